"""condensevit: Vision Transformers that condense many image tokens into a few.

``import condensevit`` registers every model of the library with timm, so
``timm.create_model('stvit_deit_small_patch16_224')`` works.
"""
from . import models  # noqa: F401  (registers the models with timm)
from .models import CheckpointError, list_models, read_checkpoint

__version__ = "0.1.0"
__all__ = ["models", "list_models", "read_checkpoint", "CheckpointError", "__version__"]
