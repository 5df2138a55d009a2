"""Shared benchmark plumbing: environment row, timing, table printing and CSV appending.

Invariants:
- Every timer synchronizes the device before it starts and before it reads; CUDA work is timed with CUDA
  events, CPU work with `time.perf_counter` (CPU ops are synchronous). Warm-up runs are never timed.
- Every CSV row names the device, the torch/diffusers/triton versions and the git revision, so a number
  can always be traced back to what produced it.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import platform
import statistics
import subprocess
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from models import build_unet

from frdiff_compile.passes import CallLayout
from frdiff_compile.schedule import StepKind

RESULTS = Path(__file__).resolve().parent / "results"


def add_unet_arguments(parser: argparse.ArgumentParser, latent: int) -> None:
    """The model and runtime arguments bench_unet and profile_graphs share (SD 1.5 config, random weights)."""
    parser.add_argument("--small", action="store_true", help="scaled-down config with the SD 1.5 block layout")
    parser.add_argument("--latent", type=int, default=latent, help=f"latent height and width (default {latent})")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = classifier-free guidance)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (CUDA default)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile both graphs (default: on for CUDA, off on CPU)")
    parser.add_argument("--cache-point", choices=("features", "deep"), default="features")


def unet_from_arguments(args: argparse.Namespace) -> types.SimpleNamespace:
    """The UNet `add_unet_arguments` describes, seeded (0) and on its device and dtype (`--dtype`, else fp16
    on CUDA and fp32 elsewhere), with `device`, `dtype`, `config` ("sd15" or "small") and a `shape` label."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    config = "small" if args.small else "sd15"
    unet = build_unet(config, args.latent).to(device=device, dtype=dtype)
    shape = f"{config} {args.batch}x4x{args.latent}x{args.latent} {str(dtype).replace('torch.', '')}"
    return types.SimpleNamespace(unet=unet, device=device, dtype=dtype, config=config, shape=shape)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_revision() -> str:
    """The checkout's short revision, "+dirty" when tracked files differ from it; FRDIFF_GIT_REV overrides
    it, since the device tool's copy of the checkout may carry a stale .git."""
    if os.environ.get("FRDIFF_GIT_REV"):
        return os.environ["FRDIFF_GIT_REV"]
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def environment(device: torch.device) -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is reported, not fatal
            return "-"

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "triton": version("triton"),
        "git": git_revision(),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of `fn` in ms over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def graph_time_ms(calls: Sequence[Callable[[], object]], device: torch.device, repeats: int = 10,
                  min_launches: int = 8) -> float:
    """Median device time in ms of one call, from CUDA-graph replays of all `calls` back to back.

    On CUDA the graph holds the calls repeated until it has at least `min_launches`, so the replay's own
    launch latency is amortised.

    A call timed on its own includes the host's dispatch when the host is slower than the kernel (on the GPU
    machine a custom op's dispatch took about 0.1 ms, longer than a 32 MB blend). Replaying a graph of many
    launches times only the device. Pass calls over several input sets whose footprint exceeds the L2
    cache, or the replays measure the cache. On CPU this is `time_ms` of the calls in turn.
    """
    def run_all() -> None:
        for call in calls:
            call()

    if device.type != "cuda":
        return time_ms(run_all, device, repeats) / len(calls)
    calls = list(calls) * -(-min_launches // len(calls))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture
        run_all()
        run_all()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    return time_ms(graph.replay, device, repeats) / len(calls)


def loop_ms(model: Callable, scheduler, latents: torch.Tensor, cond: dict, steps: int, device: torch.device) -> float:
    """Wall time in ms of one `steps`-step denoising loop (model output straight into `scheduler.step`)."""
    scheduler.set_timesteps(steps, device=device)
    x = latents.clone()
    synchronize(device)
    start = time.perf_counter()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t, **cond).sample, t, x).prev_sample
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


class DirectGraphs:
    """A prepared graph pair called directly, step by step as `schedule` says: a model for `loop_ms`.

    Each call flattens its arguments (`CallLayout.from_call`) and runs the keyframe, reuse or skip step of
    `entry` at the next step index: no argument binding, step tracking, module-state check or output
    wrapping. What `loop_ms` through `FRDiffUNet` takes on top of `loop_ms` through this is that host work,
    which the device waits for when the scheduler reads a device value every step (DDIM does). It computes
    what the runtime computes (tested).
    """

    def __init__(self, entry, schedule) -> None:
        self.entry, self.schedule, self.calls = entry, schedule, 0

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **cond) -> types.SimpleNamespace:
        _, tensors = CallLayout.from_call({"sample": sample, "timestep": timestep, **cond})
        index = self.calls % self.schedule.num_steps  # one loop after another
        self.calls += 1
        kind = self.schedule.kinds[index]
        if kind is StepKind.FULL:
            eps = self.entry.run_full(tensors, -1)
        elif kind is StepKind.REUSE:
            eps = self.entry.run_reuse(tensors, self.schedule.weights[index])
        else:
            eps = self.entry.run_skip()
        return types.SimpleNamespace(sample=eps)


def frdiff_step_ms(entry, tensors: list, scheduler, t, latents: torch.Tensor, device: torch.device,
                   repeats: int = 5) -> dict[str, float]:
    """Median ms of one keyframe call, reuse call, skip step and scheduler step of a prepared graph pair."""
    eps = torch.randn_like(latents)
    return {
        "keyframe": time_ms(lambda: entry.run_full(tensors, -1), device, repeats),
        "reuse": time_ms(lambda: entry.run_reuse(tensors, 0.5), device, repeats),
        "skip": time_ms(entry.run_skip, device, repeats),
        "scheduler": time_ms(lambda: scheduler.step(eps, t, latents), device, repeats),
    }


def loop_model_ms(counts: dict[str, int], ms: dict[str, float], steps: int) -> float:
    """The cost model of a loop: its full, reuse and skip steps and every scheduler step at measured times."""
    return (counts["full"] * ms["keyframe"] + counts["reuse"] * ms["reuse"] + counts["skip"] * ms["skip"]
            + steps * ms["scheduler"])


def deepcache(unet: torch.nn.Module, scheduler, interval: int, branch: int = 0,
              compile_backend: str | None = None) -> torch.nn.Module:
    """A deep copy of `unet` under DeepCache (the pip package, as it comes) at `interval`, `cache_branch_id`
    `branch`. The copy because DeepCache replaces forwards on the modules it is given. It finds the step
    from the timestep's value in `scheduler.timesteps`, so the caller keeps `scheduler` set up as the sampling
    loop's; the first call of a generation must be its step 0.

    With `compile_backend` ("inductor"; "eager" checks the wiring) the UNet's forward, DeepCache's block
    wrappers inside it, runs under torch.compile (`_compiled_helper`)."""
    from DeepCache import DeepCacheSDHelper

    twin = copy.deepcopy(unet)
    pipe = types.SimpleNamespace(unet=twin, scheduler=scheduler)
    if compile_backend is None:
        helper = DeepCacheSDHelper(pipe=pipe)
    else:
        helper = _compiled_helper(DeepCacheSDHelper)(pipe, compile_backend)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    return twin


def _compiled_helper(base: type) -> type:
    """DeepCache's helper with the UNet's forward compiled: a fair compiled peer for frdiff's graphs.

    As it comes, the helper's block wrappers decide from the step number (`cur_timestep - start_timestep` modulo
    the interval) inside the forward, so dynamo guards on the step number, recompiles at every step and, at its
    recompile limit (8), runs the rest eagerly. This subclass finds the step where the package does (the
    timestep's place in the scheduler's timesteps, looked up on the host), outside the compiled forward, and
    hands the package's own per-block rule only the phase: 0 on a full step, 1 on a shallow one. The rule and
    the cache are the package's; three graphs are compiled (the first full step, whose cache dict starts empty,
    the later full steps, and the shallow step).
    """

    class CompiledDeepCache(base):
        def __init__(self, pipe, backend: str) -> None:
            super().__init__(pipe=pipe)
            self.backend = backend

        def wrap_unet_forward(self) -> None:
            forward = self.function_dict["unet_forward"] = self.pipe.unet.forward
            compiled = torch.compile(forward, backend=self.backend)
            first_index: list[int] = []  # the package's start_timestep, kept out of the compiled forward
            # The schedule on the host, from the tensor it was read from: the package compares every entry on
            # the device (a kernel and a sync each, on CUDA), which would weigh on the peer's loop time.
            host: dict = {}

            def wrapped_forward(*args, **kwargs):
                timesteps = self.pipe.scheduler.timesteps
                if host.get("of") is not timesteps:
                    host.update(of=timesteps, values=timesteps.tolist())
                index = host["values"].index(args[1].item())
                first_index[:] = first_index or [index]
                self.start_timestep = 0
                self.cur_timestep = int((index - first_index[0]) % self.params["cache_interval"] != 0)
                return compiled(*args, **kwargs)

            self.pipe.unet.forward = wrapped_forward

    return CompiledDeepCache


def print_table(rows: Sequence[dict[str, object]], columns: Sequence[str], title: str) -> None:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def append_csv(path: Path, rows: Sequence[dict[str, object]], env: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    full = [{**env, **row} for row in rows]
    fields = list(dict.fromkeys(k for row in full for k in row))
    exists = path.exists() and path.stat().st_size > 0
    if exists:
        with path.open() as f:
            header = next(csv.reader(f), [])
        fields = header + [k for k in fields if k not in header]
        if fields != header:  # a new column: rewrite with the widened header
            with path.open() as f:
                old = list(csv.DictReader(f))
            full = old + full
            exists = False
    with path.open("a" if exists else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if not exists:
            writer.writeheader()
        writer.writerows(full)
    return path
