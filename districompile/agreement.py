"""Ranks that disagree get an error before any exchange: each call starts by comparing a small
fingerprint of every rank's inputs and trajectory state.

The contract is that every rank passes the same inputs and is at the same call of the same
trajectory. When it is broken (a different seed per rank, a rank that raised and called again,
one that passes another height), the ranks' exchanges pair up wrongly: a mixed image, or a
collective of mismatched sizes that aborts the process. A fixed-size all-gather of a few
numbers per rank, run before anything else of the call, turns that into an error on every rank
naming what differs. The same numbers carry what the trajectory needs to know on the host (the
timestep, how far the sample moved), so the call synchronises with the host once either way.

With ``host_checks="deferred"`` a call that runs an already compiled shape does not wait for the
numbers computed on the device: they travel to the host behind the call's work (``DeferredRows``)
and are read at the start of the model's next call, or at ``reset``. The host can then queue a
call while the device still runs the previous one, at the price of an error one call late. The
numbers the host knows itself (``HOST_AGREED``: which trajectory and call, which shapes) are still
compared before the call, over a CPU (gloo) group of the same ranks (``host_group``), so every rank
takes the same path and ranks out of step never enter mismatched exchanges.
"""

from __future__ import annotations

import zlib
from typing import Callable

import torch
import torch.distributed as dist

from .collectives import all_gather_single
from .errors import DistriCompileError

# One row per rank: what must agree, then what only this rank reads.
AGREED = ("trajectory", "call", "shapes", "inputs sum", "inputs sum of squares")
LOCAL = ("timestep", "sample moved", "sample norm")
HOST_AGREED = AGREED[:3]  # known on the host without reading the device

# Parent group name -> a gloo group of its ranks. Creating a group is a collective of the whole
# job (as in batch_split.py), so each is created once and shared.
_HOST_GROUPS: dict[str, dist.ProcessGroup] = {}


def shapes_code(args, positions: list[int]) -> int:
    """A checksum of the inputs' shapes and dtypes (the same on every rank that passes the same kind of input)."""
    text = repr([(tuple(args[i].shape), str(args[i].dtype)) if isinstance(args[i], torch.Tensor) else repr(args[i]) for i in positions])
    return zlib.crc32(text.encode())


def local_row(args, head: list[int], summed, timesteps, sample, last_sample) -> torch.Tensor:
    """This rank's numbers (``AGREED`` then ``LOCAL``) as one float64 vector on the inputs' device:
    ``head`` (``host_row``), then the sums of the inputs at ``summed``."""
    tensors = [args[i] for i in summed if isinstance(args[i], torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    zero = torch.zeros((), dtype=torch.float64, device=device)
    # Reduced in float64 without a float64 copy of each input (this runs on every call). Weighting
    # input i by i + 1 tells apart swapped inputs of equal sums.
    total = sum(((i + 1) * x.detach().sum(dtype=torch.float64) for i, x in enumerate(tensors)), zero)
    squares = sum(((i + 1) * _sum_of_squares(x.detach()) for i, x in enumerate(tensors)), zero)
    # One max on the device: Python's max over tensors would read each comparison on the host.
    timestep = torch.stack([args[i].detach().to(torch.float64).max() for i in timesteps]).max() if timesteps else zero - 1
    if sample is None or last_sample is None or last_sample.shape != sample.shape:
        moved, norm = zero - 1, zero
    else:
        moved, norm = (sample.double() - last_sample.double()).norm(), last_sample.double().norm()
    head = torch.tensor(head, dtype=torch.float64)
    # From pinned memory: a copy from pageable memory would make the host wait for the device.
    head = head.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else head
    return torch.cat([head, torch.stack([total, squares, timestep, moved, norm])])


def host_row(args, positions, trajectory: int, call: int) -> list[int]:
    """The ``HOST_AGREED`` numbers, computed on the host alone: the trajectory, the call and the
    shapes of the inputs at ``positions``."""
    return [trajectory, call, shapes_code(args, positions)]


def host_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A CPU group of ``group``'s ranks (``group`` itself where it is one), created on first use."""
    if dist.get_backend(group) == "gloo":
        return group
    if group.group_name not in _HOST_GROUPS:
        ranks = dist.get_process_group_ranks(group)
        local = len(ranks) < dist.get_world_size()  # a smaller group synchronizes its own ranks only
        _HOST_GROUPS[group.group_name] = dist.new_group(ranks, backend="gloo", use_local_synchronization=local)
    return _HOST_GROUPS[group.group_name]


def gather_host_rows(row: list[int], group, where: str) -> list[list[float]]:
    """Every rank's ``host_row`` over ``host_group(group)``: the host waits for the other ranks'
    hosts, never for a device."""
    return gather_rows_of_ranks(torch.tensor(row, dtype=torch.float64), group, where)


def _sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point():
        return torch.linalg.vector_norm(x, dtype=torch.float64).square()
    return x.double().square().sum()  # an integer input (a timestep): a few elements


def _gathered(row: torch.Tensor, group, where: str) -> torch.Tensor:
    """Every rank's row, one per line, on the row's device."""
    if group is None:
        return row.view(1, -1)
    world = dist.get_world_size(group)
    out = row.new_empty(world * row.numel())
    try:
        all_gather_single(out, row, group=group)
    except RuntimeError as error:  # a rank died, stopped calling or failed midway
        raise DistriCompileError(f"districompile: the ranks' agreement check before {where} failed: {error}") from error
    return out.view(world, -1)


def gather_rows_of_ranks(row: torch.Tensor, group, where: str) -> list[list[float]]:
    """Every rank's row, on the host (the call's one synchronisation)."""
    return _gathered(row, group, where).tolist()


class DeferredRows:
    """Every rank's row on its way to the host without the host waiting: a copy into pinned memory
    queued behind the all-gather, read (``rows``) once the device has got that far."""

    def __init__(self, row: torch.Tensor, group, where: str):
        gathered = _gathered(row, group, where)
        if gathered.is_cuda:
            self.host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
            self.host.copy_(gathered, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host, self.ready = gathered, None

    def rows(self) -> list[list[float]]:
        if self.ready is not None:
            self.ready.synchronize()  # the start of the call it checks: long done, as a rule
        return self.host.tolist()


def _differ(a: float, b: float) -> bool:
    return abs(a - b) > 1e-9 * max(abs(a), abs(b), 1.0)


def check_ranks_agree(rows: list[list[float]], describe: Callable[[], str], group, where: str, ran: bool = False):
    """Raise on every rank, with each rank's ``describe()``, if the ranks' ``AGREED`` numbers differ
    (``ran``: read after the call ran, its check deferred)."""
    first = rows[0]
    differing = [name for i, name in enumerate(AGREED[: len(first)]) if any(_differ(row[i], first[i]) for row in rows)]
    if not differing:
        return
    descriptions = [None] * len(rows)
    dist.all_gather_object(descriptions, describe(), group=group)  # every rank saw the mismatch: all reach here
    per_rank = "\n".join(f"  rank {rank}: {text}" for rank, text in enumerate(descriptions))
    raise DistriCompileError(
        f"districompile: the ranks disagree at {where} ({', '.join(differing)} differ); every rank must pass the same "
        f"inputs (same shapes, same sample and timestep: seed the noise alike) at the same call of the same trajectory "
        f"(call districompile.reset(model) on every rank, or none). "
        + ("The call ran (host_checks='deferred' reads its check at the next call): its output is wrong; call "
           "districompile.reset(model) on every rank and begin the image again. " if ran else "Nothing was exchanged. ")
        + f"Each rank has:\n{per_rank}"
    )
