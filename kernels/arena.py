"""A flat arena holding many tensors, so one kernel launch blends all of them (`BlendArena.blend_`).

Invariants:
- Every tensor starts at a multiple of `blend.BLOCK` elements, so each program of the arena kernel touches
  exactly one tensor and takes exactly that tensor's weight; the padding between tensors is never read
  through a view.
- `views` are contiguous views into `buffer`; writing a view writes the arena, and the arena's layout
  (shapes, dtype, device, offsets) never changes after construction. Two arenas blend only when their
  layouts are identical.
"""

from __future__ import annotations

import math

import torch

from .blend import BLOCK, _arena_blend_op


class BlendArena:
    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device | str) -> None:
        if not shapes:
            raise ValueError("BlendArena needs at least one tensor shape")
        self.shapes = [tuple(s) for s in shapes]
        self.dtype = dtype
        self.device = torch.device(device)
        self.offsets: list[int] = []
        segments: list[int] = []
        offset = 0
        for index, shape in enumerate(self.shapes):
            numel = math.prod(shape)
            blocks = max(1, -(-numel // BLOCK))
            self.offsets.append(offset)
            segments.extend([index] * blocks)
            offset += blocks * BLOCK
        # Zero-filled so the padding is finite: it is blended (harmlessly) with everything else.
        self.buffer = torch.zeros(offset, dtype=dtype, device=self.device)
        self.device = self.buffer.device  # canonical form ("cuda:0", not "cuda"), so device checks compare equal
        self.segments = torch.tensor(segments, dtype=torch.int32, device=self.device)
        self.views = [
            self.buffer[o : o + math.prod(s)].view(s) for o, s in zip(self.offsets, self.shapes)
        ]

    def same_layout(self, other: BlendArena) -> bool:
        return (self.shapes, self.dtype, self.device) == (other.shapes, other.dtype, other.device)

    def blend_(self, weights: torch.Tensor, a: BlendArena, b: BlendArena) -> BlendArena:
        """self <- weights[k] * a_k + (1 - weights[k]) * b_k for every tensor k, in one launch.

        `a` or `b` may be `self` (e.g. the soft memory update M <- h * S + (1 - h) * M).
        """
        for name, arena in (("a", a), ("b", b)):
            if not self.same_layout(arena):
                raise ValueError(f"arena {name} has another layout; build both arenas from the same shapes and dtype")
        if weights.shape != (len(self.shapes),) or weights.device != self.device:
            raise ValueError(
                f"weights must have shape ({len(self.shapes)},) on {self.device} (one per tensor), got "
                f"{tuple(weights.shape)} on {weights.device}"
            )
        _arena_blend_op(weights, self.segments, a.buffer, b.buffer, self.buffer)
        return self
