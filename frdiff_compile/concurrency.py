"""How a runtime serves calls from several threads and CUDA streams: one step at a time, in order.

diffusers' server recipe shares one UNet between request threads, each with a pipeline of its own
(`from_pipe`, a scheduler per request), so an optimized UNet's `forward` can be entered by several threads
at once. A stock UNet is a pure function of its inputs; the runtime is not: it keeps the current
generation, the feature caches, the keyframe output, the blend weight and, with CUDA graphs, static input
and output buffers, all of which one step reads after another step wrote them. And capturing a graph pair
(`torch.export`, non-strict) replaces `torch.nn.Module.__call__` and `__getattr__` for the whole process
while it traces (seen on torch 2.13), so a call into the same modules meanwhile runs inside that trace
(measured on CPU with two threads: assertion errors in both, or a hang).

Invariants:
- The step lock (`FRDiffUNet._lock`, re-entrant) is held for a whole call (the step lookup, any capture
  or compile, the graphs or the eager UNet, up to the fresh tensor returned) and for whatever else changes
  the runtime's state (`.to()`, `reset`, `reconfigure`, `prepare`). So a step's decisions and every read
  and write of the buffers belong to one call: no thread reads another's caches, replays over another's
  inputs or clones another's output.
- A runtime and its copies (`copy.copy(pipe.unet)`, one per worker) share one step lock, since they share
  the UNet's modules: no copy calls them while another captures. Their steps are serialized on the host.
  On a GPU a step only queues work (a CUDA-graph replay, or compiled kernels) while it holds the lock, so
  the device can still run one copy's step while the next is queued (not measured). Runtimes made by
  separate `optimize` calls share only the process-wide export gate (`EXPORT_GATE`, below).
- An export never overlaps a runtime call in another thread (`ExportGate`). torch.export is not thread-safe
  even across different modules, and while it traces it turns cuDNN, MKLDNN and NNPACK off for the whole
  process (`torch.export._trace._ignore_backend_decomps`, torch 2.11 and 2.13). A generation of another
  runtime that started meanwhile read cuDNN's flag as a change of its numerics settings and exported and
  built its graph pair again (measured on CPU, tests/test_concurrency.py; on a GPU that is also a compile
  and a capture), and a call that reads the flags before a compile or capture would run the eager UNet
  with a "flags changed" warning; on a GPU, a graph compiled or captured then would keep non-cuDNN
  convolutions. Calls hold the gate shared, exports alone; the step lock is always taken first.
- On CUDA, work on a runtime's buffers is queued in call order even when calls come from different
  streams (`StreamOrder`): a step on another stream than the last step on that device first makes its
  stream wait for everything queued on the last one's, since the host's lock alone does not order the
  device's work.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch


class StreamOrder:
    """The CUDA stream a runtime's last step on each device queued its work on."""

    def __init__(self, current_stream: Callable[[torch.device], torch.cuda.Stream] | None = None) -> None:
        self._current_stream = current_stream or torch.cuda.current_stream  # a seam for the CPU tests
        self._last: dict[torch.device, torch.cuda.Stream] = {}

    def follow(self, device: torch.device) -> None:
        """Before a step touches buffers on `device`: queue its work after the last step's there, whatever
        stream that ran on. Costs a current-stream query per CUDA step; nothing elsewhere."""
        if device.type != "cuda":
            return
        stream = self._current_stream(device)
        last = self._last.get(stream.device)
        if last is not None and last != stream:
            stream.wait_stream(last)
        self._last[stream.device] = stream


class ExportGate:
    """Runtime calls hold this gate shared (`call`), torch.export exclusively (`export`), process-wide.

    - Shared holds are re-entrant per thread, and an exporting thread's own calls (none are expected) go on.
    - An export waits for every other thread's calls to end and sets its own thread's holds aside meanwhile:
      a runtime's first call exports inside its own call, and two such calls in two threads must not wait
      for each other.
    - New calls wait behind a waiting export, so a busy runtime cannot starve another's, except while some
      call is in long work (`long_work`: a compile, minutes cold). The export could not start before that
      call ends anyway, so other runtimes' calls go on meanwhile instead of waiting out the compile; once
      no long work is left they wait again, for the calls in flight to end and the export to run.
    - Callers take their step lock first, then the gate: a thread waiting for a step lock holds no share
      that an export would wait for. (A runtime called from inside another runtime's call, on another
      thread than the one holding its step lock, could still deadlock against an export; no diffusers
      model does that.)
    - Only the order of waiting depends on `long_work`: an export never runs beside a call either way.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._holds: dict[int, int] = {}  # thread ident -> its shared holds
        self._exporter: int | None = None
        self._exports_waiting = 0
        self._long_work = 0  # calls in a compile now

    def call(self) -> ExportGate:
        """`with gate.call():` holds the gate shared for a runtime call (the gate is its own context manager,
        with nothing to allocate per use: 0.8 µs a call on the CPU machine, 1.7 µs as a generator)."""
        return self

    def __enter__(self) -> None:
        me = threading.get_ident()
        with self._changed:
            if me not in self._holds and me != self._exporter:
                while self._exporter is not None or (self._exports_waiting and not self._long_work):
                    self._changed.wait()
            self._holds[me] = self._holds.get(me, 0) + 1

    def __exit__(self, *exc_info: object) -> None:
        me = threading.get_ident()
        with self._changed:
            if (left := self._holds.pop(me) - 1) > 0:
                self._holds[me] = left
            elif self._exports_waiting:  # only an export waits for calls to end
                self._changed.notify_all()

    @contextlib.contextmanager
    def long_work(self) -> Iterator[None]:
        """Around work inside a call that takes seconds to minutes (a compile, or the wait for a worker's):
        meanwhile new calls in other threads need not wait behind a waiting export."""
        with self._changed:
            self._long_work += 1
            self._changed.notify_all()  # calls waiting behind an export may go
        try:
            yield
        finally:
            with self._changed:
                self._long_work -= 1

    @contextlib.contextmanager
    def export(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._changed:
            own = self._holds.pop(me, 0)
            if own:
                self._changed.notify_all()  # another export may be waiting for this thread's holds
            self._exports_waiting += 1
            try:
                while self._exporter is not None or self._holds:
                    self._changed.wait()
            except BaseException:  # interrupted while waiting: this thread's calls hold the gate again
                self._restore(me, own)
                raise
            finally:
                self._exports_waiting -= 1
            self._exporter = me
        try:
            yield
        finally:
            with self._changed:
                self._exporter = None
                self._restore(me, own)

    def _restore(self, me: int, own: int) -> None:
        if own:
            self._holds[me] = self._holds.get(me, 0) + own
        self._changed.notify_all()


# The package's one piece of module-level state: it configures nothing and holds nothing between calls.
EXPORT_GATE = ExportGate()
