"""Exchange ops between the ranks of one image, as ``torch.library`` custom ops.

They are opaque to Inductor (a fake implementation gives the output shape), take the
process group by name, and work on the canonical 4-d view ``(before, outer, rows, after)``
of a sharded tensor (see ``Shard.canonical_shape``), so one implementation serves every
layout. Every rank calls every op in the same order, even where it has nothing to send.
"""

from __future__ import annotations

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


def _rows_wanted(bounds, lo: int, hi: int, pad_mode: int) -> list[int | None]:
    return [source_row(row, bounds[-1], pad_mode) for row in range(lo, hi)]


def _owned(rows, bounds, rank: int) -> list[int]:
    return sorted({r for r in rows if r is not None and bounds[rank] <= r < bounds[rank + 1]})


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
    pg = _resolve_process_group(group)
    world = len(bounds) - 1
    start = bounds[rank]
    wanted = [_rows_wanted(bounds, need_lo[r], need_hi[r], pad_mode) for r in range(world)]

    ops, received = [], {}
    for peer in range(world):
        if peer == rank:
            continue
        peer_rank = dist.get_global_rank(pg, peer)
        to_send = _owned(wanted[peer], bounds, rank)
        if to_send:
            index = torch.tensor(to_send, device=x.device) - start
            ops.append(dist.P2POp(dist.isend, x.index_select(ROW_DIM, index).contiguous(), peer_rank, pg))
        to_receive = _owned(wanted[rank], bounds, peer)
        if to_receive:
            buffer = x.new_empty(x.shape[0], x.shape[1], len(to_receive), x.shape[3])
            received[peer] = (to_receive, buffer)
            ops.append(dist.P2POp(dist.irecv, buffer, peer_rank, pg))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    # Assemble: row sources are this rank's rows, received rows, and one fill row.
    pieces, position = [x], {}
    for row in range(start, bounds[rank + 1]):
        position[row] = row - start
    offset = x.shape[ROW_DIM]
    for rows, buffer in received.values():
        for i, row in enumerate(rows):
            position[row] = offset + i
        pieces.append(buffer)
        offset += len(rows)
    pieces.append(x.new_full((x.shape[0], x.shape[1], 1, x.shape[3]), fill))
    index = [offset if row is None else position[row] for row in wanted[rank]]
    return torch.cat(pieces, ROW_DIM).index_select(ROW_DIM, torch.tensor(index, device=x.device))


@fetch_rows.register_fake
def _(x, bounds, need_lo, need_hi, rank, pad_mode, fill, group):
    return x.new_empty(x.shape[0], x.shape[1], need_hi[rank] - need_lo[rank], x.shape[3])


@torch.library.custom_op("districompile::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, bounds: list[int], rank: int, group: str) -> torch.Tensor:
    """All rows of the image on every rank: an all-gather of uneven row blocks."""
    pg = _resolve_process_group(group)
    world = len(bounds) - 1
    counts = [bounds[r + 1] - bounds[r] for r in range(world)]
    most = max(counts)
    padded = x
    if x.shape[ROW_DIM] < most:  # all-gather wants equal blocks
        padded = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], most - x.shape[ROW_DIM], x.shape[3])], ROW_DIM)
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded.contiguous(), group=pg)
    return torch.cat([block[:, :, :count] for block, count in zip(blocks, counts)], ROW_DIM)


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
