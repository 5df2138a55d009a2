"""More unmodified diffusers pipelines on the optimized UNet, each a way of calling it the plain pipelines do not:
img2img (starts mid-schedule), inpainting (a 9-channel UNet), LCM (`timestep_cond`), a ControlNet
(`down_block_additional_residuals`), a T2I-Adapter (`down_intrablock_additional_residuals`), InstructPix2Pix (an
8-channel UNet called with a batch of 3), SDXL's base-to-refiner handoff (`denoising_end` then
`denoising_start`) and dynamic classifier-free guidance (the batch halves mid-generation); and one the graphs
must not serve, self-attention guidance.

Each runs at M=1, which must give the stock pipeline's images bit for bit, and at M=2, which must give the
images of the independent eager reference (`frdiff_reference.EagerFRDiff`) hooked into the same pipeline.
"""

import numpy as np
import pytest
import torch
from conftest import make_unet, max_rel_error
from frdiff_reference import EagerFRDiff
from tiny_pipelines import HIDDEN

import frdiff_compile
from frdiff_compile import FRDiffConfig

SIZE = 32  # pixels; the tiny VAE downsamples once, so 16x16 latents
STEPS = 10


def _image(seed: int, channels: int = 3) -> torch.Tensor:
    return torch.rand(1, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _run(pipe, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return pipe("a digit", generator=torch.Generator().manual_seed(0), **kwargs).images


def _parts(sd_pipe) -> dict:
    """The SD fixture's components, less the image encoder that the pipelines below do not take."""
    return {k: v for k, v in sd_pipe.components.items() if k != "image_encoder"}


def _variant(sd_pipe, name: str):
    """The pipeline `name` over the SD fixture's text encoder, tokenizer and VAE, and its call's arguments."""
    from diffusers import (
        ControlNetModel,
        LCMScheduler,
        StableDiffusionAdapterPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
        T2IAdapter,
    )

    parts = _parts(sd_pipe)
    size = {"height": SIZE, "width": SIZE}
    if name == "img2img":  # strength 0.6 of 10 steps starts at step 4: a keyframe of the reference's schedule
        pipe, kwargs = StableDiffusionImg2ImgPipeline(**parts), {"image": _image(1), "strength": 0.6}
    elif name == "inpaint":
        parts["unet"] = make_unet("sd15", cross_attention_dim=HIDDEN, in_channels=9)
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., 8:24, 8:24] = 1
        pipe, kwargs = StableDiffusionInpaintPipeline(**parts), {"image": _image(1), "mask_image": mask, **size}
    elif name == "lcm":  # the guidance scale goes in as an embedding, `timestep_cond`, and the batch is 1
        parts["unet"] = make_unet("sd15", cross_attention_dim=HIDDEN, time_cond_proj_dim=16)
        parts["scheduler"] = LCMScheduler()
        pipe, kwargs = StableDiffusionPipeline(**parts), {"guidance_scale": 6.0, **size}
    elif name == "controlnet":  # residuals for every skip connection and the mid block, off after half the steps
        controlnet = ControlNetModel.from_unet(sd_pipe.unet, conditioning_embedding_out_channels=(8, 16)).eval()
        with torch.no_grad():  # its zero convs start at zero: residuals of zero would test nothing
            for p in controlnet.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        pipe = StableDiffusionControlNetPipeline(**parts, controlnet=controlnet)
        kwargs = {"image": _image(2), "control_guidance_end": 0.5, **size}
    elif name == "pix2pix":  # an 8-channel UNet (latents, image latents) under a batch of 3 (text, image, none)
        parts["unet"] = make_unet("sd15", cross_attention_dim=HIDDEN, in_channels=8)
        pipe, kwargs = StableDiffusionInstructPix2PixPipeline(**parts), {"image": _image(1)}
    else:
        torch.manual_seed(3)
        adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2).eval()
        pipe, kwargs = StableDiffusionAdapterPipeline(**parts, adapter=adapter), {"image": _image(2), **size}
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def _reference(pipe, run, mask=None):
    reference = EagerFRDiff(pipe.unet, interval=2, mask=mask)
    reference.hook_unet(pipe.scheduler)
    try:
        return run()
    finally:
        reference.remove()


def _optimized(pipes, interval: int, run):
    """`run()` with every pipe in `pipes` sharing one runtime over their (one) UNet; the runtime's stats."""
    stock = pipes[0].unet
    runtime = frdiff_compile.optimize(stock, FRDiffConfig(keyframe_interval=interval))
    for pipe in pipes:
        pipe.unet = runtime
    try:
        return run(), runtime.stats
    finally:
        for pipe in pipes:
            pipe.unet = stock


def _assert_close(got, want, what: str) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    err = np.abs(got - want).max()
    assert err < 1e-4, f"{what}: differs from the eager reference by {err}"


@pytest.mark.parametrize("name", ["img2img", "inpaint", "lcm", "controlnet", "t2i_adapter", "pix2pix"])
def test_pipeline_variant_matches_stock_and_the_eager_reference(sd_pipe, name):
    pipe, kwargs = _variant(sd_pipe, name)
    run = lambda: _run(pipe, **kwargs)  # noqa: E731
    stock, reference = run(), _reference(pipe, run)
    got, stats = _optimized([pipe], 1, run)
    assert np.array_equal(got, stock), f"{name}: M=1 image differs from stock"
    got, stats = _optimized([pipe], 2, run)
    _assert_close(got, reference, f"{name} at M=2")
    assert stats.eager_calls == 0 and stats.reuse_calls > 0 and stats.forced_keyframes == 0, stats


def test_sdxl_base_to_refiner_handoff_on_one_runtime(sdxl_pipe):
    # The base stops at 60% of the schedule and hands latents to img2img, which starts there: two
    # generations of one schedule, the second starting at step 6 (a keyframe of the reference's schedule).
    from diffusers import StableDiffusionXLImg2ImgPipeline

    refiner = StableDiffusionXLImg2ImgPipeline(**sdxl_pipe.components)
    refiner.set_progress_bar_config(disable=True)

    def run():
        g = torch.Generator().manual_seed(0)
        latents = sdxl_pipe("a digit", num_inference_steps=STEPS, denoising_end=0.6, height=SIZE, width=SIZE,
                            output_type="latent", generator=g).images
        images = refiner("a digit", image=latents, num_inference_steps=STEPS, denoising_start=0.6,
                         output_type="np", generator=g).images
        return latents, images

    stock, reference = run(), _reference(sdxl_pipe, run)
    got, stats = _optimized([sdxl_pipe, refiner], 1, run)
    assert torch.equal(got[0], stock[0]) and np.array_equal(got[1], stock[1]), "M=1 differs from stock"
    got, stats = _optimized([sdxl_pipe, refiner], 2, run)
    assert (got[0] - reference[0]).abs().max() < 1e-4 * reference[0].abs().max(), "base latents at M=2"
    _assert_close(got[1], reference[1], "refined images at M=2")
    assert stats.generations == 2 and stats.eager_calls == 0 and stats.reuse_calls > 0, stats


def test_dynamic_cfg_halving_the_batch_mid_generation_forces_one_keyframe(sd_pipe):
    """diffusers' documented dynamic-CFG callback drops the unconditional half of the batch after 40% of the
    steps. The batch-1 graphs have no cache from this generation, so their first step (a reuse step of the
    schedule) runs full compute: the reference is the eager FRDiff with that step added to its keyframes."""
    switch = int(STEPS * 0.4)

    def dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
        if step_index == switch:
            pipe._guidance_scale = 0.0
            callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[-1]
        return callback_kwargs

    run = lambda: _run(sd_pipe, height=SIZE, width=SIZE, callback_on_step_end=dynamic_cfg,  # noqa: E731
                       callback_on_step_end_tensor_inputs=["prompt_embeds"])
    keyframes = [i % 2 == 0 or i == switch + 1 for i in range(STEPS)]
    stock, reference = run(), _reference(sd_pipe, run, mask=keyframes)
    got, stats = _optimized([sd_pipe], 1, run)
    assert np.array_equal(got, stock), "M=1 image differs from stock"
    got, stats = _optimized([sd_pipe], 2, run)
    _assert_close(got, reference, "dynamic CFG at M=2")
    assert stats.forced_keyframes == 1 and stats.eager_calls == 0, stats


def test_sag_pipeline_runs_the_eager_unet_and_equals_stock(sd_pipe):
    """Self-attention guidance reads the UNet's internals after each call: its store processor's attention
    maps and, through a torch forward hook, the mid block's output size. Graphs run neither, so every call
    runs the eager UNet (before, the first step ran the graphs and the image differed from stock by 0.16)."""
    from diffusers import StableDiffusionSAGPipeline

    pipe = StableDiffusionSAGPipeline(**_parts(sd_pipe))
    pipe.set_progress_bar_config(disable=True)
    run = lambda: _run(pipe, num_inference_steps=4, height=SIZE, width=SIZE, sag_scale=0.75)  # noqa: E731
    stock = run()
    with pytest.warns(UserWarning, match="forward hook StableDiffusionSAGPipeline"):
        got, stats = _optimized([pipe], 1, run)
    assert np.array_equal(got, stock), "SAG image differs from stock"
    assert stats.full_calls == 0 and stats.eager_calls > 0, stats


def test_panorama_runs_the_graphs_with_a_call_per_view_or_its_views_batched(sd_pipe):
    """MultiDiffusion's panorama pipeline calls the UNet once per batch of views (windows of the latents) at
    each step, by default once per view. Each call keeps caches of its own (a call slot), so a call per view
    gives what one call over all views gives: each view's denoising is the method applied to that view."""
    import diffusers

    if not hasattr(diffusers, "StableDiffusionPanoramaPipeline"):  # deprecated in diffusers since 0.33
        pytest.skip(f"diffusers {diffusers.__version__} no longer has StableDiffusionPanoramaPipeline")
    pipe = diffusers.StableDiffusionPanoramaPipeline(**_parts(sd_pipe))
    pipe.set_progress_bar_config(disable=True)
    # The pipeline counts views in pixels / 8 whatever the VAE: 2 windows 64 wide at stride 8 (8 latent rows
    # each, as the tiny VAE downsamples once), so the attention stays small; latents out.
    size = {"height": 16, "width": 576, "output_type": "latent"}
    per_view = lambda: _run(pipe, view_batch_size=1, **size)  # noqa: E731
    batched = lambda: _run(pipe, view_batch_size=2, **size)  # noqa: E731
    stock, reference = batched(), _reference(pipe, batched)
    got, stats = _optimized([pipe], 1, batched)
    assert torch.equal(got, stock), "panorama, views batched, at M=1 differs from stock"
    got, stats = _optimized([pipe], 2, batched)
    _assert_close(got, reference, "panorama, views batched, at M=2")
    stock_per_view = per_view()
    got, stats = _optimized([pipe], 1, per_view)
    assert torch.equal(got, stock_per_view), "panorama, a call per view, at M=1 differs from stock"
    # Against the batched reference: batching alone moves these latents (up to ~300) by 2.4e-6 of their
    # largest, through float rounding; caches shared between views would move them by far more than 1e-5.
    got, stats = _optimized([pipe], 2, per_view)
    assert max_rel_error(stock_per_view, stock) < 1e-5
    err = max_rel_error(got, reference)
    assert err < 1e-5, f"panorama, a call per view, at M=2: differs from the eager reference by {err:.2e} (relative)"
    assert stats.eager_calls == 0 and stats.reuse_calls > 0 and stats.forced_keyframes == 0, stats
    assert stats.full_calls == 2 * 5 and stats.reuse_calls + stats.skip_steps == 2 * 5, stats  # 2 views, 10 steps
