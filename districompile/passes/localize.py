"""Localize: replace every exchange of a per-rank program by a local stand-in of the same shape.

For projections only: the result runs one rank's compute (halo assembly, padding to whole K/V,
statistics merge included) on one device with no communication, so its time is the per-rank
compute time of a world of N ranks. Foreign rows are zeros, so its output is not the model's.

The stand-ins are custom ops, opaque to Inductor as the exchanges are: Inductor fuses around
them exactly what it can fuse around the real program's exchanges, and no more. A halo's
stand-in returns zero rows where the exchange returns the rows received; the packing of the rows
sent and the assembly (this rank's rows, the received ones, the edge padding) are ATen ops of the
program, the same in both.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from ..collectives import ROW_DIM, halo_plan, received_numel, row_counts

districompile = torch.ops.districompile


@torch.library.custom_op("districompile::local_fetch_rows", mutates_args=())
def local_fetch_rows(
    outgoing: torch.Tensor, shape: list[int], bounds: list[int], need_lo: list[int], need_hi: list[int], rank: int,
    pad_mode: int, group: str, after: list[torch.Tensor],
) -> torch.Tensor:
    plan = halo_plan(tuple(bounds), tuple(need_lo), tuple(need_hi), rank, pad_mode)
    return outgoing.new_zeros(received_numel(shape, plan))


# Kept, like the exchange, where nothing reads what it returns.
torch.fx.node.has_side_effect(torch.ops.districompile.local_fetch_rows.default)


@torch.library.custom_op("districompile::local_gather_rows", mutates_args=())
def local_gather_rows(x: torch.Tensor, bounds: list[int], rank: int, group: str, after: list[torch.Tensor]) -> torch.Tensor:
    counts = row_counts(bounds)
    blocks = [x if r == rank else x.new_zeros(x.shape[0], x.shape[1], c, x.shape[3]) for r, c in enumerate(counts)]
    return torch.cat(blocks, ROW_DIM)


@torch.library.custom_op("districompile::local_all_gather_stack", mutates_args=())
def local_all_gather_stack(x: torch.Tensor, world: int, group: str, after: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([x] * world)


@torch.library.custom_op("districompile::local_all_reduce", mutates_args=())
def local_all_reduce(x: torch.Tensor, op: str, group: str, after: list[torch.Tensor]) -> torch.Tensor:
    return x.clone()


EXCHANGES = ("fetch_rows", "gather_rows", "all_gather_stack", "all_reduce")
STAND_INS = {getattr(districompile, op).default: getattr(districompile, f"local_{op}").default for op in EXCHANGES}

# A stand-in's output has its exchange's shape: under fake tensors, call the exchange's own fake.
for _exchange, _stand_in in STAND_INS.items():
    torch.library.register_fake(_stand_in, lambda *args, _exchange=_exchange: _exchange(*args))


def localize(program: fx.GraphModule) -> fx.GraphModule:
    gm = fx.GraphModule(program, copy.deepcopy(program.graph))
    for node in gm.graph.nodes:
        if node.target in STAND_INS:
            node.target = STAND_INS[node.target]
    gm.recompile()
    return gm
