"""bench_peers' providers on CPU: the dry run of every provider, and each variant's wiring (the UNet it runs
on, the graphs it shares, the inductor settings it compiles under), and the baselines computing what the stock
UNet and DeepCache compute. What they measure needs a GPU (benchmarks/gpu_check.sh)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_bench_peers_dry_run_measures_every_requested_provider(tmp_path):
    out = tmp_path / "peers.csv"
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_peers.py"), "--dry-run",
         "--providers",
         "eager,compiled-static,compiled-static-nchw,frdiff-m2,frdiff-m3,frdiff-m2-nocg,frdiff-m3-nocg,frdiff-deep3,"
         "frdiff-deep2,compiled-static-cl,frdiff-m2-cl,frdiff-m3-cl,frdiff-m2-lo,frdiff-m3-lo,frdiff-m2-combo,"
         "frdiff-m3-combo",
         "--csv", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with out.open() as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"eager", "compiled-static", "compiled-static-nchw", "frdiff-m2", "frdiff-m3", "frdiff-m2-nocg",
                         "frdiff-m3-nocg", "frdiff-deep3", "frdiff-deep2", "compiled-static-cl", "frdiff-m2-cl",
                         "frdiff-m3-cl", "frdiff-m2-lo", "frdiff-m3-lo", "frdiff-m2-combo", "frdiff-m3-combo"}
    assert all(float(r["loop_ms"]) > 0 for r in rows.values()), rows
    frdiff = rows["frdiff-m2"]
    assert float(frdiff["keyframe_ms"]) > 0 and float(frdiff["model_ms"]) > 0
    assert "2/1/1 full/reuse/skip" in frdiff["note"]
    assert float(rows["compiled-static"]["vs_eager"]) > 0 and float(frdiff["vs_compiled_static"]) > 0
    assert float(frdiff["vs_compiled_static_nchw"]) > 0
    assert float(frdiff["vs_all_keyframes"]) > 0 and float(frdiff["compile_s"]) >= 0
    assert float(frdiff["graphs_loop_ms"]) > 0 and frdiff["runtime_host_ms"] != ""
    # M=3 runs M=2's graphs under its own schedule, and its counters are its own.
    m3 = rows["frdiff-m3"]["note"]
    assert m3.startswith("graphs of frdiff-m2 (reconfigure); 2/1/1 full/reuse/skip") and "0 graphs" in m3, m3
    m3 = rows["frdiff-m3-nocg"]["note"]  # without CUDA graphs: on the graphs of frdiff-m2-nocg
    assert m3.startswith("graphs of frdiff-m2-nocg (reconfigure); 2/1/1") and "0 graphs" in m3, m3
    # DeepCache's method on frdiff's graphs: no score mixing, so no skip steps; interval 2 on interval 3's graphs.
    assert rows["frdiff-deep3"]["note"].startswith("2/2/0 full/reuse/skip"), rows["frdiff-deep3"]["note"]
    deep2 = rows["frdiff-deep2"]["note"]
    assert deep2.startswith("graphs of frdiff-deep3 (reconfigure); 2/2/0") and "0 graphs" in deep2, deep2
    # On the channels_last copy of the UNet: its own graphs (M=3 on M=2-cl's), judged against the CL stock too.
    assert rows["frdiff-m2-cl"]["note"].startswith("2/1/1") and float(rows["frdiff-m2-cl"]["vs_compiled_static_cl"]) > 0
    m3 = rows["frdiff-m3-cl"]["note"]
    assert m3.startswith("graphs of frdiff-m2-cl (reconfigure); 2/1/1") and "0 graphs" in m3, m3
    m3 = rows["frdiff-m3-lo"]["note"]  # inductor's conv layout: graphs of their own, M=3 on M=2-lo's
    assert m3.startswith("graphs of frdiff-m2-lo (reconfigure); 2/1/1") and "0 graphs" in m3, m3
    m3 = rows["frdiff-m3-combo"]["note"]  # inductor's combo kernels: graphs of their own, M=3 on M=2-combo's
    assert m3.startswith("graphs of frdiff-m2-combo (reconfigure); 2/1/1") and "0 graphs" in m3, m3


def test_bench_peers_quantizes_the_unet_every_provider_runs_on(tmp_path):
    pytest.importorskip("torchao.quantization", reason="torchao (the test extra) is not installed")
    from bench_peers import quantized
    from conftest import make_unet

    unet = make_unet("sd15")
    assert quantized(unet, "none") is unet and type(unet.conv_in.weight) is torch.nn.Parameter
    linear = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert quantized(unet, "int8-weight-only") is unet and type(linear.weight).__name__ == "Int8Tensor"
    assert type(unet.conv_in.weight) is torch.nn.Parameter  # torchao's configs quantize Linear layers only
    out = tmp_path / "quant.csv"
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_peers.py"), "--dry-run", "--quantize", "int8-weight-only",
         "--providers", "compiled-static,frdiff-m2", "--csv", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with out.open() as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert {r["quantize"] for r in rows.values()} == {"int8-weight-only"} and not rows["compiled-static"]["note"]
    assert float(rows["frdiff-m2"]["vs_compiled_static"]) > 0 and "2/1/1 full/reuse/skip" in rows["frdiff-m2"]["note"]


def test_channels_last_providers_run_on_one_converted_copy_of_the_unet():
    from bench_peers import channels_last_copy, frdiff_config, graphs_of
    from conftest import make_unet

    unet, copies = make_unet("sd15"), {}
    cl = channels_last_copy(unet, copies)
    assert cl is not unet and channels_last_copy(unet, copies) is cl
    assert cl.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and unet.conv_in.weight.is_contiguous()
    assert graphs_of("frdiff-m3-cl") == "frdiff-m2-cl" and graphs_of("frdiff-m3-nocg") == "frdiff-m2-nocg"
    config = frdiff_config("frdiff-m3-cl", "cuda")
    assert config.keyframe_interval == 3 and config.cuda_graphs is None and config.cache_point == "features"
    assert frdiff_config("frdiff-m2-nocg", "cuda").cuda_graphs is False
    assert config.conv_layout == "traced" and frdiff_config("frdiff-m3-lo", "cuda").conv_layout == "inductor"
    assert graphs_of("frdiff-m3-lo") == "frdiff-m2-lo"


def test_combo_providers_compile_their_graphs_with_inductors_combo_kernels_on(monkeypatch):
    """frdiff-m2-combo's graphs reach inductor while combo_kernels is on, which the runtime's own options leave
    as set; the other providers' do not (inductor itself is a spy here: the setting, not the kernels)."""
    from bench_peers import build, graphs_of, inductor_patches
    from conftest import make_unet, unet_inputs
    from test_runtime import optimized_fn, sample, scheduler

    import frdiff_compile.compiled_graph

    seen = []

    def spy(gm, args, options):
        seen.append((torch._inductor.config.combo_kernels, "combo_kernels" in options))
        return gm  # the graph itself runs in place of its compiled code

    monkeypatch.setattr(frdiff_compile.compiled_graph, "compile_with_inductor", spy)
    unet, cond = make_unet("sd15"), unet_inputs("sd15")
    for name, expected in (("frdiff-m2-combo", True), ("frdiff-m2", False)):
        seen.clear()
        with inductor_patches(name):
            fr = build(name, unet, scheduler("sd15"), "cpu", {})
            sample(optimized_fn(fr, cond), scheduler("sd15"), 4)
        assert seen == [(expected, False)] * 2, (name, seen)  # the keyframe graph, then the reuse graph
    assert not torch._inductor.config.combo_kernels
    assert graphs_of("frdiff-m3-combo") == "frdiff-m2-combo"


def test_direct_graph_loop_follows_the_runtimes_schedule():
    """bench_peers' `runtime_host_ms` compares two loops: they must compute the same thing."""
    import torch
    from common import DirectGraphs
    from conftest import make_unet, unet_inputs
    from diffusers import DDIMScheduler

    import frdiff_compile
    from frdiff_compile import FRDiffConfig, build_schedule

    unet, cond, steps = make_unet("sd15"), unet_inputs("sd15"), 8
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=3, mix_bias=0.3))
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(steps)

    def final_latents(model):
        x = latents.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t, **cond).sample, t, x).prev_sample
        return x

    with torch.no_grad():
        through_runtime = final_latents(fr)
        entry, _ = fr.prepare(latents, scheduler.timesteps[0], **cond)
        schedule = build_schedule(steps, fr.frdiff_config)
        direct = final_latents(DirectGraphs(entry, schedule))
    assert schedule.counts()["reuse"] and schedule.counts()["skip"]  # every kind of step is compared
    assert torch.equal(direct, through_runtime)


def test_compiled_deepcache_peer_is_deepcache_compiled_into_three_graphs():
    """bench_peers' compiled DeepCache must run DeepCache's method: the trajectories the package gives
    eagerly, two generations in a row, from three dynamo graphs (as the package comes, compiling its UNet
    recompiles at every step: the block wrappers read the step number)."""
    pytest.importorskip("DeepCache")
    import torch
    from common import deepcache
    from conftest import make_unet, unet_inputs
    from diffusers import DDIMScheduler
    from torch._dynamo.utils import counters

    unet, cond, steps = make_unet("sd15", layers_per_block=1), unet_inputs("sd15"), 9
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def two_generations(model, scheduler):
        finals = []
        for _ in range(2):
            scheduler.set_timesteps(steps)
            x = latents.clone()
            for t in scheduler.timesteps:
                x = scheduler.step(model(x, t, **cond).sample, t, x).prev_sample
            finals.append(x)
        return finals

    eager_scheduler, compiled_scheduler = DDIMScheduler(), DDIMScheduler()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        stock = two_generations(unet, DDIMScheduler())
        expected = two_generations(deepcache(unet, eager_scheduler, interval=3), eager_scheduler)
        got = two_generations(deepcache(unet, compiled_scheduler, interval=3, compile_backend="eager"),
                              compiled_scheduler)
    assert not torch.allclose(expected[0], stock[0], atol=1e-3)  # shallow steps do read DeepCache's cache
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert counters["stats"]["unique_graphs"] == 3


def test_static_stock_baseline_returns_the_stock_unet_output():
    """The compiled-stock baseline must compute what the stock UNet computes, call after call."""
    import torch
    from bench_peers import StaticStock
    from conftest import make_unet, unet_inputs

    unet = make_unet("sd15")
    stock = StaticStock(unet, mode="dry")  # emulated capture: the same static buffers as on CUDA
    kept = []
    with torch.no_grad():
        for seed, t in ((0, 999), (1, 500)):
            call = unet_inputs("sd15", seed=seed)
            sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
            got = stock(sample, torch.tensor(t), **call).sample
            assert torch.allclose(got, unet(sample, t, **call).sample, atol=1e-5)
            kept.append((got, got.clone()))
    assert all(torch.equal(a, b) for a, b in kept), "a later call overwrote an output already returned"
