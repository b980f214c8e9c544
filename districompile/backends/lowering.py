"""Lower: run the per-rank program eagerly, or hand it to Inductor (Triton on GPU, C++ on CPU)."""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from ..config import DistriConfig


def lower(program: fx.GraphModule, inputs: list, config: DistriConfig) -> Callable:
    if config.lowering == "eager":
        return program
    from torch._inductor.compile_fx import compile_fx

    compiled = compile_fx(program, list(inputs))
    return compiled
