"""Time denoising loops that call the UNet once per view at every step, against one call over all views.

Run:
    python benchmarks/bench_calls.py                               # CPU: the small config, 2 views, 64x64
    python benchmarks/bench_calls.py --config sd15 --device cuda --views 4 --steps 50 --repeats 3

MultiDiffusion's panorama pipeline calls the UNet once per view (a window of the panorama's latents) at every
step, by default; cond and uncond called apart make the same pattern. Such loops used to run the eager UNet;
each call now keeps caches of its own (a call slot). The loop here is that pattern without the pipeline
(deprecated in diffusers): `views` latents of `latent`x`latent`, each a CFG batch of 2, stepped by DDIM, with
the UNet called once per view or once over all views. Rows: the stock UNet and FRDiff at M=2 (default config:
compiled graphs and CUDA graphs on CUDA, eager graphs on CPU), each way; `vs_stock` is stock's time over the
row's, with the same calls. One whole untimed loop per row first (graphs built, compiled and captured there),
then the median of `repeats` timed loops. Writes benchmarks/results/bench_calls.csv.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import RESULTS, append_csv, environment, print_table, time_ms
from diffusers import DDIMScheduler
from models import build_unet, example_call

import frdiff_compile


def views_loop(model, scheduler, latents: list[torch.Tensor], cond: dict, batched_cond: dict, steps: int,
               batched: bool) -> torch.Tensor:
    """One denoising loop over every view; the views' final latents, concatenated."""
    scheduler.set_timesteps(steps, device=latents[0].device)
    xs = list(latents)
    for t in scheduler.timesteps:
        if batched:
            eps = model(torch.cat(xs), t, **batched_cond).sample.chunk(len(xs))
        else:
            eps = [model(x, t, **cond).sample for x in xs]
        xs = [scheduler.step(e, t, x).prev_sample for e, x in zip(eps, xs)]
    return torch.cat(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="small", choices=["tiny", "small", "sd15", "sdxl"])
    parser.add_argument("--latent", type=int, default=64, help="each view's latent size (64: 512x512 pixels)")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="timed loops per row (median)")
    parser.add_argument("--calls", nargs="+", default=["per-view", "batched"], choices=["per-view", "batched"],
                        help="which loops (each is a graph pair to build and, on CUDA, to compile)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--csv", default=str(RESULTS / "bench_calls.csv"))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    unet = build_unet(args.config, args.latent, device)
    if dtype != torch.float32:  # built in float32
        unet = unet.to(dtype)
    call = example_call(unet, 2, args.latent, device, dtype)
    latents = [torch.randn(call["sample"].shape, generator=torch.Generator().manual_seed(v)).to(device, dtype)
               for v in range(args.views)]
    cond = {k: v for k, v in call.items() if k != "sample"}
    batched_cond = {"encoder_hidden_states": torch.cat([cond["encoder_hidden_states"]] * args.views)}
    if "added_cond_kwargs" in cond:
        batched_cond["added_cond_kwargs"] = {k: torch.cat([v] * args.views)
                                             for k, v in cond["added_cond_kwargs"].items()}
    fr = frdiff_compile.optimize(unet)
    rows, stock_ms = [], {}
    for batched in [way == "batched" for way in args.calls]:
        for name, model in (("stock", unet), ("frdiff-m2", fr)):
            def loop(model=model, batched=batched) -> torch.Tensor:
                with torch.no_grad():
                    return views_loop(model, DDIMScheduler(), latents, cond, batched_cond, args.steps, batched)

            before = fr.stats.eager_calls
            ms = time_ms(loop, device, repeats=args.repeats, warmup=1)  # synchronizes around each loop
            if name == "stock":
                stock_ms[batched] = ms
            elif fr.stats.eager_calls != before:
                raise SystemExit(f"FRDiff ran the eager UNet in the {'batched' if batched else 'per-view'} loop")
            rows.append({"config": args.config, "latent": args.latent, "views": args.views, "steps": args.steps,
                         "calls": "batched" if batched else "per view", "model": name, "loop_ms": ms,
                         "vs_stock": stock_ms[batched] / ms, "dtype": str(dtype).removeprefix("torch.")})
    print_table(rows, ["config", "views", "steps", "calls", "model", "loop_ms", "vs_stock"],
                f"UNet calls per step: one per view or one over all views ({device}, {args.repeats} timed loops)")
    path = append_csv(Path(args.csv), rows, environment(device))
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
