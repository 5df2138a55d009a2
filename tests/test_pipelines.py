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
