"""Tiny Stable Diffusion and SDXL pipelines (CLIP tokenizer files written here, random tiny weights), shared
by the pipeline tests and the demo tests as module-scoped fixtures."""

import json

import pytest
import torch
from conftest import make_unet
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

HIDDEN = 32


def write_tokenizer(folder) -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with single-character tokens and no merges."""
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to code points from 256 up.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def text_encoder(cls, vocab_size, seed):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, projection_dim=HIDDEN, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return cls(config).eval()


def vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    tok = write_tokenizer(tmp_path_factory.mktemp("tok"))
    pipe = StableDiffusionPipeline(
        vae=vae(), text_encoder=text_encoder(CLIPTextModel, len(tok), 1), tokenizer=tok,
        unet=make_unet("sd15", cross_attention_dim=HIDDEN), scheduler=DDIMScheduler(clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    tok = write_tokenizer(tmp_path_factory.mktemp("tok_xl"))
    unet = make_unet("sdxl", cross_attention_dim=2 * HIDDEN)
    pipe = StableDiffusionXLPipeline(
        vae=vae(), text_encoder=text_encoder(CLIPTextModel, len(tok), 1),
        text_encoder_2=text_encoder(CLIPTextModelWithProjection, len(tok), 2), tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=DDIMScheduler(clip_sample=False),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
