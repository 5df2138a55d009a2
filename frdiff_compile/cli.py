"""`frdiff-compile` (also `python -m frdiff_compile`): the project's command line.

    frdiff-compile demo                         # shipped digits model: stock vs FRDiff, table + PNG
    frdiff-compile demo --model DIR --prompt T  # a local diffusers Stable Diffusion folder
    frdiff-compile tune --target-keyframes 17   # Auto-FR keyframe policy for the digits model

The CLI is the one place that prints. Bad arguments and unusable models end with one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .api import UnsupportedModelError
from .config import FRDiffConfig


class CLIError(Exception):
    """A problem with the user's input, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        raise CLIError(f"{message} (see '{self.prog} --help')")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="frdiff-compile", description="FRDiff feature reuse for diffusers UNets.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="generate with the stock and the optimized UNet and compare")
    demo.add_argument("--steps", type=_positive, default=50, help="DDIM steps (default 50)")
    demo.add_argument("--interval", type=_positive, default=2, help="keyframe interval M (default 2)")
    demo.add_argument("--bias", type=float, default=0.5, help="score-mixing bias b (default 0.5)")
    demo.add_argument("--no-mixing", action="store_true", help="pure feature reuse, no score mixing")
    demo.add_argument("--cache-point", choices=("features", "deep"), default="features",
                      help="features: FRDiff's (default); deep: DeepCache's, on the same graphs (no score mixing)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--rows", type=_positive, default=4, help="digits model: rows of 0-9 in the grid (default 4)")
    demo.add_argument("--guidance", type=float, default=None,
                      help="classifier-free guidance scale (default 1.5 for the digits model, 7.5 with --model)")
    demo.add_argument("--out", type=Path, default=Path("frdiff_demo.png"), help="side-by-side PNG to write")
    demo.add_argument("--model", type=Path, default=None, help="a local diffusers Stable Diffusion folder")
    demo.add_argument("--prompt", default="a photograph of an astronaut riding a horse", help="with --model")
    demo.add_argument("--size", type=_positive, default=None, help="with --model: image height and width")
    tune = sub.add_parser("tune", help="learn a keyframe policy with Auto-FR on the shipped digits model")
    tune.add_argument("--steps", type=_positive, default=50, help="DDIM steps the policy is for (default 50)")
    tune.add_argument("--iterations", type=_positive, default=100, help="search iterations (default 100)")
    tune.add_argument("--target-keyframes", type=_positive, default=None,
                      help="keyframe budget: searched from the uniform mask with that many keyframes")
    tune.add_argument("--reuse-cost", type=float, default=None,
                      help="with --target-keyframes: a reuse call's time over a keyframe call's on the target "
                           "machine; no mask costlier than the uniform one is tried (default: no cost cap)")
    tune.add_argument("--batch", type=_positive, default=8, help="samples per iteration and validation draw")
    tune.add_argument("--validation-draws", type=_positive, default=4, help="fixed draws masks are compared on")
    tune.add_argument("--weight", type=float, default=1e-3, help="regulariser weight w without a budget (default 1e-3)")
    tune.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate without a budget (default 5e-3)")
    tune.add_argument("--bias", type=float, default=0.5, help="score-mixing bias b used in the search")
    tune.add_argument("--no-mixing", action="store_true", help="search for pure feature reuse")
    tune.add_argument("--cache-point", choices=("features", "deep"), default="features",
                      help="what reuse steps read: FRDiff's features (default) or DeepCache's deep feature")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--out", type=Path, default=Path("frdiff_policy.json"), help="policy JSON to write")
    return parser


def run_tune(args: argparse.Namespace) -> None:
    from .autofr import digits_problem, search
    from .digits import load_digits_model

    if args.target_keyframes is not None and args.target_keyframes > args.steps:
        raise CLIError(f"--target-keyframes {args.target_keyframes} exceeds --steps {args.steps}")
    if args.reuse_cost is not None and (args.target_keyframes is None or not 0.0 <= args.reuse_cost <= 1.0):
        raise CLIError(f"--reuse-cost {args.reuse_cost} needs --target-keyframes and a value in [0, 1]")
    config = FRDiffConfig(mix_bias=args.bias, score_mixing=False if args.no_mixing else None,
                          cache_point=args.cache_point)
    unet, embedding = load_digits_model()
    start = time.perf_counter()
    result = search(unet, digits_problem(embedding, batch=args.batch), args.steps, iterations=args.iterations,
                    lr=args.lr, weight=args.weight, target_keyframes=args.target_keyframes,
                    validation_draws=args.validation_draws, config=config, seed=args.seed, reuse_cost=args.reuse_cost)
    path = result.policy.save(args.out)
    mask = "".join("K" if k else "." for k in result.policy.keyframes)
    print(f"Auto-FR: {result.policy.num_keyframes} of {args.steps} steps are keyframes "
          f"({time.perf_counter() - start:.0f} s): {mask}")
    print(f"wrote {path}; use it with FRDiffConfig.from_policy({str(path)!r})")


def _config(args: argparse.Namespace) -> FRDiffConfig:
    try:
        return FRDiffConfig(keyframe_interval=args.interval, mix_bias=args.bias,
                            score_mixing=False if args.no_mixing else None, cache_point=args.cache_point)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "demo":
            from .cli_demo import run_digits_demo, run_pipeline_demo

            config = _config(args)
            if args.guidance is None:
                args.guidance = 7.5 if args.model is not None else 1.5
            if args.model is not None:
                run_pipeline_demo(args, config)
            else:
                run_digits_demo(args, config)
        elif args.command == "tune":
            run_tune(args)
        return 0
    except (CLIError, UnsupportedModelError, FileNotFoundError, ValueError) as exc:
        print(f"frdiff-compile: error: {exc}", file=sys.stderr)
        return 2


def timed(fn):  # noqa: ANN001, ANN201 - tiny helper for the demo's host-synchronous CPU/GPU timing
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


__all__ = ["CLIError", "build_parser", "main", "timed"]
