"""How a runtime serves calls from several threads and CUDA streams: one step at a time, in order.

diffusers' server recipe shares one UNet between request threads, each with a pipeline of its own
(`from_pipe`, a scheduler per request), so an optimized UNet's `forward` can be entered by several threads
at once. A stock UNet is a pure function of its inputs; the runtime is not: it keeps the current
generation, the feature caches, the keyframe output, the blend weight and, with CUDA graphs, static input
and output buffers, all of which one step reads after another step wrote them. And capturing a graph pair
(`torch.export`, non-strict) replaces the `__call__` of the UNet's modules while it traces, so any other
call into the same modules meanwhile runs inside that trace (measured on CPU with two threads: assertion
errors in both, or a hang).

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
  separate `optimize` calls share only the process-wide export lock (`passes/capture.py`): torch.export
  is not thread-safe even across different modules.
- On CUDA, work on a runtime's buffers is queued in call order even when calls come from different
  streams (`StreamOrder`): a step on another stream than the last step on that device first makes its
  stream wait for everything queued on the last one's, since the host's lock alone does not order the
  device's work.
"""

from __future__ import annotations

from collections.abc import Callable

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
