"""Auto-FR evidence: learned keyframe masks against uniform keyframes at the same keyframe count.

Run (CPU, the shipped digits model; the two searches dominate the time):
    python benchmarks/eval_autofr.py                      # searches for 17 and 25 keyframes of 50 steps
    python benchmarks/eval_autofr.py --iterations 20      # a shorter search
    python benchmarks/eval_autofr.py --reuse-cost 0.25    # no mask costlier than uniform (a reuse call = 0.25)
    python benchmarks/eval_autofr.py --cache-point deep   # masks for DeepCache's cache point (no score mixing,
                                                          # so every mask with K keyframes costs the same)

Each search writes its policy to benchmarks/results/policy_digits_50steps_<K>kf[_capped][_deep].json
(eval_quality.py adds these to its Pareto plot). Evaluation uses seeds the search never saw (--eval-seed, 200
samples): PSNR and SQNR against full-compute 50-step DDIM from the same noise, accuracy and FID-proxy, for the
Auto-FR mask and for uniform keyframes with the same count (M=3 has 17 keyframes of 50, M=2 has 25). Appends
rows to benchmarks/results/eval_autofr.csv.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import RESULTS, append_csv, environment, print_table

import frdiff_compile
from frdiff_compile import FRDiffConfig, StepKind, build_schedule
from frdiff_compile.autofr import digits_problem, search
from frdiff_compile.digits import DigitsPipeline, load_digits_model
from frdiff_compile.quality import DigitsJudge, psnr, sqnr

STEPS = 50
UNIFORM = {17: 3, 25: 2}  # keyframe count -> the uniform interval with that count at 50 steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=30, help="search iterations (one validated move each)")
    parser.add_argument("--targets", type=int, nargs="+", default=[17, 25])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--eval-seed", type=int, default=4321, help="noise seed for evaluation (never searched on)")
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8, help="samples per search iteration and validation draw")
    parser.add_argument("--validation-draws", type=int, default=4)
    parser.add_argument("--reuse-cost", type=float, default=None,
                        help="cap each search at the uniform mask's cost, a reuse call costing this much of a "
                             "keyframe call (policies then go to ..._<K>kf_capped.json)")
    parser.add_argument("--cache-point", choices=("features", "deep"), default="features")
    parser.add_argument("--csv", default=str(RESULTS / "eval_autofr.csv"))
    args = parser.parse_args()
    unet, embedding = load_digits_model()
    judge = DigitsJudge()
    labels = [i % 10 for i in range(args.samples)]
    reference = DigitsPipeline(unet, embedding)(labels, STEPS, seed=args.eval_seed)
    rows = []
    for target in args.targets:
        start = time.perf_counter()
        result = search(unet, digits_problem(embedding, batch=args.batch), STEPS, iterations=args.iterations,
                        target_keyframes=target, validation_draws=args.validation_draws, seed=args.search_seed,
                        reuse_cost=args.reuse_cost, config=FRDiffConfig(cache_point=args.cache_point))
        search_s = time.perf_counter() - start
        deep = args.cache_point == "deep"
        suffix = ("" if args.reuse_cost is None else "_capped") + ("_deep" if deep else "")
        path = result.policy.save(RESULTS / f"policy_digits_{STEPS}steps_{target}kf{suffix}.json")
        learned = "Auto-FR" if args.reuse_cost is None else f"Auto-FR, cost cap r={args.reuse_cost}"
        learned += ", deep" if deep else ""
        candidates = {learned: FRDiffConfig.from_policy(str(path))}
        if target in UNIFORM:
            uniform = FRDiffConfig(keyframe_interval=UNIFORM[target], cache_point=args.cache_point)
            candidates[f"uniform M={UNIFORM[target]}" + (", deep" if deep else "")] = uniform
        for name, config in candidates.items():
            images = DigitsPipeline(frdiff_compile.optimize(unet, config), embedding)(labels, STEPS, seed=args.eval_seed)
            counts = build_schedule(STEPS, config).counts()
            rows.append({
                "method": name, "keyframes": counts["full"], "reuse": counts["reuse"], "skip": counts["skip"],
                "psnr_db": psnr(images, reference), "sqnr_db": sqnr(images, reference),
                "accuracy": judge.accuracy(images, labels), "fid_proxy": judge.fid_proxy(images),
                "search_s": search_s if name == learned else None,
                # MSE on the search's own validation draws (seed search_seed + 1): the kept mask and its uniform start
                "val_mse": result.validation_mse if name == learned else result.start_validation_mse,
                "mask": "".join("K" if kind is StepKind.FULL else "." for kind in build_schedule(STEPS, config).kinds),
            })
    print_table(rows, ["method", "keyframes", "reuse", "skip", "psnr_db", "sqnr_db", "accuracy", "fid_proxy", "search_s"],
                f"eval_autofr (digits, {STEPS} steps, {args.samples} samples, eval seed {args.eval_seed})")
    for row in rows:
        print(f"{row['method']:<12} {row['keyframes']:>2} keyframes: {row['mask']}")
    path = append_csv(Path(args.csv), [{**r, "iterations": args.iterations, "samples": args.samples, "batch": args.batch} for r in rows],
                      environment(torch.device("cpu")))
    print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
