"""Lower: run the per-rank program eagerly or through Inductor (Triton on GPU, C++ on CPU),
and on CUDA replay each phase as a CUDA graph (``cudagraphs.PhaseGraph``).

What Inductor compiles is a *unit*: a phase's program, or each piece of a program cut into
pieces (``passes/pieces.py``), which then runs its compiled pieces in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from ..config import DistriConfig
from ..passes.pieces import piece_inputs, pieces
from .compile_workers import InputSpec
from .cudagraphs import PhaseGraph, capturable


def on_cuda(inputs: list) -> bool:
    return any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)


def use_cuda_graphs(program: fx.GraphModule, inputs: list, config: DistriConfig) -> bool:
    if not on_cuda(inputs) or config.cuda_graphs is False:
        return False
    names = [n.name for n in program.graph.nodes if n.op == "placeholder"]
    return capturable(inputs, names)


@dataclass(frozen=True)
class CompileUnit:
    """A program Inductor compiles on its own: a phase's, or a piece of one."""

    name: str  # "the warm-up phase", or "piece_1 of the warm-up phase"
    program: fx.GraphModule
    piece: str | None  # the piece's attribute in its phase's program; None for a whole phase

    def inputs(self, phase_inputs: list) -> list:
        """Example inputs to compile it with, given its phase's."""
        return list(phase_inputs) if self.piece is None else piece_inputs(self.program, phase_inputs)

    def specs(self, phase_inputs: list) -> list[InputSpec]:
        """What a compile worker needs of its example inputs, without allocating any."""
        if self.piece is None:
            return [InputSpec.of(x) for x in phase_inputs]
        return [InputSpec.of(phase_inputs[s]) if isinstance(s, int) else s for s in self.program.input_sources]


def compile_units(phase: str, program: fx.GraphModule) -> list[CompileUnit]:
    split = pieces(program)
    if not split:
        return [CompileUnit(f"the {phase} phase", program, None)]
    return [CompileUnit(f"{name} of the {phase} phase", piece, name) for name, piece in split]


def inductor(program: fx.GraphModule, inputs: list) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    # Under a tracing context of our own, as Dynamo would give: Inductor keys its FX graph cache
    # with the context's shape env (none: the cache is bypassed), and AOTAutograd's. The shapes
    # stay static (ignore_shape_env): given a shape env, AOTAutograd would make every input size
    # a symbol. CUDA graphs are ours (one per phase, collectives inside), not Inductor's.
    context = torch._guards.TracingContext(FakeTensorMode(shape_env=ShapeEnv()))
    with torch._guards.tracing(context):
        return compile_fx(program, list(inputs), config_patches={"triton.cudagraphs": False}, ignore_shape_env=True)


class CompiledPiece(torch.nn.Module):
    """A piece's compiled callable, where its program calls the piece."""

    def __init__(self, compiled: Callable):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args):
        return self.compiled(*args)


def compile_program(
    program: fx.GraphModule, inputs: list, config: DistriConfig, phase: str = "program",
    compile_unit: Callable[[CompileUnit, list], Callable] | None = None,
) -> Callable:
    """The program compiled: whole, or piece by piece. ``compile_unit(unit, example_inputs)``
    compiles each unit (default: Inductor, here)."""
    if config.lowering == "eager":
        return program
    compile_unit = compile_unit or (lambda unit, unit_inputs: inductor(unit.program, unit_inputs))
    units = compile_units(phase, program)
    if units[0].piece is None:
        return compile_unit(units[0], inputs)
    runner = fx.GraphModule(program, program.graph)
    for unit in units:
        setattr(runner, unit.piece, CompiledPiece(compile_unit(unit, unit.inputs(inputs))))
    return runner


def lower(
    program: fx.GraphModule, inputs: list, config: DistriConfig, name: str = "program", pool=None, persistent: int = 0,
    compile_unit: Callable[[CompileUnit, list], Callable] | None = None,
) -> Callable:
    """The program as a callable; on CUDA, a ``PhaseGraph`` replaying it (``pool``: its memory pool).

    The last ``persistent`` inputs are the runtime's exchange buffers: like parameters, a graph
    reads and writes them where they are. ``compile_unit``: as ``compile_program``'s."""
    compiled = compile_program(program, inputs, config, name, compile_unit)
    if not use_cuda_graphs(program, inputs, config):
        return compiled
    static = {i for i, x in enumerate(inputs) if isinstance(x, torch.nn.Parameter)}
    static |= set(range(len(inputs) - persistent, len(inputs)))
    return PhaseGraph(compiled, static, pool if pool is not None else torch.cuda.graph_pool_handle(), name)
