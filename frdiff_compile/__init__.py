"""frdiff_compile: FRDiff feature reuse for diffusers UNets, as two specialized compiled graphs.

    pipe.unet = frdiff_compile.optimize(pipe.unet)                      # M=2, score mixing, b=0.5
    pipe.unet = frdiff_compile.optimize(pipe.unet, FRDiffConfig(keyframe_interval=3))

Importing the package runs nothing: no device query, no global configuration.
"""

from .api import UnsupportedModelError, optimize
from .config import FRDiffConfig
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
]

__version__ = "0.1.0"
