"""The pass pipeline: capture -> annotate -> propagate -> partition (per rank) -> displace -> sequence,
and for Inductor, pieces."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.fx as fx

from . import rules  # noqa: F401  (registers the sharding rules)
from .backends.compile_workers import InputSpec
from .batch_split import BatchLayout, batch_split, plan_batch_split
from .config import DistriConfig
from .errors import DistriCompileError
from .passes.annotate import split_rows
from .passes.capture import capture
from .passes.displace import displace
from .passes.partition import partition
from .passes.pieces import piece_count, split_pieces
from .passes.propagate import Propagation, propagate
from .passes.sequence import sequence_exchanges
from .sharding import RowSplit

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """A model's sharding at one input shape, for any rank."""

    aten_gm: fx.GraphModule
    propagation: Propagation
    split: RowSplit
    world: int

    def program(self, rank: int, group: str) -> fx.GraphModule:
        """The per-rank program (an FX graph of ATen ops and districompile exchange ops)."""
        return partition(self.aten_gm, self.propagation, rank, self.world, group)

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(f"districompile: {f} gathers its sharded inputs: {f.reason}" for f in self.propagation.fallbacks)


def plan(
    dynamo_gm: fx.GraphModule, inputs: list, spatial: list[int], world: int, exchanges: bool = True,
    single_rank_exchanges: bool = False,
) -> Plan:
    if not spatial:
        raise DistriCompileError(
            "districompile found no spatial input (a 4-d floating tensor that is not a parameter); "
            "name the ones to split with spatial_inputs=(...)"
        )
    aten_gm = capture(dynamo_gm, inputs)
    input_specs, split = split_rows(aten_gm, spatial, world)
    # One rank holds the whole image: every op runs as written, with nothing to exchange.
    propagation = propagate(aten_gm, input_specs, world, exchanges and (world > 1 or single_rank_exchanges))
    model_plan = Plan(aten_gm, propagation, split, world)
    for warning in model_plan.warnings:
        log.warning("%s", warning)
    return model_plan


@dataclass
class RankPrograms:
    """What one rank runs for a graph at one input shape, with what running it needs: the plan
    cache keeps it (``plan_cache``)."""

    programs: dict[str, fx.GraphModule]  # by phase: "synchronous", or "warm-up" and "steady"
    buffers: list[tuple[int, torch.dtype, torch.device]]  # the exchange buffers the phases take last
    layout: BatchLayout | None  # the batch split, if any
    group: str  # the process group the programs exchange over (a half's patch group under a batch split)
    bounds: tuple[int, ...]  # the rows of each rank
    warnings: tuple[str, ...]  # the fallbacks planning warned of (a cached plan warns of them again)


def rank_programs(dynamo_gm: fx.GraphModule, args: list, spatial: list[int], config: DistriConfig, group) -> RankPrograms:
    """Plan ``dynamo_gm`` for this rank of ``group``: a batch split, then the patch split of its half."""
    batch_plan = plan_batch_split(dynamo_gm, args, spatial, dist.get_world_size(group), config)
    graph = dynamo_gm
    if batch_plan is not None:  # the phases run this rank's half of the batch over its half of the ranks
        split = batch_split(batch_plan.layout, group)
        group, graph, args = split.patch_group, batch_plan.program(split.half), split.slice_inputs(args)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    model_plan = plan(graph, list(args), spatial, world, config.exchanges, config.single_rank_exchanges)
    program = model_plan.program(rank, group.group_name)
    if config.displaced:
        phases = displace(program, config.sync_mode, rank)
        programs, buffers = {"warm-up": phases.warmup, "steady": phases.steady}, phases.buffers
    else:
        programs, buffers = {"synchronous": program}, []
    for phase_program in programs.values():
        sequence_exchanges(phase_program)
    if config.lowering == "inductor":  # compiled by several processes at once (backends/compile_workers.py)
        inputs = [InputSpec.of(x) for x in args] + [InputSpec((numel,), (1,), dtype, str(device)) for numel, dtype, device in buffers]
        programs = {phase: split_pieces(p, inputs, piece_count(p, config.compile_pieces)) for phase, p in programs.items()}
    layout = batch_plan.layout if batch_plan is not None else None
    return RankPrograms(programs, buffers, layout, group.group_name, tuple(model_plan.split.bounds), model_plan.warnings)
