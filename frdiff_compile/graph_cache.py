"""One input signature's graph pair and the buffers it reads and writes (kept by `graph_lru.GraphLRU`).

Invariants:
- Cache buffers, the keyframe-output buffer and the 0-d blend weight are owned here, allocated per entry
  (outside inference mode, so a generation run under `torch.inference_mode()` and a later one run
  without it can both write them) and only ever written in place. They are freed (`release`) when the
  UNet's parameters move (`relink`) or leave the device, and when the module settings the pair was built
  under stop being current, and made again, empty, at the pair's next use (`graph_lru.GraphLRU.get`), so no
  released pair ever runs and device memory is held only by pairs of the current settings.
- `written_generation` and `written_step` name the generation and step whose keyframe last filled the
  buffers (-1 after they are made); the runtime runs a reuse or skip step only on buffers its own
  generation's latest keyframe step filled (`holds`): no stale cache is read, neither another generation's
  nor an older step's of this one (a signature that comes back mid-generation, e.g. CFG on in an interval).
- What a step hands back is always a fresh tensor: the graphs' outputs are new (a CUDA-graph replay's
  static output is cloned), and a skip step returns a clone of the keyframe output, never the buffer the
  next keyframe overwrites.
- The graphs are inference graphs: they run under `torch.no_grad()` whatever the caller's grad mode, so a
  loop that forgot `no_grad` neither compiles training graphs nor chains autograd history from one step
  to the next through the cache buffers, and no CUDA graph captures autograd state.
- With CUDA graphs, the keyframe and reuse graphs of an entry are captured lazily at their first use and
  share the runtime's memory pool; a capture failure turns CUDA graphs off for that entry only, with one
  warning and a `cudagraph_fallbacks` count, and the step still runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

import torch
from torch import fx
from torch._subclasses import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from .background_compile import BackgroundCompile
from .config import FRDiffConfig, inductor_mode_options
from .cudagraphs import Backend, CaptureError, SharedPool, StaticGraph
from .passes import BuildReport, CallLayout, Plan, build_graphs, capture, plan_cache_points
from .passes.capture import UnsupportedCall
from .warn import warn

logger = logging.getLogger(__name__)

# How long the first reuse step waits for a background compile before compiling the graph itself. The
# worker starts before the keyframe graph, the larger one, compiles here, so by the first reuse step it
# is usually done; one still running minutes later is stuck, and compiling here is the way forward.
BACKGROUND_TIMEOUT_S = 300.0


@dataclasses.dataclass
class RuntimeStats:
    """Counters that tests and benchmarks read (never parse logs)."""

    generations: int = 0
    full_calls: int = 0
    reuse_calls: int = 0
    skip_steps: int = 0
    eager_calls: int = 0
    forced_keyframes: int = 0
    captures: int = 0  # graph pairs built (export + passes), one per input signature
    capture_failures: int = 0
    build_seconds: float = 0.0
    compiles: int = 0  # torch.compile graph compilations: two per signature when all is well
    recompiles: int = 0  # compilations past the first of a graph: guards failed, worth a bug report
    compile_seconds: float = 0.0  # first calls of compiled graphs (compilation plus one run)
    reuse_compile_seconds: float = 0.0  # the reuse graphs' share of compile_seconds
    cudagraph_captures: int = 0
    cudagraph_fallbacks: int = 0
    full_replays: int = 0  # keyframe steps served by a CUDA-graph replay
    reuse_replays: int = 0  # reuse steps served by a CUDA-graph replay
    relinks: int = 0  # parameter moves the built graphs served (new buffers, CUDA graphs captured again)
    resumed_generations: int = 0  # generations resumed after another's steps (interleaved: no reuse there)
    evicted_rebuilds: int = 0  # graph pairs built again after max_cached_shapes had dropped them
    background_compiles: int = 0  # reuse graphs a worker process compiled into the caches in time
    background_failures: int = 0  # workers that failed or timed out (the graph was compiled here)

    def since(self, before: RuntimeStats) -> RuntimeStats:
        """What happened after `before` (a `copy.copy` of these stats): the counts of one run or one loop."""
        return RuntimeStats(**{f.name: getattr(self, f.name) - getattr(before, f.name)
                               for f in dataclasses.fields(self)})


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of `gm`'s nodes (names and metadata kept) and the same attributes."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def compile_with_inductor(gm: fx.GraphModule, args: tuple[torch.Tensor, ...], options: dict) -> Callable:
    """`gm` compiled by inductor directly, with its on-disk caches on (shared with `background_compile`)."""
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
    # over the same parameters, so `gm` stays the graph the entry was built from.
    with torch._guards.tracing(context):
        return torch._inductor.compile(copy_graph_module(gm), examples, options=options)


def _dynamo_graphs() -> int:
    # torch's own count of graphs dynamo compiled in this process; the delta around one call is what that
    # call compiled (calls are not concurrent).
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class _Compiled:
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

    def __init__(self, gm: fx.GraphModule, mode: str | None, stats: RuntimeStats, kind: str = "keyframe") -> None:
        self.gm = gm
        self.kind = kind  # "keyframe" or "reuse": which share of the compile time this graph's goes to
        # Never frozen, whatever `torch._inductor.config.freezing` says (users turn it on for CPU inference):
        # freezing folds the parameters into constants of the compiled code, so in-place updates (a LoRA
        # fuse, a hotswap) went unseen, 9.1 off stock, and moved parameters would be kept twice. Nor are
        # inductor's own CUDA graphs on unless the mode asks for them: a global `triton.cudagraphs = True`
        # would have the direct compile replay graphs inside the runtime's captures.
        self.options = {"triton.cudagraphs": False, **inductor_mode_options(mode), "freezing": False}
        self.via_dynamo = bool(self.options.get("triton.cudagraphs"))
        self.stats = stats
        self.fn: Callable[..., torch.Tensor] | None = None
        self.calls = 0
        self.background: BackgroundCompile | None = None  # a worker compiling this graph into the caches

    def _compile(self, args: tuple[torch.Tensor, ...]) -> Callable[..., torch.Tensor]:
        if torch._inductor.config.freezing:
            logger.info("torch._inductor.config.freezing is on: the %s graph is compiled without it, since frozen "
                        "graphs keep the parameter values of their compile", self.kind)
        if not self.via_dynamo:
            try:
                return self._compile_directly(args)
            except Exception as exc:  # noqa: BLE001 - torch.compile is the documented way to the same compiler
                self.via_dynamo = True
                warn(logger, f"inductor could not compile a graph directly ({type(exc).__name__}: {exc}); "
                     "compiling it through torch.compile instead")
        # fullgraph: a graph break inside a graph of pure ATen ops would be a bug worth failing loudly on.
        # The mode's options with freezing off: torch.compile takes a mode or options, not both.
        return torch.compile(self.gm, fullgraph=True, dynamic=False, options=self.options)

    def _compile_directly(self, args: tuple[torch.Tensor, ...]) -> Callable[..., torch.Tensor]:
        return compile_with_inductor(self.gm, args, self.options)

    def _wait_for_background(self) -> None:
        """Let a worker compiling this graph finish first, so that the compile here is a cache hit."""
        background, self.background = self.background, None
        if background is None:
            return
        failure = background.wait(timeout=BACKGROUND_TIMEOUT_S)
        if failure is None:
            self.stats.background_compiles += 1
        else:
            self.stats.background_failures += 1
            logger.warning("background compile of the %s graph failed, compiling it here: %s", self.kind, failure)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        before, start = _dynamo_graphs(), time.perf_counter()
        fresh = self.fn is None
        if fresh:
            self._wait_for_background()
            self.fn = self._compile(args)
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


@dataclasses.dataclass
class GraphEntry:
    plan: Plan
    report: BuildReport
    keyframe: Callable[..., torch.Tensor]
    reuse: Callable[..., torch.Tensor]
    out_meta: torch.Tensor  # the UNet output's fake value: shape, strides and dtype of keyframe_out
    device: torch.device
    stats: RuntimeStats
    graph_backend: Backend | None = None
    pool: SharedPool | None = None
    caches: list[torch.Tensor] = dataclasses.field(default_factory=list)
    keyframe_out: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    static_keyframe: StaticGraph | None = None
    static_reuse: StaticGraph | None = None
    written_generation: int = -1
    written_step: int = -1
    build_seconds: float = 0.0

    @classmethod
    def create(
        cls,
        keyframe: fx.GraphModule,
        reuse: fx.GraphModule,
        plan: Plan,
        report: BuildReport,
        out_meta: torch.Tensor,
        device: torch.device,
        compile: bool,
        compile_mode: str | None,
        stats: RuntimeStats,
        graph_backend: Backend | None = None,
        pool: SharedPool | None = None,
    ) -> GraphEntry:
        keyframe_fn: Callable[..., torch.Tensor] = keyframe
        reuse_fn: Callable[..., torch.Tensor] = reuse
        if compile:
            keyframe_fn = _Compiled(keyframe, compile_mode, stats)
            reuse_fn = _Compiled(reuse, compile_mode, stats, kind="reuse")
        entry = cls(plan, report, keyframe_fn, reuse_fn, out_meta, device, stats, graph_backend, pool)
        entry.allocate()
        return entry

    def allocate(self) -> None:
        """Make the buffers the graphs write and read, and the (not yet captured) static graphs over them."""
        with torch.inference_mode(False):
            # In the traced layouts: the reuse graph reads these where the UNet's own values were (a
            # channels_last UNet keeps channels_last caches), and blends its output with keyframe_out.
            self.caches = [p.empty(self.device) for p in self.plan.points]
            self.keyframe_out = torch.empty_strided(tuple(self.out_meta.shape), self.out_meta.stride(),
                                                    dtype=self.out_meta.dtype, device=self.device)
            self.weight = torch.ones((), dtype=torch.float32, device=self.device)
        if self.graph_backend is not None:
            self.static_keyframe = StaticGraph(self.keyframe, [*self.caches, self.keyframe_out],
                                               self.graph_backend, self.pool)
            self.static_reuse = StaticGraph(self.reuse, [*self.caches, self.keyframe_out, self.weight],
                                            self.graph_backend, self.pool)
        self.written_generation = self.written_step = -1

    def compile_reuse_in_background(self, tensors: list[torch.Tensor]) -> None:
        """Have a worker process compile the reuse graph (for calls like `tensors`) while the keyframe graph
        compiles here; see `background_compile`. Does nothing for graphs not compiled by inductor directly."""
        reuse = self.reuse
        if isinstance(reuse, _Compiled) and not reuse.via_dynamo and reuse.fn is None and reuse.background is None:
            example = (*tensors, *self.caches, self.keyframe_out, self.weight)
            reuse.background = BackgroundCompile.start(reuse.gm, example, reuse.options)

    @property
    def allocated(self) -> bool:
        return self.keyframe_out is not None

    def release(self) -> None:
        """Free the device memory of this pair (buffers, CUDA graphs); the compiled graphs are kept.

        For a UNet that left its device (model CPU offload), or settings switched away from: `allocate`
        makes them again at the pair's next use.
        """
        self.caches, self.keyframe_out, self.weight = [], None, None
        self.static_keyframe = self.static_reuse = None
        self.written_generation = self.written_step = -1

    def relink(self) -> bool:
        """Serve parameters that moved to new storage of the same layout; False if this pair cannot.

        Graphs run eagerly or compiled by inductor directly take parameters as call arguments, read from
        each Parameter at every call, so they serve the new storage as they are. CUDA graphs baked the old
        addresses: buffers and static graphs are released, to be made and captured again at the next use.
        Graphs compiled through torch.compile (`reduce-overhead`) were guarded and captured over the old
        tensors by dynamo: they are not kept.
        """
        if any(getattr(fn, "via_dynamo", False) for fn in (self.keyframe, self.reuse)):
            return False
        self.release()
        return True

    def _replay(self, static: StaticGraph, tensors: list[torch.Tensor]) -> torch.Tensor | None:
        """Run `static` (capturing it first if needed); None if capture failed and graphs are now off."""
        fresh = not static.captured
        try:
            out = static(tensors)
        except CaptureError as exc:
            self.static_keyframe = self.static_reuse = None
            self.graph_backend = None  # and so for buffers made again after a move
            self.stats.cudagraph_fallbacks += 1
            warn(logger, f"CUDA graph capture failed, running the graphs without CUDA graphs for this input "
                 f"signature ({exc})")
            return None
        self.stats.cudagraph_captures += fresh
        return out

    def _on_device(self) -> contextlib.AbstractContextManager:
        # ATen kernels run on their tensors' device, but a Triton kernel launched outside inductor's code (the
        # blend op in eager graphs) goes to the current device: a UNet on cuda:1 driven from a thread whose
        # current device is cuda:0 must have cuda:1 current while its graphs run. (A `StaticGraph` sees to
        # its own capture and replay.)
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.no_grad()
    def run_full(self, tensors: list[torch.Tensor], generation: int, step: int = 0) -> torch.Tensor:
        out = self._replay(self.static_keyframe, tensors) if self.static_keyframe else None
        if out is None:
            with self._on_device():
                out = self.keyframe(*tensors, *self.caches, self.keyframe_out)
        else:
            self.stats.full_replays += 1
        self.written_generation, self.written_step = generation, step
        return out

    @torch.no_grad()
    def run_reuse(self, tensors: list[torch.Tensor], weight: float) -> torch.Tensor:
        self.weight.fill_(weight)  # in place: same tensor every step, so no recompile, no sync, and replays see it
        out = self._replay(self.static_reuse, tensors) if self.static_reuse else None
        if out is None:
            with self._on_device():
                return self.reuse(*tensors, *self.caches, self.keyframe_out, self.weight)
        self.stats.reuse_replays += 1
        return out

    def run_skip(self) -> torch.Tensor:
        return self.keyframe_out.clone()

    def holds(self, generation: int, keyframe_step: int) -> bool:
        """Whether the buffers hold what `generation`'s keyframe at `keyframe_step` (or a later forced one)
        wrote: what a reuse or skip step after that keyframe may read."""
        return self.written_generation == generation and self.written_step >= keyframe_step

    def builds_at_next_run(self, full: bool) -> bool:
        """Whether the next keyframe (`full`) or reuse run compiles or CUDA-graph-captures its graph: the graph
        then keeps the kernels that the numerics flags of that moment pick."""
        fn, static = (self.keyframe, self.static_keyframe) if full else (self.reuse, self.static_reuse)
        return (isinstance(fn, _Compiled) and fn.fn is None) or (static is not None and not static.captured)


def build_entry(
    unet: torch.nn.Module,
    layout: CallLayout,
    tensors: list[torch.Tensor],
    config: FRDiffConfig,
    stats: RuntimeStats,
    backend_override: Backend | None,
    pool: SharedPool,
) -> GraphEntry | str:
    """The graph pair for calls laid out as `layout`, or why the UNet could not be captured for them.

    Export and the graph passes run here; compilation and CUDA-graph capture wait for each graph's first run.
    `FRDiffConfig.resolve`'s error for settings the device cannot take is raised, not returned.
    """
    device = tensors[0].device
    compile_graphs, cuda_graphs = config.resolve(device.type)
    backend = backend_override or ("cuda" if cuda_graphs else None)
    start = time.perf_counter()
    try:
        captured = capture(unet, layout, tensors)
        plan = plan_cache_points(captured.graph_module, unet, captured.module_prefix)
        pair = build_graphs(captured.graph_module, plan)
        out = captured.graph_module.graph.find_nodes(op="output")[0].args[0].meta["val"]
        entry: GraphEntry | str = GraphEntry.create(pair.keyframe, pair.reuse, plan, pair.report, out, device,
                                                    compile_graphs, config.compile_mode, stats, backend, pool)
        stats.captures += 1
    except UnsupportedCall as exc:  # refused by a check, not a failure: the reason says it all
        entry = f"the UNet could not be captured for {layout.describe()}: {exc}"
        stats.capture_failures += 1
    except Exception as exc:  # noqa: BLE001 - any export failure must become a clear eager fallback
        logger.exception("capture failed for %s", layout.describe())
        entry = f"the UNet could not be captured for {layout.describe()} ({type(exc).__name__}: {exc})"
        stats.capture_failures += 1
    elapsed = time.perf_counter() - start
    stats.build_seconds += elapsed
    if isinstance(entry, GraphEntry):
        entry.build_seconds = elapsed
        logger.info("built graph pair for %s in %.1f s\n%s\n%s", layout.describe(), elapsed, entry.plan, entry.report)
        if (shortfall := entry.plan.shortfall()) is not None:
            warn(logger, shortfall)
        if config.background_compile:  # before the keyframe graph compiles, at its first run
            entry.compile_reuse_in_background(tensors)
    return entry
