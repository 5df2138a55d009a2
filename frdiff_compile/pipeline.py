"""`unwrapped(pipe)`: the stock UNet in the pipeline for diffusers calls that skip or refuse the wrapper.

diffusers' pipeline-level calls act on a component only if its class is one of diffusers' own: LoRA management
(`set_adapters`, `disable_lora`, `fuse_lora`, `unload_lora_weights`, ...) skips any other module without a word,
and `save_pretrained` refuses it and records the component as missing. Inside `with unwrapped(pipe):` every
component `optimize` wrapped is the UNet it wraps, registered as diffusers registers a component; on exit the
wrapper is registered again.

Invariants:
- The swap is of registrations only: the UNet is the wrapper's own module, so whatever the calls inside change
  (adapters, fused weights, FreeU) is what the wrapper runs afterwards; the runtime's check at its next
  generation sees module-state changes and builds graphs for them, and in-place weight updates are read
  live (see README, "Module state").
- Registering, not assigning: after a failed `save_pretrained` a pipeline's config records the component as
  `(None, None)`, which a plain assignment keeps and `register_modules` rewrites (tested).
- Generations inside the block run the stock UNet (no feature reuse), as the pipeline then holds it.
- A component the block's code replaced is left as it was replaced, with a warning, never overwritten.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from .unet import FRDiffUNet
from .warn import warn

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def unwrapped(pipe: Any) -> Iterator[Any]:
    """Within the block, `pipe`'s optimized UNets are the stock ones; yields `pipe`.

        with frdiff_compile.unwrapped(pipe):
            pipe.set_adapters(["a", "b"], [0.5, 0.8])
            pipe.save_pretrained(path)
    """
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict) or not hasattr(pipe, "register_modules"):
        raise TypeError(
            f"unwrapped() takes a diffusers pipeline (a DiffusionPipeline), found {type(pipe).__qualname__}; "
            "for a UNet alone, its `.unet` is the stock module"
        )
    wrapped = {name: module for name, module in components.items() if isinstance(module, FRDiffUNet)}
    if not wrapped:
        found = ", ".join(f"{n}: {type(m).__name__}" for n, m in components.items() if m is not None)
        raise ValueError(
            f"unwrapped() found no UNet optimized by frdiff_compile among the pipeline's components ({found}); "
            "it is for a pipeline after `pipe.unet = frdiff_compile.optimize(pipe.unet)`"
        )
    pipe.register_modules(**{name: fr.unet for name, fr in wrapped.items()})
    try:
        yield pipe
    finally:
        for name, fr in wrapped.items():
            current = getattr(pipe, name, None)
            if current is fr.unet:
                pipe.register_modules(**{name: fr})
            else:
                warn(logger, f"pipe.{name} was replaced inside `unwrapped(pipe)` ({type(current).__name__}); "
                             "it is left as it is, not put back to the optimized UNet")
