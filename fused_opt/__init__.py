"""fused_opt: fused multi-tensor SGD and Adam/AdamW, drop-in replacements for torch.optim."""

from . import _ops  # noqa: F401  (defines the ops and loads the compiled kernels)
from ._backends import available_backends
from .optim import SGD, Adam, AdamW

# With a local label such as +torch2.13cpu when built with kernels.
__version__: str = _ops.BUILD_INFO.get("version", "0.1.0")

__all__ = ["SGD", "Adam", "AdamW", "__version__", "available_backends"]
