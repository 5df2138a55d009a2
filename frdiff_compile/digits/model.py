"""The shipped digits model: its architecture, its label embedding, and offline loading.

Invariants:
- The model folder (`frdiff_compile/digits/weights/`) is a plain diffusers model folder (config.json +
  diffusion_pytorch_model.safetensors) that `UNet2DConditionModel.from_pretrained` loads with no network,
  plus `label_embedding.safetensors` for the class table; it is installed with the package.
- Labels 0-9 are the digits; `NULL_LABEL` (10) is the unconditional class used for classifier-free
  guidance. A label enters the UNet as `encoder_hidden_states` of shape (batch, 1, 32).
- Images are 16x16, one channel, in [-1, 1] (scikit-learn's 8x8 digits upsampled bilinearly).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

MODEL_DIR = Path(__file__).resolve().parent / "weights"
NULL_LABEL = 10
EMBED_DIM = 32
IMAGE_SIZE = 16


def digits_unet_config() -> dict:
    """Three resolutions (16, 8, 4); cross-attention in the lower two, so both cache kinds are exercised."""
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=EMBED_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


class LabelEmbedding(torch.nn.Module):
    """Digit label (or NULL_LABEL) -> encoder_hidden_states of shape (batch, 1, EMBED_DIM)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(NULL_LABEL + 1, EMBED_DIM)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table(labels)[:, None, :]


def load_digits_model(
    path: str | Path | None = None, device: str | torch.device = "cpu"
) -> tuple[UNet2DConditionModel, LabelEmbedding]:
    """Load the UNet and label embedding from `path` (default: the folder installed with the package)."""
    folder = Path(path) if path is not None else MODEL_DIR
    table = folder / "label_embedding.safetensors"
    if not (folder / "config.json").is_file() or not table.is_file():
        raise FileNotFoundError(
            f"no digits model in {folder}: expected config.json, diffusion_pytorch_model.safetensors and "
            "label_embedding.safetensors (train one with `python -m frdiff_compile.digits.train`)"
        )
    unet = UNet2DConditionModel.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    unet = unet.to(device).eval()
    embedding = LabelEmbedding()
    embedding.load_state_dict(load_file(str(table)))
    return unet, embedding.to(device).eval()
