"""The public verb: `optimize(unet, config) -> FRDiffUNet`, and the one error it raises.

Invariants:
- Preconditions are checked here, at the API boundary, and only here: anything but a diffusers
  `UNet2DConditionModel`, an already optimized UNet, a `torch.compile`d module, or a UNet with forward
  hooks on its modules (offload enabled before `optimize`, torch hooks) raises `UnsupportedModelError` saying
  what was found, what is supported, and what to do. (Hooks attached later are the runtime's to refuse.)
- `optimize` captures nothing itself: graphs are built lazily per input signature on first use, so it is
  cheap, and nothing runs at import time.
"""

from __future__ import annotations

import logging

import torch

from .config import FRDiffConfig
from .module_state import describe_hooks, module_fingerprint
from .policy import check_policy_fingerprint
from .unet import FRDiffUNet

logger = logging.getLogger(__name__)


class UnsupportedModelError(TypeError):
    """`optimize()` was given a model it cannot accelerate; the message says what to do instead."""


def _check_model(unet: object) -> None:
    from diffusers import UNet2DConditionModel

    if isinstance(unet, FRDiffUNet):
        raise UnsupportedModelError(
            "optimize() was given an FRDiffUNet: frdiff_compile has already been applied to this UNet. "
            "To change the keyframe schedule, call `.reconfigure(FRDiffConfig(...))` on it (keeps its compiled "
            "graphs); to start over, pass the original UNet2DConditionModel (its `.unet`)."
        )
    if isinstance(unet, torch._dynamo.eval_frame.OptimizedModule):
        raise UnsupportedModelError(
            f"optimize() was given a torch.compile'd module wrapping {type(unet._orig_mod).__name__}; "
            "frdiff_compile must be called before torch.compile. Pass the uncompiled UNet2DConditionModel and "
            "set FRDiffConfig(compile=True) to compile the keyframe and reuse graphs."
        )
    if not isinstance(unet, UNet2DConditionModel):
        raise UnsupportedModelError(
            f"optimize() supports diffusers UNet2DConditionModel (SD 1.x, SD 2.x, SDXL), found "
            f"{type(unet).__module__}.{type(unet).__qualname__}. Pass `pipe.unet` of a Stable Diffusion "
            "class pipeline."
        )
    hooks = module_fingerprint(unet).hooks
    if hooks:
        raise UnsupportedModelError(
            f"optimize() was given a UNet whose modules carry forward hooks ({describe_hooks(hooks)}); "
            "its compiled graphs cannot run them. For model CPU offload, optimize first and enable offload "
            "after: `pipe.remove_all_hooks()`, `pipe.unet = frdiff_compile.optimize(pipe.unet)`, "
            "`pipe.enable_model_cpu_offload()`. Sequential CPU offload, group offloading, a device_map, "
            "layerwise casting and diffusers' caching hooks are not supported: load the UNet without them. "
            "Remove torch hooks (`handle.remove()` on what register_forward_hook returned) before optimize."
        )


def optimize(unet: torch.nn.Module, config: FRDiffConfig | None = None) -> FRDiffUNet:
    """Wrap `unet` so every generation runs FRDiff's keyframe and reuse graphs.

    Use it as `pipe.unet = frdiff_compile.optimize(pipe.unet)`; generating needs no other change. diffusers'
    pipeline-level LoRA management (`pipe.set_adapters`, `pipe.disable_lora`, ...) skips a UNet that is not one
    of its own classes without a word, and `pipe.save_pretrained` refuses it: make those calls inside
    `with frdiff_compile.unwrapped(pipe):`. `from_pretrained(..., unet=...)` refuses it too: load, then optimize.
    """
    if config is None:
        config = FRDiffConfig()
    if not isinstance(config, FRDiffConfig):
        raise ValueError(f"config must be an FRDiffConfig, got {type(config).__name__}")
    _check_model(unet)
    check_policy_fingerprint(unet, config.policy_fingerprint)
    wrapped = FRDiffUNet(unet, config)
    logger.info("frdiff_compile.optimize: %s", config)
    return wrapped
