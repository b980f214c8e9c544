"""Localize: replace every exchange of a per-rank program by a local stand-in of the same shape.

For projections only: the result runs one rank's compute (halo assembly, padding to whole K/V,
statistics merge included) on one device with no communication, so its time is the per-rank
compute time of a world of N ranks. Foreign rows are zeros, so its output is not the model's.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from ..collectives import ROW_DIM, assemble_halo, halo_plan, row_counts

districompile = torch.ops.districompile


def local_fetch_rows(x, bounds, need_lo, need_hi, rank, pad_mode, fill, group):
    plan = halo_plan(tuple(bounds), tuple(need_lo), tuple(need_hi), rank, pad_mode)
    zeros = [x.new_zeros(x.shape[0], x.shape[1], count, x.shape[3]) for _, count in plan.receives]
    return assemble_halo(x, plan, zeros, fill)


def local_gather_rows(x, bounds, rank, group):
    counts = row_counts(bounds)
    blocks = [x if r == rank else x.new_zeros(x.shape[0], x.shape[1], c, x.shape[3]) for r, c in enumerate(counts)]
    return torch.cat(blocks, ROW_DIM)


def local_all_gather_stack(x, world, group):
    return torch.stack([x] * world)


def local_all_reduce(x, op, group):
    return x.clone()


STAND_INS = {
    districompile.fetch_rows.default: local_fetch_rows,
    districompile.gather_rows.default: local_gather_rows,
    districompile.all_gather_stack.default: local_all_gather_stack,
    districompile.all_reduce.default: local_all_reduce,
}


def localize(program: fx.GraphModule) -> fx.GraphModule:
    gm = fx.GraphModule(program, copy.deepcopy(program.graph))
    for node in gm.graph.nodes:
        if node.target in STAND_INS:
            node.target = STAND_INS[node.target]
    gm.recompile()
    return gm
