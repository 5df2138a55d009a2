"""A real client: unmodified diffusers SD and SDXL pipelines, built from tiny components, run the
optimized UNet."""

import numpy as np
import pytest
import torch
from frdiff_reference import EagerFRDiff

import frdiff_compile
from frdiff_compile import FRDiffConfig


def generate(pipe, steps, size, seed=0):
    return pipe(
        ["a digit", "a cat"], num_inference_steps=steps, height=size, width=size, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images


def reference_images(pipe, calls, interval):
    ref = EagerFRDiff(pipe.unet, interval=interval)
    ref.hook_unet(pipe.scheduler)
    try:
        return [generate(pipe, steps, size) for steps, size in calls]
    finally:
        ref.remove()


@pytest.mark.parametrize("name", ["sd_pipe", "sdxl_pipe"])
def test_pipeline_runs_optimized_unet(name, request):
    pipe = request.getfixturevalue(name)
    stock = pipe.unet
    calls = [(10, 16), (7, 32)]  # two consecutive calls: other step count, other resolution
    expected_full = generate(pipe, 6, 16)
    expected_frdiff = reference_images(pipe, calls, interval=2)
    try:
        pipe.unet = frdiff_compile.optimize(stock, FRDiffConfig(keyframe_interval=1))
        assert np.array_equal(generate(pipe, 6, 16), expected_full), f"{name}: M=1 image differs from stock"
        pipe.unet = frdiff_compile.optimize(stock, FRDiffConfig(keyframe_interval=2))
        for (steps, size), expected in zip(calls, expected_frdiff):
            got = generate(pipe, steps, size)
            err = np.abs(got - expected).max()
            assert err < 1e-4, f"{name}: steps={steps} size={size} image differs from eager FRDiff by {err}"
        stats = pipe.unet.stats
        assert stats.generations == 2 and stats.eager_calls == 0 and stats.reuse_calls > 0, stats
        assert stats.forced_keyframes == 0, stats
    finally:
        pipe.unet = stock


def test_pag_and_plain_pipelines_sharing_the_unet_switch_graphs_without_rebuilding(sd_pipe):
    # diffusers' PAG pipeline swaps attention processors in for each call and restores them after it, so the
    # UNet's settings alternate when it serves a plain pipeline too: each setting's graphs are built once.
    from diffusers import StableDiffusionPAGPipeline

    stock = sd_pipe.unet
    pag = StableDiffusionPAGPipeline(**sd_pipe.components, requires_safety_checker=False, pag_applied_layers=["mid"])
    pag.set_progress_bar_config(disable=True)
    run = {"pag": lambda: generate(pag, 4, 16), "plain": lambda: generate(sd_pipe, 4, 16)}
    expected = {name: fn() for name, fn in run.items()}
    try:
        sd_pipe.unet = pag.unet = frdiff_compile.optimize(stock, FRDiffConfig(keyframe_interval=1))
        for name in ("pag", "plain", "pag", "plain"):
            assert np.array_equal(run[name](), expected[name]), name
        assert sd_pipe.unet.stats.captures == 2 and sd_pipe.unet.stats.eager_calls == 0, sd_pipe.unet.stats
    finally:
        sd_pipe.unet = stock
