"""Lower: run the per-rank program eagerly, or hand it to Inductor (Triton on GPU, C++ on CPU)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from ..config import DistriConfig


def _has_host_state(program: fx.GraphModule) -> bool:
    """Displaced exchanges keep Python-side state per call, which a CUDA graph replay would skip."""
    return any("_displaced" in str(node.target) for node in program.graph.nodes)


def use_cuda_graphs(program: fx.GraphModule, inputs: list, config: DistriConfig) -> bool:
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    wanted = on_cuda if config.cuda_graphs is None else config.cuda_graphs
    return wanted and on_cuda and not _has_host_state(program)


def lower(program: fx.GraphModule, inputs: list, config: DistriConfig) -> Callable:
    if config.lowering == "eager":
        return program
    from torch._inductor.compile_fx import compile_fx

    patches = {"triton.cudagraphs": use_cuda_graphs(program, inputs, config)}
    return compile_fx(program, list(inputs), config_patches=patches)
