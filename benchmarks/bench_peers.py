"""UNet loop on CUDA against peers: eager diffusers, compiled stock, DeepCache, frdiff_compile.

Run (CUDA; SD 1.5 config with random weights, 512x512 = 64x64 latents, CFG batch 2, fp16, 50 DDIM steps,
the UNet loop only: no VAE, no text encoder):
    python benchmarks/bench_peers.py
    python benchmarks/bench_peers.py --config sdxl --latent 128 --steps 30
    python benchmarks/bench_peers.py --dry-run     # CPU, tiny config, nothing compiled: checks the script
    python benchmarks/bench_peers.py --cpu --config small --latent 32 --providers eager,frdiff-m2,...
                                                   # CPU inductor, fp32, no CUDA graphs: ratios only
    python benchmarks/bench_peers.py --quantize float8-dynamic   # every provider on torchao's quantized UNet

Providers, in one process on one UNet (DeepCache on a deep copy, since it rewrites module forwards): eager
diffusers (SDPA attention); "compiled-static": torch.compile of the stock UNet (inductor, default mode)
replayed as one CUDA graph by the same StaticGraph capture that frdiff_compile uses, the strongest stock
baseline and the one the targets name; DeepCache (the pip package) at cache interval 3 (--deepcache-interval),
branch 0; frdiff_compile M=2 and M=3 with score mixing (compiled, CUDA graphs; M=3 runs M=2's graphs under a
new schedule, `FRDiffUNet.reconfigure`, so it compiles nothing); frdiff_compile M=2 compiled without CUDA
graphs. Also available, not run by default: "compiled-static-nchw", compiled-static with inductor's layout
optimization off, as frdiff_compile compiles its graphs (inductor otherwise runs convolutions channels_last and
copies every weight to that layout at every call; the faster of the two is the baseline the summary judges
against); "compiled", torch.compile in "reduce-overhead" mode (inductor's own CUDA graphs; on the first H100
run it took 10.7 ms a step where our captured keyframe graph, which does more, took 7.7, so it is not the
strongest baseline); "deepcache-compiled", DeepCache at interval 3 with the UNet's forward (its block wrappers
inside) compiled by inductor, no CUDA graphs (`common.deepcache`): the method against frdiff's, both compiled,
where "deepcache" compares an eager implementation with compiled graphs; set it against frdiff-m3-nocg (the
same interval; it runs frdiff-m2-nocg's graphs where that was built) and frdiff-m2-nocg; "frdiff-deep3" and
"frdiff-deep2" (and "-nocg"), frdiff_compile with `cache_point="deep"`: DeepCache's method (branch 0, no score
mixing) served by frdiff's two compiled graphs, at interval 3 and 2 (deep2 runs deep3's graphs);
"compiled-static-cl", "frdiff-m2-cl" and "frdiff-m3-cl" (M=3 on M=2-cl's graphs), the same on a copy of the
UNet converted with `.to(memory_format=torch.channels_last)`, the conversion diffusers recommends: its
convolutions run channels_last with weights laid out once, where frdiff_compile's graphs otherwise keep the
NCHW layout the UNet is loaded in; "frdiff-m2-lo" and "frdiff-m3-lo" (M=3 on M=2-lo's graphs), frdiff_compile
with `conv_layout="inductor"` on the NCHW UNet: inductor's layout optimization runs the convolutions
channels_last, copying the weights at every call, as compiled-static does (the configuration of the 2026-11-26
H100 run, whose reuse call took 0.28 of a keyframe call); "frdiff-m2-combo" and "frdiff-m3-combo" (M=3 on
M=2-combo's graphs), frdiff_compile with inductor's experimental `combo_kernels` on while its graphs compile:
independent kernels share a launch (the SD 1.5 reuse graph's CUDA code has 43 Triton launches instead of 106:
the group-norm kernels of different resnets share them), which says whether the reuse call's launches cost it
time. Each provider runs one untimed loop (compilation, capture) and then --loops timed loops (CUDA events,
median).

Reports per provider: loop ms, speedup against eager and against compiled stock, first-loop seconds (for
compiled providers, mostly compilation), peak memory above what was allocated before it was built; for
frdiff also ms per keyframe and per reuse call, the cost model (full + reuse calls at their measured
times, skips and scheduler steps included) against its measured loop, and the same loop with the graphs
called directly (`graphs_loop_ms`; the difference, `runtime_host_ms`, is the runtime's own host work, which
DDIM's per-step read of a device value puts on the loop's critical path). Appends rows to
benchmarks/results/bench_peers.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch._inductor.config
from common import (RESULTS, DirectGraphs, append_csv, deepcache, environment, frdiff_step_ms, loop_model_ms, loop_ms,
                    print_table, synchronize)
from diffusers import DDIMScheduler
from models import build_unet, example_call

import frdiff_compile
from frdiff_compile import FRDiffConfig, build_schedule
from frdiff_compile.cudagraphs import StaticGraph
from frdiff_compile.passes import CallLayout

# Run order: the numbers the targets name come first, so a run cut short by its time limit keeps them; the
# stock compile comes after frdiff M=2 and the speedups against it are filled in at the end.
DEFAULT = ("eager", "frdiff-m2", "compiled-static", "frdiff-m3", "deepcache", "frdiff-m2-nocg")
ALL = (*DEFAULT, "compiled-static-nchw", "compiled", "deepcache-compiled", "frdiff-m3-nocg", "frdiff-deep3",
       "frdiff-deep2", "frdiff-deep3-nocg", "frdiff-deep2-nocg", "compiled-static-cl", "frdiff-m2-cl", "frdiff-m3-cl",
       "frdiff-m2-lo", "frdiff-m3-lo", "frdiff-m2-combo", "frdiff-m3-combo")
# Providers that run another's graphs under their own schedule where that one was built (`reconfigure`).
SHARES_GRAPHS = {"frdiff-m3": "frdiff-m2", "frdiff-deep2": "frdiff-deep3"}
BASELINES = ("eager", "compiled-static", "compiled-static-nchw", "compiled-static-cl", "compiled")
CHANNELS_LAST = "-cl"  # the suffix of the providers that run on the channels_last copy of the UNet
INDUCTOR_LAYOUT = "-lo"  # the suffix of the frdiff providers compiled with conv_layout="inductor"
COMBO = "-combo"  # the suffix of the frdiff providers compiled with inductor's combo_kernels on


# torchao's configs by the names --quantize takes: what `quantize_` does to every Linear layer (the
# convolutions stay as they are). The float8 ones need a GPU with float8 matrix products (H100 and later).
QUANTIZE = {"none": None, "int8-weight-only": "Int8WeightOnlyConfig",
            "int8-dynamic": "Int8DynamicActivationInt8WeightConfig", "float8-weight-only": "Float8WeightOnlyConfig",
            "float8-dynamic": "Float8DynamicActivationFloat8WeightConfig"}


def quantized(unet: torch.nn.Module, name: str) -> torch.nn.Module:
    """`unet` with its Linear layers quantized by torchao's config `name` (a QUANTIZE key), in place."""
    if QUANTIZE[name] is None:
        return unet
    from torchao import quantization  # only for --quantize: the benchmark runs without torchao otherwise

    quantization.quantize_(unet, getattr(quantization, QUANTIZE[name])())
    return unet


class StaticStock:
    """The stock UNet compiled by inductor and replayed by frdiff_compile's StaticGraph (one signature).

    The same capture discipline as frdiff's graphs (static inputs copied in, output cloned), so the speedup
    against it is feature reuse alone, not CUDA graphs against none.
    """

    def __init__(self, unet, mode: str, options: dict | None = None) -> None:
        self.unet = unet
        self.compiled = torch.compile(unet, backend="eager" if mode == "dry" else "inductor",
                                      options=None if mode == "dry" else options)
        self.graph: StaticGraph | None = None
        self.layout: CallLayout | None = None
        self.backend = "cuda" if mode == "cuda" else "emulate"

    def _run(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.compiled(**self.layout.rebuild(list(tensors)), return_dict=False)[0]

    def __call__(self, sample, timestep, **kwargs):
        layout, tensors = CallLayout.from_call({"sample": sample, "timestep": timestep, **kwargs})
        if self.graph is None:
            self.layout, self.graph = layout, StaticGraph(self._run, [], self.backend)
        elif layout != self.layout:
            raise ValueError("StaticStock serves one call signature; the benchmark changed its inputs")
        return types.SimpleNamespace(sample=self.graph(tensors))


def _without_suffixes(name: str) -> str:
    """A frdiff provider's name without its variant suffixes: frdiff-m3-nocg-cl is frdiff-m3."""
    return name.removesuffix(COMBO).removesuffix(CHANNELS_LAST).removesuffix(INDUCTOR_LAYOUT).removesuffix("-nocg")


def graphs_of(name: str) -> str:
    """The frdiff provider whose graphs `name` runs where that one was built: M=3 runs M=2's, deep2 deep3's
    (each with the same suffixes: frdiff-m3-cl runs frdiff-m2-cl's)."""
    base = _without_suffixes(name)
    return SHARES_GRAPHS.get(base, base) + name[len(base):]


def channels_last_copy(unet, copies: dict):
    """One deep copy of `unet` per run, converted to channels_last (made before a provider's memory is read,
    so its weights do not count as that provider's extra memory)."""
    if "cl" not in copies:
        copies["cl"] = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    return copies["cl"]


def inductor_patches(name: str) -> contextlib.AbstractContextManager:
    """The inductor settings provider `name` runs under: its graphs compile at its first loop, inside this,
    and the runtime's own compile options go on top of these (they set no combo_kernels)."""
    if name.endswith(COMBO):
        return torch._inductor.config.patch(combo_kernels=True)
    return contextlib.nullcontext()


def frdiff_config(name: str, mode: str) -> FRDiffConfig:
    """frdiff-m<M>[-nocg][-cl|-lo][-combo] (FRDiff's cache points) or frdiff-deep<N>[-nocg] (DeepCache's deep
    feature)."""
    method = _without_suffixes(name).removeprefix("frdiff-")
    deep = method.startswith("deep")
    return FRDiffConfig(keyframe_interval=int(method.removeprefix("deep" if deep else "m")),
                        cache_point="deep" if deep else "features",
                        cuda_graphs=False if "-nocg" in name else None,
                        conv_layout="inductor" if name.endswith(INDUCTOR_LAYOUT) else "traced",
                        compile={"dry": False, "cpu": True, "cuda": None}[mode])


def build(name: str, unet, scheduler, mode: str, runtimes: dict, deepcache_interval: int = 3) -> Callable:
    """Provider `name`; `mode` "cuda", "cpu" (CPU inductor, no CUDA graphs) or "dry" (nothing compiled)."""
    if name == "eager":
        return unet
    if name in ("compiled-static", "compiled-static-cl"):  # -cl: `unet` is the channels_last copy
        return StaticStock(unet, mode)
    if name == "compiled-static-nchw":
        return StaticStock(unet, mode, options={"layout_optimization": False})
    if name == "compiled":
        # The dry run checks the wiring only: the eager backend compiles nothing.
        if mode == "dry":
            return torch.compile(unet, backend="eager")
        return torch.compile(unet, mode="reduce-overhead" if mode == "cuda" else None)
    if name.startswith("deepcache"):
        backend = None if name == "deepcache" else "eager" if mode == "dry" else "inductor"
        return deepcache(unet, scheduler, interval=deepcache_interval, compile_backend=backend)
    config = frdiff_config(name, mode)
    owner = graphs_of(name)
    if owner != name and owner in runtimes:
        # The graphs do not depend on the schedule: M=3 replays the graphs M=2 compiled and captured, as a
        # user switching M on a live pipeline would (its compile time is M=2's).
        fr = runtimes[owner]
        fr.reconfigure(config)
        return fr
    runtimes[name] = frdiff_compile.optimize(unet, config)
    return runtimes[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="sd15", choices=["sd15", "sdxl", "small", "tiny"])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--loops", type=int, default=5, help="timed loops per provider (median)")
    parser.add_argument("--providers", default=",".join(DEFAULT), help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--deepcache-interval", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny config, 4 steps, nothing compiled")
    parser.add_argument("--cpu", action="store_true",
                        help="CPU, fp32, compiled by CPU inductor, no CUDA graphs (compiled-static emulates them): "
                             "ratios between providers, not GPU times")
    parser.add_argument("--quantize", default="none", choices=sorted(QUANTIZE),
                        help="quantize the UNet with torchao before every provider (the test extra installs it)")
    parser.add_argument("--csv", default=None, help="default: benchmarks/results/bench_peers.csv, bench_peers_cpu.csv "
                                                    "with --cpu (none for --dry-run)")
    args = parser.parse_args()
    names = [n for n in args.providers.split(",") if n]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        parser.error(f"unknown providers {unknown}; known: {', '.join(ALL)}")
    if args.dry_run:
        args.config, args.latent, args.steps, args.loops = "tiny", 8, 4, 1
        mode, device, dtype = "dry", torch.device("cpu"), torch.float32
    elif args.cpu:
        mode, device, dtype = "cpu", torch.device("cpu"), torch.float32
    elif not torch.cuda.is_available():
        parser.error("bench_peers measures CUDA providers and needs a CUDA device (use --cpu or --dry-run on CPU)")
    else:
        mode, device, dtype = "cuda", torch.device("cuda"), torch.float16

    torch.manual_seed(0)
    unet = quantized(build_unet(args.config, args.latent).to(device, dtype), args.quantize)
    call = example_call(unet, args.batch, args.latent, device, dtype)
    latents = call.pop("sample")
    scheduler = DDIMScheduler()
    env = environment(device)
    shape = f"{args.config} {args.batch}x4x{args.latent}x{args.latent} {str(dtype).replace('torch.', '')}"
    shape += f" {args.quantize}" if args.quantize != "none" else ""
    print(f"bench_peers: {shape}, {args.steps} DDIM steps on {env['device']} (torch {env['torch']}, git {env['git']})",
          flush=True)
    rows: list[dict] = []
    default_csv = {"dry": None, "cpu": RESULTS / "bench_peers_cpu.csv", "cuda": RESULTS / "bench_peers.csv"}[mode]
    csv_path = args.csv or (default_csv and str(default_csv))
    extra = {"shape": shape, "quantize": args.quantize, "steps": args.steps, "loops": args.loops,
             "dry_run": args.dry_run, "deepcache_interval": args.deepcache_interval}
    runtimes: dict = {}  # frdiff runtimes by provider, kept for the providers that share their graphs
    copies: dict = {}  # the channels_last copy of the UNet, made for the first -cl provider
    with torch.no_grad():
        for name in names:
            row: dict = {"provider": name}
            rows.append(row)
            source = channels_last_copy(unet, copies) if name.endswith(CHANNELS_LAST) else unet
            synchronize(device)
            before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                with inductor_patches(name):
                    model = build(name, source, scheduler, mode, runtimes, args.deepcache_interval)
                    stats_before = copy.copy(getattr(model, "stats", None))
                    start = time.perf_counter()
                    loop_ms(model, scheduler, latents, call, args.steps, device)  # compile, capture, warm
                    row["first_loop_s"] = time.perf_counter() - start
                    row["loop_ms"] = sorted(loop_ms(model, scheduler, latents, call, args.steps, device)
                                            for _ in range(args.loops))[args.loops // 2]
            except Exception as exc:  # noqa: BLE001 - one provider failing must not hide the others
                row["note"] = f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
                print(f"{name}: {row['note']}", flush=True)
                if csv_path:
                    append_csv(Path(csv_path), [{**extra, **row}], env)
                continue
            if device.type == "cuda":
                row["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            if name.startswith("frdiff"):
                # A provider without a runtime of its own runs another's graphs (frdiff-m3 on frdiff-m2's).
                describe_frdiff(row, model, stats_before, runtimes.get(name) is not model, scheduler, latents,
                                call, args.steps, device)
            if name == "frdiff-m2" and mode != "dry":
                # Where the first (cold) compile's time went, phase by phase, for the log.
                print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
            del model
            speedups(rows)
            print(f"{name}: {row['loop_ms']:.1f} ms per loop", flush=True)
            if csv_path:  # row by row, so a run cut short by its time limit keeps what it measured
                append_csv(Path(csv_path), [{**extra, **row}], env)

    speedups(rows)
    columns = ["provider", "loop_ms", "vs_eager", "vs_compiled_static", "vs_compiled_static_nchw",
               "vs_compiled_static_cl", "vs_compiled",
               "vs_all_keyframes", "keyframe_ms", "reuse_ms", "model_ms", "measured_over_model", "graphs_loop_ms",
               "runtime_host_ms", "compile_s", "first_loop_s", "peak_extra_MiB", "note"]
    print_table(rows, columns, f"bench_peers ({shape}, {args.steps} steps, median of {args.loops} loops)")
    if csv_path:
        print(f"\nappended {len(rows)} rows to {csv_path}")


def speedups(rows: list[dict]) -> None:
    """Fill vs_<baseline> on every measured row whose baseline has been measured by now."""
    base = {r["provider"]: r.get("loop_ms") for r in rows}
    for row in rows:
        for other in BASELINES:
            if base.get(other) and row.get("loop_ms"):
                row[f"vs_{other.replace('-', '_')}"] = base[other] / row["loop_ms"]


def describe_frdiff(row: dict, fr, before, shared: bool, scheduler, latents, call, steps: int,
                    device: torch.device) -> None:
    """Per-call times of the graphs the loop used, and the cost model they predict for the loop.

    Counters are this provider's own (since `before`), also when it runs graphs another provider built.
    """
    scheduler.set_timesteps(steps, device=device)
    t = scheduler.timesteps[steps // 2]
    entry, tensors = fr.prepare(latents, t, **call)
    ms = frdiff_step_ms(entry, tensors, scheduler, t, latents, device)
    schedule = build_schedule(steps, fr.frdiff_config)
    counts = schedule.counts()
    model = loop_model_ms(counts, ms, steps)
    # The same loop with the graphs called directly: what the runtime's host work per call adds.
    direct_model = DirectGraphs(entry, schedule)
    direct = sorted(loop_ms(direct_model, scheduler, latents, call, steps, device) for _ in range(3))[1]
    # The same runtime with a keyframe at every step, at the measured per-call times: what feature reuse
    # itself gains, separate from compilation and CUDA graphs.
    all_keyframes = loop_model_ms({"full": steps, "reuse": 0, "skip": 0}, ms, steps)
    stats = fr.stats.since(before)
    prefix = f"graphs of {graphs_of(row['provider'])} (reconfigure); " if shared else ""
    row.update({
        "keyframe_ms": ms["keyframe"], "reuse_ms": ms["reuse"], "model_ms": model,
        "measured_over_model": row["loop_ms"] / model, "vs_all_keyframes": all_keyframes / row["loop_ms"],
        "graphs_loop_ms": direct, "runtime_host_ms": row["loop_ms"] - direct,
        "compile_s": stats.compile_seconds,
        "note": f"{prefix}{counts['full']}/{counts['reuse']}/{counts['skip']} full/reuse/skip; compile "
                f"{stats.compile_seconds:.0f} s (reuse graph {stats.reuse_compile_seconds:.0f} s; "
                f"{stats.compiles} graphs, {stats.recompiles} recompiles); export and passes "
                f"{stats.build_seconds:.0f} s; "
                f"graph captures {stats.cudagraph_captures}, replays {stats.full_replays}+{stats.reuse_replays}, "
                f"fallbacks {stats.cudagraph_fallbacks}",
    })


if __name__ == "__main__":
    main()
