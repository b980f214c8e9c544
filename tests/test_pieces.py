"""The pieces pass (``passes/pieces.py``) on rewritten graphs: no process group, the per-rank
programs that ``explain`` plans, displaced and sequenced as the runtime's are, then cut.

A split program must be the same program: the same nodes in the same order (so the exchanges
keep the order every rank issues them in), only tensors between pieces, and each piece able to
build its example inputs. Outputs under Inductor, with the pieces compiled by worker processes,
are checked by ``test_invariants.py`` (mode ``compile_pieces``) and ``test_compile_cache.py``.
"""

import operator

import pytest
import torch
import torch.fx as fx
from checks import exchanges
from models import micro_sdxl_unet, micro_unet

import districompile
from districompile.backends.compile_workers import InputSpec, portable
from districompile.backends.lowering import compile_units
from districompile.displaced import allocate_buffers
from districompile.passes.displace import displace
from districompile.passes.pieces import NODES_PER_PIECE, _propagate, piece_count, pieces, split_pieces
from districompile.passes.sequence import sequence_exchanges

WORLD = 3  # rank 1 has two neighbours


def phase_programs(factory, rank: int) -> tuple[dict[str, fx.GraphModule], list]:
    """A rank's warm-up and steady programs of the default mode, and their inputs' specs."""
    model, args, kwargs = factory(batch=2)
    report = districompile.explain(model, *args, world_size=WORLD, verbose=False, **kwargs)
    program = report.plan.program(rank, "g")
    phases = displace(program, "corrected_async_gn", rank)
    programs = {"warm-up": phases.warmup, "steady": phases.steady}
    for phase_program in programs.values():
        sequence_exchanges(phase_program)
    inputs = [n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"]
    return programs, [InputSpec.of(x) for x in inputs] + [InputSpec.of(b) for b in allocate_buffers(phases.buffers)]


def body(program: fx.GraphModule) -> list[fx.Node]:
    return [n for n in program.graph.nodes if n.op not in ("placeholder", "output")]


@pytest.mark.parametrize("factory", [micro_unet, micro_sdxl_unet], ids=["micro", "micro_sdxl"])
@pytest.mark.parametrize("rank", range(WORLD))
def test_pieces_are_the_program_in_order(factory, rank):
    programs, specs = phase_programs(factory, rank)
    for phase, program in programs.items():
        split = split_pieces(program, specs, 3)
        parts = pieces(split)
        assert [name for name, _ in parts] == ["piece_0", "piece_1", "piece_2"], phase
        # Every node, in order: the exchanges (halos, statistics, K/V; the steady join last) too.
        names = [n.name for _, piece in parts for n in body(piece)]
        assert names == [n.name for n in body(program)], phase
        assert [row for _, piece in parts for row in exchanges(piece)] == exchanges(program), phase
        assert exchanges(program), phase
        # Near equal shares of the nodes.
        sizes = [len(body(piece)) for _, piece in parts]
        assert max(sizes) < 2 * min(sizes), (phase, sizes)
        # A piece's inputs: the program's own by position, or an earlier piece's tensors by their metadata.
        placeholders = [n.name for n in program.graph.nodes if n.op == "placeholder"]
        for name, piece in parts:
            inputs = [n.name for n in piece.graph.find_nodes(op="placeholder")]
            assert len(piece.input_sources) == len(inputs), name
            for source, input_name in zip(piece.input_sources, inputs):
                if isinstance(source, int):
                    assert placeholders[source] == input_name, name
                else:
                    assert source.shape is not None and input_name not in placeholders, (name, input_name, source)
        assert [unit.name for unit in compile_units(phase, split)] == [f"{name} of the {phase} phase" for name, _ in parts]
        # What a worker and the plan cache receive (a pickled, code-only copy) knows its inputs too.
        copied = pieces(portable(split))
        assert [piece.input_sources for _, piece in copied] == [piece.input_sources for _, piece in parts]


@pytest.mark.parametrize("mode", ["corrected_async_gn", "stale_gn", "separate_gn", "no_sync"])
def test_displaced_programs_carry_every_value(mode):
    """``displace`` gives each node it adds its value, so ``split_pieces`` reads the values instead of
    propagating the program again: each equals (shape, strides, dtype) a fresh propagation's."""
    model, args, kwargs = micro_sdxl_unet(batch=2)
    report = districompile.explain(model, *args, world_size=WORLD, verbose=False, **kwargs)
    for rank in range(WORLD):
        phases = displace(report.plan.program(rank, "g"), mode, rank)
        for program in (phases.warmup, phases.steady):
            sequence_exchanges(program)
            kept = {n.name: n.meta["val"] for n in program.graph.nodes if n.op != "output"}
            inputs = [InputSpec.of(n.meta["val"]) for n in program.graph.nodes if n.op == "placeholder"]
            fresh = _propagate(program, inputs)
            assert {k: layout(v) for k, v in kept.items()} == {k: layout(fresh[k]) for k in kept}, (mode, rank)


def layout(value):
    """Shape, strides and dtype of a tensor, or of each in a sequence (a multi-output op's value)."""
    if isinstance(value, (list, tuple)):
        return tuple(layout(v) for v in value)
    return (tuple(value.shape), value.stride(), value.dtype) if isinstance(value, torch.Tensor) else value


def test_a_multi_output_op_stays_with_its_reads():
    """``var_mean`` returns a tuple, read by ``getitem``s a few nodes later: the cut, ideally between
    them, goes before or after; a tuple read at the end leaves nowhere to cut."""

    def f(x, read_stats_at_end):
        h = x
        for _ in range(20):
            h = torch.ops.aten.sin.default(h)
        stats = torch.ops.aten.var_mean.correction(h, [1], correction=0, keepdim=True)
        for _ in range(3):
            h = torch.ops.aten.cos.default(h)
        if not read_stats_at_end:
            h = torch.ops.aten.mul.Tensor(torch.ops.aten.add.Tensor(h, operator.getitem(stats, 0)), operator.getitem(stats, 1))
        for _ in range(20):
            h = torch.ops.aten.cos.default(h)
        if read_stats_at_end:
            h = torch.ops.aten.mul.Tensor(torch.ops.aten.add.Tensor(h, operator.getitem(stats, 0)), operator.getitem(stats, 1))
        return (h,)

    x = torch.randn(2, 5)
    program = fx.symbolic_trace(lambda x: f(x, False))
    split = split_pieces(program, [InputSpec.of(x)], 2)
    parts = pieces(split)
    assert len(parts) == 2
    (holder,) = [piece for _, piece in parts if any("var_mean" in str(n.target) for n in piece.graph.nodes)]
    assert sum(n.target is operator.getitem for n in holder.graph.nodes) == 2
    torch.testing.assert_close(split(x), program(x))
    everywhere = fx.symbolic_trace(lambda x: f(x, True))
    assert split_pieces(everywhere, [InputSpec.of(x)], 2) is everywhere


def test_small_programs_stay_whole():
    programs, specs = phase_programs(micro_unet, 0)
    program = programs["steady"]
    assert piece_count(program, None) == 1 and len(program.graph.nodes) < NODES_PER_PIECE
    assert split_pieces(program, specs, 1) is program
    assert piece_count(program, 4) == 4


def test_compile_pieces_is_checked():
    with pytest.raises(ValueError, match="compile_pieces must be an int >= 1"):
        districompile.DistriConfig(compile_pieces=0)
