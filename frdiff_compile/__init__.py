"""frdiff_compile: FRDiff feature reuse for diffusers UNets, as two specialized compiled graphs.

    pipe.unet = frdiff_compile.optimize(pipe.unet)                      # M=2, score mixing, b=0.5
    pipe.unet = frdiff_compile.optimize(pipe.unet, FRDiffConfig(keyframe_interval=3))
    with frdiff_compile.unwrapped(pipe):                                  # diffusers calls that want the stock UNet
        pipe.set_adapters(["a", "b"], [0.5, 0.8])

Importing the package runs nothing: no device query, no global configuration.
"""

from .api import UnsupportedModelError, optimize
from .config import FRDiffConfig
from .pipeline import unwrapped
from .schedule import Schedule, StepKind, build_schedule, mix_weight
from .unet import FRDiffUNet, RuntimeStats

__all__ = [
    "FRDiffConfig",
    "FRDiffUNet",
    "RuntimeStats",
    "Schedule",
    "StepKind",
    "UnsupportedModelError",
    "build_schedule",
    "mix_weight",
    "optimize",
    "unwrapped",
]

__version__ = "0.1.0"
