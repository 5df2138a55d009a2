"""One input signature's graph pair, the buffers it reads and writes, and an LRU of such entries.

Invariants:
- Cache buffers, the keyframe-output buffer and the 0-d blend weight are owned here, allocated once per
  entry (outside inference mode, so a generation run under `torch.inference_mode()` and a later one run
  without it can both write them) and only ever written in place.
- `written_generation` names the generation whose keyframe last filled the buffers; the runtime runs a
  reuse or skip step only when it equals the current generation, so a stale cache is never read.
- What a step hands back is always a fresh tensor: the graphs' outputs are new, and a skip step returns a
  clone of the keyframe output, never the buffer the next keyframe overwrites.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import fx

from .passes import BuildReport, Plan

logger = logging.getLogger(__name__)


def _compile(gm: fx.GraphModule, mode: str | None) -> Callable[..., torch.Tensor]:
    # fullgraph: a graph break inside a graph of pure ATen ops would be a bug worth failing loudly on.
    return torch.compile(gm, fullgraph=True, dynamic=False, mode=mode)


@dataclasses.dataclass
class GraphEntry:
    plan: Plan
    report: BuildReport
    keyframe: Callable[..., torch.Tensor]
    reuse: Callable[..., torch.Tensor]
    caches: list[torch.Tensor]
    keyframe_out: torch.Tensor
    weight: torch.Tensor
    written_generation: int = -1
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
    ) -> GraphEntry:
        with torch.inference_mode(False):
            caches = [torch.empty(p.shape, dtype=p.dtype, device=device) for p in plan.points]
            keyframe_out = torch.empty(tuple(out_meta.shape), dtype=out_meta.dtype, device=device)
            weight = torch.ones((), dtype=torch.float32, device=device)
        keyframe_fn: Callable[..., torch.Tensor] = keyframe
        reuse_fn: Callable[..., torch.Tensor] = reuse
        if compile:
            keyframe_fn, reuse_fn = _compile(keyframe, compile_mode), _compile(reuse, compile_mode)
        return cls(plan, report, keyframe_fn, reuse_fn, caches, keyframe_out, weight)

    def run_full(self, tensors: list[torch.Tensor], generation: int) -> torch.Tensor:
        out = self.keyframe(*tensors, *self.caches, self.keyframe_out)
        self.written_generation = generation
        return out

    def run_reuse(self, tensors: list[torch.Tensor], weight: float) -> torch.Tensor:
        self.weight.fill_(weight)  # in place: same tensor every step, so no recompile and no host sync
        return self.reuse(*tensors, *self.caches, self.keyframe_out, self.weight)

    def run_skip(self) -> torch.Tensor:
        return self.keyframe_out.clone()


class GraphLRU:
    """Entries by input signature, least recently used dropped past `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: collections.OrderedDict[tuple, GraphEntry | str] = collections.OrderedDict()

    def get(self, signature: tuple) -> GraphEntry | str | None:
        """The entry, the reason its capture failed, or None if the signature was never built."""
        found = self._entries.get(signature)
        if found is not None:
            self._entries.move_to_end(signature)
        return found

    def put(self, signature: tuple, entry: GraphEntry | str) -> None:
        self._entries[signature] = entry
        self._entries.move_to_end(signature)
        while len(self._entries) > self.capacity:
            dropped, _ = self._entries.popitem(last=False)
            logger.debug("dropped least recently used graph pair %s", dropped)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[GraphEntry]:
        return [e for e in self._entries.values() if isinstance(e, GraphEntry)]

