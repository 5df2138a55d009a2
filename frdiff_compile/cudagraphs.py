"""Static replay of one graph: inputs copied into owned buffers, the graph replayed, a fresh output returned.

Invariants:
- A `StaticGraph` owns one static buffer per per-call input (sample, timestep, text embeddings, ...) and
  copies the caller's tensors into them before every replay; the runtime's persistent tensors (feature
  caches, keyframe output, blend weight) are passed by reference at capture and never copied, because the
  keyframe graph writes them in place and the reuse graph reads them in place.
- What a call returns is a clone of the static output, never the static output itself: schedulers such as
  PNDM and multistep DPM keep earlier model outputs, and the next replay overwrites the static one.
- Capture happens at the first call, after `warmup` eager runs on a side stream (they compile the graph and
  let cuBLAS and Triton set themselves up outside the capture), and the capture itself runs on that private
  stream with thread-local capture errors, so other threads' CUDA work neither enters the graph nor fails
  while it is captured, and, begun without `torch.cuda.graph`'s device-wide synchronize, two runtimes can
  capture in two threads at once; the graphs of one runtime share one memory pool. Those warm-up runs and the
  capture run are real calls on the same inputs, so the buffers the keyframe graph writes hold this step's
  values afterwards either way. Capture and replay run on the inputs' device whichever device is current, so a
  UNet on cuda:1 driven from a thread whose current device is cuda:0 is captured, not run beside an empty
  capture.
- Two backends: "cuda" (`torch.cuda.CUDAGraph`) and "emulate", which keeps the same buffer discipline on
  any device by re-running the function and copying into the static output, so the CPU test suite can
  check the copying and aliasing rules that a real replay depends on.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Backend = Literal["cuda", "emulate"]


class CaptureError(RuntimeError):
    """The graph could not be captured; the runtime falls back to running it without CUDA graphs."""


def _static_like(t: torch.Tensor) -> torch.Tensor:
    # Same strides as the example: a channels_last sample must stay channels_last in the static buffer,
    # since the graph was traced (and compiled) for that layout.
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


class StaticGraph:
    """`fn(*inputs, *persistent)` captured once over static input buffers and replayed per call."""

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        persistent: Sequence[torch.Tensor],
        backend: Backend,
        pool: SharedPool | None = None,
        warmup: int = 2,
    ) -> None:
        if backend not in ("cuda", "emulate"):
            raise ValueError(f"backend must be 'cuda' or 'emulate', got {backend!r}")
        self.fn = fn
        self.persistent = list(persistent)
        self.backend = backend
        self.pool = pool
        self.warmup = warmup
        self.replays = 0
        self._inputs: list[torch.Tensor] | None = None
        self._output: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._device: torch.device | None = None  # where a CUDA graph was captured

    @property
    def captured(self) -> bool:
        return self._inputs is not None

    def _load(self, tensors: Sequence[torch.Tensor]) -> None:
        # Every call: the graph reads these addresses, never the caller's tensors.
        for static, t in zip(self._inputs, tensors, strict=True):
            static.copy_(t)

    def _capture(self, tensors: Sequence[torch.Tensor]) -> None:
        try:
            with torch.inference_mode(False), torch.no_grad():
                self._inputs = [_static_like(t) for t in tensors]
            self._load(tensors)
            args = [*self._inputs, *self.persistent]
            if self.backend == "emulate":
                self._output = self.fn(*args)
                return
            # On the tensors' device, whatever device is current: a UNet on cuda:1 called from a thread whose
            # current device is cuda:0 (a server with a pipeline per GPU) would have its kernels launched on
            # cuda:1's own stream, outside a capture made on cuda:0, and every replay of the empty graph would
            # hand back the capture's output again. (Reasoned: one-GPU machines cannot show it.)
            self._device = next(t.device for t in args if t.is_cuda)
            with torch.cuda.device(self._device):
                self._graph = self._capture_cuda(args)
            if self.pool is not None:
                self.pool.add(self)
        except Exception as exc:  # noqa: BLE001 - any capture failure becomes the runtime's fallback
            self._inputs, self._output, self._graph = None, None, None
            raise CaptureError(f"{type(exc).__name__}: {exc}") from exc

    def _capture_cuda(self, args: list[torch.Tensor]) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool = self.pool.handle() if self.pool else None
        # On the private side stream, not torch's default capture stream (one per process, so runtimes
        # capturing in two threads would record into one another's graphs); "thread_local" because in
        # "global" mode another thread's unsafe call during the capture (a scheduler step's host sync in
        # another request) would fail there, while no other thread can queue work on this stream. Begun and
        # ended directly, not through `torch.cuda.graph`, whose entry synchronizes the whole device and empties
        # the allocator's cache: in a thread beside another runtime's capture that fails this capture
        # ("operation not permitted when stream is capturing") and invalidates the other (seen on an H200).
        with torch.cuda.stream(side):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                self._output = self.fn(*args)
            except BaseException:
                with contextlib.suppress(Exception):  # ends the capture and the pool's use; the first error tells
                    graph.capture_end()
                raise
            graph.capture_end()
        return graph

    def __call__(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if not self.captured:
            self._capture(tensors)
            logger.debug("captured a %s graph over %d inputs", self.backend, len(tensors))
        else:
            self._load(tensors)
        if self._graph is not None:
            with torch.cuda.device(self._device):  # onto that device's current stream, as captured
                self._graph.replay()
        elif self.replays:  # emulation: the capture call already produced this call's result
            with torch.no_grad():
                self._output.copy_(self.fn(*self._inputs, *self.persistent))
        self.replays += 1
        return self._output.clone()


class SharedPool:
    """One CUDA-graph memory pool for all graphs of one runtime, created at the first capture.

    Sharing is safe because replays run one at a time on one stream and every output is cloned before the
    next replay; what one graph keeps alive (its static output) is never handed to another.

    A handle is reused only while a graph captured into it is alive. CUDA's caching allocator keeps a pool
    until its memory is freed, and a capture into a pool that still exists but that no live graph uses
    fails its internal check (`use_count > 0` in `beginAllocateToPool`). That is the state after every graph
    of a runtime is dropped: a parameter move (`GraphEntry.relink`), model offload, `clear`, an eviction of
    the last captured pair. So once none is left, the next capture gets a new handle; the old pool's memory
    goes back at the allocator's next `empty_cache` (diffusers' offload calls it) or its own retry on OOM.
    """

    def __init__(self, new_handle: Callable[[], object] | None = None) -> None:
        self._new_handle = new_handle or torch.cuda.graph_pool_handle  # a seam for the CPU tests
        self._handle: object | None = None
        self._graphs: weakref.WeakSet[StaticGraph] = weakref.WeakSet()  # the graphs captured into it

    def handle(self) -> object:
        if self._handle is None or not self._graphs:
            self._handle = self._new_handle()
        return self._handle

    def add(self, graph: StaticGraph) -> None:
        """Record a graph captured into the current handle (a StaticGraph owns its CUDA graph to the end)."""
        self._graphs.add(graph)
