"""One input signature's graph pair and the buffers it reads and writes (kept by `graph_lru.GraphLRU`).

Invariants:
- Cache buffers, the keyframe-output buffer and the 0-d blend weight are owned here, one set per call slot
  (`StepBuffers`): the k-th call of a step with this signature uses slot k, so a pipeline calling the UNet
  once per view (MultiDiffusion) or cond and uncond apart keeps each call's features apart. Slot 0 is made
  with the entry, the others at their first use. They are allocated outside inference mode (so a
  generation run under `torch.inference_mode()` and a later one run without it can both write them) and
  only ever written in place. They are freed (`release`) when the UNet's parameters move (`relink`) or
  leave the device, and when the module settings the pair was built under stop being current, and made
  again, empty, at the pair's next use (`graph_lru.GraphLRU.get`), so no released pair ever runs and device
  memory is held only by pairs of the current settings.
- A slot's `written_generation` and `written_step` name the generation and step whose keyframe last filled
  it (-1 after it is made); the runtime runs a reuse or skip step only on a slot its own generation's latest
  keyframe step filled (`holds`): no stale cache is read, neither another generation's nor an older step's
  of this one (a signature that comes back mid-generation, e.g. CFG on in an interval).
- What a step hands back is always a fresh tensor: the graphs' outputs are new (a CUDA-graph replay's
  static output is cloned), and a skip step returns a clone of the keyframe output, never the buffer the
  next keyframe overwrites.
- The graphs are inference graphs: they run under `torch.no_grad()` whatever the caller's grad mode, so a
  loop that forgot `no_grad` neither compiles training graphs nor chains autograd history from one step
  to the next through the cache buffers, and no CUDA graph captures autograd state.
- With CUDA graphs, each slot's keyframe and reuse graphs are captured lazily at their first use and
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

from .background_compile import BackgroundCompile
from .compiled_graph import CompiledGraph
from .config import FRDiffConfig
from .cudagraphs import Backend, CaptureError, SharedPool, StaticGraph
from .passes import BuildReport, CallLayout, Plan, build_graphs, capture, plan_cache_points
from .passes.capture import UnsupportedCall
from .warn import warn

logger = logging.getLogger(__name__)

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
    keyframes_ahead: int = 0  # generations' first steps replayed before the module state was read (unet.py)
    keyframes_discarded: int = 0  # of those replays, dropped because the module state had changed
    reuse_replays: int = 0  # reuse steps served by a CUDA-graph replay
    relinks: int = 0  # parameter moves the built graphs served (new buffers, CUDA graphs captured again)
    resumed_generations: int = 0  # generations resumed after another's steps (interleaved: no reuse there)
    evicted_rebuilds: int = 0  # graph pairs built again after max_cached_shapes had dropped them
    background_compiles: int = 0  # graphs (or keyframe parts) a worker process compiled into the caches in time
    background_failures: int = 0  # workers that failed or timed out (the graph or part was compiled here)

    def since(self, before: RuntimeStats) -> RuntimeStats:
        """What happened after `before` (a `copy.copy` of these stats): the counts of one run or one loop."""
        return RuntimeStats(**{f.name: getattr(self, f.name) - getattr(before, f.name)
                               for f in dataclasses.fields(self)})


@dataclasses.dataclass
class StepBuffers:
    """One call slot's buffers: what the k-th call of a step with this signature writes at keyframes and reads
    at reuse and skip steps (k = 0 for a pipeline that calls the UNet once per step, the usual case)."""

    caches: list[torch.Tensor]
    keyframe_out: torch.Tensor
    weight: torch.Tensor  # the 0-d blend weight, filled in place before every reuse step
    static_keyframe: StaticGraph | None = None
    static_reuse: StaticGraph | None = None
    written_generation: int = -1
    written_step: int = -1


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
    slots: list[StepBuffers] = dataclasses.field(default_factory=list)  # empty while released
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
        keyframe_parts: int = 1,
        conv_layout: str = "traced",
    ) -> GraphEntry:
        keyframe_fn: Callable[..., torch.Tensor] = keyframe
        reuse_fn: Callable[..., torch.Tensor] = reuse
        if compile:
            keyframe_fn = CompiledGraph(keyframe, compile_mode, stats, parts=keyframe_parts, conv_layout=conv_layout)
            reuse_fn = CompiledGraph(reuse, compile_mode, stats, kind="reuse", conv_layout=conv_layout)
        entry = cls(plan, report, keyframe_fn, reuse_fn, out_meta, device, stats, graph_backend, pool)
        entry.allocate()
        return entry

    def allocate(self) -> None:
        """Make the first call slot's buffers; the others are made at their first use (`slot`)."""
        self.slots = [self._new_slot()]

    def _new_slot(self) -> StepBuffers:
        """Empty buffers for the graphs to write and read, and the (not yet captured) static graphs over them."""
        with torch.inference_mode(False):
            # In the traced layouts: the reuse graph reads these where the UNet's own values were (a
            # channels_last UNet keeps channels_last caches), and blends its output with keyframe_out.
            caches = [p.empty(self.device) for p in self.plan.points]
            keyframe_out = torch.empty_strided(tuple(self.out_meta.shape), self.out_meta.stride(),
                                               dtype=self.out_meta.dtype, device=self.device)
            weight = torch.ones((), dtype=torch.float32, device=self.device)
        buffers = StepBuffers(caches, keyframe_out, weight)
        if self.graph_backend is not None:
            # A CUDA graph per slot: a captured graph reads and writes the addresses it was captured over.
            # They share the runtime's pool, so a slot adds its buffers and static inputs, not activations.
            buffers.static_keyframe = StaticGraph(self.keyframe, [*caches, keyframe_out], self.graph_backend,
                                                  self.pool)
            buffers.static_reuse = StaticGraph(self.reuse, [*caches, keyframe_out, weight], self.graph_backend,
                                               self.pool)
        return buffers

    def slot(self, k: int) -> StepBuffers:
        """Call slot `k`'s buffers, made (empty, never written) at its first use."""
        while len(self.slots) <= k:
            self.slots.append(self._new_slot())
        return self.slots[k]

    def keep_slots(self, count: int) -> None:
        """Free the buffers of call slots `count` and up (a lower `max_calls_per_step`)."""
        del self.slots[max(count, 1):]

    @property
    def slot_bytes(self) -> int:
        """Device memory one call slot's buffers take (feature caches and keyframe output)."""
        return self.plan.cache_bytes + self.out_meta.numel() * self.out_meta.element_size()

    def compile_in_background(self, tensors: list[torch.Tensor], spare: list[BackgroundCompile]) -> None:
        """Have worker processes (from `spare` first) compile the reuse graph and the keyframe graph's parts
        after the first (for calls like `tensors`) while the keyframe graph's first part compiles here; see
        `background_compile`. Does nothing for graphs not compiled by inductor directly."""
        first = self.slots[0]
        keyframe_args = (*tensors, *first.caches, first.keyframe_out)
        if isinstance(self.reuse, CompiledGraph):
            self.reuse.start_background((*keyframe_args, first.weight), spare=spare)
        if isinstance(self.keyframe, CompiledGraph):  # its parts after the first, if it is split
            self.keyframe.start_background(keyframe_args, skip_first=True, spare=spare)

    @property
    def allocated(self) -> bool:
        return bool(self.slots)

    def release(self) -> None:
        """Free the device memory of this pair (every slot's buffers and CUDA graphs); the compiled graphs are
        kept.

        For a UNet that left its device (model CPU offload), or settings switched away from: `allocate`
        makes them again at the pair's next use.
        """
        self.slots = []

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
            for buffers in self.slots:
                buffers.static_keyframe = buffers.static_reuse = None
            self.graph_backend = None  # and so for slots made later, and buffers made again after a move
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
    def run_full(self, tensors: list[torch.Tensor], generation: int, step: int = 0, slot: int = 0) -> torch.Tensor:
        buffers = self.slot(slot)
        out = self._replay(buffers.static_keyframe, tensors) if buffers.static_keyframe else None
        if out is None:
            with self._on_device():
                out = self.keyframe(*tensors, *buffers.caches, buffers.keyframe_out)
        else:
            self.stats.full_replays += 1
        buffers.written_generation, buffers.written_step = generation, step
        return out

    @torch.no_grad()
    def run_reuse(self, tensors: list[torch.Tensor], weight: float, slot: int = 0) -> torch.Tensor:
        buffers = self.slot(slot)
        # In place: the same tensor every step, so no recompile, no sync, and replays see it.
        buffers.weight.fill_(weight)
        out = self._replay(buffers.static_reuse, tensors) if buffers.static_reuse else None
        if out is None:
            with self._on_device():
                return self.reuse(*tensors, *buffers.caches, buffers.keyframe_out, buffers.weight)
        self.stats.reuse_replays += 1
        return out

    def replays_full(self, slot: int = 0) -> bool:
        """Whether a keyframe run in `slot` is a replay of its captured graph: nothing compiles or captures."""
        if slot >= len(self.slots):
            return False
        static = self.slots[slot].static_keyframe
        return static is not None and static.captured

    @torch.no_grad()
    def replay_full_ahead(self, tensors: list[torch.Tensor], step: int, slot: int = 0) -> torch.Tensor:
        """Queue a keyframe replay whose step is not decided yet (`replays_full` must hold): until
        `commit_full`, the slot holds nothing a step may read, since the replay overwrote its caches."""
        buffers = self.slots[slot]
        buffers.written_generation, buffers.written_step = -1, step
        return buffers.static_keyframe(tensors)  # type: ignore[misc]  # replays_full: captured

    def commit_full(self, generation: int, step: int, slot: int = 0) -> None:
        """The replay `replay_full_ahead` queued is `generation`'s keyframe at `step`."""
        buffers = self.slots[slot]
        buffers.written_generation, buffers.written_step = generation, step
        self.stats.full_replays += 1

    def synchronize(self) -> None:
        """Wait for the work queued on this pair's device: before a replay's buffers or graph may be freed."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def run_skip(self, slot: int = 0) -> torch.Tensor:
        return self.slot(slot).keyframe_out.clone()

    def holds(self, generation: int, keyframe_step: int, slot: int = 0) -> bool:
        """Whether slot `slot` holds what `generation`'s keyframe at `keyframe_step` (or a later forced one)
        wrote: what a reuse or skip step after that keyframe may read."""
        if slot >= len(self.slots):
            return False
        buffers = self.slots[slot]
        return buffers.written_generation == generation and buffers.written_step >= keyframe_step

    def builds_at_next_run(self, full: bool, slot: int = 0) -> bool:
        """Whether the next keyframe (`full`) or reuse run in `slot` compiles or CUDA-graph-captures its graph:
        the graph then keeps the kernels that the numerics flags of that moment pick."""
        fn = self.keyframe if full else self.reuse
        if isinstance(fn, CompiledGraph) and fn.fn is None:
            return True
        if slot >= len(self.slots):  # made at this run, with static graphs not yet captured
            return self.graph_backend is not None
        buffers = self.slots[slot]
        static = buffers.static_keyframe if full else buffers.static_reuse
        return static is not None and not static.captured


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
    # Workers for the reuse graph and the keyframe graph's later parts, started now so that their imports
    # overlap the export below; handed their graphs once they exist, stopped if they are not needed.
    spare: list[BackgroundCompile] = []
    for _ in range(config.keyframe_parts if config.background_compile and compile_graphs else 0):
        worker = BackgroundCompile.spawn(tuple(tensors), unet.parameters())
        if worker is None:  # why is logged; the same holds for the rest, so it is checked and logged once
            break
        spare.append(worker)
    try:
        captured = capture(unet, layout, tensors)
        plan = plan_cache_points(captured.graph_module, unet, captured.module_prefix, config.cache_point)
        pair = build_graphs(captured.graph_module, plan)
        out = captured.graph_module.graph.find_nodes(op="output")[0].args[0].meta["val"]
        entry: GraphEntry | str = GraphEntry.create(pair.keyframe, pair.reuse, plan, pair.report, out, device,
                                                    compile_graphs, config.compile_mode, stats, backend, pool,
                                                    config.keyframe_parts, config.conv_layout)
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
            entry.compile_in_background(tensors, spare)
    for worker in spare:  # not needed: the capture failed, or a graph goes to torch.compile
        worker.cancel()
    return entry
