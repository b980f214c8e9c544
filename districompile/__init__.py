"""districompile: ``torch.compile(unet, backend="distri")`` runs a diffusion UNet patch-parallel."""

from .config import DistriConfig
from .errors import DistriCompileError, ShapeError
from .explain import ExplainReport, explain
from .runtime import reset

__all__ = ["DistriCompileError", "DistriConfig", "ExplainReport", "ShapeError", "explain", "reset"]
__version__ = "0.1.0"
