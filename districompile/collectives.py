"""Exchange ops between the ranks of one image, as ``torch.library`` custom ops.

They are opaque to Inductor (a fake implementation gives the output shape), take the
process group by name, and work on the canonical 4-d view ``(before, outer, rows, after)``
of a sharded tensor (see ``Shard.canonical_shape``), so one implementation serves every
layout. Every rank calls every op in the same order, even where it has nothing to send.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

ROW_DIM = 2  # the rows of the canonical view

# How rows outside the image are filled when a halo reaches past the top or bottom edge.
PAD_CONSTANT, PAD_REPLICATE, PAD_REFLECT = 0, 1, 2


def source_row(row: int, extent: int, pad_mode: int) -> int | None:
    """The image row that padding row ``row`` copies, or None for a constant fill."""
    if 0 <= row < extent:
        return row
    if pad_mode == PAD_CONSTANT:
        return None
    if pad_mode == PAD_REPLICATE:
        return min(max(row, 0), extent - 1)
    reflected = -row if row < 0 else 2 * (extent - 1) - row
    if not 0 <= reflected < extent:
        raise ValueError(f"reflect padding of row {row} reaches past an image of {extent} rows")
    return reflected


Segment = tuple[int, int, int]  # (source, first row, row count); source -1: this rank, -2: fill, else a peer


@dataclass(frozen=True)
class HaloPlan:
    """Who sends which rows to whom for one row fetch, and how to assemble the result.

    Rows move as contiguous runs (slices and one cat), so no index tensor is built per call
    and the plan can be replayed inside a CUDA graph.
    """

    sends: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]  # (peer, runs of local rows: (first, count))
    receives: tuple[tuple[int, int], ...]  # (peer, number of rows), received in ascending row order
    segments: tuple[Segment, ...]  # the result, top to bottom


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    runs = []
    for row in rows:
        if runs and runs[-1][0] + runs[-1][1] == row:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((row, 1))
    return runs


@functools.lru_cache(maxsize=None)
def halo_plan(bounds: tuple, need_lo: tuple, need_hi: tuple, rank: int, pad_mode: int) -> HaloPlan:
    world, start = len(bounds) - 1, bounds[rank]
    wanted = [[source_row(r, bounds[-1], pad_mode) for r in range(need_lo[q], need_hi[q])] for q in range(world)]

    def owned(rows, owner):
        return sorted({r for r in rows if r is not None and bounds[owner] <= r < bounds[owner + 1]})

    where = {row: (-1, row - start) for row in range(start, bounds[rank + 1])}  # row -> (source, index)
    sends, receives = [], []
    for peer in range(world):
        if peer == rank:
            continue
        to_send = owned(wanted[peer], rank)
        if to_send:
            sends.append((peer, tuple(_runs([r - start for r in to_send]))))
        to_receive = owned(wanted[rank], peer)
        if to_receive:
            receives.append((peer, len(to_receive)))
            where.update({row: (len(receives) - 1, i) for i, row in enumerate(to_receive)})
    segments: list[list[int]] = []
    for row in wanted[rank]:
        source, index = (-2, 0) if row is None else where[row]
        last = segments[-1] if segments else None
        if last and last[0] == source and (source == -2 or last[1] + last[2] == index):
            last[2] += 1
        else:
            segments.append([source, index, 1])
    return HaloPlan(tuple(sends), tuple(receives), tuple(tuple(s) for s in segments))


def _rows(x: torch.Tensor, runs) -> torch.Tensor:
    return torch.cat([x.narrow(ROW_DIM, first, count) for first, count in runs], ROW_DIM)


def post_halo(x: torch.Tensor, plan: HaloPlan, pg, into: list[torch.Tensor] | None = None):
    """Start the sends and receives of ``plan``; returns (receive buffers, works)."""
    ops, buffers = [], []
    for i, (peer, count) in enumerate(plan.receives):
        buffer = into[i] if into is not None else x.new_empty(x.shape[0], x.shape[1], count, x.shape[3])
        buffers.append(buffer)
        ops.append(dist.P2POp(dist.irecv, buffer, dist.get_global_rank(pg, peer), pg))
    for peer, runs in plan.sends:
        ops.append(dist.P2POp(dist.isend, _rows(x, runs).contiguous(), dist.get_global_rank(pg, peer), pg))
    return buffers, (dist.batch_isend_irecv(ops) if ops else [])


def assemble_halo(x: torch.Tensor, plan: HaloPlan, received: list[torch.Tensor], fill: float) -> torch.Tensor:
    pieces = []
    for source, first, count in plan.segments:
        if source == -2:
            pieces.append(x.new_full((x.shape[0], x.shape[1], count, x.shape[3]), fill))
        else:
            pieces.append((x if source == -1 else received[source]).narrow(ROW_DIM, first, count))
    return torch.cat(pieces, ROW_DIM)


@torch.library.custom_op("districompile::fetch_rows", mutates_args=())
def fetch_rows(
    x: torch.Tensor,
    bounds: list[int],
    need_lo: list[int],
    need_hi: list[int],
    rank: int,
    pad_mode: int,
    fill: float,
    group: str,
) -> torch.Tensor:
    """Rows ``need_lo[rank]:need_hi[rank]`` of the whole image, this rank holding ``bounds[rank]:bounds[rank+1]``.

    Rows held by other ranks arrive by point-to-point messages; rows past the image's edges
    are padded (``pad_mode``). Each rank also sends the rows the others need from it.
    """
    plan = halo_plan(tuple(bounds), tuple(need_lo), tuple(need_hi), rank, pad_mode)
    received, works = post_halo(x, plan, _resolve_process_group(group))
    for work in works:
        work.wait()
    return assemble_halo(x, plan, received, fill)


@fetch_rows.register_fake
def _(x, bounds, need_lo, need_hi, rank, pad_mode, fill, group):
    return x.new_empty(x.shape[0], x.shape[1], need_hi[rank] - need_lo[rank], x.shape[3])


def row_counts(bounds) -> list[int]:
    return [b - a for a, b in zip(bounds, bounds[1:])]


def post_row_gather(x: torch.Tensor, bounds, pg, into: list[torch.Tensor] | None = None):
    """Start an all-gather of every rank's row block (padded to the largest); returns (blocks, work)."""
    most = max(row_counts(bounds))
    if x.shape[ROW_DIM] < most:  # all-gather wants equal blocks
        x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], most - x.shape[ROW_DIM], x.shape[3])], ROW_DIM)
    blocks = into if into is not None else [torch.empty_like(x) for _ in range(len(bounds) - 1)]
    return blocks, dist.all_gather(blocks, x.contiguous(), group=pg, async_op=True)


def join_rows(blocks, bounds) -> torch.Tensor:
    return torch.cat([block[:, :, :count] for block, count in zip(blocks, row_counts(bounds))], ROW_DIM)


@torch.library.custom_op("districompile::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, bounds: list[int], rank: int, group: str) -> torch.Tensor:
    """All rows of the image on every rank: an all-gather of uneven row blocks."""
    blocks, work = post_row_gather(x, bounds, _resolve_process_group(group))
    work.wait()
    return join_rows(blocks, bounds)


@gather_rows.register_fake
def _(x, bounds, rank, group):
    return x.new_empty(x.shape[0], x.shape[1], bounds[-1], x.shape[3])


@torch.library.custom_op("districompile::all_gather_stack", mutates_args=())
def all_gather_stack(x: torch.Tensor, world: int, group: str) -> torch.Tensor:
    """Every rank's ``x`` (same shape everywhere), stacked along a new leading dimension."""
    blocks = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(blocks, x.contiguous(), group=_resolve_process_group(group))
    return torch.stack(blocks)


@all_gather_stack.register_fake
def _(x, world, group):
    return x.new_empty(world, *x.shape)


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@torch.library.custom_op("districompile::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, op: str, group: str) -> torch.Tensor:
    """The elementwise ``op`` of ``x`` over all ranks."""
    out = x.contiguous().clone()
    dist.all_reduce(out, op=_REDUCE_OPS[op], group=_resolve_process_group(group))
    return out


@all_reduce.register_fake
def _(x, op, group):
    return torch.empty_like(x)
