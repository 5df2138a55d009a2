"""Where one keyframe call and one reuse call of frdiff's compiled graphs spend their device time, kernel by kernel.

Run (CUDA; SD 1.5 config with random weights, 64x64 latents, CFG batch 2, fp16, compiled graphs):
    python benchmarks/profile_graphs.py
    python benchmarks/profile_graphs.py --cache-point deep
    python benchmarks/profile_graphs.py --small --latent 8 --calls 2   # CPU: checks the script (aten ops, CPU time)

Why: on an H200 (2026-11-28) a reuse call took 0.47 of a keyframe call's time for 0.27 of its FLOPs, where an
H100 run two days earlier had measured 0.28 of the time; the loop times cannot say why. This lists each graph's
kernels with their launches and device time per call, so one GPU run tells layout copies or unfused
elementwise work from the convolutions. The graphs run without CUDA graphs, so the profiler sees every launch;
they are the kernels a capture replays. The event-timed call beside the profile shows how far the launches
alone (the host) set the pace.

Prints per graph the call time, the device time and launches per call and the top kernels, and the seconds the
runtime counted building and compiling the pair; appends one row per kernel to benchmarks/results/profile_graphs.csv
(or --csv), its graph's totals and those seconds on every row.

Also each graph's convolutions by shape (input, weight, stride, groups), with their device time per call (CPU
time on CPU), FLOPs and TFLOP/s, into profile_convs.csv beside that CSV: one reuse call runs 44 convolutions on
SD 1.5, 22 of them (every resnet's conv2) off the sample's path and some so small that one alone leaves a GPU
mostly idle (8x8 maps at 1280 channels; see bench_flops.py). Their TFLOP/s against the large ones' says whether
that is where the reuse call's time above its FLOP share goes. A kernel name alone cannot: one cuDNN kernel
serves many shapes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import (
    RESULTS,
    add_unet_arguments,
    append_csv,
    environment,
    print_table,
    synchronize,
    time_ms,
    unet_from_arguments,
)
from diffusers import DDIMScheduler
from models import conv_gflop, example_call
from torch.profiler import ProfilerActivity

import frdiff_compile
from frdiff_compile import FRDiffConfig


def convolutions(events, device: torch.device, calls: int) -> list[dict[str, object]]:
    """`aten::convolution` calls grouped by shape, per graph call, longest first: launches, device time
    (CUDA; the kernels each call launched, its children's included) or CPU time, GFLOP and TFLOP/s."""
    groups: dict[tuple, list[float]] = {}
    for event in events:
        if event.name != "aten::convolution" or len(event.input_shapes) < 2:
            continue
        x, w = event.input_shapes[:2]
        # stride, padding, dilation, transposed, output_padding, groups; a torch that records no argument
        # values leaves the shape without FLOPs rather than failing the profile.
        concrete = list(getattr(event, "concrete_inputs", None) or [])[3:9]
        known = len(concrete) == 6 and all(v is not None for v in concrete)
        stride, padding, dilation, transposed, _, n_groups = concrete if known else ((), (), (), False, None, 1)
        spent = event.device_time_total if device.type == "cuda" else event.cpu_time_total
        group = groups.setdefault((tuple(x), tuple(w), tuple(stride), tuple(padding), tuple(dilation),
                                   bool(transposed), int(n_groups), known), [0, 0.0])
        group[0] += 1
        group[1] += spent
    rows = []
    for (x, w, stride, padding, dilation, transposed, n_groups, known), (n, us) in groups.items():
        gflop = None
        if known and not transposed and len(x) == 4 and len(w) == 4:
            gflop = conv_gflop(x, w, stride, padding, dilation)
        label = f"x {'x'.join(map(str, x))} w {'x'.join(map(str, w))}"
        if known:
            label += f" stride {stride[0]}" + (f" groups {n_groups}" if n_groups > 1 else "")
            label += " transposed" if transposed else ""
        else:
            label += " (arguments not recorded)"
        # GFLOP per us is 1e15 FLOP/s, so 1e3 TFLOP/s.
        rows.append({"conv": label, "launches": n / calls, "us": us / calls, "gflop": gflop,
                     "tflops": gflop * n / us * 1e3 if gflop is not None and us > 0 else None})
    rows.sort(key=lambda r: -r["us"])
    return rows


def profile(fn, device: torch.device, calls: int) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Kernels (CUDA) or aten ops by self time (CPU) of `calls` runs of `fn`, per call, longest first; and
    its convolutions by shape (`convolutions`)."""
    fn()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    totals: dict[str, list[float]] = {}
    if device.type == "cuda":
        for event in prof.events():  # every kernel, memcpy and memset the device ran
            if event.device_type == torch.autograd.DeviceType.CUDA:
                total = totals.setdefault(event.name, [0, 0.0])
                total[0] += 1
                total[1] += event.time_range.elapsed_us()
    else:
        for event in prof.key_averages():  # self time, so nested aten calls are not counted twice
            if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
                totals[event.key] = [event.count, event.self_cpu_time_total]
    rows = [{"kernel": name if len(name) <= 110 else name[:107] + "...", "launches": n / calls, "us": us / calls}
            for name, (n, us) in totals.items()]
    rows.sort(key=lambda r: -r["us"])
    whole = sum(r["us"] for r in rows) or 1.0
    for rank, row in enumerate(rows, 1):
        row.update(rank=rank, share=row["us"] / whole)
    return rows, convolutions(prof.events(), device, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_unet_arguments(parser, latent=64)
    parser.add_argument("--calls", type=int, default=10, help="profiled (and timed) calls per graph")
    parser.add_argument("--top", type=int, default=15, help="kernels printed per graph (the CSV has them all)")
    parser.add_argument("--csv", default=str(RESULTS / "profile_graphs.csv"))
    parser.add_argument("--conv-csv", default="", help="convolutions by shape (default: profile_convs.csv by --csv)")
    args = parser.parse_args()

    setup = unet_from_arguments(args)
    unet, device, dtype, shape = setup.unet, setup.device, setup.dtype, setup.shape
    call = example_call(unet, args.batch, args.latent, device, dtype)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(50, device=device)
    env = environment(device)
    print(f"profile_graphs: {shape}, cache point {args.cache_point}, on {env['device']} (torch {env['torch']}, "
          f"git {env['git']})")
    config = FRDiffConfig(keyframe_interval=2, cuda_graphs=False, compile=args.compile, cache_point=args.cache_point)
    fr = frdiff_compile.optimize(unet, config)
    with torch.no_grad():
        sample = call.pop("sample")
        entry, tensors = fr.prepare(sample, scheduler.timesteps[25], **call)
        graphs = {"keyframe": lambda: entry.run_full(tensors, -1), "reuse": lambda: entry.run_reuse(tensors, 0.5)}
        for fn in graphs.values():  # compiles both graphs
            fn()
        stats = fr.stats
        # As the runtime counts them: cold on a fresh machine, warm when another run compiled these graphs
        # before (gpu_check runs this after bench_peers, which compiles the same ones).
        built = {"export_s": stats.build_seconds, "compile_s": stats.compile_seconds,
                 "reuse_compile_s": stats.reuse_compile_seconds}
        print(f"export and passes {stats.build_seconds:.1f} s; compile of both graphs {stats.compile_seconds:.1f} s "
              f"(reuse graph {stats.reuse_compile_seconds:.1f} s, {stats.compiles} graphs)")
        csv_rows, conv_rows = [], []
        for name, fn in graphs.items():
            call_ms = time_ms(fn, device, repeats=args.calls)
            rows, convs = profile(fn, device, args.calls)
            device_ms, launches = sum(r["us"] for r in rows) / 1e3, sum(r["launches"] for r in rows)
            what = "device" if device.type == "cuda" else "aten self CPU"
            print_table(rows[: args.top], ["rank", "kernel", "launches", "us", "share"],
                        f"{name} graph: call {call_ms:.3f} ms (median of {args.calls}), {what} {device_ms:.3f} ms "
                        f"in {launches:.0f} launches per call")
            totals = {"graph": name, "call_ms": call_ms, "profiled_ms": device_ms, "launches_per_call": launches,
                      **built}
            csv_rows += [{"shape": shape, "cache_point": args.cache_point, **totals, **row} for row in rows]
            print_table(convs, ["conv", "launches", "us", "gflop", "tflops"],
                        f"{name} graph: {sum(r['launches'] for r in convs):.0f} convolutions per call by shape, "
                        f"{'device' if device.type == 'cuda' else 'CPU'} {sum(r['us'] for r in convs) / 1e3:.3f} ms")
            conv_rows += [{"shape": shape, "cache_point": args.cache_point, "graph": name, **row} for row in convs]
    path = append_csv(Path(args.csv), csv_rows, env)
    conv_path = append_csv(Path(args.conv_csv or Path(args.csv).with_name("profile_convs.csv")), conv_rows, env)
    print(f"\nappended {len(csv_rows)} rows to {path} and {len(conv_rows)} to {conv_path}")


if __name__ == "__main__":
    main()
