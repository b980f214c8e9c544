"""The pass pipeline: capture -> annotate -> propagate -> partition (per rank)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.fx as fx

from . import rules  # noqa: F401  (registers the sharding rules)
from .errors import DistriCompileError
from .passes.annotate import split_rows
from .passes.capture import capture
from .passes.partition import partition
from .passes.propagate import Propagation, propagate
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
    for fallback in propagation.fallbacks:
        log.warning("districompile: %s gathers its sharded inputs: %s", fallback, fallback.reason)
    return Plan(aten_gm, propagation, split, world)
