"""Shared fixtures: tiny UNets shaped like SD 1.5, SD 2 and SDXL, built from configs with seeded weights."""

from __future__ import annotations

import os

import torch

# Without CUDA the Triton kernels run under the interpreter on CPU tensors. Triton reads this when a kernel
# is decorated, so it must be set before frdiff_compile (and its kernels) is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's test command runs two workers) each worker takes its share of the cores:
# workers that each keep torch's default pool, a thread per core, oversubscribe the machine and their OpenMP
# threads spin. On the 2-core CI machine the suite took 730 s so, 283-285 s with one thread each, 587 s serially.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

import pytest  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

TEXT_DIM = 32
TEXT_LEN = 7

# Each config keeps the structure that matters (cross-attention down/mid/up blocks, two layers per block,
# conv vs linear projections, SDXL's text_time add-embedding) at a size that runs in milliseconds.
TINY_CONFIGS = {
    "sd15": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    ),
    "sd2": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    ),
    "sdxl": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * 8,
    ),
}


def make_unet(
    kind: str, seed: int = 0, sample_size: int = 8, layers_per_block: int = 2, cross_attention_dim: int = TEXT_DIM,
    in_channels: int = 4, **overrides,
) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,  # 9 for inpainting: latents, mask and masked-image latents
        out_channels=4,
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
        **{**TINY_CONFIGS[kind], **overrides},
    )
    # Default init leaves conv_out and some projections at zero; random weights make every path matter.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet.eval()


def unet_inputs(kind: str, batch: int = 2, size: int = 8, text_len: int = TEXT_LEN, seed: int = 1) -> dict:
    """Conditioning for one call (without sample and timestep)."""
    g = torch.Generator().manual_seed(seed)
    kwargs = {"encoder_hidden_states": torch.randn(batch, text_len, TEXT_DIM, generator=g)}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, TEXT_DIM, generator=g),
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch, dtype=torch.float32),
        }
    return kwargs


@pytest.fixture(params=sorted(TINY_CONFIGS))
def kind(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    # FRDIFF_EMULATE_GPU=1 (gpu_check.sh --dry-run) runs the gpu tests marked cpu_emulation on CPU.
    emulated = os.environ.get("FRDIFF_EMULATE_GPU") == "1"
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords and not (emulated and "cpu_emulation" in item.keywords):
            item.add_marker(skip)


def needs_unet_method(name: str, added_in: str):
    """Skip mark for a test that drives `UNet2DConditionModel.<name>`, which diffusers releases before
    `added_in` lack. The library takes diffusers from 0.30 on; only these tests need the newer API."""
    import diffusers

    return pytest.mark.skipif(not hasattr(UNet2DConditionModel, name),
                              reason=f"diffusers {diffusers.__version__} has no UNet2DConditionModel.{name} (added "
                                     f"in {added_in}); it is what this test drives")


def max_rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| relative to max |expected| (DDIM latents of random tiny UNets reach ~1e2)."""
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def generated_code(fn, *args, **kwargs) -> tuple[object, list[str]]:
    """(fn's result, the output code inductor generated for every graph compiled while it ran).

    Inductor writes output code only while lowering, which a hit in its FX graph cache or AOTAutograd's
    cache skips, so both caches are off here (and dynamo is reset, so every graph compiles again).
    """
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.utils import run_and_get_code

    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        return run_and_get_code(fn, *args, **kwargs)


# Module-scoped tiny pipelines, importable as fixtures by every test module.
from tiny_pipelines import sd_pipe, sdxl_pipe  # noqa: E402, F401
