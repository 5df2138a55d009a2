"""Blend benchmark: the fused Triton blend against eager torch and torch.compile of the torch reference.

Run (on a CUDA machine; on CPU it says so and times only the torch paths):
    python benchmarks/bench_blend.py
    python benchmarks/bench_blend.py --quick        # fewer sizes, for a smoke run
    python benchmarks/bench_blend.py --target       # only the cases the bandwidth targets cover

Shapes: every SD 1.5 cache point at 64x64 latents and SDXL's at 128x128 (CFG batch 2, planned by the
project's own planner on the meta device), and a size sweep from 4 KB to 256 MB; fp16 and bf16. Also one
launch of the arena kernel over all SD 1.5 cache points against a loop of single blends. On CUDA (not
--quick), a sweep of the kernel's launch configuration (block size, warps) at 8-128 MB fp16.

Two times per provider and case. "us" is device time per launch, from CUDA-graph replays of back-to-back
launches that rotate over enough input sets to spill the L2 cache: the kernel's own speed, as it runs inside the
runtime's captured graphs. "call us" is one call timed on its own, host dispatch included: what the op costs
when called eagerly. GB/s counts 3 bytes moved per element byte (read a, read b, write out), from "us", and "%
copy" compares it with a 256 MB device-to-device copy timed the same way in the same run: the targets on an H100
are >= 90% of that copy bandwidth for tensors >= 8 MB and >= 80% for the arena launch. Each sweep, cache-shape
and (on CUDA) configuration case also times a copy of its own size ("device copy", 2 bytes moved per element
byte) and "% same-size copy" compares with that: how far a size's shortfall is the kernel's, and how far any
kernel's at that size. `--target` keeps only what the targets read: sizes from 8 MB (the sweep's and SDXL's
cache shapes) and the arena launch, with no torch.compile provider and no launch-configuration sweep, so that it
fits beside other stages in one device lease (its GPU time is not measured yet). Appends rows to
benchmarks/results/bench_blend.csv.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from common import RESULTS, append_csv, environment, graph_time_ms, print_table, time_ms
from models import cache_shapes

from frdiff_compile.kernels.arena import BlendArena
from frdiff_compile.kernels.blend import BLOCK, kernel_available, launch_blend, score_blend, score_blend_reference

SWEEP_MB = [0.004, 0.064, 1, 8, 32, 128, 256]
# Launch configurations (elements per program, warps) tried on the single-tensor kernel at the sizes the
# bandwidth target covers, fp16, so a GPU run shows whether the default (first) leaves bandwidth behind.
CONFIG_MB = [8, 32, 128]
CONFIGS = [(BLOCK, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8)]


SPILL_BYTES = 200 * 2**20  # rotate inputs until a graph's launches touch this much: 4x an H100's L2


def copy_bandwidth_gbs(device: torch.device, repeats: int) -> float:
    src = torch.empty(256 * 2**20 // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = graph_time_ms([lambda: dst.copy_(src)], device, repeats)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def input_sets(shape, dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Enough (a, b) pairs that one round over them (outputs included) spills the L2 cache."""
    per_set = 3 * math.prod(shape) * dtype.itemsize
    count = 1 if device.type != "cuda" else min(16, max(1, -(-SPILL_BYTES // per_set)))
    return [(torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype))
            for _ in range(count)]


def timed(fn, sets, weight, device: torch.device, repeats: int) -> tuple[float, float]:
    """(device ms per launch from graph replays, ms of one call with its dispatch) of fn over the sets."""
    calls = [lambda a=a, b=b: fn(weight, a, b) for a, b in sets]
    a, b = sets[0]
    return graph_time_ms(calls, device, repeats), time_ms(lambda: fn(weight, a, b), device, repeats)


def same_size_copy(sets, device: torch.device, repeats: int) -> tuple[float, float]:
    """`timed` for a device-to-device copy of each set's `a` into a buffer of its own."""
    pairs = [(torch.empty_like(a), a) for a, _ in sets]
    calls = [lambda dst=dst, src=src: dst.copy_(src) for dst, src in pairs]
    return graph_time_ms(calls, device, repeats), time_ms(calls[0], device, repeats)


def same_size(rows: list[dict], case: str, dtype: torch.dtype) -> None:
    """Fill "% same-size copy" into the rows of one case and dtype from its "device copy" row."""
    name = str(dtype).replace("torch.", "")
    mine = [r for r in rows if r["case"] == case and r["dtype"] == name]
    copy_gbs = next(r["GB/s"] for r in mine if r["provider"] == "device copy")
    for r in mine:
        r["% same-size copy"] = 100 * r["GB/s"] / copy_gbs


def providers(device: torch.device, target: bool) -> dict:
    found = {"torch eager": score_blend_reference}
    if not target:
        # dynamic=True: one compiled kernel serves every size of the sweep (a static compile per shape would
        # spend the device check's time budget compiling).
        found["torch.compile"] = torch.compile(score_blend_reference, dynamic=True)
    if kernel_available(torch.empty(1, device=device)) and device.type == "cuda":
        found["triton"] = score_blend
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--target", action="store_true",
                        help="only the cases the bandwidth targets cover (>= 8 MB and the arena), no torch.compile")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--csv", default=str(RESULTS / "bench_blend.csv"))
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = 5 if args.quick or device.type == "cpu" else args.repeats
    env = environment(device)
    if device.type != "cuda":
        print("bench_blend: the Triton kernel timings need CUDA; timing only the torch paths on CPU.")
    copy_gbs = copy_bandwidth_gbs(device, repeats)
    print(f"bench_blend on {env['device']} (torch {env['torch']}, triton {env['triton']}, git {env['git']}); "
          f"device-to-device copy {copy_gbs:.0f} GB/s")

    sd15 = cache_shapes("sd15", 64)
    cases = [(f"sweep {mb:g} MB", (max(1, int(mb * 2**20 / 2)),)) for mb in (SWEEP_MB[:4] if args.quick else SWEEP_MB)]
    cases += [(f"sd15 {tuple(s)}", s) for s in sorted(set(sd15), key=math.prod, reverse=True)[:3 if args.quick else None]]
    if not args.quick:
        cases += [(f"sdxl {tuple(s)}", s) for s in sorted(set(cache_shapes("sdxl", 128)), key=math.prod, reverse=True)]
    if args.target:  # fp16 sizes: the same cut at 8 MB as the targets' (gpu_summary.py reads "MB" >= 8)
        cases = [(label, shape) for label, shape in cases if math.prod(shape) * 2 >= 8 * 2**20]
    funcs = providers(device, args.target)
    weight = torch.tensor(0.37, device=device)
    rows = []

    def row(case, dtype, provider, mbytes, ms, call_ms, moved=3):
        gbs = moved * mbytes * 2**20 / ms / 1e6
        rows.append({"case": case, "dtype": str(dtype).replace("torch.", ""), "provider": provider, "MB": mbytes,
                     "us": ms * 1e3, "GB/s": gbs, "% copy": 100 * gbs / copy_gbs, "call us": call_ms * 1e3})

    for dtype in (torch.float16, torch.bfloat16):
        for label, shape in cases:
            sets = input_sets(shape, dtype, device)
            mbytes = math.prod(shape) * dtype.itemsize / 2**20
            for name, fn in funcs.items():
                row(label, dtype, name, mbytes, *timed(fn, sets, weight, device, repeats))
            # The same-size copy (2 bytes moved per element byte), timed the same way: how much of the
            # bandwidth a kernel of this size can reach at all, beside the 256 MB copy "% copy" divides by.
            row(label, dtype, "device copy", mbytes, *same_size_copy(sets, device, repeats), moved=2)
            same_size(rows, label, dtype)
            del sets
        arena = [BlendArena(sd15, dtype, device) for _ in range(2)]
        for x in arena:
            x.buffer.normal_()
        weights = torch.full((len(sd15),), 0.37, device=device)
        mbytes = arena[0].buffer.numel() * arena[0].buffer.element_size() / 2**20
        loop = lambda: [score_blend_reference(weights[k], s, m) for k, (m, s) in enumerate(zip(*(x.views for x in arena)))]  # noqa: E731
        whole = {"torch loop of single blends": loop}
        if "triton" in funcs:
            whole["triton arena, one launch"] = lambda: arena[0].blend_(weights, arena[1], arena[0])
        for name, fn in whole.items():
            # The arenas (2 x 90 MB for SD 1.5) already spill the L2 cache: no rotation needed.
            row(f"sd15 all {len(sd15)} cache points", dtype, name, mbytes, graph_time_ms([fn], device, repeats),
                time_ms(fn, device, repeats))
    if "triton" in funcs and not args.quick and not args.target:
        for mb in CONFIG_MB:
            shape = (int(mb * 2**20 / 2),)
            sets = input_sets(shape, torch.float16, device)
            outs = [torch.empty_like(a) for a, _ in sets]
            for block, warps in CONFIGS:
                calls = [lambda a=a, b=b, o=o, block=block, warps=warps: launch_blend(weight, a, b, o, block, warps)
                         for (a, b), o in zip(sets, outs)]
                row(f"config {mb} MB", torch.float16, f"triton BLOCK={block} warps={warps}", mb,
                    graph_time_ms(calls, device, repeats), time_ms(calls[0], device, repeats))
            row(f"config {mb} MB", torch.float16, "device copy", mb, *same_size_copy(sets, device, repeats), moved=2)
            same_size(rows, f"config {mb} MB", torch.float16)
            del sets, outs
    print_table(rows, ["case", "dtype", "provider", "MB", "us", "GB/s", "% copy", "% same-size copy", "call us"],
                "bench_blend (us: device time per launch, from CUDA-graph replays; call us: one call, dispatch included)")
    path = append_csv(Path(args.csv), [{**row, "copy GB/s": copy_gbs} for row in rows], env)
    print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
