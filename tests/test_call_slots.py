"""More than one UNet call per step: each call keeps caches of its own (a call slot), matched to it by its
place in the step. The panorama pipeline's call per view is tested in test_pipeline_variants.py; here a
hand-written loop that calls the UNet for the unconditional and the conditional half apart, and (gpu-marked,
on test_cuda_runtime's compiled fp16 runtime) two calls per step under compiled graphs and CUDA graphs."""

import copy
import warnings

import pytest
import torch
from conftest import make_unet, max_rel_error, unet_inputs
from test_cuda_runtime import DEVICE, TOLERANCE, eager_graphs, trajectory, use_schedule, warm  # noqa: F401
from test_runtime import scheduler

import frdiff_compile
from frdiff_compile import FRDiffConfig
from frdiff_compile.call_slots import CallSlots

STEPS = 10


@torch.no_grad()
def cfg_apart(models, steps=STEPS, guided=lambda i: True, scale=5.0):
    """DDIM with classifier-free guidance, uncond and cond called apart at each step where `guided(i)`:
    `models` is (uncond's UNet, cond's UNet), the same one for a loop over one UNet."""
    uncond, cond = unet_inputs("sd15", batch=1, seed=1), unet_inputs("sd15", batch=1, seed=2)
    sched = scheduler("sd15")
    sched.set_timesteps(steps)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(sched.timesteps):
        eps_uncond = models[0](x, t, **uncond).sample if guided(i) else None
        eps = models[1](x, t, **cond).sample
        if eps_uncond is not None:
            eps = eps_uncond + scale * (eps - eps_uncond)
        x = sched.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("backend", [None, "emulate"])
def test_cond_and_uncond_called_apart_keep_their_caches_apart(backend):
    """One runtime serving both calls of every step gives what two runtimes, one per call, give."""
    unet = make_unet("sd15")
    assert torch.equal(cfg_apart([frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1))] * 2),
                       cfg_apart([unet, unet])), "M=1 differs from the stock UNet"
    fr = frdiff_compile.optimize(unet)
    fr.graph_backend_override = backend
    apart = [copy.copy(fr) for _ in range(2)]
    for runtime in apart:
        runtime.graph_backend_override = backend
    got, expected = cfg_apart([fr, fr]), cfg_apart(apart)
    assert torch.equal(got, expected), f"max diff {(got - expected).abs().max()}"
    s = fr.stats
    assert s.eager_calls == 0 and s.forced_keyframes == 0 and s.captures == 1, s
    assert s.full_calls == sum(r.stats.full_calls for r in apart) and s.reuse_calls > 0, s
    (entry,) = fr.graph_entries()
    assert len(entry.slots) == 2
    if backend:  # a keyframe and a reuse graph captured per slot, which serve every step
        assert s.cudagraph_captures == 4 and (s.full_replays, s.reuse_replays) == (s.full_calls, s.reuse_calls), s
    # One set of caches for both calls would have served the uncond call the cond call's features.
    shared = frdiff_compile.optimize(unet)
    shared._slots.assign = lambda signature: 0
    assert (cfg_apart([shared, shared]) - expected).abs().max() > 1e-3


def test_a_step_with_fewer_calls_stops_the_graphs_at_the_next():
    # Guidance for the first half of the steps only: the cond call is then the step's first, where the
    # uncond call was. The step that made one call is seen at the next, which runs the eager UNet.
    unet = make_unet("sd15")
    fr = frdiff_compile.optimize(unet)
    with pytest.warns(UserWarning, match=r"number of UNet calls per step.*changed.*\(2 calls, then 1\)"):
        got = cfg_apart([fr, fr], guided=lambda i: i < 5)
    s = fr.stats
    assert s.full_calls + s.reuse_calls + s.skip_steps == 2 * 5 + 1 and s.eager_calls == STEPS - 6, s
    assert torch.isfinite(got).all()


def test_a_step_with_more_calls_is_stopped_before_its_extra_call():
    unet = make_unet("sd15")
    fr = frdiff_compile.optimize(unet)
    with pytest.warns(UserWarning, match=r"number of UNet calls per step.*changed.*\(1 calls, then 2\)"):
        cfg_apart([fr, fr], guided=lambda i: i >= 4)
    s = fr.stats
    assert s.full_calls + s.reuse_calls + s.skip_steps == 5 and s.eager_calls == 1 + 2 * (STEPS - 5), s


def test_a_last_step_with_fewer_calls_is_reported_when_the_next_generation_starts():
    fr = frdiff_compile.optimize(make_unet("sd15", layers_per_block=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to report until a step or a generation follows
        cfg_apart([fr, fr], guided=lambda i: i < STEPS - 1)
    with pytest.warns(UserWarning, match=r"last generation's last step.*\(2 calls, then 1\)"):
        cfg_apart([fr, fr])
    assert fr.stats.eager_calls == 0 and fr.stats.generations == 2, fr.stats


def test_max_calls_per_step_bounds_the_slots():
    unet = make_unet("sd15", layers_per_block=1)
    stock = cfg_apart([unet, unet])
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=1, max_calls_per_step=1))
    with pytest.warns(UserWarning, match=r"more than max_calls_per_step=1 times with .* MiB.*raise"):
        assert torch.equal(cfg_apart([fr, fr]), stock)
    assert fr.stats.full_calls == 1 and fr.stats.eager_calls == 2 * STEPS - 1, fr.stats
    fr.reconfigure(FRDiffConfig(keyframe_interval=1, max_calls_per_step=2))
    assert torch.equal(cfg_apart([fr, fr]), stock)
    (entry,) = fr.graph_entries()
    assert len(entry.slots) == 2
    fr.reconfigure(FRDiffConfig(max_calls_per_step=1))  # frees the slot it no longer allows
    assert len(entry.slots) == 1


def test_call_slots_count_per_signature_and_step():
    slots = CallSlots()
    a, b = ("a",), ("b",)
    assert [slots.assign(a), slots.assign(b), slots.assign(a)] == [0, 0, 1]
    assert slots.new_step() is None  # the first step sets the counts: a twice, b once
    assert [slots.assign(b), slots.assign(a), slots.assign(a)] == [0, 0, 1]
    assert "2 calls, then 3" in slots.assign(a)
    assert slots.new_step() is None  # a step without one of the signatures is not a change
    slots.assign(a)
    assert "2 calls, then 1" in slots.new_step()
    slots.assign(a)
    slots.assign(a)
    assert slots.new_generation() is None
    assert [slots.assign(a) for _ in range(3)] == [0, 1, 2]
    assert slots.new_step() is None
    slots.assign(a)  # the generation's last step made fewer calls: known when the next generation starts
    assert "3 calls, then 1" in slots.new_generation()
    assert [slots.assign(a) for _ in range(3)] == [0, 1, 2]


@pytest.mark.gpu
@pytest.mark.cpu_emulation
def test_two_calls_per_step_under_compiled_graphs_and_cuda_graphs(warm):  # noqa: F811 - the imported fixture
    """The second call of every step gets buffers and CUDA graphs of its own over the same compiled graphs:
    no compile, and each call's trajectory is the one it has alone."""
    unet, cond, fr = warm(torch.float16)
    use_schedule(fr)
    trajectory(fr, cond, steps=2)  # the first slot's graphs captured, whatever ran before
    before = copy.copy(fr.stats)
    sched = scheduler("sd15")
    sched.set_timesteps(STEPS, device=DEVICE)
    xs = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.float16)
          for seed in range(2)]
    with torch.no_grad():
        for t in sched.timesteps:  # DDIM's step keeps no state between calls
            xs = [sched.step(fr(x, t, **cond).sample, t, x).prev_sample for x in xs]
    for seed, got in enumerate(xs):
        err = max_rel_error(got.float(), trajectory(eager_graphs(unet), cond, steps=STEPS, seed=seed))
        assert err < TOLERANCE[torch.float16], f"call {seed}: relative error {err:.2e}"
    new = fr.stats.since(before)
    assert (new.compiles, new.recompiles, new.captures, new.cudagraph_fallbacks, new.eager_calls) == (0,) * 5, new
    assert new.cudagraph_captures == 2, new  # the second slot's keyframe and reuse graphs
    assert (new.full_replays, new.reuse_replays) == (new.full_calls, new.reuse_calls), new
