"""Displaced exchanges: use the neighbours' values from the previous call, send this call's for the next.

Each exchange site of a compiled program owns a persistent buffer in an ``ExchangeState``.
In the warm-up phase the ``*_displaced`` ops exchange synchronously and record what arrived;
in the steady phase they wait for the exchange started by the previous call (long finished,
behind that call's compute), build their result from those stale values and this rank's fresh
ones, and start this call's exchange into the same buffers.
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

    def drain(self):
        """Finish the exchanges in flight (before a reset drops the buffers)."""
        for site in self.sites.values():
            site.wait()
        self.sites.clear()


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
    if stale:
        if entry.buffers is None:
            raise RuntimeError("districompile: a steady-phase call ran before any warm-up call filled its buffers")
        entry.wait()
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
        received, works = post_halo(x, plan, pg)
        for work in works:
            work.wait()
        entry.buffers = received
        return assemble_halo(x, plan, received, fill)
    out = assemble_halo(x, plan, entry.buffers, fill)
    entry.buffers, entry.works = post_halo(x, plan, pg, into=entry.buffers)
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
        blocks, work = post_row_gather(x, bounds, pg)
        work.wait()
        entry.buffers = blocks
        return join_rows(blocks, bounds)
    blocks = list(entry.buffers)
    blocks[rank] = torch.nn.functional.pad(x, (0, 0, 0, blocks[rank].shape[2] - x.shape[2]))
    out = join_rows(blocks, bounds)
    entry.buffers, work = post_row_gather(x, bounds, pg, into=entry.buffers)
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
        blocks = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(blocks, x.contiguous(), group=pg)
        entry.buffers = blocks
        return torch.stack(blocks)
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
    if not stale:
        total = x.contiguous().clone()
        dist.all_reduce(total, op=_REDUCE_OPS[op], group=pg)
        entry.buffers = (total, x.clone())
        return total
    total, own = entry.buffers
    if mode == CORRECTED and op == "sum":
        out = total - own + x
    elif mode == CORRECTED:
        out = torch.maximum(total, x) if op == "max" else torch.minimum(total, x)
    else:
        out = total.clone()
    fresh = x.contiguous().clone()
    entry.buffers = (fresh, x.clone())
    entry.works = [dist.all_reduce(fresh, op=_REDUCE_OPS[op], group=pg, async_op=True)]
    return out


@all_reduce_displaced.register_fake
def _(x, op, group, state_id, site, stale, mode):
    return torch.empty_like(x)
