"""Inductor's Python-side compile work for the keyframe and reuse graphs, timed on a machine without a GPU.

Run (a process per shape mode, each compile cold):
    python benchmarks/bench_codegen.py                          # SD 1.5, 64x64 latents, CFG batch 2, fp16
    python benchmarks/bench_codegen.py --config small --latent 16 --shapes static
    python benchmarks/bench_codegen.py --backend cuda-stub      # a CUDA build of torch, no GPU
    python benchmarks/bench_codegen.py --shapes static --keyframe-parts 3 --parts-in-turn   # keyframe_parts=3
    python benchmarks/bench_codegen.py --backend cuda-stub --shapes static --dump-code /tmp/code --csv ''
                                                                # and each graph's generated code, to read
    python benchmarks/bench_codegen.py --backend cuda-stub --conv-layout inductor --dump-code /tmp/code
                                                                # FRDiffConfig(conv_layout="inductor")

Why: on the H200 (2026-11-28) the cold compile of both SD 1.5 graphs took 97 s, and inductor's own phase
timers put 85 s of it in single-threaded Python (AOTAutograd's trace, lowering, scheduling, code generation)
against 2 s waiting for Triton's compiler. That work is what this script times, without a GPU, and the compile
stops when the code is generated, so no kernel is built. Two backends:
- "cpu-triton" (any torch): the graphs compiled for CPU tensors through inductor's Triton backend
  (`cpu_backend="triton"`); a stub Triton driver
  (`cuda_codegen_stub.TritonDriver`) names the target. It skips some of the CUDA paths' work: for
  SD 1.5's keyframe graph it generates 126 kernels where the CUDA paths generate 142.
- "cuda-stub" (a CUDA build of torch, no GPU; `cuda_codegen_stub.py`): inductor's CUDA paths on fake CUDA
  tensors, the device's properties an H200's; the closer proxy, static sizes only.

Invariants:
- "static" compiles as the library does (`compiled_graph.compile_with_inductor`: one signature, no symbolic
  size); "symbolic" through the path it replaced (a shape environment about and not ignored, so AOTAutograd
  fakes the inputs with symbolic sizes), which the H200 run of 2026-11-28 used.
- Under no_grad, as the runtime compiles (with grad on, AOTAutograd traces a joint forward and backward
  graph, which is not what the runtime builds).
- Every compile is cold: each shape mode runs in a process of its own with inductor's on-disk caches off.
- `--keyframe-parts K` also compiles the keyframe graph cut as `FRDiffConfig(keyframe_parts=K)` cuts it, a
  process per part fed as the runtime's workers feed theirs (the trace's metadata for what earlier parts
  return): the first generation's wait is then about the slowest part's time plus a worker's start.
- A proxy, not a GPU measurement: compare shape modes, backends and commits on one machine; the GPU machine's
  host may run this Python at another speed. Appends rows to benchmarks/results/bench_codegen.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, append_csv, environment, print_table
from models import build_unet, example_call

MODES = ("static", "symbolic")
BACKENDS = ("cpu-triton", "cuda-stub")
# Inductor's phase timers (torch._dynamo.utils.compilation_time_metrics) reported per graph.
PHASES = {"aot_s": "create_aot_dispatcher_function", "lowering_s": "GraphLowering.run",
          "scheduling_s": "Scheduler.__init__", "codegen_s": "GraphLowering.codegen"}


class _Generated(Exception):
    """Raised where inductor would load the generated module: the compile is measured up to here."""


@contextlib.contextmanager
def codegen_only():
    """Stop every compile once its code is generated (no kernel built); CPU tensors get inductor's Triton backend."""
    import triton
    from cuda_codegen_stub import TritonDriver
    from torch._inductor.graph import GraphLowering

    def generate(self, *args, **kwargs):
        code = self.codegen()
        source = str(getattr(code[0] if isinstance(code, tuple) else code, "value", code))
        code_lines = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#"))
        symbols = set(re.findall(r"\bk?s\d+\b", code_lines))  # comments name cache folders such as /s5/
        raise _Generated(source.count("async_compile.triton("), len(symbols), source)

    load, driver = GraphLowering.compile_to_module, triton.runtime.driver
    active = driver._active  # None here: a machine without a GPU has no driver (`reset_active` would raise)
    GraphLowering.compile_to_module = generate
    driver.set_active(TritonDriver())  # only the target is asked of it for CPU tensors (cache keys)
    try:
        with torch._inductor.config.patch(cpu_backend="triton"):
            yield
    finally:
        GraphLowering.compile_to_module = load
        driver._active = active


def _compile(gm, args: tuple, options: dict, mode: str, fake_mode=None) -> tuple[int, int, str]:
    """Compile `gm` as `mode` says up to the generated code; its Triton kernels, symbolic sizes (`s0`, `ks0`)
    and source.

    With `fake_mode` (the cuda-stub backend: `args` and the parameters are its fake CUDA tensors), "static" is
    `compile_with_inductor`'s call made under that mode's tracing context, since there are no real inputs."""
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from frdiff_compile.compiled_graph import compile_with_inductor, copy_graph_module

    try:
        if fake_mode is not None:
            with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
                compile_fx(gm, list(args), config_patches=options, ignore_shape_env=True)
        elif mode == "static":
            compile_with_inductor(gm, args, options)
        else:  # the path before static sizes: the same tracing context, its shape environment not ignored
            with torch._guards.tracing(torch._guards.TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
                compile_fx(copy_graph_module(gm), list(args), config_patches=options)
    except Exception as exc:  # inductor wraps what its compile raises
        generated = exc if isinstance(exc, _Generated) else getattr(exc, "inner_exception", None) or exc.__cause__
        if isinstance(generated, _Generated):
            return generated.args
        raise
    raise RuntimeError("inductor loaded a module: the code-generation stop did not take effect")


def child(args: argparse.Namespace) -> None:
    """One process: both graphs of one shape mode, compiled to their code in turn; the rows as JSON."""
    from frdiff_compile.compiled_graph import CompiledGraph
    from frdiff_compile.graph_cache import RuntimeStats
    from frdiff_compile.passes import CallLayout, capture, plan_cache_points
    from frdiff_compile.passes.build import build_graphs
    from frdiff_compile.passes.plan import count_nodes

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    unet = build_unet(args.config, args.latent).to(dtype)
    call = example_call(unet, args.batch, args.latent, "cpu", dtype)
    call["timestep"] = torch.tensor(500)
    layout, tensors = CallLayout.from_call(call)
    captured = capture(unet, layout, tensors)
    plan = plan_cache_points(captured.graph_module, unet, captured.module_prefix, args.cache_point)
    pair = build_graphs(captured.graph_module, plan)
    caches = [p.empty(torch.device("cpu")) for p in plan.points]
    out = captured.graph_module.graph.find_nodes(op="output")[0].args[0].meta["val"]
    keyframe_out = torch.empty_strided(tuple(out.shape), out.stride(), dtype=out.dtype)
    weight = torch.ones(())
    graphs = {"keyframe": (pair.keyframe, (*tensors, *caches, keyframe_out), pair.report.keyframe["ops"]),
              "reuse": (pair.reuse, (*tensors, *caches, keyframe_out, weight), pair.report.reuse["ops"])}
    if args.part:  # one part of the keyframe graph cut as the runtime cuts it, fed as a worker would feed it
        k, parts = map(int, args.part.split("/"))
        compiled = CompiledGraph(pair.keyframe, None, RuntimeStats(), parts=parts)
        if len(compiled.parts) != parts:
            raise SystemExit(f"the keyframe graph was cut in {len(compiled.parts)} parts, not {parts}")
        gm, example = compiled.background_examples(graphs["keyframe"][1])[k - 1]
        example = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype) for t in example]
        graphs = {f"keyframe part {k}/{parts}": (gm, tuple(example), count_nodes(gm.graph)["ops"])}
    metrics = torch._dynamo.utils.compilation_time_metrics
    rows = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(codegen_only())
        fake_mode, extra = None, {}
        if args.backend == "cuda-stub":
            import cuda_codegen_stub as stub
            from torch._subclasses import FakeTensorMode

            stack.enter_context(stub.cuda_codegen_stub())
            fake_mode, extra = FakeTensorMode(), stub.OPTIONS
            graphs = {kind: (stub.to_cuda(gm, fake_mode), [stub.fake_cuda(t, fake_mode) for t in example], ops)
                      for kind, (gm, example, ops) in graphs.items()}
        for kind, (gm, example, ops) in graphs.items():
            before = {k: len(metrics.get(v, [])) for k, v in PHASES.items()}
            options = {**CompiledGraph(gm, None, RuntimeStats(), conv_layout=args.conv_layout).options, **extra}
            start = time.perf_counter()
            kernels, symbols, source = _compile(gm, example, options, args.mode, fake_mode)
            if args.dump_code:  # to read what a graph runs: its kernels, library calls and copies
                layout = "_inductor-layout" if args.conv_layout == "inductor" else ""
                name = f"{args.backend}_{args.mode}{layout}_{kind.replace(' ', '_').replace('/', 'of')}.py"
                Path(args.dump_code).mkdir(parents=True, exist_ok=True)
                Path(args.dump_code, name).write_text(source)
            row = {"backend": args.backend, "shapes": args.mode, "conv_layout": args.conv_layout, "graph": kind,
                   "ops": ops, "to_code_s": time.perf_counter() - start, "triton_kernels": kernels,
                   "symbolic_sizes": symbols}
            row.update({k: sum(metrics.get(v, [])[before[k]:]) for k, v in PHASES.items()})
            rows.append(row)
    print(json.dumps(rows))


def _run(commands: list[list[str]], env: dict, timeout: int, labels: dict) -> list[dict]:
    """Run child processes at once; their rows, or a row with a note for each that failed."""
    running = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for c in commands]
    rows = []
    for process in running:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        lines = out.strip().splitlines()
        if process.returncode != 0 or not lines:
            tail = (err.strip().splitlines() or ["no output"])[-1][:200]
            rows.append({**labels, "note": f"failed (exit {process.returncode}): {tail}"})
            continue
        rows.extend(json.loads(lines[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="sd15", choices=["sd15", "sdxl", "small", "tiny"])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--cache-point", default="features", choices=["features", "deep"])
    parser.add_argument("--shapes", default=None, help=f"comma-separated subset of {','.join(MODES)} (default: "
                        "both; static alone with --backend cuda-stub)")
    parser.add_argument("--backend", default="cpu-triton", choices=BACKENDS,
                        help="cpu-triton: inductor's Triton backend for CPU tensors (any torch); cuda-stub: inductor's "
                             "CUDA paths on fake CUDA tensors, no GPU (a CUDA build of torch; cuda_codegen_stub.py)")
    parser.add_argument("--keyframe-parts", type=int, default=1,
                        help="also compile the keyframe graph cut in this many parts (FRDiffConfig.keyframe_parts), "
                             "a process per part, all at once, as the runtime's workers would")
    parser.add_argument("--parts-in-turn", action="store_true",
                        help="compile the parts one process after another: each part's time as on a machine with "
                             "a core per part, where parts running at once on too few cores slow each other")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per process")
    parser.add_argument("--csv", default=str(RESULTS / "bench_codegen.csv"), help="'' to write none")
    parser.add_argument("--dump-code", default="", help="a folder to write each graph's generated code into")
    parser.add_argument("--conv-layout", default="traced", choices=["traced", "inductor"],
                        help="FRDiffConfig.conv_layout the graphs are compiled with (default traced)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="static", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--part", default="", help=argparse.SUPPRESS)  # "k/K": one keyframe part, static
    args = parser.parse_args()
    if args.child:
        return child(args)
    modes = [m for m in (args.shapes or ("static" if args.backend == "cuda-stub" else ",".join(MODES))).split(",") if m]
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"unknown shape modes {unknown}; known: {', '.join(MODES)}")
    if args.backend == "cuda-stub":
        import cuda_codegen_stub

        if (why := cuda_codegen_stub.unavailable()) is not None:
            parser.error(f"--backend cuda-stub: {why}")
        if "symbolic" in modes:  # AOTAutograd makes sizes symbolic while it fakes real inputs; there are none
            parser.error("--backend cuda-stub compiles fake inputs, which keep static sizes: use --shapes static")
    # Cold compiles: no FX-graph or AOTAutograd cache hit from an earlier run (nothing reaches the disk cache
    # anyway, since no module is loaded, but a cache hit would skip the work this measures).
    # With TRITON_INTERPRET set (the CPU tests set it for the blend kernel), inductor loaded kernels while it
    # generated them (seen under torch 2.11): not what a GPU compile does, and impossible without a driver.
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    shape = f"{args.config} {args.batch}x4x{args.latent}x{args.latent} {args.dtype} {args.cache_point}"
    rows: list[dict] = []
    base = [sys.executable, __file__, "--child", "--backend", args.backend, "--config", args.config, "--latent",
            str(args.latent), "--batch", str(args.batch), "--dtype", args.dtype, "--cache-point", args.cache_point,
            "--dump-code", str(Path(args.dump_code).resolve()) if args.dump_code else "",
            "--conv-layout", args.conv_layout]
    for mode in modes:
        rows.extend(_run([[*base, "--mode", mode]], env, args.timeout, {"backend": args.backend, "shapes": mode}))
    if args.keyframe_parts > 1:  # all parts at once, a process each: the wait is the slowest part's
        parts = [[*base, "--mode", "static", "--part", f"{k}/{args.keyframe_parts}"]
                 for k in range(1, args.keyframe_parts + 1)]
        for batch in ([[c] for c in parts] if args.parts_in_turn else [parts]):
            rows.extend(_run(batch, env, args.timeout, {"backend": args.backend, "shapes": "static"}))
    rows = [{**row, "shape": shape} for row in rows]
    columns = ["backend", "shapes", "conv_layout", "graph", "ops", "triton_kernels", "symbolic_sizes", "to_code_s",
               *PHASES, "note"]
    print_table(rows, columns, f"bench_codegen ({shape}; {args.backend}: inductor's code generation, no kernel built)")
    if args.csv:
        append_csv(Path(args.csv), rows, environment(torch.device("cpu")))
        print(f"\nappended {len(rows)} rows to {args.csv}")
    if any("note" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
