"""The demo command (part of the CLI, so it prints): stock UNet against FRDiff from the same noise.

Invariants:
- Both runs get identical noise and conditioning; the stock run is the full-compute reference for PSNR.
- Each side is warmed up once (the FRDiff warm-up builds its graphs) before the timed run, and graph build
  time is reported on its own line, never folded into time per image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from .api import optimize
from .cli import CLIError, timed
from .config import FRDiffConfig
from .quality import psnr, sqnr
from .schedule import build_schedule


def _save_side_by_side(left: np.ndarray, right: np.ndarray, path: Path) -> None:
    """Two HxWxC uint8 images side by side with a gap, as PNG."""
    from PIL import Image

    gap = np.full((left.shape[0], max(4, left.shape[1] // 40), left.shape[2]), 255, dtype=np.uint8)
    combined = np.concatenate([left, gap, right], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(combined.squeeze(-1) if combined.shape[2] == 1 else combined).save(path)


def _digit_grid(images: torch.Tensor, rows: int, scale: int = 4) -> np.ndarray:
    """(rows*10, 1, 16, 16) in [-1, 1] -> uint8 grid, one row of 0-9 per row, upscaled for viewing."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    grid = pixels.reshape(rows, 10, 16, 16).permute(0, 2, 1, 3).reshape(rows * 16, 10 * 16)
    grid = grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return grid.numpy()[:, :, None]


def _print_table(rows: list[dict[str, str]]) -> None:
    columns = list(rows[0])
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(r[c].ljust(w) for c, w in zip(columns, widths)))


def _label(config: FRDiffConfig) -> str:
    deep = ", deep cache point" if config.cache_point == "deep" else ""
    return f"frdiff M={config.keyframe_interval}{deep}"


def _kinds(config: FRDiffConfig, steps: int) -> str:
    counts = build_schedule(steps, config).counts()
    return f"{counts['full']}/{counts['reuse']}/{counts['skip']}"


def run_digits_demo(args: argparse.Namespace, config: FRDiffConfig) -> None:
    from .digits import DigitsPipeline, load_digits_model
    from .quality import DigitsJudge

    unet, embedding = load_digits_model()
    judge = DigitsJudge()
    labels = list(range(10)) * args.rows
    fr = optimize(unet, config)
    stock_pipe, fr_pipe = DigitsPipeline(unet, embedding), DigitsPipeline(fr, embedding)
    run = lambda pipe: pipe(labels, args.steps, args.guidance, seed=args.seed, progress=True)  # noqa: E731
    _, build_s = timed(lambda: fr_pipe(labels, 2, args.guidance, seed=args.seed))  # builds the graph pair
    stock_pipe(labels, 2, args.guidance, seed=args.seed)  # same warm-up for the stock side
    stock, stock_s = timed(lambda: run(stock_pipe))
    ours, ours_s = timed(lambda: run(fr_pipe))
    n = len(labels)
    print(f"digits demo: {n} images, {args.steps} DDIM steps, guidance {args.guidance}, seed {args.seed}, {config}")
    _print_table([
        {"unet": "stock", "ms/image": f"{1e3 * stock_s / n:.1f}", "speedup": "1.00x", "PSNR dB": "ref",
         "SQNR dB": "ref", "accuracy": f"{judge.accuracy(stock, labels):.3f}", "full/reuse/skip": f"{args.steps}/0/0"},
        {"unet": _label(config), "ms/image": f"{1e3 * ours_s / n:.1f}",
         "speedup": f"{stock_s / ours_s:.2f}x", "PSNR dB": f"{psnr(ours, stock):.2f}", "SQNR dB": f"{sqnr(ours, stock):.2f}",
         "accuracy": f"{judge.accuracy(ours, labels):.3f}", "full/reuse/skip": _kinds(config, args.steps)},
    ])
    print(f"graph build (once per input shape): {build_s:.2f} s")
    _save_side_by_side(_digit_grid(stock, args.rows), _digit_grid(ours, args.rows), args.out)
    print(f"wrote {args.out} (left: stock UNet, right: frdiff_compile)")


def _load_pipeline(path: Path):  # noqa: ANN202 - returns a diffusers pipeline
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    if not path.is_dir():
        raise CLIError(f"--model {path}: no such folder (give a local diffusers pipeline folder)")
    if not (path / "model_index.json").is_file():
        raise CLIError(f"--model {path}: no model_index.json, so this is not a diffusers pipeline folder")
    try:
        pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one line
        raise CLIError(f"--model {path}: could not load the pipeline ({type(exc).__name__}: {exc})") from None
    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        found = type(getattr(pipe, "unet", None)).__name__
        raise CLIError(f"--model {path}: the pipeline's unet is {found}; frdiff_compile supports UNet2DConditionModel")
    return pipe


def run_pipeline_demo(args: argparse.Namespace, config: FRDiffConfig) -> None:
    pipe = _load_pipeline(args.model)
    pipe.set_progress_bar_config(leave=False)
    stock_unet = pipe.unet
    size = args.size or stock_unet.config.sample_size * pipe.vae_scale_factor

    def generate(steps: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(args.seed)
        return pipe(args.prompt, num_inference_steps=steps, height=size, width=size, guidance_scale=args.guidance,
                    generator=generator, output_type="np").images[0]

    generate(2)
    stock, stock_s = timed(lambda: generate(args.steps))
    pipe.unet = optimize(stock_unet, config)
    try:
        _, build_s = timed(lambda: generate(2))
        ours, ours_s = timed(lambda: generate(args.steps))
    finally:
        pipe.unet = stock_unet
    ref, got = torch.from_numpy(stock) * 2 - 1, torch.from_numpy(ours) * 2 - 1
    print(f"pipeline demo: {args.model} '{args.prompt}' {size}x{size}, {args.steps} steps, {config}")
    _print_table([
        {"unet": "stock", "s/image": f"{stock_s:.2f}", "speedup": "1.00x", "PSNR dB": "ref", "full/reuse/skip": f"{args.steps}/0/0"},
        {"unet": _label(config), "s/image": f"{ours_s:.2f}", "speedup": f"{stock_s / ours_s:.2f}x",
         "PSNR dB": f"{psnr(got, ref):.2f}", "full/reuse/skip": _kinds(config, args.steps)},
    ])
    print(f"graph build (once per input shape): {build_s:.2f} s")
    to_uint8 = lambda img: (np.clip(img, 0, 1) * 255).round().astype(np.uint8)  # noqa: E731
    _save_side_by_side(to_uint8(stock), to_uint8(ours), args.out)
    print(f"wrote {args.out} (left: stock UNet, right: frdiff_compile)")
