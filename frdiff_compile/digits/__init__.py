"""The model the project ships: a small class-conditional diffusers UNet trained on scikit-learn's digits.

It exists so that quality can be measured offline, on a real trained model: `load_digits_model()` gives
the UNet and its label embedding, `DigitsPipeline` samples digits with any UNet (the optimized one
included), and `frdiff_compile.quality` judges them.
"""

from .model import MODEL_DIR, NULL_LABEL, LabelEmbedding, digits_unet_config, load_digits_model
from .pipeline import DigitsPipeline

__all__ = ["MODEL_DIR", "NULL_LABEL", "DigitsPipeline", "LabelEmbedding", "digits_unet_config", "load_digits_model"]
