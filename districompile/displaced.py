"""Displaced exchanges: use the neighbours' values from the previous call, send this call's for the next.

Each exchange site of a compiled program owns persistent buffers in an ``ExchangeState``.
In the warm-up phase the ``*_displaced`` ops exchange synchronously into those buffers; in the
steady phase they build their result from the buffers (the previous call's values) and this
rank's fresh ones, then start this call's exchange into the same buffers, behind the rest of
the call's compute. ``join_exchanges``, the steady program's last op, waits for them.

Buffers are allocated once (the first warm-up call) and then only written in place, and no
exchange is left in flight between calls, so a phase can be captured as a CUDA graph: a
replay reads and writes the same buffers, and the collectives and their joins are inside it.
Reading a buffer is ordered before the collective that overwrites it: the read is queued
first on the compute stream, and a collective starts after the work queued before it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from .collectives import _REDUCE_OPS, assemble_halo, halo_plan, join_rows, post_halo, post_row_gather


@dataclass
class Site:
    buffers: object = None
    works: list = field(default_factory=list)

    def wait(self):
        for work in self.works:
            work.wait()
        self.works = []


class ExchangeState:
    """The stale buffers of one compiled program, by site number."""

    def __init__(self):
        self.sites: dict[int, Site] = {}

    def site(self, number: int) -> Site:
        return self.sites.setdefault(number, Site())

    def join(self):
        """Wait for every exchange in flight (on CUDA: the current stream waits for them)."""
        for site in self.sites.values():
            site.wait()


_STATES: dict[int, ExchangeState] = {}
_ids = itertools.count()


def new_state() -> int:
    number = next(_ids)
    _STATES[number] = ExchangeState()
    return number


def state(number: int) -> ExchangeState:
    return _STATES[number]


def _site(state_id: int, site: int, stale: bool) -> Site:
    entry = _STATES[state_id].site(site)
    if stale and entry.buffers is None:
        raise RuntimeError("districompile: a steady-phase call ran before any warm-up call filled its buffers")
    return entry


@torch.library.custom_op("districompile::fetch_rows_displaced", mutates_args=())
def fetch_rows_displaced(
    x: torch.Tensor, bounds: list[int], need_lo: list[int], need_hi: list[int], rank: int, pad_mode: int,
    fill: float, group: str, state_id: int, site: int, stale: bool,
) -> torch.Tensor:
    """``fetch_rows`` whose rows from other ranks are those of the previous call once ``stale``."""
    plan = halo_plan(tuple(bounds), tuple(need_lo), tuple(need_hi), rank, pad_mode)
    pg = _resolve_process_group(group)
    entry = _site(state_id, site, stale)
    if not stale:
        entry.buffers, works = post_halo(x, plan, pg, into=entry.buffers)
        for work in works:
            work.wait()
        return assemble_halo(x, plan, entry.buffers, fill)
    out = assemble_halo(x, plan, entry.buffers, fill)
    _, entry.works = post_halo(x, plan, pg, into=entry.buffers)
    return out


@fetch_rows_displaced.register_fake
def _(x, bounds, need_lo, need_hi, rank, pad_mode, fill, group, state_id, site, stale):
    return x.new_empty(x.shape[0], x.shape[1], need_hi[rank] - need_lo[rank], x.shape[3])


@torch.library.custom_op("districompile::gather_rows_displaced", mutates_args=())
def gather_rows_displaced(
    x: torch.Tensor, bounds: list[int], rank: int, group: str, state_id: int, site: int, stale: bool
) -> torch.Tensor:
    """``gather_rows`` with the other ranks' rows from the previous call once ``stale``."""
    pg = _resolve_process_group(group)
    entry = _site(state_id, site, stale)
    if not stale:
        entry.buffers, work = post_row_gather(x, bounds, pg, into=entry.buffers)
        work.wait()
        return join_rows(entry.buffers, bounds)
    blocks = list(entry.buffers)
    blocks[rank] = torch.nn.functional.pad(x, (0, 0, 0, blocks[rank].shape[2] - x.shape[2]))
    out = join_rows(blocks, bounds)
    _, work = post_row_gather(x, bounds, pg, into=entry.buffers)
    entry.works = [work]
    return out


@gather_rows_displaced.register_fake
def _(x, bounds, rank, group, state_id, site, stale):
    return x.new_empty(x.shape[0], x.shape[1], bounds[-1], x.shape[3])


# How a stale statistic is combined with this rank's fresh one.
CORRECTED, STALE, SEPARATE = "corrected", "stale", "separate"


@torch.library.custom_op("districompile::all_gather_stack_displaced", mutates_args=())
def all_gather_stack_displaced(
    x: torch.Tensor, world: int, rank: int, group: str, state_id: int, site: int, stale: bool, mode: str
) -> torch.Tensor:
    """Every rank's statistics, stacked. Once ``stale``: the previous call's, with this rank's
    entry fresh (``corrected``), all of the previous call (``stale``), or only this rank's
    (``separate``, the others zero: they drop out of a count-weighted merge)."""
    pg = _resolve_process_group(group)
    entry = _site(state_id, site, stale)
    if not stale:
        if entry.buffers is None:
            entry.buffers = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(entry.buffers, x.contiguous(), group=pg)
        return torch.stack(entry.buffers)
    if mode == SEPARATE:
        return torch.stack([x if r == rank else torch.zeros_like(x) for r in range(world)])
    blocks = list(entry.buffers)
    if mode == CORRECTED:
        blocks[rank] = x
    out = torch.stack(blocks)
    entry.works = [dist.all_gather(entry.buffers, x.contiguous(), group=pg, async_op=True)]
    return out


@all_gather_stack_displaced.register_fake
def _(x, world, rank, group, state_id, site, stale, mode):
    return x.new_empty(world, *x.shape)


@torch.library.custom_op("districompile::all_reduce_displaced", mutates_args=())
def all_reduce_displaced(
    x: torch.Tensor, op: str, group: str, state_id: int, site: int, stale: bool, mode: str
) -> torch.Tensor:
    """``all_reduce`` from the previous call once ``stale``; ``corrected`` swaps in this rank's
    fresh part of a sum."""
    pg = _resolve_process_group(group)
    entry = _site(state_id, site, stale)
    if entry.buffers is None:
        entry.buffers = (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(x))
    total, own = entry.buffers  # the reduction and this rank's part of it
    if not stale:
        total.copy_(x)
        dist.all_reduce(total, op=_REDUCE_OPS[op], group=pg)
        own.copy_(x)
        return total.clone()
    if mode == CORRECTED and op == "sum":
        out = total - own + x
    elif mode == CORRECTED:
        out = torch.maximum(total, x) if op == "max" else torch.minimum(total, x)
    else:
        out = total.clone()
    total.copy_(x)
    own.copy_(x)
    entry.works = [dist.all_reduce(total, op=_REDUCE_OPS[op], group=pg, async_op=True)]
    return out


@all_reduce_displaced.register_fake
def _(x, op, group, state_id, site, stale, mode):
    return torch.empty_like(x)


@torch.library.custom_op("districompile::join_exchanges", mutates_args=())
def join_exchanges(outputs: list[torch.Tensor], state_id: int) -> list[torch.Tensor]:
    """The program's outputs, once every exchange this call started has finished.

    Taking the outputs orders it after every exchange op (each one feeds an output, or dead
    code elimination would have removed it); returning copies keeps it a functional op.
    """
    _STATES[state_id].join()
    return [x.clone() for x in outputs]


@join_exchanges.register_fake
def _(outputs, state_id):
    return [torch.empty_like(x) for x in outputs]
