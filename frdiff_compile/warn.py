"""The runtime's warnings: raised at the line that called the UNet, recorded in the log once; and the texts
of those the runtime gives when it runs the eager UNet or serves calls without reuse.

Invariants:
- A warning names the caller's line (a pipeline's `self.unet(...)`, a user's loop), never a frame of this
  package or of torch: a step's warning is raised several frames deep (the runtime, then torch's
  `torch.compiler.disable` wrapper and `Module.__call__`), so a fixed `stacklevel` would point inside
  torch, and Python's once-per-location filter would lump every call site together.
- The same text goes to the package's logger at INFO, not WARNING: with logging left unconfigured,
  Python's last-resort handler prints WARNING records to stderr, which would show every message twice.
  Programs that route warnings into logging have `logging.captureWarnings(True)`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch

# Frames in these directories are the runtime's or torch's own; the first frame outside them is the caller.
_INTERNAL = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (__file__, torch.__file__))


def _caller_stacklevel() -> int:
    """The `stacklevel` at which a `warnings.warn` in `warn` names the first frame outside the package."""
    frame, level = sys._getframe(2), 2  # warn's caller: stacklevel 2 of a warn in `warn`
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def warn(logger: logging.Logger, message: str) -> None:
    """Warn the user (`UserWarning`, "frdiff_compile: " + message) at the caller's line; log it at INFO."""
    warnings.warn(f"frdiff_compile: {message}", stacklevel=_caller_stacklevel())
    logger.info(message)


# --- what the runtime (unet.py) says when it runs the eager UNet or serves a call without reuse -------------
INTERLEAVED = (
    "generations are interleaved on this UNet (requests stepped in turn through it, e.g. a server's threads "
    "sharing one pipeline's UNet): each step of one follows another's and starts with a keyframe, so these "
    "steps run the full UNet, correctly but without feature reuse; give each worker its own runtime, "
    "`copy.copy(pipe.unet)`, made once"
)
OPAQUE = (
    "frdiff_compile's runtime is not traceable: it picks the step's graph on the host and runs graphs it has "
    "compiled itself (FRDiffConfig(compile=..., compile_mode=...)). torch.compile(pipe.unet) after optimize() "
    "runs it as it is, which fullgraph=True does not allow: drop fullgraph=True, or the torch.compile call, "
    "which adds nothing here"
)
# Graphs built now would trace the new state under the old settings, which a later generation would be served.
CHANGED_MID_GENERATION = (
    "the UNet's module state changed during this generation (FreeU, a LoRA scale or an attention processor set "
    "from a step callback, ...) and these inputs need new graphs; the next generation builds them"
)
# A graph compiles or is captured at its first run, the reuse graph a step or more after the keyframe's: it
# keeps the kernels the flags of that moment pick, and later generations under the old flags would run them.
FLAGS_CHANGED_MID_GENERATION = (
    "numerics flags (TF32, determinism, cuDNN, attention backends) changed during this generation before one of "
    "its graphs was compiled or captured at its first run; the next generation builds graphs under its own flags"
)
UNTRACKED = (
    "the step index cannot be told from this timestep (not a view into a schedule of two or more timesteps, "
    "such as scheduler.timesteps); a loop over plain timesteps calls unet.reset(num_inference_steps=N) first, "
    "and a one-step generation has nothing to reuse"
)
