"""The ``distri`` torch.compile backend (registered through the ``torch_dynamo_backends`` entry point)."""

from __future__ import annotations

import torch.fx as fx

from ..config import DistriConfig
from ..runtime import DistriRuntime, InputLayout


def distri_backend(gm: fx.GraphModule, example_inputs: list, options=None, **kwargs) -> DistriRuntime:
    """Compile lazily: the per-rank program is built on the first call with concrete shapes."""
    config = DistriConfig.from_options(options, **kwargs)
    return DistriRuntime(gm, InputLayout.read(gm, list(example_inputs), config), config)
