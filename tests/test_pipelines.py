"""A real client: unmodified diffusers SD and SDXL pipelines, built from tiny components, run the
optimized UNet."""

import copy

import diffusers
import numpy as np
import pytest
import torch
from frdiff_reference import EagerFRDiff
from packaging.version import Version

import frdiff_compile
from frdiff_compile import FRDiffConfig


def generate(pipe, steps, size, seed=0, **kwargs):
    return pipe(
        ["a digit", "a cat"], num_inference_steps=steps, height=size, width=size, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs,
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
        images = [generate(pipe, steps, size) for steps, size in calls]
        for (steps, size), got, expected in zip(calls, images, expected_frdiff):
            err = np.abs(got - expected).max()
            assert err < 1e-4, f"{name}: steps={steps} size={size} image differs from eager FRDiff by {err}"
        # The first shape again: its graphs serve it. Nothing a pipeline call does (or the module globals its
        # code reads) may count as a module change and build them again.
        assert np.array_equal(generate(pipe, *calls[0]), images[0])
        stats = pipe.unet.stats
        assert stats.generations == 3 and stats.captures == 2 and stats.eager_calls == 0, stats
        assert stats.reuse_calls > 0 and stats.forced_keyframes == 0, stats
    finally:
        pipe.unet = stock


@pytest.mark.parametrize("name", ["sd_pipe", "sdxl_pipe"])
def test_deep_cache_point_in_a_pipeline_gives_deepcaches_own_images(name, request):
    """DeepCache as its README uses it (the helper on the pipeline) and `cache_point="deep"` make the same images."""
    pytest.importorskip("DeepCache")
    from DeepCache import DeepCacheSDHelper

    pipe = request.getfixturevalue(name)
    stock = pipe.unet
    try:
        pipe.unet = copy.deepcopy(stock)  # the helper replaces module forwards for good
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=3, cache_branch_id=0)
        helper.enable()
        expected = generate(pipe, 10, 16)
        pipe.unet = frdiff_compile.optimize(stock, FRDiffConfig(cache_point="deep", keyframe_interval=3))
        got = generate(pipe, 10, 16)
        assert pipe.unet.stats.reuse_calls == 6 and pipe.unet.stats.eager_calls == 0, pipe.unet.stats
    finally:
        pipe.unet = stock
    assert np.array_equal(got, expected), np.abs(got - expected).max()
    assert not np.allclose(got, generate(pipe, 10, 16), atol=1e-3)  # the shallow steps read the cache


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


def _ip_adapter_state(unet, clip_dim: int, seed: int) -> dict:
    """A random IP-Adapter (plain image projection, 4 tokens) in the layout `load_ip_adapter` takes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    dim, widths = unet.config.cross_attention_dim, unet.config.block_out_channels
    image_proj = {"proj.weight": rand(4 * dim, clip_dim), "proj.bias": rand(4 * dim), "norm.weight": 1 + rand(dim),
                  "norm.bias": rand(dim)}
    layers, key = {}, 1
    for name in (n for n in unet.attn_processors if not n.endswith("attn1.processor")):  # cross-attention only
        block = int(name.split(".")[1]) if not name.startswith("mid_block") else 0
        hidden = {"down_blocks": widths[block], "up_blocks": widths[::-1][block], "mid_block": widths[-1]}[
            name.split(".")[0]]
        layers[f"{key}.to_k_ip.weight"], layers[f"{key}.to_v_ip.weight"] = rand(hidden, dim), rand(hidden, dim)
        key += 2
    return {"image_proj": image_proj, "ip_adapter": layers}


@pytest.mark.skipif(Version(diffusers.__version__) < Version("0.31"),
                    reason=f"diffusers {diffusers.__version__}: load_ip_adapter(image_encoder_folder=None) reads the "
                           "image encoder it did not load (fixed in 0.31)")
def test_ip_adapter_loads_unloads_and_reloads_through_the_wrapper(sd_pipe):
    """`unload_ip_adapter` assigns `pipe.unet.encoder_hid_proj = None`: the assignment must reach the UNet.

    Kept on the wrapper, it shadowed the UNet's projection: the unloaded one stayed in the UNet, and after a
    reload `pipe.unet.encoder_hid_proj` read None (the pipeline reads it to encode `ip_adapter_image`).
    """
    stock = sd_pipe.unet
    embeds = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(5))]  # (uncond, cond) x one image

    def story(pipe):
        pipe.load_ip_adapter(_ip_adapter_state(stock, 16, 1), subfolder=None, weight_name=None,
                             image_encoder_folder=None)
        images = [generate(pipe, 4, 16, ip_adapter_image_embeds=embeds)]
        pipe.unload_ip_adapter()
        assert stock.encoder_hid_proj is None and stock.config.encoder_hid_dim_type is None
        images.append(generate(pipe, 4, 16))
        pipe.load_ip_adapter(_ip_adapter_state(stock, 16, 2), subfolder=None, weight_name=None,
                             image_encoder_folder=None)
        assert pipe.unet.encoder_hid_proj is stock.encoder_hid_proj is not None
        images.append(generate(pipe, 4, 16, ip_adapter_image_embeds=embeds))
        pipe.unload_ip_adapter()
        return images

    expected = story(sd_pipe)
    try:
        sd_pipe.unet = frdiff_compile.optimize(stock, FRDiffConfig(keyframe_interval=1))  # M=1: exactly the UNet
        got = story(sd_pipe)
        assert "encoder_hid_proj" not in vars(sd_pipe.unet)
        assert sd_pipe.unet.stats.eager_calls == 0, sd_pipe.unet.stats
    finally:
        sd_pipe.unet = stock
    for want, have in zip(expected, got, strict=True):
        assert np.array_equal(have, want)
