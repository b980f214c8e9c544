"""Lower: run the per-rank program eagerly or through Inductor (Triton on GPU, C++ on CPU),
and on CUDA replay each phase as a CUDA graph (``cudagraphs.PhaseGraph``)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from ..config import DistriConfig
from .cudagraphs import PhaseGraph, capturable


def on_cuda(inputs: list) -> bool:
    return any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)


def use_cuda_graphs(program: fx.GraphModule, inputs: list, config: DistriConfig) -> bool:
    if not on_cuda(inputs) or config.cuda_graphs is False:
        return False
    names = [n.name for n in program.graph.nodes if n.op == "placeholder"]
    return capturable(inputs, names)


def compile_program(program: fx.GraphModule, inputs: list, config: DistriConfig) -> Callable:
    if config.lowering == "eager":
        return program
    from torch._inductor.compile_fx import compile_fx

    # Under a tracing context of our own, as Dynamo would give: Inductor keys its FX graph cache
    # with the context's shape env (none: the cache is bypassed), and AOTAutograd's. The shapes
    # stay static (ignore_shape_env): given a shape env, AOTAutograd would make every input size
    # a symbol. CUDA graphs are ours (one per phase, collectives inside), not Inductor's.
    context = torch._guards.TracingContext(FakeTensorMode(shape_env=ShapeEnv()))
    with torch._guards.tracing(context):
        return compile_fx(program, list(inputs), config_patches={"triton.cudagraphs": False}, ignore_shape_env=True)


def lower(
    program: fx.GraphModule, inputs: list, config: DistriConfig, name: str = "program", pool=None, persistent: int = 0
) -> Callable:
    """The program as a callable; on CUDA, a ``PhaseGraph`` replaying it (``pool``: its memory pool).

    The last ``persistent`` inputs are the runtime's exchange buffers: like parameters, a graph
    reads and writes them where they are."""
    compiled = compile_program(program, inputs, config)
    if not use_cuda_graphs(program, inputs, config):
        return compiled
    static = {i for i, x in enumerate(inputs) if isinstance(x, torch.nn.Parameter)}
    static |= set(range(len(inputs) - persistent, len(inputs)))
    return PhaseGraph(compiled, static, pool if pool is not None else torch.cuda.graph_pool_handle(), name)
