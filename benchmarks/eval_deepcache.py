"""FRDiff against DeepCache, the other training-free feature cache, on the shipped digits model at equal cost.

Run (about four minutes on 2 CPU cores; needs the DeepCache package, in the `bench` extra):
    python benchmarks/eval_deepcache.py
    python benchmarks/eval_deepcache.py --samples 50 --quick   # smoke run

DeepCache (Ma et al. 2023; the authors' pip package, used as it comes, on a deep copy of the UNet because
it replaces module forwards) runs the full UNet every N steps and in between only the shallow branch that
`cache_branch_id` names, reading everything deeper from the last full step. On this model (one layer per
block; counted by module with FlopCounterMode) branch 0 computes only conv_in, the time embedding, the last up
block's last resnet and conv_out; branch 3 computes the whole first level and the second level's last up
layer (resnet, attention, upsampler). FRDiff rows are as in eval_quality.py.

Cost is in full-UNet-call equivalents: each method's cheap call (DeepCache's shallow call, FRDiff's reuse
call) is weighted by its time over that method's own full call, both timed here at the harness batch, all
eager on the CPU (FRDiff's graphs are not compiled on the CPU). So the cost compares the methods, not the
two implementations. PSNR/SQNR against full 50-step DDIM from the same noise; every row uses the same
labels and noise. The "deep N=" rows run DeepCache's method (branch 0) on frdiff_compile's two graphs
(`FRDiffConfig(cache_point="deep")`): their images must equal the package's at the same N, and their cost
weighs the reuse graph's time over the keyframe graph's. Writes benchmarks/results/eval_deepcache.csv.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import RESULTS, append_csv, deepcache, environment, print_table, time_ms
from eval_quality import add_sampling_args, interpolated_ddim, reuse_cost, setup

import frdiff_compile
from frdiff_compile import FRDiffConfig, build_schedule
from frdiff_compile.digits import DigitsPipeline
from frdiff_compile.digits.model import IMAGE_SIZE, NULL_LABEL
from frdiff_compile.digits.pipeline import default_scheduler
from frdiff_compile.quality import psnr, sqnr

STEPS = 50
CPU = torch.device("cpu")


def stepped_scheduler(steps: int):  # noqa: ANN201 - a diffusers scheduler
    """The digits scheduler set up as the pipeline's own copy will be for `steps` steps (DeepCache reads it)."""
    scheduler = default_scheduler()
    scheduler.set_timesteps(steps)
    return scheduler


def deepcache_partial_cost(unet: torch.nn.Module, embedding, batch: int, branch: int) -> float:
    """DeepCache's shallow call over its full call, timed at the harness batch (CFG: 2 x batch)."""
    scheduler = stepped_scheduler(STEPS)
    twin = deepcache(unet, scheduler, interval=STEPS, branch=branch)  # only step 0 is full
    x = torch.randn(2 * batch, 1, IMAGE_SIZE, IMAGE_SIZE)
    cond = embedding(torch.full((2 * batch,), NULL_LABEL))
    first, later = scheduler.timesteps[0], scheduler.timesteps[1]
    with torch.no_grad():
        full = time_ms(lambda: twin(x, first, encoder_hidden_states=cond), CPU, 5)  # fills the cache too
        partial = time_ms(lambda: twin(x, later, encoder_hidden_states=cond), CPU, 5)
    return partial / full


def deepcache_cost(steps: int, interval: int, shallow: float) -> float:
    """Full-call equivalents of a DeepCache generation: a full call every `interval` steps from step 0, a
    shallow call costing `shallow` of a full one at every other step."""
    full_calls = len(range(0, steps, interval))
    return full_calls + shallow * (steps - full_calls)


def rows_to_run(quick: bool) -> list[dict]:
    runs = [{"method": "DDIM", "steps": s} for s in ((15, 30, 50) if quick else (10, 15, 20, 30, 50))]
    for m in (2, 3) if quick else (2, 3, 4):
        runs.append({"method": f"FRDiff M={m}", "interval": m, "mixing": True})
    runs.append({"method": "FRDiff M=2 no mixing", "interval": 2, "mixing": False})
    for branch in (0,) if quick else (0, 3):
        for n in (2, 3) if quick else (2, 3, 4, 5):
            runs.append({"method": f"DeepCache N={n}", "interval": n, "branch": branch})
    for n in (2, 3) if quick else (2, 3, 4, 5):
        runs.append({"method": f"frdiff_compile deep N={n}", "interval": n, "cache_point": "deep"})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_sampling_args(parser, "a few rows only")
    parser.add_argument("--csv", default=str(RESULTS / "eval_deepcache.csv"))
    args = parser.parse_args()
    unet, embedding, judge, labels, reuse = setup(args)
    partial = {b: deepcache_partial_cost(unet, embedding, args.samples, b) for b in ((0,) if args.quick else (0, 3))}
    deep_reuse = reuse_cost(unet, embedding, args.samples, FRDiffConfig(cache_point="deep"))
    print(f"eval_deepcache: {args.samples} samples, seed {args.seed}; a FRDiff reuse call = {reuse:.3f} of its "
          f"keyframe call, a DeepCache shallow call = "
          + ", ".join(f"{r:.3f} (branch {b})" for b, r in partial.items()) + " of its full call, "
          f"frdiff_compile's deep reuse graph = {deep_reuse:.3f} of its keyframe graph")
    reference = DigitsPipeline(unet, embedding)(labels, STEPS, args.guidance, seed=args.seed)
    rows = []
    for run in rows_to_run(args.quick):
        steps = run.get("steps", STEPS)
        if run["method"] == "DDIM":
            model, cost, ratio = unet, float(steps), None
        elif "branch" in run:
            model = deepcache(unet, stepped_scheduler(steps), run["interval"], run["branch"])
            ratio = partial[run["branch"]]
            cost = deepcache_cost(steps, run["interval"], ratio)
        else:
            deep = run.get("cache_point") == "deep"
            config = FRDiffConfig(keyframe_interval=run["interval"], score_mixing=None if deep else run["mixing"],
                                  cache_point=run.get("cache_point", "features"))
            model, ratio = frdiff_compile.optimize(unet, config), deep_reuse if deep else reuse
            cost = build_schedule(steps, config).cost(ratio)
        start = time.perf_counter()
        images = DigitsPipeline(model, embedding)(labels, steps, args.guidance, seed=args.seed)
        wall = time.perf_counter() - start
        # frdiff_compile's wall time includes building its graphs at this shape (export and passes), once.
        build = getattr(getattr(model, "stats", None), "build_seconds", None)
        rows.append({**run, "steps": steps, "partial_cost": ratio, "cost": cost, "wall_s": wall, "build_s": build,
                     "psnr_db": psnr(images, reference), "sqnr_db": sqnr(images, reference),
                     "accuracy": judge.accuracy(images, labels), "fid_proxy": judge.fid_proxy(images)})
    fewer_steps = [r for r in rows if r["steps"] < STEPS]  # full compute is the reference: its PSNR is inf
    for row in rows:
        row["ddim_psnr_at_cost"] = None if row["method"] == "DDIM" else interpolated_ddim(
            fewer_steps, row["cost"], "psnr_db")
    print_table(rows, ["method", "branch", "steps", "partial_cost", "cost", "wall_s", "build_s", "psnr_db", "sqnr_db",
                       "accuracy", "fid_proxy", "ddim_psnr_at_cost"], "eval_deepcache (digits model, CPU)")
    path = append_csv(Path(args.csv), [{**row, "samples": args.samples, "seed": args.seed} for row in rows],
                      environment(CPU))
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
