"""The runtime's warnings: raised at the line that called the UNet, recorded in the log once.

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
