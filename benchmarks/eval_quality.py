"""Quality harness on the shipped digits model: DDIM at fewer steps against FRDiff at equal cost.

Run (about two minutes on 2 CPU cores):
    python benchmarks/eval_quality.py
    python benchmarks/eval_quality.py --samples 100 --quick   # smoke run

Every row uses the same labels (0-9 repeated) and the same noise (seed --seed). Columns: cost in
full-UNet-call equivalents (a reuse call counted at its measured cost relative to a keyframe call, timed
here at the harness's batch), wall time, PSNR/SQNR against full 50-step DDIM from the same noise, class
accuracy and FID-proxy (frdiff_compile.quality). Writes benchmarks/results/eval_quality.csv and a Pareto
plot (cost against FID-proxy, one curve per method) benchmarks/results/eval_quality_pareto.png, and prints
the two checks of the quality issue: at how many FRDiff operating points FID-proxy beats DDIM interpolated
at equal cost, and FRDiff M=2 at 50 steps against full 50 steps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS, append_csv, environment, print_table, time_ms

import frdiff_compile
from frdiff_compile import FRDiffConfig, build_schedule
from frdiff_compile.digits import DigitsPipeline, load_digits_model
from frdiff_compile.digits.model import IMAGE_SIZE, NULL_LABEL
from frdiff_compile.policy import KeyframePolicy
from frdiff_compile.quality import DigitsJudge, psnr, sqnr


def reuse_cost(unet, embedding, batch: int, config: FRDiffConfig | None = None) -> float:
    """Measured reuse-call time over keyframe-call time at this batch (the cost model's reuse weight), for the
    graphs `config` builds (its cache point)."""
    fr = frdiff_compile.optimize(unet, config)
    x = torch.randn(2 * batch, 1, IMAGE_SIZE, IMAGE_SIZE)
    cond = embedding(torch.full((2 * batch,), NULL_LABEL))
    t = torch.tensor(500)
    with torch.no_grad():
        entry, tensors = fr.prepare(x, t, encoder_hidden_states=cond)
        full = time_ms(lambda: entry.run_full(tensors, -1), torch.device("cpu"), 5)
        reuse = time_ms(lambda: entry.run_reuse(tensors, 0.5), torch.device("cpu"), 5)
    return reuse / full


def add_sampling_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """The options every digits-model harness shares (eval_schedulers.py takes them from here)."""
    parser.add_argument("--samples", type=int, default=200, help="images per row (labels 0-9 repeated)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--quick", action="store_true", help=quick_help)


def setup(args: argparse.Namespace) -> tuple:
    """(unet, embedding, judge, labels, reuse cost) for a digits-model harness run with `args`."""
    torch.manual_seed(0)
    unet, embedding = load_digits_model()
    labels = [i % 10 for i in range(args.samples)]
    return unet, embedding, DigitsJudge(), labels, reuse_cost(unet, embedding, args.samples)


def rows_to_run(quick: bool) -> list[dict]:
    runs = [{"method": "DDIM", "steps": s} for s in ((10, 20, 50) if quick else (10, 15, 20, 30, 50))]
    for steps in (50,) if quick else (20, 30, 50):
        for m in (2, 3) if quick else (2, 3, 4):
            for b in (0.5,) if quick else (0.3, 0.5, 0.7):
                runs.append({"method": f"FRDiff M={m}", "steps": steps, "M": m, "b": b, "mixing": True})
    for m in (2, 3):
        runs.append({"method": f"FRDiff M={m} no mixing", "steps": 50, "M": m, "b": None, "mixing": False})
    for path in sorted(RESULTS.glob("policy_digits_*.json")):  # by eval_autofr.py; "_paper" by frdiff-compile tune
        policy = KeyframePolicy.load(path)
        if policy.settings.get("method") == "penalty":
            method = "Auto-FR, paper's search"
        else:
            method = "Auto-FR" if policy.settings.get("reuse_cost") is None else "Auto-FR, cost cap"
        method += ", deep" if policy.settings.get("cache_point") == "deep" else ""
        runs.append({"method": method, "steps": policy.num_steps, "b": None, "policy": str(path)})
    return runs


def interpolated_ddim(rows: list[dict], cost: float, column: str = "fid_proxy") -> float | None:
    """DDIM's `column` linearly interpolated at `cost` over the DDIM rows; None outside their range."""
    ddim = sorted((r["cost"], r[column]) for r in rows if r["method"] == "DDIM")
    costs, values = zip(*ddim)
    if not costs[0] <= cost <= costs[-1]:
        return None
    return float(np.interp(cost, costs, values))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "DDIM", m))
    for method in methods:
        pts = sorted((r["cost"], r["fid_proxy"]) for r in rows if r["method"] == method and r.get("b") in (None, 0.5))
        label = method + (" (b=0.5)" if method.startswith("FRDiff") and "mixing" not in method else "")
        ax.plot(*zip(*pts), marker="o", label=label)
        others = [(r["cost"], r["fid_proxy"]) for r in rows if r["method"] == method and r.get("b") not in (None, 0.5)]
        if others:
            ax.scatter(*zip(*others), marker="x", s=18, alpha=0.6, color=ax.lines[-1].get_color())
    ax.set_xlabel("cost (full-UNet-call equivalents per sample)")
    ax.set_ylabel("FID-proxy (lower is better)")
    ax.set_title("Digits model: quality against cost (x: FRDiff with b = 0.3 / 0.7)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_sampling_args(parser, "a few rows only")
    parser.add_argument("--csv", default=str(RESULTS / "eval_quality.csv"))
    parser.add_argument("--plot", default=str(RESULTS / "eval_quality_pareto.png"))
    args = parser.parse_args()
    unet, embedding, judge, labels, r = setup(args)
    env = environment(torch.device("cpu"))
    print(f"eval_quality: {args.samples} samples, seed {args.seed}, reuse call = {r:.3f} of a keyframe call")
    reference = DigitsPipeline(unet, embedding)(labels, 50, args.guidance, seed=args.seed)
    rows = []
    ratios = {"features": r}  # a reuse call's cost by cache point; the deep one's measured if a policy needs it
    for run in rows_to_run(args.quick):
        if run["method"] == "DDIM":
            model, cost = unet, float(run["steps"])
        else:
            if "policy" in run:
                config = FRDiffConfig.from_policy(run["policy"])
            else:
                config = FRDiffConfig(keyframe_interval=run["M"], mix_bias=run["b"] or 0.5, score_mixing=run["mixing"])
            model = frdiff_compile.optimize(unet, config)
            if config.cache_point not in ratios:
                ratios[config.cache_point] = reuse_cost(unet, embedding, args.samples, config)
            cost = build_schedule(run["steps"], config).cost(ratios[config.cache_point])
        start = time.perf_counter()
        images = DigitsPipeline(model, embedding)(labels, run["steps"], args.guidance, seed=args.seed)
        wall = time.perf_counter() - start
        rows.append({**{k: v for k, v in run.items() if k != "policy"}, "cost": cost, "wall_s": wall, "psnr_db": psnr(images, reference),
                     "sqnr_db": sqnr(images, reference), "accuracy": judge.accuracy(images, labels),
                     "fid_proxy": judge.fid_proxy(images)})
    for row in rows:
        ddim = interpolated_ddim(rows, row["cost"]) if row["method"] != "DDIM" else None
        row["ddim_fid_at_cost"] = ddim
        row["beats_ddim"] = None if ddim is None else row["fid_proxy"] < ddim
    print_table(rows, ["method", "steps", "b", "cost", "wall_s", "psnr_db", "sqnr_db", "accuracy", "fid_proxy",
                       "ddim_fid_at_cost", "beats_ddim"], "eval_quality (digits model, CPU)")
    wins = sum(1 for row in rows if row["beats_ddim"])
    print(f"\nFRDiff operating points with lower FID-proxy than DDIM at equal cost: {wins} "
          f"of {sum(1 for row in rows if row['beats_ddim'] is not None)} (target: >= 3)")
    full = next(row for row in rows if row["method"] == "DDIM" and row["steps"] == 50)
    m2 = next((row for row in rows if row["method"] == "FRDiff M=2" and row["steps"] == 50 and row["b"] == 0.5), None)
    if m2:
        print(f"FRDiff M=2 at 50 steps: accuracy {m2['accuracy']:.3f} vs {full['accuracy']:.3f} "
              f"(target within 0.01), FID-proxy {m2['fid_proxy']:.3f} vs {full['fid_proxy']:.3f} "
              f"({100 * (m2['fid_proxy'] / full['fid_proxy'] - 1):+.1f}%, target within 10%)")
    path = append_csv(Path(args.csv), [{**row, "samples": args.samples, "seed": args.seed, "reuse_cost": r}
                                       for row in rows], env)
    plot(rows, Path(args.plot))
    print(f"appended {len(rows)} rows to {path}; plot {args.plot}")


if __name__ == "__main__":
    main()
