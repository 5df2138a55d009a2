"""FRDiff and DeepCache with the solvers people use, on the shipped digits model, against fewer steps.

Run (about nine minutes on 2 CPU cores; needs the DeepCache package, in the `bench` extra):
    python benchmarks/eval_schedulers.py
    python benchmarks/eval_schedulers.py --samples 50 --quick   # smoke run

For each (solver, N steps): full compute at N steps is the reference; FRDiff M=2 and M=3 (b = 0.5) at N steps;
DeepCache N=2 and N=3 (branch 0, as in eval_deepcache.py) at N steps; and, as the equal-cost baseline, full
compute with the same solver at the step count nearest to each cached row's cost (full-call equivalents, each
method's cheap call weighted by its measured time over its own full call, as in eval_quality.py and
eval_deepcache.py). PSNR/SQNR against the reference, class accuracy and FID-proxy (frdiff_compile.quality).
Every row uses the same labels and noise. Writes benchmarks/results/eval_schedulers.csv.

The questions it answers: for a solver that already needs few steps, does feature reuse give better images
than simply running that solver for fewer steps at the same cost? And is DeepCache, which beats FRDiff at
equal cost with DDIM (eval_deepcache.py), ahead with these solvers too?
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import RESULTS, append_csv, deepcache, environment, print_table
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler
from eval_deepcache import deepcache_cost, deepcache_partial_cost
from eval_quality import add_sampling_args, setup

import frdiff_compile
from frdiff_compile import FRDiffConfig, build_schedule
from frdiff_compile.digits import DigitsPipeline
from frdiff_compile.digits.pipeline import default_scheduler
from frdiff_compile.quality import psnr, sqnr

# (name, scheduler class, N): the model's own betas (cosine) carried over from its DDIM config, and its
# "leading" spacing. The other solvers default to "linspace", which starts at t = 999, where the cosine
# schedule leaves no signal and this small model is poor: measured at 200 samples, DPM-Solver++, UniPC and
# Euler all fell to 83.5% accuracy (FID-proxy 153) with it, against 98.5% (18.4) with "leading".
SOLVERS = [
    ("DDIM", DDIMScheduler, 50),
    ("DDIM", DDIMScheduler, 25),
    ("DPM-Solver++ 2M", DPMSolverMultistepScheduler, 25),
    ("DPM-Solver++ 2M", DPMSolverMultistepScheduler, 20),
    ("UniPC", UniPCMultistepScheduler, 20),
    ("Euler", EulerDiscreteScheduler, 30),
]
QUICK = [SOLVERS[2], SOLVERS[4]]


def solver(cls, steps: int | None = None) -> object:
    """Solver `cls` over the model's schedule; with `steps`, already set up as a pipeline's copy will be (for
    DeepCache, which looks each call's timestep up in its own scheduler's timesteps)."""
    scheduler = cls.from_config(default_scheduler().config, timestep_spacing="leading")
    if steps is not None:
        scheduler.set_timesteps(steps)
    return scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_sampling_args(parser, "two solvers only")
    parser.add_argument("--csv", default=str(RESULTS / "eval_schedulers.csv"))
    args = parser.parse_args()
    unet, embedding, judge, labels, r = setup(args)
    shallow = deepcache_partial_cost(unet, embedding, args.samples, branch=0)
    print(f"eval_schedulers: {args.samples} samples, seed {args.seed}, reuse call = {r:.3f} of a keyframe call, "
          f"DeepCache shallow call = {shallow:.3f} of its full call")
    rows: list[dict] = []

    def measure(name: str, cls, n: int, steps: int, method: str, model, cost: float, reference):
        """One row: `steps` steps of solver `cls` with `model`; returns its images."""
        start = time.perf_counter()
        images = DigitsPipeline(model, embedding, solver(cls))(labels, steps, args.guidance, seed=args.seed)
        row = {"solver": name, "N": n, "method": method, "steps": steps, "cost": cost,
               "wall_s": time.perf_counter() - start, "accuracy": judge.accuracy(images, labels),
               "fid_proxy": judge.fid_proxy(images)}
        if reference is not None:
            row.update(psnr_db=psnr(images, reference), sqnr_db=sqnr(images, reference))
        rows.append(row)
        return images

    for name, cls, n in QUICK if args.quick else SOLVERS:
        reference = measure(name, cls, n, n, "full", unet, float(n), None)
        for m in (2, 3):
            config = FRDiffConfig(keyframe_interval=m)
            cost = build_schedule(n, config).cost(r)
            measure(name, cls, n, n, f"FRDiff M={m}", frdiff_compile.optimize(unet, config), cost, reference)
            fewer = max(1, round(cost))
            measure(name, cls, n, fewer, f"full, cost of M={m}", unet, float(fewer), reference)
        for k in (2, 3):
            cost = deepcache_cost(n, k, shallow)
            model = deepcache(unet, solver(cls, n), interval=k, branch=0)
            measure(name, cls, n, n, f"DeepCache N={k}", model, cost, reference)
            fewer = max(1, round(cost))
            measure(name, cls, n, fewer, f"full, cost of DeepCache N={k}", unet, float(fewer), reference)
        print(f"{name} N={n}: done", flush=True)
    # No wall times in the table: each FRDiff row includes its graph capture; cost is the speed measure here.
    print_table(rows, ["solver", "N", "method", "steps", "cost", "psnr_db", "sqnr_db", "accuracy", "fid_proxy"],
                "eval_schedulers (digits model, CPU; PSNR/SQNR against full compute at N)")
    env = environment(torch.device("cpu"))
    path = append_csv(Path(args.csv), [{**row, "samples": args.samples, "seed": args.seed, "reuse_cost": r,
                                        "deepcache_shallow_cost": shallow} for row in rows], env)
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
