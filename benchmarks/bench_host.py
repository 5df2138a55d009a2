"""The runtime's host work at each kind of step, up to the moment its graph is launched and in all.

Run:
    python benchmarks/bench_host.py                              # SD 1.5 config, 50 DDIM steps, M=2
    python benchmarks/bench_host.py --config sdxl --steps 30

Diffusers' DDIM step reads a device value, so the device is idle from the end of one step until the next
step's graph is launched: the runtime's host work before that launch is device idle time, and the host
work after it (a generation's first step reads the module state then, `FRDiffUNet._first_step_ahead`)
runs while the device works. This times both by the host's clock. The graphs are the runtime's own,
built for an 8x8 latent and captured through the "emulate" CUDA-graph backend (the replay discipline of
the CUDA path: static inputs copied in, output cloned), then replaced by a function that notes the time
it is called (the launch) and returns at once: what is timed is the runtime, not a UNet. Rows: each step
kind (a generation's first step, its later keyframes, reuse steps, skip steps, which launch no graph),
median µs from the call to the launch and for the whole call, through the runtime and through the same
graphs called directly (`common.DirectGraphs`: the replay's own host work, the static-input copies
included, without the runtime's binding, step tracking, module-state check and output wrapping);
`module_snapshot` and `tensor_addresses` alone. It measures the host it runs on (a GPU host's is
another); a GPU is not used. Appends rows to benchmarks/results/bench_host.csv.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from common import RESULTS, DirectGraphs, append_csv, environment, print_table, time_ms
from diffusers import DDIMScheduler
from models import build_unet, example_call

import frdiff_compile
from frdiff_compile import FRDiffConfig
from frdiff_compile.code_reads import CodeReads
from frdiff_compile.module_state import module_snapshot, tensor_addresses
from frdiff_compile.schedule import Schedule, StepKind, build_schedule


def launch_recorder(out: torch.Tensor, stamps: list[float]):
    """A stand-in graph: notes when it is launched and returns an output of the real one's shape."""
    def launched(*args: torch.Tensor) -> torch.Tensor:
        stamps.append(time.perf_counter())
        return out
    return launched


def median_us(seconds: list[float]) -> float | None:
    return statistics.median(seconds) * 1e6 if seconds else None


KIND_NAMES = {StepKind.FULL: "keyframe", StepKind.REUSE: "reuse", StepKind.SKIP: "skip"}


@torch.no_grad()
def step_times(model, schedule: Schedule, sched, sample: torch.Tensor, cond: dict, generations: int,
               stamps: list[float]) -> dict[str, dict[str, list[float]]]:
    """Per step kind (as `schedule` has them; a generation's first step apart), the seconds from each call of
    `model` to its graph's launch and of each whole call."""
    times: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"to_launch": [], "call": []})
    for _ in range(generations):
        sched.set_timesteps(schedule.num_steps)
        x = sample
        for i, t in enumerate(sched.timesteps):
            launches = len(stamps)
            start = time.perf_counter()
            out = model(x, t, **cond).sample
            end = time.perf_counter()
            kind = "first step" if i == 0 else KIND_NAMES[schedule.kinds[i]]
            if len(stamps) > launches:
                times[kind]["to_launch"].append(stamps[launches] - start)
            times[kind]["call"].append(end - start)
            x = sched.step(out, t, x).prev_sample
    return times


def rows_of(times: dict[str, dict[str, list[float]]], path: str, config: str, note: str = "") -> list[dict]:
    return [{"config": config, "path": path, "item": kind, "calls": len(t["call"]),
             "to_launch_us": median_us(t["to_launch"]), "call_us": median_us(t["call"]),
             "note": note if kind == "first step" else ""} for kind, t in sorted(times.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("sd15", "sdxl", "small", "tiny"), default="sd15",
                        help="the module tree whose host work is timed (tiny: the tests' check of this script)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--interval", type=int, default=2, help="keyframe interval M")
    parser.add_argument("--generations", type=int, default=20, help="timed generations (one more untimed first)")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_host.csv")
    args = parser.parse_args()

    latent, batch = 8, 2
    torch.manual_seed(0)
    unet = build_unet(args.config, latent)
    cond = example_call(unet, batch, latent, "cpu", torch.float32)
    sample = cond.pop("sample")
    fr = frdiff_compile.optimize(unet, FRDiffConfig(keyframe_interval=args.interval))
    fr.graph_backend_override = "emulate"
    sched = DDIMScheduler()
    schedule = build_schedule(args.steps, fr.frdiff_config)
    stamps: list[float] = []
    step_times(fr, schedule, sched, sample, cond, 1, stamps)  # builds the pair and captures both graphs
    for entry in fr.graph_entries():
        for buffers in entry.slots:
            for static in (buffers.static_keyframe, buffers.static_reuse):
                static.fn = launch_recorder(buffers.keyframe_out, stamps)
    before = copy.copy(fr.stats)
    times = step_times(fr, schedule, sched, sample, cond, args.generations, stamps)
    new = fr.stats.since(before)
    ahead = f"{new.keyframes_ahead} of {args.generations} first steps replayed before the module state was read"
    # The same graphs called directly (no argument binding, step tracking, module-state check or output
    # wrapping): what is left of each step's time to launch is the replay's own host work.
    direct = step_times(DirectGraphs(fr.graph_entries()[0], schedule), schedule, sched, sample, cond,
                        args.generations, stamps)
    rows = rows_of(times, "runtime", args.config, ahead) + rows_of(direct, "graphs called directly", args.config)
    cpu, reads = torch.device("cpu"), CodeReads()  # the runtime keeps one such memo; the warm-up call fills this
    for item, fn in (("module_snapshot", lambda: module_snapshot(unet, reads)),
                     ("tensor_addresses", lambda: tensor_addresses(unet))):
        rows.append({"config": args.config, "item": item, "call_us": time_ms(fn, cpu, repeats=50, warmup=1) * 1e3})
    print_table(rows, ["path", "item", "calls", "to_launch_us", "call_us", "note"],
                f"Runtime host work, {args.config} config, {args.steps} DDIM steps, M={args.interval}, "
                f"median over {args.generations} generations (µs)")
    print(f"\nrows appended to {append_csv(args.out, rows, environment(torch.device('cpu')))}")


if __name__ == "__main__":
    main()
