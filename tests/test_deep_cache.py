"""`FRDiffConfig(cache_point="deep")`: DeepCache's method (its branch 0) served by the same two graphs.

The oracle is the DeepCache package itself (a test dependency), run eagerly on a copy of the UNet: the runtime
must give its trajectories bit for bit, while its reuse graph computes only the shallow branch. A gpu-marked
test runs the deep cache point under compiled graphs and CUDA graphs (test_cuda_runtime's helpers).
"""

import copy
import functools
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import make_unet, max_rel_error, unet_inputs
from diffusers import DDIMScheduler, UNet2DConditionModel

import frdiff_compile
from frdiff_compile import FRDiffConfig
from frdiff_compile.passes import CallLayout, build_graphs, capture, plan_cache_points
from frdiff_compile.passes.plan import DEEP_FEATURE

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from bench_flops import counted, deepcache_shallow  # noqa: E402
from common import deepcache  # noqa: E402
from test_cuda_runtime import TOLERANCE, compiled, device_inputs, device_unet, eager_graphs, trajectory  # noqa: E402
from test_runtime import controlnet_residuals, non_sd_unet  # noqa: E402

STEPS = 9


def two_generations(model, scheduler, cond, latents):
    """Two DDIM generations; `cond` is the conditioning, or a function of the timestep giving it."""
    finals = []
    with torch.no_grad():
        for _ in range(2):
            scheduler.set_timesteps(STEPS)
            x = latents.clone()
            for t in scheduler.timesteps:
                eps = model(x, t, **(cond(t) if callable(cond) else cond)).sample[:, :x.shape[1]]  # noise half
                x = scheduler.step(eps, t, x).prev_sample
            finals.append(x)
    return finals


def deepcache_reference(unet, cond, latents, interval, scheduler_type=DDIMScheduler):
    scheduler = scheduler_type()
    return two_generations(deepcache(unet, scheduler, interval=interval), scheduler, cond, latents)


@pytest.mark.parametrize("kind,layers,backend", [("sd15", 1, None), ("sdxl", 2, None), ("sd15", 2, "emulate")])
def test_deep_cache_point_gives_deepcaches_trajectories(kind, layers, backend):
    pytest.importorskip("DeepCache")
    unet, cond = make_unet(kind, layers_per_block=layers), unet_inputs(kind)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = deepcache_reference(unet, cond, latents, interval=3)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(cache_point="deep", keyframe_interval=3))
    fr.graph_backend_override = backend
    got = two_generations(fr, DDIMScheduler(), cond, latents)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)), [(a - b).abs().max() for a, b in zip(got, expected)]
    stock = two_generations(unet, DDIMScheduler(), cond, latents)
    assert not torch.allclose(expected[0], stock[0], atol=1e-3)  # the shallow steps do read the cache
    s = fr.stats  # no score mixing by default with the deep cache point: every non-keyframe step calls
    assert (s.full_calls, s.reuse_calls, s.skip_steps, s.eager_calls, s.captures) == (6, 12, 0, 0, 1), s
    if backend:
        assert s.cudagraph_captures == 2 and (s.full_replays, s.reuse_replays) == (6, 12), s


@pytest.mark.parametrize("variant", ["deepfloyd_if", "kandinsky22", "controlnet"])
def test_deep_cache_point_on_other_unets_and_with_controlnet_residuals(variant):
    """Scale-shift resnets that resample inside and simple cross-attention (IF, Kandinsky 2.2): the last up
    block's concatenation is the same; ControlNet's residuals enter the skip the last layer reads, fresh."""
    pytest.importorskip("DeepCache")
    if variant == "controlnet":
        unet, cond = make_unet("sd15"), lambda t: {**unet_inputs("sd15"), **controlnet_residuals(t)}
    else:
        unet, cond = non_sd_unet(variant)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler_type = functools.partial(DDIMScheduler, clip_sample=False)
    expected = deepcache_reference(unet, cond, latents, interval=3, scheduler_type=scheduler_type)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(cache_point="deep", keyframe_interval=3))
    got = two_generations(fr, scheduler_type(), cond, latents)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)), [(a - b).abs().max() for a, b in zip(got, expected)]
    assert (fr.stats.reuse_calls, fr.stats.eager_calls) == (12, 0), fr.stats


def hooked_deep_reference(unet, interval):
    """DeepCache's branch 0 as module hooks, for STEPS-step generations: at a keyframe the module feeding the last
    up layer's concatenation keeps a copy of its output; at other steps it returns a copy of that copy."""
    state = {"calls": 0, "cache": None}

    def count(module, args):
        state["calls"] += 1

    def feed(module, args, output):  # the up block calls its transformers with return_dict=False
        if (state["calls"] - 1) % STEPS % interval == 0:
            state["cache"] = output[0].clone()
            return None
        return (state["cache"].clone(),)

    unet.register_forward_pre_hook(count)
    unet.up_blocks[-1].attentions[-2].register_forward_hook(feed)
    return unet


def test_a_deep_point_written_in_place_later_is_read_through_a_copy():
    """FreeU scales half the hidden state's channels in place just before the last layer's concatenation (on a
    UNet with two up blocks its second stage is the last block): a reuse step must scale a copy of the cache,
    once, as the keyframe scaled the computed tensor. Before, the reuse graph scaled the cache itself, again at
    every step. (So does the DeepCache package, which keeps the very tensor FreeU scales; hence hooks here.)"""
    unet, cond = make_unet("sd15", layers_per_block=1), unet_inputs("sd15")
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fr = frdiff_compile.optimize(unet, FRDiffConfig(cache_point="deep", keyframe_interval=3))
    got = two_generations(fr, DDIMScheduler(), cond, latents)
    expected = two_generations(hooked_deep_reference(copy.deepcopy(unet), 3), DDIMScheduler(), cond, latents)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)), [(a - b).abs().max() for a, b in zip(got, expected)]
    (entry,) = fr.graph_entries()
    assert [p.written for p in entry.plan.points] == [True], entry.plan
    assert not torch.allclose(got[0], two_generations(unet, DDIMScheduler(), cond, latents)[0], atol=1e-3)


def _captured(unet, kwargs):
    layout, tensors = CallLayout.from_call(kwargs)
    return capture(unet, layout, tensors), tensors


@torch.no_grad()
def test_deep_reuse_graph_computes_only_the_shallow_branch():
    """The reuse graph keeps conv_in, the time embedding, the last up block's last layer and conv_out, and
    does exactly the FLOPs of DeepCache's own shallow call."""
    unet = make_unet("sd15")
    kwargs = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor(500), **unet_inputs("sd15"))
    captured, tensors = _captured(unet, kwargs)
    plan = plan_cache_points(captured.graph_module, unet, cache_point="deep")
    (point,) = plan.points
    assert (point.kind, point.module, point.shape) == (DEEP_FEATURE, "up_blocks.1.resnets.2", (2, 32, 8, 8)), plan
    assert not plan.skipped and plan.shortfall() is None and "1 deep feature" in str(plan)
    pair = build_graphs(captured.graph_module, plan)
    kept = set()  # the innermost UNet module of every node the reuse graph keeps
    for node in pair.reuse.graph.nodes:
        paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        kept.add(paths[-1].removeprefix(captured.module_prefix.rstrip(".")).lstrip(".") if paths else "")
    shallow = ("conv_in", "time_proj", "time_embedding", "up_blocks.1.resnets.2", "up_blocks.1.attentions.2",
               "conv_norm_out", "conv_act", "conv_out")
    outside = {p for p in kept
               if p not in ("", "up_blocks.1") and not any(p == r or p.startswith(r + ".") for r in shallow)}
    assert not outside, outside
    assert {"up_blocks.1.resnets.2.conv1", "up_blocks.1.attentions.2.proj_out", "conv_out"} <= kept, kept

    expected = unet(**kwargs).sample
    cache, keyframe_out = torch.empty(point.shape), torch.empty_like(expected)
    assert torch.equal(pair.keyframe(*tensors, cache, keyframe_out), expected)
    assert torch.equal(pair.reuse(*tensors, cache, keyframe_out, torch.tensor(1.0)), expected)
    reuse = counted(lambda: pair.reuse(*tensors, cache, keyframe_out, torch.tensor(1.0)))["Global"]
    assert reuse == deepcache_shallow(unet, kwargs["sample"], unet_inputs("sd15"), branch=0)
    assert reuse < 0.35 * counted(lambda: unet(**kwargs))["Global"]


def test_full_size_sd15_deep_point_on_meta():
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()
    kwargs = dict(sample=torch.empty(2, 4, 64, 64, device="meta"),
                  timestep=torch.empty((), dtype=torch.int64, device="meta"),
                  encoder_hidden_states=torch.empty(2, 77, 768, device="meta"))
    captured, _ = _captured(unet, kwargs)
    plan = plan_cache_points(captured.graph_module, unet, cache_point="deep")
    (point,) = plan.points
    assert point.module == "up_blocks.3.resnets.2" and point.shape == (2, 320, 64, 64), str(plan)
    report = build_graphs(captured.graph_module, plan).report
    assert report.reuse["attention"] == 2 and report.reuse["conv"] <= 8, str(report)


def test_a_unet_without_a_deep_feature_is_named_with_what_to_do():
    unet = make_unet("sd15", layers_per_block=1)
    kwargs = dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor(3), **unet_inputs("sd15", batch=1))
    captured, _ = _captured(unet, kwargs)
    plan = plan_cache_points(captured.graph_module, types.SimpleNamespace(up_blocks=[]), cache_point="deep")
    assert plan.points == () and plan.skipped == (("up_blocks", "the UNet has no up blocks"),)
    text = plan.shortfall()
    assert "cache_point='deep' found no deep feature" in text and "use cache_point='features'" in text, text
    with pytest.raises(ValueError, match="cache_point must be one of"):
        plan_cache_points(captured.graph_module, unet, cache_point="shallow")


def test_reconfigure_between_cache_points_builds_each_pair_and_serves_each_method():
    pytest.importorskip("DeepCache")
    unet, cond = make_unet("sd15", layers_per_block=1), unet_inputs("sd15")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=3, score_mixing=False))
    features = two_generations(fr, DDIMScheduler(), cond, latents)
    fr.reconfigure(FRDiffConfig(keyframe_interval=3, cache_point="deep"))
    deep = two_generations(fr, DDIMScheduler(), cond, latents)
    assert all(torch.equal(a, b) for a, b in zip(deep, deepcache_reference(unet, cond, latents, interval=3)))
    assert not torch.allclose(deep[0], features[0], atol=1e-3)
    fr.reconfigure(FRDiffConfig(keyframe_interval=3, score_mixing=False))
    again = two_generations(fr, DDIMScheduler(), cond, latents)
    assert all(torch.equal(a, b) for a, b in zip(again, features))
    assert fr.stats.captures == 3 and fr.stats.eager_calls == 0, fr.stats


@pytest.mark.gpu
@pytest.mark.cpu_emulation
def test_deep_cache_point_under_compiled_graphs_and_cuda_graphs():
    """Two graphs compiled once and captured once serve a 12-step generation; the trajectory is the eager
    graphs' (which equal DeepCache's own, above)."""
    unet, cond = device_unet(torch.float16), device_inputs(torch.float16)
    config = {"cache_point": "deep", "keyframe_interval": 3}
    fr = compiled(unet, **config)
    got = trajectory(fr, cond)
    err = max_rel_error(got, trajectory(eager_graphs(unet, **config), cond))
    assert err < TOLERANCE[torch.float16], f"relative error {err:.2e}"
    s = fr.stats
    assert (s.compiles, s.recompiles, s.cudagraph_captures, s.cudagraph_fallbacks, s.eager_calls) == (2, 0, 2, 0, 0), s
    assert (s.full_replays, s.reuse_replays, s.skip_steps) == (s.full_calls, s.reuse_calls, 0) == (4, 8, 0), s
