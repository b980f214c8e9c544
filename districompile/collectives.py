"""Synchronous exchange ops between the ranks of one image, as ``torch.library`` custom ops.

They are opaque to Inductor (a fake implementation gives the output shape), take the
process group by name, and work on the canonical 4-d view ``(before, outer, rows, after)``
of a sharded tensor (see ``Shard.canonical_shape``), so one implementation serves every
layout. Every rank calls every op in the same order, even where it has nothing to send.

Each is a function, as its schema says (``mutates_args=()``): it reads its input only while it
runs and returns a new tensor, with all communication finished. The halo exchange
(``fetch_rows``) takes only the rows it sends, packed by ATen ops in the program
(``pack_outgoing_rows``), and returns only the rows it receives; the program assembles the halo
itself (``assemble_halo``), so Inductor can fuse the rows' producer into the assembly, and the
packing, as it would with no exchange. A rank may receive nothing, so that nothing reads what
``fetch_rows`` returns: it is marked as having a side effect (its sends), which keeps it in the
program. The displaced programs' ops, which keep state between calls, are in ``displaced.py``;
they share the packing and the assembly.

Every exchange op, here and there, takes ``after``: tensors that must exist before it runs.
``passes/sequence.py`` puts the previous exchange's result there, so each rank issues its
collectives in program order, whatever order Inductor would otherwise pick.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from .errors import DistriCompileError

aten = torch.ops.aten

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


Segment = tuple[int, int, int]  # (source, first row, row count); source -1: this rank, -2: fill, else a receive


@dataclass(frozen=True)
class HaloPlan:
    """Who sends which rows to whom for one row fetch, and how to assemble the result.

    Rows move as contiguous runs (slices and one cat), so no index tensor is built per call
    and the plan can be replayed inside a CUDA graph.
    """

    sends: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]  # (peer, runs of local rows: (first, count))
    receives: tuple[tuple[int, int], ...]  # (peer, number of rows), received in ascending row order
    segments: tuple[Segment, ...]  # the result, top to bottom

    def send_rows(self) -> list[int]:
        return [sum(count for _, count in runs) for _, runs in self.sends]

    def receive_rows(self) -> list[int]:
        return [count for _, count in self.receives]


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


def row_counts(bounds) -> list[int]:
    return [b - a for a, b in zip(bounds, bounds[1:])]


# ------------------------------------------------------------------ shared by both families
# ``call(op, *args)`` runs an ATen op: on tensors (``run``) in the ops, or emitted as a graph
# node by the passes, which write the packing and the assembly into the program itself.


@contextlib.contextmanager
def exchanging(what: str, x: torch.Tensor, shape=None):
    """Name the exchange in the error of a collective that fails (a peer died, failed or timed out),
    with the shape of the tensor exchanged (``shape``, else ``x``'s) and its dtype."""
    try:
        yield
    except RuntimeError as error:
        if isinstance(error, DistriCompileError):
            raise
        shape = tuple(x.shape if shape is None else shape)
        raise DistriCompileError(f"districompile: the {what} of a {shape} {x.dtype} tensor failed: {error}") from error


def run(op, *args, **kwargs):
    return op(*args, **kwargs)


def halo_shapes(shape, counts: list[int]) -> list[list[int]]:
    """The canonical shapes of row blocks of ``counts`` rows of a tensor of canonical ``shape``."""
    return [[shape[0], shape[1], count, shape[3]] for count in counts]


def chunks(call, flat, shapes: list[list[int]]) -> list:
    """Consecutive views of a flat tensor, one per shape."""
    views, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(call(aten.view.default, call(aten.slice.Tensor, flat, 0, offset, offset + size), shape))
        offset += size
    return views


def pack_outgoing_rows(call, x, plan: HaloPlan, dtype, device):
    """The rows of ``x`` that ``plan`` sends, flat, peer after peer (what the halo ops send), as ATen ops.

    In the program rather than in the op: Inductor computes only these rows, where an op taking all
    of ``x`` would make it materialise the whole tensor (a SiLU the convolution's input assembly
    computes anyway) for the sake of a few rows."""
    flat = [
        call(aten.reshape.default, call(aten.cat.default, [call(aten.slice.Tensor, x, ROW_DIM, first, first + count)
                                                           for first, count in runs], ROW_DIM), [-1])
        for _, runs in plan.sends
    ]
    if not flat:
        return call(aten.full.default, [0], 0.0, dtype=dtype, device=device)
    return flat[0] if len(flat) == 1 else call(aten.cat.default, flat)


def assemble_halo(call, x, shape, plan: HaloPlan, received: list, fill: float, dtype, device):
    """The fetched rows, top to bottom: this rank's (``x``), received ones (one block per peer of
    ``plan.receives``) and edge fill."""
    pieces = []
    for source, first, count in plan.segments:
        if source == -2:
            piece_shape = [shape[0], shape[1], count, shape[3]]
            pieces.append(call(aten.full.default, piece_shape, fill, dtype=dtype, device=device))
        else:
            pieces.append(call(aten.slice.Tensor, x if source == -1 else received[source], ROW_DIM, first, first + count))
    return call(aten.cat.default, pieces, ROW_DIM)


def join_blocks(call, blocks: list, bounds) -> object:
    """Every rank's row block (each padded to the largest), cut to its rows and joined."""
    return call(aten.cat.default, [call(aten.slice.Tensor, b, ROW_DIM, 0, n) for b, n in zip(blocks, row_counts(bounds))], ROW_DIM)


# torch 2.13 renamed all_gather_into_tensor (deprecated there); torch 2.11 has only the old name.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def post_p2p(receives, sends, pg) -> list:
    """Start point-to-point messages: ``receives`` and ``sends`` are (peer, tensor) pairs."""
    ops = [dist.P2POp(dist.irecv, t, dist.get_global_rank(pg, peer), pg) for peer, t in receives]
    ops += [dist.P2POp(dist.isend, t, dist.get_global_rank(pg, peer), pg) for peer, t in sends]
    return dist.batch_isend_irecv(ops) if ops else []


# ------------------------------------------------------------------ synchronous ops


@torch.library.custom_op("districompile::fetch_rows", mutates_args=())
def fetch_rows(
    outgoing: torch.Tensor,
    shape: list[int],
    bounds: list[int],
    need_lo: list[int],
    need_hi: list[int],
    rank: int,
    pad_mode: int,
    group: str,
    after: list[torch.Tensor],
) -> torch.Tensor:
    """The halo exchange of a tensor of canonical ``shape``, held by this rank as rows
    ``bounds[rank]:bounds[rank+1]`` of the image, of which rank ``q`` reads rows
    ``need_lo[q]:need_hi[q]`` (past the image's edges: padding of ``pad_mode``).

    Sends ``outgoing``, the rows the other ranks read from this one, packed flat by the program
    (``pack_outgoing_rows``), and returns the rows this rank reads from the others, flat: one
    block per peer of ``halo_plan(...).receives``, in that order, each of canonical shape. The
    program assembles them with its own rows and the padding (``assemble_halo``).
    """
    plan = halo_plan(tuple(bounds), tuple(need_lo), tuple(need_hi), rank, pad_mode)
    outgoing = outgoing.contiguous()
    received = outgoing.new_empty(received_numel(shape, plan))
    sends = list(zip((peer for peer, _ in plan.sends), chunks(run, outgoing, halo_shapes(shape, plan.send_rows()))))
    receives = list(zip((peer for peer, _ in plan.receives), chunks(run, received, halo_shapes(shape, plan.receive_rows()))))
    with exchanging(f"halo exchange of rows {need_lo[rank]}:{need_hi[rank]}", outgoing, shape):
        for work in post_p2p(receives, sends, _resolve_process_group(group)):
            work.wait()
    return received


def received_numel(shape, plan: HaloPlan) -> int:
    """The elements ``fetch_rows`` returns: every row this rank receives, of canonical ``shape``."""
    return sum(map(math.prod, halo_shapes(shape, plan.receive_rows())))


@fetch_rows.register_fake
def _(outgoing, shape, bounds, need_lo, need_hi, rank, pad_mode, group, after):
    plan = halo_plan(tuple(bounds), tuple(need_lo), tuple(need_hi), rank, pad_mode)
    return outgoing.new_empty(received_numel(shape, plan))


# It sends: kept even where nothing reads what it returns (a rank that receives nothing), which
# dead-code elimination (FX's, Inductor's) would otherwise drop, leaving its peers waiting.
torch.fx.node.has_side_effect(torch.ops.districompile.fetch_rows.default)


def padded_block(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended up to ``rows`` (all-gathers want equal blocks)."""
    return torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[ROW_DIM])) if x.shape[ROW_DIM] < rows else x.contiguous()


@torch.library.custom_op("districompile::gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, bounds: list[int], rank: int, group: str, after: list[torch.Tensor]) -> torch.Tensor:
    """All rows of the image on every rank: an all-gather of uneven row blocks."""
    block = padded_block(x, max(row_counts(bounds)))
    world = len(bounds) - 1
    gathered = block.new_empty(world * block.numel())  # flat: gloo takes no stacked output
    with exchanging("row gather", x):
        all_gather_single(gathered, block.view(-1), group=_resolve_process_group(group))
    return join_blocks(run, list(gathered.view(world, *block.shape).unbind(0)), bounds)


@gather_rows.register_fake
def _(x, bounds, rank, group, after):
    return x.new_empty(x.shape[0], x.shape[1], bounds[-1], x.shape[3])


@torch.library.custom_op("districompile::all_gather_stack", mutates_args=())
def all_gather_stack(x: torch.Tensor, world: int, group: str, after: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's ``x`` (same shape everywhere), stacked along a new leading dimension."""
    out = x.new_empty(world * x.numel())
    with exchanging("all-gather", x):
        all_gather_single(out, x.reshape(-1), group=_resolve_process_group(group))
    return out.view(world, *x.shape)


@all_gather_stack.register_fake
def _(x, world, group, after):
    return x.new_empty(world, *x.shape)


REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@torch.library.custom_op("districompile::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, op: str, group: str, after: list[torch.Tensor]) -> torch.Tensor:
    """The elementwise ``op`` of ``x`` over all ranks."""
    out = x.contiguous().clone()
    with exchanging(f"all-reduce ({op})", x):
        dist.all_reduce(out, op=REDUCE_OPS[op], group=_resolve_process_group(group))
    return out


@all_reduce.register_fake
def _(x, op, group, after):
    return torch.empty_like(x)
