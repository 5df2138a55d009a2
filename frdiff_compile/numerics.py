"""The process-wide numerics flags a compiled or captured graph keeps: read them, and set them elsewhere.

A graph compiled by inductor picks its kernels under these flags (its cache keys include most of them), and
a CUDA graph replays the cuBLAS, cuDNN and attention kernels picked under them at capture; eager torch reads
them at every call. So `module_state.Fingerprint` includes `numerics_settings()`, and a generation after a
user changed one (TF32 off for precision, fp16 accumulation or cuDNN benchmarking on for speed,
`sdpa_kernel(SDPBackend.MATH)` around a call) runs graphs built under the new flags, as eager would; the
background compile worker sets the parent's (`apply_numerics_settings`).

Invariants:
- Reading costs host calls only (about 30 µs on one CPU core), never a device sync.
- What a torch version lacks is skipped when read and when set, so one job written by another torch
  still applies what both have.
- `apply_numerics_settings(numerics_settings())` changes nothing; only flags that differ are set, since
  setting one to its default can change how torch reports it (`allow_tf32 = False` turns the fp32 precision
  "none" into "ieee", which inductor's cache keys tell apart).
"""

from __future__ import annotations

import torch

# Where torch keeps each backend's fp32 precision (torch 2.9 on). The legacy TF32 flags are read from these,
# which hold more: `allow_tf32 = True` then `False` leaves "ieee" where it was "none".
_FP32_PRECISION_OWNERS = ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul",
                          "mkldnn.conv", "mkldnn.rnn")
# Scaled-dot-product attention's backend switches (getter, setter under torch.backends.cuda), which
# `torch.nn.attention.sdpa_kernel` sets too: inductor picks the attention kernel under them when it compiles
# (on CPU too: a graph compiled under the defaults gave the same output inside `sdpa_kernel(MATH)`, where
# the stock UNet's moved by 1.9e-5).
_SDPA_SWITCHES = (
    ("flash_sdp_enabled", "enable_flash_sdp"),
    ("mem_efficient_sdp_enabled", "enable_mem_efficient_sdp"),
    ("math_sdp_enabled", "enable_math_sdp"),
    ("cudnn_sdp_enabled", "enable_cudnn_sdp"),
    ("fp16_bf16_reduction_math_sdp_allowed", "allow_fp16_bf16_reduction_math_sdp"),
)


# cuBLAS flags under torch.backends.cuda.matmul that pick a matmul's precision (`fp32_precision` aside): a
# flag a torch version lacks reads as missing and is skipped. fp16 accumulation (torch 2.7 on) trades
# precision for speed as TF32 does; the split-K flags go with the reduced-precision reductions (2.9 on).
_CUBLAS_FLAGS = ("allow_tf32", "allow_fp16_reduced_precision_reduction",
                 "allow_fp16_reduced_precision_reduction_split_k", "allow_bf16_reduced_precision_reduction",
                 "allow_bf16_reduced_precision_reduction_split_k", "allow_fp16_accumulation")


def _blas_library() -> str | None:
    """The preferred BLAS library's name (cuBLAS or cuBLASLt; CK on ROCm), which a CUDA graph keeps."""
    preferred = getattr(torch.backends.cuda, "preferred_blas_library", None)
    return None if preferred is None else preferred().name


def fp32_precision_owner(path: str) -> object | None:
    """The object under `torch.backends` at `path` ("" for `torch.backends` itself) if it has `fp32_precision`."""
    owner: object = torch.backends
    for part in filter(None, path.split(".")):
        owner = getattr(owner, part, None)
    return owner if hasattr(owner, "fp32_precision") else None


def _sdpa_settings() -> tuple:
    cuda = torch.backends.cuda
    found: list = [(getter, getattr(cuda, getter)()) for getter, _ in _SDPA_SWITCHES if hasattr(cuda, getter)]
    priority = getattr(torch._C, "_get_sdp_priority_order", None)  # sdpa_kernel(..., set_priority=True)
    if priority is not None:
        found.append(("priority", tuple(priority())))
    return tuple(found)


def numerics_settings() -> dict:
    """Process-wide flags that pick kernels and their precision when a graph is compiled or captured, and that
    a user may set (dynamo's global-state guard recompiles on two of them: TF32 matmuls, determinism)."""
    return {
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul": tuple([(name, value) for name in _CUBLAS_FLAGS
                              if (value := getattr(torch.backends.cuda.matmul, name, None)) is not None]),
        "blas": _blas_library(),
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        # cuDNN off (for debugging), deterministic (for reproducible images) or benchmarking (for speed): a
        # captured convolution keeps the cuDNN algorithm picked at capture.
        "cudnn": (torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
        "fp32_precision": tuple([(path, owner.fp32_precision) for path in _FP32_PRECISION_OWNERS
                                 if (owner := fp32_precision_owner(path)) is not None]),
        "sdpa": _sdpa_settings(),
    }


def numerics_key() -> tuple:
    """`numerics_settings()` as (name, value) pairs: the form `module_state.Fingerprint.numerics` holds."""
    return tuple(numerics_settings().items())


def numerics_changes(before: tuple, after: tuple) -> str:
    """What differs between two `numerics_key()`s, as "name: old -> new" (for warnings and logs)."""
    changes = []
    old, new = dict(before), dict(after)
    for name in dict.fromkeys([*old, *new]):
        a, b = old.get(name), new.get(name)
        if a != b and _named_pairs(a) and _named_pairs(b):  # one level down: the flag, not the whole group
            sub_a, sub_b = dict(a), dict(b)
            changes += [f"{name}.{k}: {sub_a.get(k)} -> {sub_b.get(k)}" for k in dict.fromkeys([*sub_a, *sub_b])
                        if sub_a.get(k) != sub_b.get(k)]
        elif a != b:
            changes.append(f"{name}: {a} -> {b}")
    return "; ".join(changes) or "no difference"


def _named_pairs(value: object) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
                                            for v in value)


def apply_numerics_settings(settings: dict) -> None:
    """Set the flags `settings` (a `numerics_settings()`) holds where they differ from this process's."""
    current = numerics_settings()
    if settings["deterministic"] != current["deterministic"]:
        mode, warn_only = settings["deterministic"]
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    if settings["matmul_precision"] != torch.get_float32_matmul_precision():
        torch.set_float32_matmul_precision(settings["matmul_precision"])
    matmul = torch.backends.cuda.matmul
    wanted, now = dict(settings["cuda_matmul"]), dict(current["cuda_matmul"])
    for name in _CUBLAS_FLAGS:
        split_k = f"{name}_split_k"
        if name.endswith("_split_k") or name not in now or name not in wanted or (
                now[name] == wanted[name] and now.get(split_k) == wanted.get(split_k)):
            continue
        # A reduced-precision reduction is set together with its split-K flag, as a pair.
        setattr(matmul, name, (wanted[name], wanted[split_k]) if split_k in wanted and split_k in now else wanted[name])
    if settings["blas"] is not None and settings["blas"] != current["blas"]:
        torch.backends.cuda.preferred_blas_library(getattr(torch._C._BlasBackend, settings["blas"]))
    if torch.backends.cudnn.allow_tf32 != settings["cudnn_tf32"]:
        torch.backends.cudnn.allow_tf32 = settings["cudnn_tf32"]
    if settings["cudnn"] != current["cudnn"]:
        (torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic,
         torch.backends.cudnn.benchmark) = settings["cudnn"]
    for path, value in settings["fp32_precision"]:  # after the TF32 flags, which set these less finely
        owner = fp32_precision_owner(path)
        if owner is not None and owner.fp32_precision != value:
            owner.fp32_precision = value
    setters = dict(_SDPA_SWITCHES)
    now = dict(current["sdpa"])
    for name, value in settings["sdpa"]:
        if name in now and now[name] != value:
            if name == "priority":
                torch._C._set_sdp_priority_order(list(value))
            else:
                getattr(torch.backends.cuda, setters[name])(value)
