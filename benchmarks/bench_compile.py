"""Compile time of the keyframe and reuse graphs for one shape, cold and warm, per inductor setting.

Run (on a CUDA machine; `--dry-run` checks the wiring on CPU with a tiny config):
    python benchmarks/bench_compile.py                       # SD 1.5, 64x64 latents, CFG batch 2, fp16
    python benchmarks/bench_compile.py --variants default,background --phases cold   # the worker's gain
    python benchmarks/bench_compile.py --variants default,parts3 --phases cold       # and the keyframe's parts
    python benchmarks/bench_compile.py --variants default,shared-names   # also with shared kernel names
    python benchmarks/bench_compile.py --phases cold,portable   # a fresh machine given the cold run's artifacts

Invariants:
- Every measurement is a process of its own with its own inductor and Triton cache folders: "cold" starts
  from empty folders (a fresh machine), "warm" is a second process over the folders its cold run filled
  (a restart on the same machine), "portable" a process over new empty folders that first loads the
  portable cache artifacts the cold process saved (`torch.compiler.save_cache_artifacts` after its compile,
  `load_cache_artifacts` before the build: a fresh machine given them, README's cold-start recipe). Nothing
  is shared between variants.
- A variant is a set of environment variables that inductor reads when it is imported, and FRDiffConfig
  fields, so the library runs as a user setting them would run it. "default" is inductor and the config as
  they come; "background" compiles the reuse graph in a worker process while the keyframe graph compiles
  (`FRDiffConfig(background_compile=True)`; the worker fills inductor's caches, and the reuse graph's
  compile here is a cache hit); "parts2" and "parts3" also cut the keyframe graph in that many parts, all
  but the first compiled by workers (`FRDiffConfig(keyframe_parts=...)`: the keyframe graph's compile
  here is its first part's, then cache hits); "shared-names" names every generated Triton kernel `triton_`
  instead of numbering them per graph (TORCHINDUCTOR_UNIQUE_KERNEL_NAMES=0), so that Triton's compile
  cache, which hashes a kernel's source with its name, can serve a reuse-graph kernel from the keyframe
  graph's binary.
  Counted on CPU for the SD 1.5 config, only 12 of the reuse graph's 113 kernels could be served so.
- Times are the runtime's own counters: export and graph passes (`build_seconds`), and each graph's first
  call, compilation included (`compile_seconds`, `reuse_compile_seconds`; with a worker, the reuse share is
  the wait for it plus the cache hit). CUDA graphs are off: capture is not compilation. "triton_binaries"
  counts the kernels in the Triton cache folder afterwards (built there; in the portable phase also any the
  artifacts brought, since inductor writes those out when it serves a graph from them); "fx_hits" the graphs
  inductor's FX-graph cache served (each keyframe part counts), "artifact_mb" the size of what the cold
  process saved, "load_s" the portable process's load of it (not in the compile seconds).
- The target (GPU issue): both graphs compiled in <= 60 s for one shape. Appends rows to
  benchmarks/results/bench_compile.csv (none for --dry-run unless --csv is given).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, append_csv, environment, print_table, synchronize
from models import build_unet, example_call

# name: (environment variables, FRDiffConfig fields)
VARIANTS = {
    "default": ({}, {}),
    "background": ({}, {"background_compile": True}),
    "parts2": ({}, {"background_compile": True, "keyframe_parts": 2}),
    "parts3": ({}, {"background_compile": True, "keyframe_parts": 3}),
    "shared-names": ({"TORCHINDUCTOR_UNIQUE_KERNEL_NAMES": "0"}, {}),
}


def device_and_dtype(dry_run: bool) -> tuple[torch.device, torch.dtype]:
    return (torch.device("cpu"), torch.float32) if dry_run else (torch.device("cuda"), torch.float16)


def child(args: argparse.Namespace) -> None:
    """One process: build the runtime's graph pair and run each graph once; print the counters as JSON."""
    from torch._dynamo.utils import counters

    import frdiff_compile
    from frdiff_compile import FRDiffConfig

    start = time.perf_counter()
    if args.load_artifacts:  # before anything compiles, as a server would at its start
        torch.compiler.load_cache_artifacts(Path(args.load_artifacts).read_bytes())
    load_s = time.perf_counter() - start if args.load_artifacts else None
    device, dtype = device_and_dtype(args.dry_run)
    torch.manual_seed(0)
    unet = build_unet(args.config, args.latent, device).to(dtype)  # initialized on the device: seconds less
    call = example_call(unet, args.batch, args.latent, device, dtype)
    sample = call.pop("sample")
    fields = VARIANTS[args.variant][1]
    fr = frdiff_compile.optimize(unet, FRDiffConfig(compile=True, cuda_graphs=False, **fields))
    with torch.no_grad():
        entry, tensors = fr.prepare(sample, torch.tensor(500, device=device), **call)
        entry.run_full(tensors, generation=1)
        entry.run_reuse(tensors, 0.5)
        synchronize(device)
    stats = fr.stats
    artifact_mb = None
    if args.save_artifacts:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            Path(args.save_artifacts).write_bytes(saved[0])
            artifact_mb = len(saved[0]) / 2**20
    print(json.dumps({
        "export_s": stats.build_seconds,
        "keyframe_s": stats.compile_seconds - stats.reuse_compile_seconds,
        "reuse_s": stats.reuse_compile_seconds,
        "compile_s": stats.compile_seconds,
        "compiles": stats.compiles,
        "background_compiles": stats.background_compiles,
        "fx_hits": counters["inductor"]["fxgraph_cache_hit"],
        "artifact_mb": artifact_mb,
        "load_s": load_s,
        "process_s": time.perf_counter() - start,
    }))


def measure(args: argparse.Namespace, variant: str, cache: Path, phase: str, artifacts: dict) -> dict:
    """Run `child` in a fresh process over `cache`; the row for the table. `artifacts` has "--save-artifacts"
    or "--load-artifacts" with a path, or neither."""
    env = {**os.environ, **VARIANTS[variant][0], "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "TRITON_CACHE_DIR": str(cache / "triton")}
    command = [sys.executable, __file__, "--child", "--variant", variant, "--config", args.config,
               "--latent", str(args.latent), "--batch", str(args.batch), *(["--dry-run"] if args.dry_run else []),
               *(x for item in artifacts.items() for x in item)]
    row: dict = {"variant": variant, "phase": phase}
    began = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**row, "note": f"timed out after {args.timeout} s"}
    row["wall_s"] = time.perf_counter() - began
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return {**row, "note": f"failed (exit {done.returncode}): {tail}"}
    row.update(json.loads(lines[-1]))
    binaries = cache / "triton"
    row["triton_binaries"] = sum(1 for p in binaries.iterdir() if p.is_dir()) if binaries.exists() else 0
    env_vars, fields = VARIANTS[variant]
    row["note"] = " ".join(f"{k}={v}" for k, v in {**env_vars, **fields}.items())
    return row


def variant_runs(args: argparse.Namespace, variant: str, root: Path, phases: list[str]):
    """Yield the rows of one variant's phases, in order. Cold runs first whenever warm (which reuses its
    cache folders) or portable (which loads the artifacts it saved) is asked for, and yields only if asked."""
    cache, saved = root / variant, root / f"{variant}_artifacts.bin"
    runs = {"cold": (cache, {"--save-artifacts": str(saved)} if "portable" in phases else {}),
            "warm": (cache, {}),
            "portable": (root / f"{variant}_portable", {"--load-artifacts": str(saved)})}
    for phase, (folder, artifacts) in runs.items():
        if phase not in phases and not (phase == "cold" and {"warm", "portable"} & set(phases)):
            continue
        if phase == "portable" and not saved.exists():
            row = {"variant": variant, "phase": phase, "note": "no artifacts: the cold run saved none"}
        else:
            row = measure(args, variant, folder, phase, artifacts)
        print(f"{variant} {phase}: {row.get('compile_s', float('nan')):.1f} s {row.get('note', '')}", flush=True)
        if phase in phases:
            yield row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="sd15", choices=["sd15", "sdxl", "small", "tiny"])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--variants", default="default",
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--phases", default="cold,warm",
                        help="comma-separated subset of cold, warm, portable (warm and portable run cold first)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per process")
    parser.add_argument("--dry-run", action="store_true", help="CPU inductor, a tiny UNet at 8x8 latents")
    parser.add_argument("--csv", default=None,
                        help="default: benchmarks/results/bench_compile.csv (none for --dry-run)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="default", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--save-artifacts", default="", help=argparse.SUPPRESS)
    parser.add_argument("--load-artifacts", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:  # CPU inductor compiles even the tiny UNet in about a minute, cold
        args.config, args.latent = "tiny", 8
    if args.child:
        child(args)
        return
    variants = [v for v in args.variants.split(",") if v]
    phases = [p for p in args.phases.split(",") if p]
    if sorted(set(variants) - set(VARIANTS)) or sorted(set(phases) - {"cold", "warm", "portable"}):
        parser.error(f"variants are {', '.join(VARIANTS)}; phases are cold, warm and portable")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("bench_compile times compilation for CUDA and needs a CUDA device (use --dry-run on CPU)")
    device, dtype = device_and_dtype(args.dry_run)
    env = environment(device)
    shape = f"{args.config} {args.batch}x4x{args.latent}x{args.latent} {str(dtype).removeprefix('torch.')}"
    print(f"bench_compile: {shape} on {env['device']} (torch {env['torch']}, git {env['git']})", flush=True)
    csv_path = args.csv or (None if args.dry_run else str(RESULTS / "bench_compile.csv"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="frdiff_compile_caches_") as root:
        for variant in variants:
            for row in variant_runs(args, variant, Path(root), phases):
                rows.append(row)
                if csv_path:  # row by row: a stage cut short by its time limit keeps what it measured
                    append_csv(Path(csv_path), [{"shape": shape, "dry_run": args.dry_run, **row}], env)
    columns = ["variant", "phase", "export_s", "keyframe_s", "reuse_s", "compile_s", "compiles", "background_compiles",
               "fx_hits", "triton_binaries", "artifact_mb", "load_s", "process_s", "wall_s", "note"]
    print_table(rows, columns, f"bench_compile ({shape}; target: both graphs <= 60 s)")


if __name__ == "__main__":
    main()
