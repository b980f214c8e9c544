"""Errors raised at compile time: each names the graph node and what to change."""


class DistriCompileError(RuntimeError):
    """The model cannot be partitioned as asked."""


class ShapeError(DistriCompileError):
    """The image height does not split into the row blocks this network needs."""
