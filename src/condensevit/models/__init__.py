"""Model families. Importing this package registers every variant with timm."""
from ._builder import CheckpointError, read_checkpoint

# one module per family; each registers its variants with timm on import
FAMILY_MODULES = ("stvit", "stvit_r", "stvit_swin", "lookupvit", "video", "video_swin")

from . import stvit  # noqa: E402,F401
from . import stvit_r  # noqa: E402,F401
from . import stvit_swin  # noqa: E402,F401
from . import lookupvit  # noqa: E402,F401
from . import video  # noqa: E402,F401
from . import video_swin  # noqa: E402,F401

__all__ = ["CheckpointError", "read_checkpoint", "FAMILY_MODULES", "list_models"]


def list_models(pattern: str = "*") -> list[str]:
    """Names of the models this library registers with timm (fnmatch pattern)."""
    import timm
    return timm.list_models(pattern, module=list(FAMILY_MODULES))
