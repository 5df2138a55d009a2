"""Whether the reuse call's convolutions off the sample's path would run faster at once than one after another.

Run (CUDA; on CPU it runs the one-stream case only, to check the script):
    python benchmarks/bench_offpath.py                   # SD 1.5 config, 64x64 latents, CFG batch 2, fp16
    python benchmarks/bench_offpath.py --config sdxl --latent 128

Why: in the reuse graph every resnet's conv2 reads only its cached conv1 output and the time embedding, never
the sample (`bench_flops.py`: 253 of SD 1.5's 437 reuse-call GFLOPs at this shape). Inductor runs them on one
stream, one after another, and many are small (7 are 1280-channel 3x3 convolutions on 8x8 maps). On the H200
the reuse call took 0.47 of a keyframe call for 0.27 of its FLOPs. Before building a reuse graph that forks
them onto several streams (or batches them), this measures what that could buy, on the convolutions alone.

What it times, as device time from CUDA-graph replays (`common.graph_time_ms`), every resnet's conv2 of the
config (shapes from a forward on the meta device; random weights and inputs on the device, in the dtype):
- "one stream": all of them in turn, as the compiled reuse graph runs them;
- "K streams": split over K streams forked from and joined back to the capturing stream, each stream's share
  balanced by FLOPs, in one captured graph (as a captured reuse graph would run them);
- "grouped by shape": each set of same-shaped convolutions as one grouped convolution (`groups=k`) over
  inputs and weights concatenated beforehand; the concatenation, which a graph would pay at every call
  unless the weights were laid out once, is timed apart ("weight concat").
Each row gives µs, TFLOP/s and the speedup over one stream. Appends rows to
benchmarks/results/bench_offpath.csv. A bound on the convolutions, not a reuse call: the norms, SiLUs, adds
and the sample's path are left out.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, append_csv, environment, graph_time_ms, print_table
from diffusers.models.resnet import ResnetBlock2D
from models import conv_gflop, meta_unet_and_call


def conv2_shapes(unet: torch.nn.Module, call: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, weight shape) of every resnet's conv2 in one forward of `unet` on `call`, in order."""
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    hooks = [m.conv2.register_forward_hook(lambda mod, args, out: shapes.append((tuple(args[0].shape),
                                                                                 tuple(mod.weight.shape))))
             for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    try:
        with torch.no_grad():
            unet(**call)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def meta_conv2_shapes(config: str, latent: int, batch: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """`conv2_shapes` of a benchmark config, from a forward on the meta device (no memory, no compute)."""
    return conv2_shapes(*meta_unet_and_call(config, latent, batch))


def gflop(x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> float:
    """A resnet conv2 as this benchmark runs it: stride 1, same padding."""
    return conv_gflop(x_shape, w_shape, padding=(w_shape[2] // 2, w_shape[3] // 2))


def balanced(flops: list[float], k: int) -> list[list[int]]:
    """Indices split into k lists of about equal FLOPs (largest first onto the lightest list)."""
    groups: list[list[int]] = [[] for _ in range(k)]
    load = [0.0] * k
    for i in sorted(range(len(flops)), key=lambda i: -flops[i]):
        j = load.index(min(load))
        groups[j].append(i)
        load[j] += flops[i]
    return [sorted(g) for g in groups if g]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="sd15", choices=["sd15", "sdxl", "small", "tiny"])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--streams", default="2,3,4", help="comma-separated stream counts to try")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", default=str(RESULTS / "bench_offpath.csv"))
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type != "cuda":
        print("bench_offpath: streams and CUDA graphs need CUDA; timing only the one-stream case on CPU.")
    shapes = meta_conv2_shapes(args.config, args.latent, args.batch)
    torch.manual_seed(0)
    convs = [(torch.randn(x, device=device, dtype=dtype), torch.randn(w, device=device, dtype=dtype) * 0.02,
              torch.randn(w[0], device=device, dtype=dtype)) for x, w in shapes]
    flops = [gflop(x, w) for x, w in shapes]
    total = sum(flops)

    def run(indices: list[int]) -> None:
        for i in indices:
            x, w, b = convs[i]
            F.conv2d(x, w, b, padding=w.shape[-1] // 2)

    def forked(groups: list[list[int]], streams: list[torch.cuda.Stream]) -> None:
        # Fork from the current (capturing) stream and join back, as a captured reuse graph would have to.
        main = torch.cuda.current_stream()
        for s in streams:
            s.wait_stream(main)
        for group, s in zip(groups, streams):
            with torch.cuda.stream(s):
                run(group)
        for s in streams:
            main.wait_stream(s)

    rows = []

    def row(mode: str, ms: float, base: float | None) -> None:
        rows.append({"config": args.config, "latent": args.latent, "batch": args.batch, "dtype": args.dtype,
                     "convolutions": len(convs), "GFLOP": total, "mode": mode, "us": ms * 1e3,
                     "TFLOP/s": total / ms / 1e3, "vs one stream": (base / ms) if base else 1.0})

    everything = list(range(len(convs)))
    one = graph_time_ms([lambda: run(everything)], device, args.repeats)
    row("one stream", one, None)
    if device.type == "cuda":
        for k in (int(s) for s in args.streams.split(",") if s):
            groups = balanced(flops, k)
            streams = [torch.cuda.Stream(device) for _ in groups]
            row(f"{len(groups)} streams", graph_time_ms([lambda g=groups, s=streams: forked(g, s)], device,
                                                        args.repeats), one)
        # Same-shaped convolutions as one grouped convolution each (inputs and weights concatenated once).
        by_shape: dict[tuple, list[int]] = defaultdict(list)
        for i, (x, w) in enumerate(shapes):
            by_shape[(x, w)].append(i)
        grouped = []
        for members in by_shape.values():
            x = torch.cat([convs[i][0] for i in members], dim=1)
            w = torch.cat([convs[i][1] for i in members], dim=0)
            b = torch.cat([convs[i][2] for i in members], dim=0)
            grouped.append((x, w, b, len(members)))
        calls = [lambda x=x, w=w, b=b, k=k: F.conv2d(x, w, b, padding=w.shape[-1] // 2, groups=k)
                 for x, w, b, k in grouped]
        row(f"grouped by shape ({len(grouped)} convolutions)",
            graph_time_ms([lambda: [c() for c in calls]], device, args.repeats), one)
        weights = [[convs[i][1] for i in members] for members in by_shape.values() if len(members) > 1]
        concat = graph_time_ms([lambda: [torch.cat(ws, dim=0) for ws in weights]], device, args.repeats)
        rows.append({**rows[-1], "mode": "weight concat (per call, if not laid out once)", "us": concat * 1e3,
                     "TFLOP/s": "", "vs one stream": ""})
    env = environment(device)
    print_table(rows, ["mode", "us", "TFLOP/s", "vs one stream"],
                f"bench_offpath: {len(convs)} resnet conv2s off the sample's path, {total:.0f} GFLOP "
                f"({args.config} {args.batch}x4x{args.latent}x{args.latent} {args.dtype}, {env['device']})")
    path = append_csv(Path(args.csv), rows, env)
    print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
