"""Fused cache blend `out = w * a + (1 - w) * b`: Triton kernels, their launchers, and the torch reference.

Read top to bottom: the two `@triton.jit` kernels (one tensor; many tensors in one flat arena), their
launchers, the pure-torch references (the single reference the tests and benchmarks import), and the
`torch.library` ops the graphs call.

Invariants:
- `w` is a tensor on the device of the data (0-d for one tensor, one entry per tensor for an arena), never
  a Python float: a new weight written into the same tensor needs no recompile and no host sync, and a
  captured CUDA graph picks it up.
- Loads in the storage dtype, math in fp32, store cast back to the output dtype (fp32, fp16, bf16). For
  finite inputs w == 1 gives exactly `a` and w == 0 exactly `b`. The ops also take fp64 (a UNet run in
  double precision): the torch reference blends it in fp64, since fp32 math would throw its precision away.
- Elementwise in memory order: the launchers take `a`, `b` and `out` in one dense layout (all contiguous,
  or all channels_last) and raise `ValueError` on anything else instead of blending the wrong elements.
  `out` may alias `a` or `b`: each element is read before it is written, by the same program. The ops
  allocate `out` like `a` and first copy an operand of another layout into `a`'s (contiguous where `a`
  is not dense): a channels_last UNet's output meets a keyframe output kept contiguous (seen on an H200).
- Where the Triton kernel cannot run (no CUDA tensor and no `TRITON_INTERPRET=1`, or no triton), the ops
  compute the reference; results agree exactly in fp32 and fp16 (bf16 under the interpreter: 2^-7).
- `score_blend` is differentiable in all three inputs (torch-op backward), so the Auto-FR search runs its
  soft memory update through the same kernel as inference.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the library runs without triton; the reference computes the blend
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernels' (the launchers refuse others)
OP_DTYPES = (*SUPPORTED_DTYPES, torch.float64)  # the ops'; fp64 always goes to the reference
BLOCK = 1024  # elements per program; also the arena's alignment, so no block spans two tensors

if triton is not None:

    @triton.jit
    def _blend_kernel(w_ptr, a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        w = tl.load(w_ptr).to(tl.float32)
        a = tl.load(a_ptr + offsets, mask=mask).to(tl.float32)
        b = tl.load(b_ptr + offsets, mask=mask).to(tl.float32)
        # out = w * a + (1 - w) * b, in fp32
        tl.store(out_ptr + offsets, (w * a + (1.0 - w) * b).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _arena_blend_kernel(w_ptr, segment_ptr, a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        segment = tl.load(segment_ptr + pid)  # which tensor of the arena this block belongs to
        w = tl.load(w_ptr + segment).to(tl.float32)
        offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        a = tl.load(a_ptr + offsets, mask=mask).to(tl.float32)
        b = tl.load(b_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(out_ptr + offsets, (w * a + (1.0 - w) * b).to(out_ptr.dtype.element_ty), mask=mask)


def _check(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.numel() != 1:
        raise ValueError(f"weight must be a 1-element tensor (not a Python float), got {weight!r}")
    if a.shape != b.shape or a.shape != out.shape:
        raise ValueError(f"blend shapes differ: a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)}")
    if a.dtype not in SUPPORTED_DTYPES or b.dtype != a.dtype or out.dtype != a.dtype:
        raise ValueError(
            f"blend supports one dtype of {[str(d) for d in SUPPORTED_DTYPES]} for a, b and out; "
            f"got {a.dtype}, {b.dtype}, {out.dtype}"
        )
    if len({a.device, b.device, out.device, weight.device}) != 1:
        raise ValueError(f"blend tensors must share a device, got {a.device}, {b.device}, {out.device}, {weight.device}")
    layout = _dense_layout(a)
    if layout is None or _dense_layout(b) != layout or _dense_layout(out) != layout:
        raise ValueError(
            f"blend needs a, b and out in one dense layout (all contiguous or all channels_last); got strides "
            f"{a.stride()}, {b.stride()}, {out.stride()}. Call .contiguous() on the inputs first."
        )


def _dense_layout(t: torch.Tensor) -> torch.memory_format | None:
    """The dense layout `t` is in, contiguous first (a tensor in both, e.g. with H = W = 1, is in the same
    memory order either way), or None."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _op_layout(a: torch.Tensor) -> torch.memory_format:
    """The layout the ops blend in and return: `a`'s dense layout, contiguous where `a` has none. Real and
    fake implementations both allocate `out` in it, so inductor's strides for the result are the real ones."""
    return _dense_layout(a) or torch.contiguous_format


# Triton reads TRITON_INTERPRET when a kernel is decorated, that is when this module is imported: kernels
# decorated without it cannot run on CPU tensors even if the variable is set later (triton finds no driver).
_DECORATED_FOR_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_available(t: torch.Tensor) -> bool:
    """Whether the Triton kernel runs for tensors like `t` (CUDA, or CPU under TRITON_INTERPRET=1).

    On CPU both the import-time and the current value of TRITON_INTERPRET must say "1": set later, it
    cannot make the kernels interpretable; unset later (as two slow tests do), the torch reference runs.
    """
    if triton is None:
        return False
    if t.is_cuda:
        return True
    interpret = _DECORATED_FOR_INTERPRETER and os.environ.get("TRITON_INTERPRET") == "1"
    return t.device.type == "cpu" and interpret


def launch_blend(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, block: int = BLOCK,
    num_warps: int = 4,
) -> torch.Tensor:
    """One launch of `_blend_kernel` over every element of `out` (which may alias a or b).

    `block` and `num_warps` are for bench_blend's launch-configuration sweep; the ops use the defaults.
    """
    _check(weight, a, b, out)
    n = out.numel()
    if n:
        _blend_kernel[(triton.cdiv(n, block),)](weight, a, b, out, n, BLOCK=block, num_warps=num_warps)
    return out


def launch_arena_blend(
    weights: torch.Tensor, segments: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """One launch of `_arena_blend_kernel` over flat arenas; `segments[i]` is block i's tensor index."""
    _check(weights[:1], a, b, out)
    n = out.numel()
    if segments.numel() != triton.cdiv(n, BLOCK):
        raise ValueError(f"segments has {segments.numel()} entries for {triton.cdiv(n, BLOCK)} blocks of {BLOCK}")
    if n:
        _arena_blend_kernel[(segments.numel(),)](weights, segments, a, b, out, n, BLOCK=BLOCK)
    return out


def score_blend_reference(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """w * a + (1 - w) * b in fp32 (fp64 for fp64), cast back to a's dtype: the reference every test compares
    against."""
    math = torch.promote_types(a.dtype, torch.float32)
    w = weight.to(math)
    return (w * a.to(math) + (1.0 - w) * b.to(math)).to(a.dtype)


def arena_blend_reference(weights: torch.Tensor, segments: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The arena blend in torch: each block takes the weight of its tensor."""
    per_element = weights.to(torch.float32)[segments.long()].repeat_interleave(BLOCK)[: a.numel()]
    return score_blend_reference(per_element, a, b)


@torch.library.custom_op("frdiff::score_blend", mutates_args=())
def _score_blend_op(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    layout = _op_layout(a)
    if a.dtype not in OP_DTYPES or b.dtype != a.dtype:
        raise ValueError(f"score_blend supports one dtype of {[str(d) for d in OP_DTYPES]} for a and b; got "
                         f"{a.dtype} and {b.dtype}. Run the UNet in one of these dtypes.")
    if kernel_available(a) and a.dtype in SUPPORTED_DTYPES:
        a, b = a.contiguous(memory_format=layout), b.contiguous(memory_format=layout)
        return launch_blend(weight, a, b, torch.empty_like(a, memory_format=layout))
    return score_blend_reference(weight, a, b).contiguous(memory_format=layout)


@_score_blend_op.register_fake
def _(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(a, memory_format=_op_layout(a))


@torch.library.custom_op("frdiff::arena_blend_", mutates_args=("out",))
def _arena_blend_op(
    weights: torch.Tensor, segments: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor
) -> None:
    if kernel_available(out):
        launch_arena_blend(weights, segments, a, b, out)
    else:
        out.copy_(arena_blend_reference(weights, segments, a, b))


@_arena_blend_op.register_fake
def _(weights, segments, a, b, out) -> None:  # noqa: ANN001 - mirrors the op's schema
    return None


def _blend_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 - torch.library's signature
    weight, a, b = inputs
    ctx.save_for_backward(weight, a, b)


def _blend_backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202 - torch.library's signature
    """Gradients of w * a + (1 - w) * b, in fp32, the form autograd gives the same expression in torch ops.

    The Auto-FR search differentiates its soft memory update through this op: the gate is `w`, the fresh
    feature `a`, the memory `b`. Plain torch ops: the backward pass is not on any inference path.
    """
    weight, a, b = ctx.saved_tensors
    w, g = weight.to(torch.float32), grad.to(torch.float32)
    grad_w = grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_w = ((g * a.to(torch.float32)).sum() - (g * b.to(torch.float32)).sum()).reshape(weight.shape)
        grad_w = grad_w.to(weight.dtype)
    if ctx.needs_input_grad[1]:
        grad_a = (g * w).to(a.dtype)
    if ctx.needs_input_grad[2]:
        grad_b = (g * (1.0 - w)).to(b.dtype)
    return grad_w, grad_a, grad_b


_score_blend_op.register_autograd(_blend_backward, setup_context=_blend_setup_context)

if triton is not None:

    # On CUDA the kernel is registered with triton_op + wrap_triton so inductor sees (and can schedule) the
    # Triton kernel itself. On CPU, inductor does not recognise the interpreter, so CPU uses the opaque
    # custom op above.
    @torch.library.triton_op("frdiff::score_blend_triton", mutates_args={})
    def _score_blend_triton(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        layout = _op_layout(a)
        a, b = a.contiguous(memory_format=layout), b.contiguous(memory_format=layout)
        out = torch.empty_like(a, memory_format=layout)
        _check(weight, a, b, out)
        n = out.numel()
        torch.library.wrap_triton(_blend_kernel)[(triton.cdiv(n, BLOCK),)](weight, a, b, out, n, BLOCK=BLOCK)
        return out

    _score_blend_triton.register_autograd(_blend_backward, setup_context=_blend_setup_context)


def score_blend_op(device: torch.device, dtype: torch.dtype = torch.float32) -> torch._ops.OpOverload:
    """The blend op for tensors on `device` of `dtype`: the triton_op on CUDA for the kernel's dtypes (inductor
    sees its kernel), else the custom op (which blends fp64 by the reference).

    Graphs built for one device call this op itself rather than `score_blend`: AOTAutograd's cache takes
    graphs of torch ops only and bypasses one that calls a Python function.
    """
    if device.type == "cuda" and triton is not None and dtype in SUPPORTED_DTYPES:
        return torch.ops.frdiff.score_blend_triton.default
    return torch.ops.frdiff.score_blend.default


def score_blend(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A new tensor w * a + (1 - w) * b (Triton where it can run), through the op for a's device."""
    return score_blend_op(a.device, a.dtype)(weight, a, b)
