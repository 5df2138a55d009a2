"""`FRDiffUNet`: the drop-in replacement for a diffusers `UNet2DConditionModel` (the two-phase runtime).

Invariants:
- Called exactly like the wrapped UNet, same return types; attributes and state-dict keys as
  `wrapper.UNetWrapper` gives them. A copy or a pickle is a new runtime with no graphs.
- Every per-step decision (keyframe, reuse or skip; the blend weight) is made here on the host from the
  step position (`steps.StepTracker`) and the generation's `Schedule`; graphs only ever see tensors.
- A step never reads a cache its generation's latest keyframe did not write (`GraphEntry.holds`), and each
  call of a step with one signature (a panorama's views) has caches of its own (`call_slots`); a new
  signature, a new generation or a module change (anything `module_state.module_fingerprint` sees:
  replaced parameters, processors, adapters, module values and configs, classes, their code and the
  globals it reads, numerics flags) forces a keyframe or other graphs (those built under the new settings,
  if any were: a switch back builds nothing). Graphs are only built, compiled and captured under the
  settings they are filed under. A generation's first step may be replayed before the module state is
  read (`_first_step_ahead`, so that the device runs it meanwhile, unless the last read found a change); if
  the state changed, that replay is dropped and its slot holds nothing a step may read.
- Parameters that move (`.to()`, model CPU offload, a swapped `.data`) never leave a graph reading old
  storage (`placement.GraphPlacement`).
- Calls the graphs cannot serve run the eager UNet for the rest of that generation, with one warning that
  names the argument; nothing is silently approximated outside the method.
- One call at a time through a runtime and its copies, whatever thread or CUDA stream makes it (see
  `concurrency.py`); generations stepped in turn are each correct, without reuse across the interleaving,
  and the first such resume warns once.
- `forward` is opaque to dynamo (`torch.compiler.disable`): an outer `torch.compile` of this module runs
  the runtime as it is, never a trace of its host-side control flow.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import torch

from .call_slots import TOO_MANY_CALLS, CallSlots
from .code_reads import CodeReads
from .concurrency import EXPORT_GATE, StreamOrder
from .config import FRDiffConfig
from .cudagraphs import Backend, SharedPool
from .graph_cache import GraphEntry, RuntimeStats, build_entry
from .graph_lru import GraphLRU
from .module_state import hooks_reason, module_fingerprint, module_snapshot, tensor_addresses
from .numerics import numerics_changes, numerics_key
from .passes import CallLayout
from .passes.capture import ArgumentBinder, UnsupportedCall
from .placement import GraphPlacement
from .policy import check_policy_fingerprint
from .schedule import Schedule, StepKind, build_schedule
from .steps import StepPosition, StepTracker
from .warn import CHANGED_MID_GENERATION, FLAGS_CHANGED_MID_GENERATION, INTERLEAVED, OPAQUE, UNTRACKED, warn
from .wrapper import UNetWrapper

logger = logging.getLogger(__name__)


def _flatten(arguments: dict[str, Any]) -> tuple[CallLayout, list[torch.Tensor]] | UnsupportedCall:
    try:  # `CallLayout.from_call`, or the refusal it raised
        return CallLayout.from_call(arguments)
    except UnsupportedCall as exc:
        return exc


def _wants_gradients(tensors: list[torch.Tensor]) -> bool:  # the inference graphs record no autograd history
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@dataclasses.dataclass
class _Generation:
    number: int
    schedule: Schedule | None
    eager_reason: str | None = None


class FRDiffUNet(UNetWrapper):
    """A UNet2DConditionModel that runs FRDiff's keyframe and reuse graphs; build it with `optimize()`."""

    def __init__(self, unet: torch.nn.Module, config: FRDiffConfig) -> None:
        super().__init__(unet)
        self.frdiff_config = config
        self.stats = RuntimeStats()
        # Test seam: "emulate" runs the CUDA-graph buffer discipline on any device (see cudagraphs.py).
        self.graph_backend_override: Backend | None = None
        self._pool = SharedPool()
        # One call at a time through this runtime and its copies (shared by `__copy__`); see concurrency.py.
        # Re-entrant: a call back into the runtime from inside its own step, on one thread, goes on.
        self._lock = threading.RLock()
        self._streams = StreamOrder()
        self._bind = ArgumentBinder(unet.forward)
        self._graphs = GraphLRU(config.max_cached_shapes)
        self._tracker = StepTracker()
        self._slots = CallSlots()  # which caches each call of a step uses (one set per call)
        self._generation = _Generation(number=0, schedule=None)
        self._code_reads = CodeReads()  # a memo of which globals each class's code looks up
        # Whether the module state was found unchanged when last read: only then is a generation's first step
        # replayed before it is read again (`_first_step_ahead`).
        self._state_settled = True
        self._fingerprint = module_fingerprint(self.unet, self._code_reads)
        self._graphs.use_settings(self._fingerprint.settings)
        self._where = GraphPlacement(self.unet, self._graphs, self.stats)

    # --- copies ---------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        # `print(pipe.unet)` says at once that the UNet is optimized, how, and how many shapes are built.
        return f"{self.frdiff_config}, graph pairs built: {len(self._graphs.entries())}"

    def __reduce__(self) -> tuple:
        # copy.copy, copy.deepcopy and pickle make a new runtime over the (copied) UNet with this config: the
        # graphs, buffers and CUDA graphs are built over this UNet's parameters and are never shared or copied.
        return (type(self), (self.unet, self.frdiff_config))

    def __copy__(self) -> FRDiffUNet:
        # Over the same UNet: the step lock is shared, so no copy calls its modules while another captures.
        copied = type(self)(self.unet, self.frdiff_config)
        copied._lock = self._lock
        return copied

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's own signature
        # .to(), .half(), .cuda() may give parameters and buffers new storage. A call that moves nothing
        # (`pipe.to("cuda")` on a pipeline already there, accelerate's offload hook before every forward)
        # costs one walk of the addresses and keeps everything.
        with self._lock:  # never under a step another thread is running
            before = tensor_addresses(self.unet)
            result = super()._apply(fn, recurse)
            if tensor_addresses(self.unet) != before:
                self._where.moved()
        return result

    # --- generations ----------------------------------------------------------------------------------
    def reset(self, num_inference_steps: int | None = None) -> None:
        """Start a new generation at the next call; with N, count the next N calls as its steps.

        Diffusers pipelines need no reset (each call's timesteps tensor starts a generation); hand-written
        loops that pass timesteps not taken from `scheduler.timesteps` call `reset(num_inference_steps=N)`.
        """
        with self._lock:
            self._tracker.reset(num_inference_steps)
            self._generation = _Generation(self._generation.number + 1, None)

    def reconfigure(self, config: FRDiffConfig) -> None:
        """Use `config` from the next generation on, keeping the built graphs where they still apply.

        A new keyframe schedule (interval, mask, score mixing, mix bias/slope) keeps every captured,
        compiled and CUDA-graph-captured graph: they do not depend on it. A change of `cache_point`, `compile`,
        `compile_mode` or `cuda_graphs` drops them (rebuilt on next use). The generation in progress, if any,
        ends here; the next call starts a new one, whose first step is always a keyframe.
        """
        if not isinstance(config, FRDiffConfig):
            raise ValueError(f"reconfigure() takes an FRDiffConfig, got {type(config).__name__}")
        check_policy_fingerprint(self.unet, config.policy_fingerprint)
        with self._lock:
            if not config.same_graphs(self.frdiff_config):
                logger.info("reconfigure: cache point, compile or CUDA-graph settings changed, dropping %d graph pairs",
                            len(self._graphs))
                self._graphs.clear()
            self._graphs.resize(config.max_cached_shapes)
            for entry in self._graphs.entries():
                entry.keep_slots(config.max_calls_per_step)
            self.frdiff_config = config
            self.reset()
        logger.info("frdiff_compile.reconfigure: %s", config)

    def _use_current_settings(self, snapshot: tuple | None = None) -> tuple[str, ...]:
        """Snapshot the module state (or take `snapshot`, one just made) and switch to the graphs built under
        it: at a generation's start, and before `prepare` builds graphs (which must be filed under the settings
        they are built under). The forward hooks found, which no graph runs."""
        fingerprint, addresses = snapshot or module_snapshot(self.unet, self._code_reads)
        self._state_settled = fingerprint == self._fingerprint
        if fingerprint != self._fingerprint:
            if fingerprint.parameters != self._fingerprint.parameters:
                # Graphs over replaced Parameters would keep them (and their memory) alive, and serve no one.
                logger.info("the UNet's parameters were replaced: rebuilding graphs")
                self._where.drop_graphs()
            else:
                logger.info("module settings changed (attention processors, adapters, module values or configs, "
                            "classes, their code, the globals it reads, hooks or numerics flags): using graphs "
                            "built under these settings, keeping the others for a switch back")
            self._graphs.use_settings(fingerprint.settings)
            self._fingerprint = fingerprint
        self._where.check(addresses)
        return fingerprint.hooks

    def _start_generation(self, num_steps: int, snapshot: tuple | None = None) -> None:
        hooks = self._use_current_settings(snapshot)
        number = self._generation.number + 1
        try:
            schedule = build_schedule(num_steps, self.frdiff_config)
        except ValueError as exc:
            raise ValueError(f"frdiff_compile: {exc}") from None
        # The last step of the generation that ended, unless that one had stopped serving calls midway.
        if (changed := self._slots.new_generation()) is not None and self._generation.eager_reason is None:
            warn(logger, f"in the last generation's last step, {changed}")
        self._generation = _Generation(number, schedule)
        self.stats.generations += 1
        logger.debug("generation %d: %s", number, schedule)
        if hooks:
            self._fall_back(hooks_reason(hooks) + "; the graphs serve calls again once they are removed")

    def _fall_back(self, reason: str) -> None:
        if self._generation.eager_reason is None:
            warn(logger, f"running the eager UNet for the rest of this generation: {reason}")
            self._generation.eager_reason = reason

    # --- graphs ---------------------------------------------------------------------------------------
    def _entry(self, layout: CallLayout, tensors: list[torch.Tensor]) -> GraphEntry | str:
        found = self._graphs.get(layout.signature)
        if found is not None:
            return found
        if module_fingerprint(self.unet, self._code_reads) != self._fingerprint:  # 2 ms, before seconds of build
            return CHANGED_MID_GENERATION
        entry = build_entry(self.unet, layout, tensors, self.frdiff_config, self.stats,
                            self.graph_backend_override, self._pool)
        if (numerics := numerics_key()) != self._fingerprint.numerics:
            self._settle_numerics(numerics)
        if self._graphs.put(layout.signature, entry) and isinstance(entry, GraphEntry):
            self._evicted_rebuild(layout, entry)
        return entry

    def _settle_numerics(self, numerics: tuple) -> None:
        """File the graph pair just built under the numerics flags torch itself set while tracing it.

        Only the build ran since the fingerprint was checked (in this call, under the lock), so torch set
        them. On an H200 (torch 2.11) every first generation of a process ran the eager UNet and the next built
        its graphs again; the flag, by torch's source (`sdp_utils.cpp`): on a Hopper or Blackwell GPU with
        cuDNN past 9.15, the first attention dispatch of a process puts cuDNN first in the SDPA priority order.
        The trace dispatched its attention under the new order, and the graphs compile and capture under it.
        """
        logger.info("torch set numerics flags while the UNet was traced (%s): graphs filed under them",
                    numerics_changes(self._fingerprint.numerics, numerics))
        self._fingerprint = self._fingerprint._replace(numerics=numerics)
        self._graphs.use_settings(self._fingerprint.settings)

    def _evicted_rebuild(self, layout: CallLayout, entry: GraphEntry) -> None:
        self.stats.evicted_rebuilds += 1
        if self.stats.evicted_rebuilds == 1:  # once per runtime: a thrashing server would warn at every call
            n = self.frdiff_config.max_cached_shapes
            warn(logger, f"built the graph pair for {layout.describe()} again after max_cached_shapes={n} had "
                 "dropped it: these calls use more input signatures (batch, resolution, text length, module "
                 "settings) than that, and each return to a dropped one exports and compiles again. Raise "
                 "FRDiffConfig(max_cached_shapes=...); each pair of the current settings holds its feature "
                 f"caches ({entry.slot_bytes / 2**20:.0f} MiB for this one, per call it serves in a step)")

    def prepare(self, *args: Any, **kwargs: Any) -> tuple[GraphEntry, list[torch.Tensor]]:
        """Build the graph pair for calls shaped like this one, without running a step.

        Returns the entry and the call's flat input tensors, for warm-ups and benchmarks that time the
        keyframe and reuse graphs on their own; built under the settings of this moment, as a generation
        starting now would build them. Raises `RuntimeError` if such calls cannot be captured.
        """
        arguments = self._bind(args, kwargs)
        arguments.pop("return_dict", None)
        if isinstance(call := _flatten(arguments), UnsupportedCall):
            raise RuntimeError(f"calls with argument {call} run the eager UNet; there is no graph to prepare")
        layout, tensors = call
        with self._lock, EXPORT_GATE.call():
            hooks = self._use_current_settings()
            if hooks:
                raise RuntimeError(hooks_reason(hooks) + "; remove them before preparing graphs")
            entry = self._entry(layout, tensors)
        if isinstance(entry, str):
            raise RuntimeError(entry)
        return entry, tensors

    def graph_entries(self) -> list[GraphEntry]:
        """The live graph pairs, most recently used last (for tests, benchmarks and reports)."""
        return self._graphs.entries()

    # --- the call -------------------------------------------------------------------------------------
    # Opaque to dynamo: users habitually wrap `pipe.unet` in torch.compile, and tracing this host-side
    # control flow (step tracking from storage metadata, graph lookup, CUDA-graph replay) only breaks the
    # graph a dozen times and compiles fragments of it (measured on CPU: 13 graphs, 51 s for 6 tiny steps
    # against 2 s). The graphs this method runs are compiled already, so an outer torch.compile adds nothing.
    # Under fullgraph=True dynamo raises at the first call instead of skipping, with this reason in its message.
    @torch.compiler.disable(reason=OPAQUE)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        arguments = self._bind(args, kwargs)
        return_dict = arguments.pop("return_dict", True)
        # The whole call, the eager UNet too: no copy's capture nor any export (`ExportGate`) runs meanwhile.
        with self._lock, EXPORT_GATE.call():
            out = self._step(arguments)
            if out is None:
                self.stats.eager_calls += 1
                return self.unet(*args, **kwargs)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
        return UNet2DConditionOutput(sample=out)

    def _step(self, arguments: dict[str, Any]) -> torch.Tensor | None:
        """Run one step through the graphs; None means 'run the eager UNet'."""
        position = self._tracker.locate(arguments.get("timestep"))
        if position is None:
            if self._generation.eager_reason != UNTRACKED:
                self._generation = _Generation(self._generation.number + 1, None)
                self._fall_back(UNTRACKED)
            return None
        if position.resumed:
            self._interleaved()
        call = None  # flattened once per call, where a graph may serve it
        if position.new_generation:
            call = _flatten(arguments)
            out, snapshot = self._first_step_ahead(call, position) if isinstance(call, tuple) else (None, None)
            if out is not None:
                return out
            self._start_generation(position.num_steps, snapshot)
        elif not position.repeated and (changed := self._slots.new_step()) is not None:
            self._fall_back(changed)
        if self._generation.eager_reason is not None:
            return None
        if self._where.away:  # moved mid-generation: the graphs' buffers were released
            self._where.check()
        call = _flatten(arguments) if call is None else call
        if isinstance(call, UnsupportedCall):  # refused here, once the generation it falls back in has started
            self._fall_back(f"argument {call} is not supported by the captured graphs")
            return None
        layout, tensors = call
        if _wants_gradients(tensors):
            # A caller differentiating through the UNet (guidance by a loss on its output) needs the autograd
            # history the inference graphs never record; a loop that merely forgot no_grad has no such input.
            self._fall_back("an input requires grad and grad mode is on (gradients through the UNet); the "
                            "graphs are inference graphs")
            return None
        entry = self._entry(layout, tensors)
        if isinstance(entry, str):
            self._fall_back(entry)
            return None
        slot, limit = self._slots.assign(layout.signature), self.frdiff_config.max_calls_per_step
        if isinstance(slot, int) and slot >= limit:
            slot = TOO_MANY_CALLS.format(limit=limit, calls=layout.describe(), mib=entry.slot_bytes / 2**20)
        if isinstance(slot, str):
            self._fall_back(slot)
            return None
        return self._run(entry, tensors, position.index, slot)

    def _first_step_ahead(self, call: tuple[CallLayout, list[torch.Tensor]],
                          position: StepPosition) -> tuple[torch.Tensor | None, tuple | None]:
        """A generation's first step replayed before the module state is read, and the snapshot then read.

        A first step is always a keyframe. Where it is a replay of a captured graph (nothing to build, compile
        or capture), it is queued first and the module state is read while the device runs it (README: "The
        module-state check off the device's path"; `benchmarks/bench_host.py`). Unchanged: the step is served.
        Changed: the replay is dropped (its slot already holds nothing a step may read) and the step goes the
        usual way. Before the replay only the addresses the graphs were captured over are read
        (`GraphPlacement.unmoved`). After a read that found a change (adapters switched per request), the next
        first step waits for its read, so a run of changes costs one dropped replay. (None, None) where this
        does not apply.
        """
        layout, tensors = call
        entry = self._graphs.peek(layout.signature)
        if (entry is None or not entry.replays_full() or not self._state_settled or self._fingerprint.hooks
                or not self._where.unmoved() or _wants_gradients(tensors)):
            return None, None
        self._streams.follow(entry.device)
        out = entry.replay_full_ahead(tensors, position.index)
        self.stats.keyframes_ahead += 1
        snapshot = module_snapshot(self.unet, self._code_reads)
        if snapshot[0] != self._fingerprint or snapshot[1] != self._where.addresses:
            self.stats.keyframes_discarded += 1
            entry.synchronize()  # the new state may free this pair's buffers and graphs
            return None, snapshot
        self._start_generation(position.num_steps, snapshot)  # a bad step count raises here, as it would anyway
        self._graphs.get(layout.signature)  # recorded as used
        self._slots.assign(layout.signature)  # slot 0: the generation's first call
        entry.commit_full(self._generation.number, position.index)
        self.stats.forced_keyframes += self._generation.schedule.kinds[position.index] is not StepKind.FULL
        self.stats.full_calls += 1
        return out, snapshot

    def _interleaved(self) -> None:
        self.stats.resumed_generations += 1
        if self.stats.resumed_generations == 1:  # once per runtime: a server would otherwise warn every step
            warn(logger, INTERLEAVED)

    def _run(self, entry: GraphEntry, tensors: list[torch.Tensor], index: int, slot: int) -> torch.Tensor | None:
        self._streams.follow(entry.device)
        generation = self._generation
        schedule: Schedule = generation.schedule  # type: ignore[assignment]  # set with the generation
        kind = schedule.kinds[index]
        if kind is not StepKind.FULL and not entry.holds(generation.number, schedule.last_keyframes[index], slot):
            # First step of an img2img generation, or a signature new this generation or back in it after
            # others' keyframes: no cache from the latest keyframe to read.
            logger.debug("step %d: %s forced to full (no cache from the latest keyframe)", index, kind.value)
            self.stats.forced_keyframes += 1
            kind = StepKind.FULL
        if (kind is not StepKind.SKIP and entry.builds_at_next_run(kind is StepKind.FULL, slot)
                and (now := numerics_key()) != self._fingerprint.numerics):  # 30 µs, before a compile or capture
            changed = numerics_changes(self._fingerprint.numerics, now)
            self._fall_back(f"{FLAGS_CHANGED_MID_GENERATION} (changed: {changed})")
            return None
        logger.debug("step %d/%d, call %d: %s (lambda=%.3f)", index, schedule.num_steps, slot, kind.value,
                     schedule.weights[index])
        if kind is StepKind.FULL:
            self.stats.full_calls += 1
            return entry.run_full(tensors, generation.number, index, slot)
        if kind is StepKind.REUSE:
            self.stats.reuse_calls += 1
            return entry.run_reuse(tensors, schedule.weights[index], slot)
        self.stats.skip_steps += 1
        return entry.run_skip(slot)
