"""Graphs compiled by inductor at their first call (`CompiledGraph`), and the helpers a background worker
shares with it.

Invariants:
- A graph given to inductor is never rewritten: inductor gets a copy of its nodes over the same parameters,
  so the entry's fx graph stays the one it was built from (a worker pickles that one).
- Compiled code is never frozen (parameters stay call arguments, read live) and never captures inductor's
  own CUDA graphs unless the compile mode asks for them, which the config allows only with the runtime's
  CUDA graphs off.
- Every compilation is counted into the runtime's `RuntimeStats` (compiles, recompiles, compile seconds),
  so tests and benchmarks read counts, never logs.
- Compiled for the sizes and strides of its example inputs only (no symbolic sizes): a graph serves one
  input signature, which the runtime keys its graphs on, and inductor's code asserts it at every call.
- Convolutions run in the traced layouts, never re-laid-out by inductor: no weight is copied per call.
- A graph compiled in parts (`parts` > 1, `passes/split.py`) is compiled part by part at its first call,
  each part for the values the earlier parts returned, and counts as one compilation of one graph; a part
  inductor cannot compile directly sends the whole graph to `torch.compile`, as an unsplit graph would go.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import fx
from torch._subclasses import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from .background_compile import BackgroundCompile
from .concurrency import EXPORT_GATE
from .config import inductor_mode_options
from .passes.capture import forget_real_tensors
from .passes.split import SplitGraph, split_graph
from .warn import warn

if TYPE_CHECKING:
    from .graph_cache import RuntimeStats

logger = logging.getLogger(__name__)

# How long the first reuse step waits for a background compile before compiling the graph itself. The
# worker starts before the keyframe graph, the larger one, compiles here, so by the first reuse step it
# is usually done; one still running minutes later is stuck, and compiling here is the way forward.
BACKGROUND_TIMEOUT_S = 300.0


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of `gm`'s nodes (names and metadata kept) and the same attributes."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def compile_with_inductor(gm: fx.GraphModule, args: tuple[torch.Tensor, ...], options: dict) -> Callable:
    """`gm` compiled by inductor directly, with its on-disk caches on (shared with `background_compile`)."""
    # Both imported at the first compile, not with the package. `compile_lock` is dynamo's process-wide lock,
    # which every torch.compile compile holds: inductor's compile is not thread-safe (pytorch/pytorch#136833).
    # Direct compiles of two small graphs in two threads at once failed in each of 7 trials on the CPU machine,
    # under torch 2.11 and 2.13 ("CURRENT_PATCHER is None in finally block", "aten.copy_.default DispatchKey.CPU
    # already in dispatch cache"), and torch 2.11 left the user's inductor config changed (its config patches are
    # process-wide there). Two runtimes' first generations in two threads compile so; the lock orders them, and
    # orders them against torch.compile in other threads (tests/test_concurrency.py).
    from torch._dynamo.convert_frame import compile_lock
    from torch._inductor.compile_fx import compile_fx

    # A tracing context whose fake mode has a shape environment, as inductor's own standalone_compile
    # sets up: without one inductor bypasses its FX-graph and AOTAutograd caches ("No shape env"), and
    # every new process would compile cold.
    context = torch._guards.TracingContext(FakeTensorMode(shape_env=ShapeEnv()))
    # Contiguous inputs at a storage offset (the step's timestep, a view into `scheduler.timesteps`) are
    # compiled from an aligned copy with the same strides: inductor keys its caches on which inputs are
    # aligned, and that would otherwise depend on the step the graph first ran at (and a background
    # worker's key would differ). The compiled code copies an input that arrives misaligned itself.
    examples = [a.clone() if a.storage_offset() and a.is_contiguous() else a for a in args]
    # Inductor rewrites the graph it is given (its output becomes a list); it gets a copy of the nodes
    # over the same parameters, so `gm` stays the graph the entry was built from. `ignore_shape_env`, as
    # standalone_compile passes it for shapes "from_example_inputs": with a shape environment about, AOTAutograd
    # otherwise fakes the inputs with symbolic sizes, and every kernel was compiled for any shape (sizes read
    # at run time, index arithmetic on them) though a graph serves one signature. Seen in the H200 run: a
    # reuse call took 0.47 of a keyframe call's time for 0.27 of its FLOPs (0.28 on an H100, before this path).
    try:
        with EXPORT_GATE.long_work(), compile_lock, torch._guards.tracing(context):
            return compile_fx(copy_graph_module(gm), examples, config_patches=options, ignore_shape_env=True)
    finally:  # what inductor compiled keeps this mode alive, on a cold compile (a cache hit makes no fakes)
        forget_real_tensors(context.fake_mode)


def _wait_for(background: BackgroundCompile | None, stats: RuntimeStats, kind: str) -> None:
    """Let a worker compiling a graph (or a part of one) finish first, so that the compile here is a cache hit."""
    if background is None:
        return
    with EXPORT_GATE.long_work():
        failure = background.wait(timeout=BACKGROUND_TIMEOUT_S)
    if failure is None:
        stats.background_compiles += 1
    else:
        stats.background_failures += 1
        logger.warning("background compile of the %s graph failed, compiling it here: %s", kind, failure)


class _PartFailed(Exception):
    """Inductor could not compile a part of a split graph directly (the cause is chained)."""


class _Part:
    """One part of a split graph, compiled by inductor at its first call, for the inputs that call brings."""

    def __init__(self, gm: fx.GraphModule, owner: CompiledGraph) -> None:
        self.gm = gm
        self.owner = owner
        self.fn: Callable | None = None
        self.background: BackgroundCompile | None = None

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if self.fn is None:
            background, self.background = self.background, None
            _wait_for(background, self.owner.stats, f"{self.owner.kind} part")
            try:
                self.fn = compile_with_inductor(self.gm, args, self.owner.options)
            except Exception as exc:  # noqa: BLE001 - the whole graph goes to torch.compile instead
                raise _PartFailed(f"{type(exc).__name__}: {exc}") from exc
        return self.fn(*args)


def _dynamo_graphs() -> int:
    # torch's own count of graphs dynamo compiled in this process; the delta around one call is what that
    # call compiled (calls are not concurrent).
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class CompiledGraph:
    """One graph compiled by inductor at its first call, counted into the runtime's stats.

    The graph goes to inductor directly (`torch._inductor.compile`, inductor's entry point for FX graphs
    captured without dynamo), not through `torch.compile`: it is already a flat ATen graph, so dynamo's
    retrace of it (about 2000 nodes for SD 1.5) only costs time, and its guards re-check what the entry's
    signature already fixes (shapes, dtypes, devices, layouts, autocast; grad mode is always off). Inductor's
    generated code still asserts every input's size and stride, so a mismatch raises instead of computing
    garbage. Modes whose options make inductor capture its own CUDA graphs ("reduce-overhead", allowed only
    with the runtime's CUDA graphs off) go through `torch.compile`, which drives inductor's CUDA-graph trees,
    and so does a graph the direct call fails on (with one warning): on a torch release where that private
    entry point changed, users get the old path, not an error.
    """

    def __init__(self, gm: fx.GraphModule, mode: str | None, stats: RuntimeStats, kind: str = "keyframe",
                 parts: int = 1, conv_layout: str = "traced") -> None:
        self.gm = gm
        self.kind = kind  # "keyframe" or "reuse": which share of the compile time this graph's goes to
        # Never frozen, whatever `torch._inductor.config.freezing` says (users turn it on for CPU inference):
        # freezing folds the parameters into constants of the compiled code, so in-place updates (a LoRA
        # fuse, a hotswap) went unseen, 9.1 off stock, and moved parameters would be kept twice. Nor are
        # inductor's own CUDA graphs on unless the mode asks for them: a global `triton.cudagraphs = True`
        # would have the direct compile replay graphs inside the runtime's captures.
        # conv_layout "traced": convolutions in the layouts the graph was traced in (a channels_last UNet's are
        # channels_last). Inductor's layout optimization ("inductor") runs them channels_last instead, and with
        # parameters as call arguments (never frozen, above) it copies every convolution weight to that layout at
        # every call (its own TODO in `kernel/conv.py`): 52 3x3 weights, 1032 MiB read and as much written, per
        # keyframe call of SD 1.5 in fp16 (bench_codegen's cuda-stub), about 0.52 ms at an H200's copy bandwidth,
        # and 482 MiB per reuse call. On CPU (small config, 32x32 latents, fp32, two pairs of processes) both graphs
        # were 6-12% faster without it. The GPU runs point the other way, with a second difference between them: the
        # reuse call took 0.28 of a keyframe call on an H100 with it on, 0.47 on an H200 with NCHW convolutions and
        # symbolic sizes. bench_peers' frdiff-m2-lo measures it. Set explicitly either way, so that a worker process
        # compiles under the same key.
        self.options = {"triton.cudagraphs": False, **inductor_mode_options(mode), "freezing": False,
                        "layout_optimization": conv_layout == "inductor"}
        self.via_dynamo = bool(self.options.get("triton.cudagraphs"))
        self.stats = stats
        self.fn: Callable[..., torch.Tensor] | None = None
        self.calls = 0
        self.background: BackgroundCompile | None = None  # a worker compiling this graph into the caches
        # Compiled in parts (each its own inductor compile, so workers can take some): only on the direct path,
        # since torch.compile's CUDA-graph trees want the whole graph.
        self.split: SplitGraph | None = split_graph(gm, parts) if parts > 1 and not self.via_dynamo else None
        self.parts = [_Part(part.gm, self) for part in self.split.parts] if self.split else []

    def _compile(self, args: tuple[torch.Tensor, ...]) -> Callable[..., torch.Tensor]:
        if torch._inductor.config.freezing:
            logger.info("torch._inductor.config.freezing is on: the %s graph is compiled without it, since frozen "
                        "graphs keep the parameter values of their compile", self.kind)
        if self.split is not None and not self.via_dynamo:
            # Each part compiles at its first call, for what the parts before it returned.
            return lambda *call: self.split.run(self.parts, call)
        if not self.via_dynamo:
            try:
                return self._compile_directly(args)
            except Exception as exc:  # noqa: BLE001 - torch.compile is the documented way to the same compiler
                return self._fall_back(exc)
        return self._through_dynamo()

    def _fall_back(self, exc: Exception) -> Callable[..., torch.Tensor]:
        self.via_dynamo = True
        warn(logger, f"inductor could not compile a graph directly ({type(exc).__name__}: {exc}); "
             "compiling it through torch.compile instead")
        return self._through_dynamo()

    def _through_dynamo(self) -> Callable[..., torch.Tensor]:
        # fullgraph: a graph break inside a graph of pure ATen ops would be a bug worth failing loudly on.
        # The mode's options with freezing off: torch.compile takes a mode or options, not both.
        return torch.compile(self.gm, fullgraph=True, dynamic=False, options=self.options)

    def _compile_directly(self, args: tuple[torch.Tensor, ...]) -> Callable[..., torch.Tensor]:
        return compile_with_inductor(self.gm, args, self.options)

    def background_examples(self, args: tuple[torch.Tensor, ...]) -> list[tuple[fx.GraphModule, list]]:
        """(graph, example inputs) for each compile of this graph, for calls like `args`: the graph's, or
        its parts' in order. A part's inputs from earlier parts are the values the trace recorded (shape,
        strides, dtype and device: what inductor's cache keys read)."""
        if self.split is None:
            return [(self.gm, list(args))]
        examples = []
        for part in self.split.parts:
            placeholders = part.gm.graph.find_nodes(op="placeholder")
            examples.append((part.gm, [args[i] if isinstance(i, int) else node.meta["val"]
                                       for i, node in zip(part.inputs, placeholders, strict=True)]))
        return examples

    def start_background(self, args: tuple[torch.Tensor, ...], skip_first: bool = False,
                         spare: list[BackgroundCompile] | None = None) -> None:
        """Have worker processes fill inductor's caches with this graph's compiles (its parts', when split),
        but the first where `skip_first` (this process compiles that one meanwhile); workers spawned ahead
        are taken from `spare` first."""
        if self.fn is not None or self.via_dynamo:
            return
        targets = self.parts or [self]
        for target, (gm, example) in list(zip(targets, self.background_examples(args), strict=True))[skip_first:]:
            if target.background is None:
                target.background = BackgroundCompile.start(gm, tuple(example), self.options, spare)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        before, start = _dynamo_graphs(), time.perf_counter()
        fresh = self.fn is None
        if fresh:
            background, self.background = self.background, None
            _wait_for(background, self.stats, self.kind)
            self.fn = self._compile(args)
        try:
            out = self.fn(*args)
        except _PartFailed as exc:  # only at the first call: a part compiles there
            for part in self.parts:  # workers still compiling later parts are of no use now
                if part.background is not None:
                    part.background.cancel()
            self.fn = self._fall_back(exc.__cause__)
            out = self.fn(*args)
        compiled = _dynamo_graphs() - before if self.via_dynamo else int(fresh)
        if compiled:
            self.stats.compiles += compiled
            self.stats.recompiles += compiled if self.calls else compiled - 1
            elapsed = time.perf_counter() - start
            self.stats.compile_seconds += elapsed
            if self.kind == "reuse":
                self.stats.reuse_compile_seconds += elapsed
            logger.info("compiled the %s graph in %.1f s (%s)", self.kind, elapsed,
                        "torch.compile" if self.via_dynamo else "inductor directly")
            if self.calls:
                logger.warning("a compiled FRDiff graph recompiled (%d graphs); inputs changed in a way the "
                               "signature did not capture", compiled)
        self.calls += 1
        return out
