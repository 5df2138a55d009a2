"""Score-mix blend `out = w * a + (1 - w) * b`, the one place the runtime's reuse graph blends outputs.

Invariants:
- `w` is a 0-d tensor on the device of `a` (a Python float would recompile a compiled graph per value and
  a CUDA graph could not pick up a new value written into the same tensor).
- Math in fp32, result cast back to `a`'s dtype; `w == 1` returns exactly `a` and `w == 0` exactly `b` for
  finite inputs, so a reuse step with lambda == 1 is bit-identical to pure feature reuse.
- The result is a new tensor; it never aliases `a` or `b`.

This is the pure-torch reference. The fused Triton kernel of the blend issue replaces `score_blend`'s body
and is tested against `score_blend_reference`, which stays here as the single reference.
"""

from __future__ import annotations

import torch


def score_blend_reference(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """w * a + (1 - w) * b in fp32, cast back to a's dtype."""
    w = weight.to(torch.float32)
    return (w * a.to(torch.float32) + (1.0 - w) * b.to(torch.float32)).to(a.dtype)


def score_blend(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The blend the reuse graph calls (traceable by torch.export and torch.compile)."""
    return score_blend_reference(weight, a, b)
