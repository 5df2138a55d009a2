"""The CUDA path (gpu-marked): compiled graphs replayed as CUDA graphs against the eager graphs on the GPU.

Run with `pytest -m gpu tests` on a CUDA machine (benchmarks/gpu_check.sh does). Every test builds tiny UNets,
so the whole file compiles in a few minutes; identical graphs across configs hit inductor's FX graph cache.
"""

import numpy as np
import pytest
import torch
from conftest import generated_code, make_unet, max_rel_error, unet_inputs
from test_runtime import scheduler

import frdiff_compile
from frdiff_compile import FRDiffConfig

pytestmark = pytest.mark.gpu

STEPS = 12
# Relative to the largest latent of a DDIM trajectory. The eager graphs and inductor's fused kernels round
# differently; fp16 trajectories of a random tiny UNet amplify that over the steps.
TOLERANCE = {torch.float32: 2e-3, torch.float16: 3e-2}


def cuda_unet(dtype, layers_per_block=1):
    return make_unet("sd15", layers_per_block=layers_per_block).to("cuda", dtype)


def cuda_inputs(dtype, batch=2):
    return {k: v.to("cuda", dtype) for k, v in unet_inputs("sd15", batch=batch).items()}


@torch.no_grad()
def trajectory(fr, cond, steps=STEPS, batch=2, size=8, seed=0, keep=None):
    """DDIM over scheduler.timesteps on the GPU (the timestep is a view, as pipelines pass it)."""
    sched = scheduler("sd15")
    sched.set_timesteps(steps, device="cuda")
    dtype = next(iter(cond.values())).dtype
    x = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)
    for t in sched.timesteps:
        out = fr(x, t, **cond).sample
        if keep is not None:
            keep.append((out, out.clone()))
        x = sched.step(out, t, x).prev_sample
    return x.float()


def eager_graphs(unet, **config):
    return frdiff_compile.optimize(unet, FRDiffConfig(compile=False, cuda_graphs=False, **config))


# One test per case, so each result is named and the per-test timeout of the device check covers one compile.
@pytest.mark.parametrize("mixing", [True, False], ids=["mixing", "no-mixing"])
@pytest.mark.parametrize("interval", [1, 2, 3], ids=["M1", "M2", "M3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_graph_trajectories_match_the_eager_graphs(dtype, interval, mixing):
    unet = cuda_unet(dtype)
    cond = cuda_inputs(dtype)
    config = {"keyframe_interval": interval, "score_mixing": mixing}
    expected = trajectory(eager_graphs(unet, **config), cond)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(**config))
    got = trajectory(fr, cond)
    err = max_rel_error(got, expected)
    assert err < TOLERANCE[dtype], f"{dtype} M={interval} mixing={mixing}: relative error {err:.2e}"
    stats = fr.stats
    assert stats.cudagraph_fallbacks == 0 and stats.recompiles == 0, stats
    assert (stats.full_replays, stats.reuse_replays) == (stats.full_calls, stats.reuse_calls), stats


def test_fifty_steps_without_recompiles_and_outputs_never_overwritten():
    unet = cuda_unet(torch.float16)
    cond = cuda_inputs(torch.float16)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=2))
    kept = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        trajectory(fr, cond, steps=50, keep=kept)
        trajectory(fr, cond, steps=50, seed=1)
    stats = fr.stats
    assert stats.compiles == 2 and stats.recompiles == 0 and stats.cudagraph_captures == 2, stats
    assert stats.full_replays == stats.full_calls == 50 and stats.reuse_replays == stats.reuse_calls, stats
    assert all(torch.equal(out, copy) for out, copy in kept), "a later replay overwrote an output already returned"
    assert len({out.data_ptr() for out, _ in kept}) == len(kept)


def test_second_generation_at_another_resolution_and_batch():
    unet = cuda_unet(torch.float16)
    fr = frdiff_compile.optimize(unet)
    eager = eager_graphs(unet)
    for batch, size in ((2, 8), (4, 16)):
        cond = cuda_inputs(torch.float16, batch=batch)
        got = trajectory(fr, cond, batch=batch, size=size)
        expected = trajectory(eager, cond, batch=batch, size=size)
        assert max_rel_error(got, expected) < TOLERANCE[torch.float16], (batch, size)
    assert fr.stats.captures == 2 and fr.stats.cudagraph_captures == 4, fr.stats


def test_cfg_pipeline_on_cuda(sd_pipe):
    stock = sd_pipe.unet
    sd_pipe.to("cuda", torch.float16)
    try:
        def generate():
            return sd_pipe(["a digit", "a cat"], num_inference_steps=10, height=32, width=32, guidance_scale=3.0,
                           generator=torch.Generator().manual_seed(0), output_type="np").images

        sd_pipe.unet = eager_graphs(stock)
        expected = generate()
        sd_pipe.unet = frdiff_compile.optimize(stock)
        got = generate()
        assert np.abs(got - expected).max() < 2e-2
        assert sd_pipe.unet.stats.reuse_replays > 0 and sd_pipe.unet.stats.eager_calls == 0, sd_pipe.unet.stats
    finally:
        sd_pipe.unet = stock
        sd_pipe.to("cpu", torch.float32)


def test_reuse_graph_code_holds_the_triton_blend_kernel():
    """Inductor sees the Triton kernel itself (triton_op), not an opaque call, in the reuse graph only."""
    unet = cuda_unet(torch.float16)
    cond = cuda_inputs(torch.float16)
    fr = frdiff_compile.optimize(unet, FRDiffConfig(cuda_graphs=False, score_mixing=False))
    _, codes = generated_code(trajectory, fr, cond, steps=2)  # a keyframe step, then a reuse step
    assert len(codes) == 2, f"expected the keyframe and reuse graphs' code, got {len(codes)} graphs"
    assert sorted("_blend_kernel" in code for code in codes) == [False, True]


# Last in the file: on the first H100 run it had not finished when the stage's time limit ended pytest
# (cause not known), so the tests before it report first.
def test_reuse_graph_runs_the_triton_blend():
    unet = cuda_unet(torch.float16)
    cond = cuda_inputs(torch.float16)
    # Without CUDA graphs the profiler sees each kernel of the compiled reuse graph.
    fr = frdiff_compile.optimize(unet, FRDiffConfig(cuda_graphs=False, score_mixing=False))
    trajectory(fr, cond, steps=2)  # a keyframe step, then a reuse step: compiles both graphs
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        trajectory(fr, cond, steps=2)
    names = {e.name for e in prof.events()}
    assert any("blend" in n for n in names), sorted(names)[:40]
