"""districompile: ``torch.compile(unet, backend="distri")`` runs a diffusion UNet patch-parallel."""

from .config import DistriConfig
from .errors import DistriCompileError, ShapeError
from .explain import ExplainReport, explain
from .pipelines import parallelize
from .runtime import finish_compiles, reset, runtimes, settle

__all__ = ["DistriCompileError", "DistriConfig", "ExplainReport", "ShapeError", "explain", "finish_compiles", "parallelize", "reset", "runtimes", "settle"]
__version__ = "0.1.0"
