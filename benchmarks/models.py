"""UNet configurations the benchmarks use, and their FRDiff cache shapes (planned on the meta device).

The SD 1.5 and SDXL configs are the published architectures with random weights: speed does not depend on
the weights, and no model hub is reachable. `cache_shapes` captures and plans on the meta device, so it
costs seconds and no memory, and the shapes are the planner's own, never typed in by hand.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from frdiff_compile.passes import CallLayout, capture, plan_cache_points

SMALL = dict(block_out_channels=(64, 128, 256, 256), cross_attention_dim=256, attention_head_dim=8)
SD15 = dict(cross_attention_dim=768)  # UNet2DConditionModel's defaults are the SD 1.5 architecture
SDXL = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# Dry runs on CPU: the smallest UNet with every block kind (cross-attention down and up, plain, mid).
TINY = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=4, norm_num_groups=8)
CONFIGS = {"tiny": TINY, "small": SMALL, "sd15": SD15, "sdxl": SDXL}


def build_unet(name: str, latent: int, device: torch.device | str = "cpu") -> UNet2DConditionModel:
    with torch.device(device):
        return UNet2DConditionModel(sample_size=latent, **CONFIGS[name]).eval()


def example_call(unet: UNet2DConditionModel, batch: int, latent: int, device, dtype, text_len: int = 77) -> dict:
    """Inputs of one CFG-batched UNet call (SDXL's added conditioning included)."""
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    call = {
        "sample": make(batch, 4, latent, latent),
        "encoder_hidden_states": make(batch, text_len, unet.config.cross_attention_dim),
    }
    if unet.config.addition_embed_type == "text_time":
        call["added_cond_kwargs"] = {"text_embeds": make(batch, 1280), "time_ids": make(batch, 6)}
    return call


def meta_unet_and_call(name: str, latent: int, batch: int) -> tuple[UNet2DConditionModel, dict]:
    """Config `name` and one call of it on the meta device: shapes without memory or compute."""
    unet = build_unet(name, latent, device="meta")
    call = example_call(unet, batch, latent, "meta", torch.float32)
    call["timestep"] = torch.empty((), dtype=torch.int64, device="meta")
    return unet, call


def conv_gflop(x: tuple[int, ...], w: tuple[int, ...], stride: tuple[int, ...] = (1, 1),
               padding: tuple[int, ...] = (0, 0), dilation: tuple[int, ...] = (1, 1)) -> float:
    """GFLOP of a 2-d convolution of input shape `x` with weight shape `w` (Cout, Cin/groups, kh, kw):
    2 * output elements * Cin/groups * kh * kw, as FlopCounterMode counts it (the bias left out)."""
    out = [(x[2 + i] + 2 * padding[i] - dilation[i] * (w[2 + i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    return 2 * x[0] * w[0] * out[0] * out[1] * w[1] * w[2] * w[3] / 1e9


def cache_shapes(name: str, latent: int, batch: int = 2) -> list[tuple[int, ...]]:
    """The FRDiff cache point shapes of config `name` at `latent`x`latent` latents and this batch."""
    unet, call = meta_unet_and_call(name, latent, batch)
    layout, tensors = CallLayout.from_call(call)
    captured = capture(unet, layout, tensors)
    return [p.shape for p in plan_cache_points(captured.graph_module, unet).points]
