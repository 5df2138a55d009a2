"""UNet benchmark: stock UNet against frdiff_compile's keyframe and reuse graphs and 50-step DDIM loops.

Run (CPU, the SD 1.5 config at 32x32 latents, CFG batch 2; a few minutes on 2 cores):
    python benchmarks/bench_unet.py
Quick run on a scaled-down config with the same block structure (about a minute on 2 cores):
    python benchmarks/bench_unet.py --small
DeepCache's cache point (`FRDiffConfig(cache_point="deep")`, no score mixing) instead of FRDiff's:
    python benchmarks/bench_unet.py --cache-point deep

Prints a table and appends rows to benchmarks/results/bench_unet.csv (device, versions, git revision on
every row). Random weights: speed does not depend on them. Measures, in one process: ms per call of the
stock UNet, the keyframe graph and the reuse graph (median of --repeats after warm-up), their FLOPs
(torch.utils.flop_counter), and the loop time of stock against FRDiff M=2 and M=3 (b=0.5) next to the cost
model (full, reuse and skip steps and scheduler steps at their measured per-call times).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import (
    RESULTS,
    add_unet_arguments,
    append_csv,
    environment,
    frdiff_step_ms,
    loop_model_ms,
    loop_ms,
    print_table,
    synchronize,
    time_ms,
    unet_from_arguments,
)
from diffusers import DDIMScheduler
from torch.utils.flop_counter import FlopCounterMode

import frdiff_compile
from frdiff_compile import FRDiffConfig, build_schedule


def gflop(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_unet_arguments(parser, latent=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per call measurement")
    parser.add_argument("--csv", default=str(RESULTS / "bench_unet.csv"))
    args = parser.parse_args()

    setup = unet_from_arguments(args)
    unet, device, dtype, config_name, shape = setup.unet, setup.device, setup.dtype, setup.config, setup.shape
    text_dim = unet.config.cross_attention_dim
    latents = torch.randn(args.batch, 4, args.latent, args.latent, device=device, dtype=dtype)
    cond = {"encoder_hidden_states": torch.randn(args.batch, 77, text_dim, device=device, dtype=dtype)}
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(args.steps, device=device)
    t = scheduler.timesteps[args.steps // 2]
    env = environment(device)
    print(f"bench_unet: {shape}, {args.steps} DDIM steps on {env['device']} (torch {env['torch']}, git {env['git']})")

    with torch.no_grad():
        configs = {m: FRDiffConfig(keyframe_interval=m, compile=args.compile, cache_point=args.cache_point)
                   for m in (2, 3)}
        fr = {m: frdiff_compile.optimize(unet, configs[m]) for m in (2, 3)}
        start = time.perf_counter()
        entry, tensors = fr[2].prepare(latents, t, **cond)
        entry.run_full(tensors, -1)
        entry.run_reuse(tensors, 0.5)
        synchronize(device)
        build_s = time.perf_counter() - start
        fr[3].prepare(latents, t, **cond)
        print(entry.plan)
        print(entry.report)

        stock = lambda: unet(latents, t, **cond)  # noqa: E731
        full = lambda: entry.run_full(tensors, -1)  # noqa: E731
        reuse = lambda: entry.run_reuse(tensors, 0.5)  # noqa: E731
        ms = {"stock": time_ms(stock, device, args.repeats),
              **frdiff_step_ms(entry, tensors, scheduler, t, latents, device, args.repeats)}
        flops = {"stock": gflop(stock), "keyframe": gflop(full), "reuse": gflop(reuse)}
        loops = {"stock": loop_ms(unet, scheduler, latents, cond, args.steps, device)}
        for m in (2, 3):
            loops[f"M={m}"] = loop_ms(fr[m], scheduler, latents, cond, args.steps, device)

    reuse_time_share = ms["reuse"] / ms["keyframe"]
    reuse_flop_share = flops["reuse"] / flops["keyframe"]
    rows = [
        {"item": "stock UNet call", "ms": ms["stock"], "GFLOP": flops["stock"]},
        {"item": "keyframe graph call", "ms": ms["keyframe"], "GFLOP": flops["keyframe"],
         "ratio": ms["keyframe"] / ms["stock"], "note": "ratio = time / stock"},
        {"item": "reuse graph call", "ms": ms["reuse"], "GFLOP": flops["reuse"], "ratio": reuse_time_share,
         "note": f"time share of keyframe; FLOP share {reuse_flop_share:.3f}; "
                 f"time/FLOP share {reuse_time_share / reuse_flop_share:.2f}"},
        {"item": "skip step (clone)", "ms": ms["skip"]},
        {"item": "scheduler step", "ms": ms["scheduler"]},
        {"item": f"loop stock x{args.steps}", "ms": loops["stock"],
         "model_ms": args.steps * (ms["stock"] + ms["scheduler"]), "ratio": 1.0, "note": "ratio = speedup"},
        {"item": "graph build + warm-up", "ms": build_s * 1e3, "note": "capture, plan, build (+ compile)"},
    ]
    for m in (2, 3):
        counts = build_schedule(args.steps, configs[m]).counts()
        model = loop_model_ms(counts, ms, args.steps)
        rows.insert(-1, {
            "item": f"loop {'deep' if args.cache_point == 'deep' else 'FRDiff'} M={m} x{args.steps}", "ms": loops[f"M={m}"], "model_ms": model,
            "ratio": loops["stock"] / loops[f"M={m}"],
            "note": f"{counts['full']} full / {counts['reuse']} reuse / {counts['skip']} skip; "
                    f"measured/model {loops[f'M={m}'] / model:.3f}; stats {fr[m].stats.full_calls}/"
                    f"{fr[m].stats.reuse_calls}/{fr[m].stats.skip_steps}",
        })
    print_table(rows, ["item", "ms", "model_ms", "GFLOP", "ratio", "note"], f"bench_unet ({shape})")
    extra = {"config": config_name, "shape": shape, "steps": args.steps, "compile": args.compile,
             "cache_point": args.cache_point}
    path = append_csv(Path(args.csv), [{**extra, **row} for row in rows], env)
    print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
