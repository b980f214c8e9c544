"""Displaced exchanges: the ops that fill an exchange site's stale buffers, and the join.

A displaced program (``passes/displace.py``) takes two flat buffers per exchange site as
inputs, allocated by the runtime that owns them (``allocate_buffers``): ``send``, what this
rank sent at its last call, and ``recv``, what it received. The ops here declare both as
mutated, so the compiler knows that they write them:

- warm-up (``wait=True``): the op exchanges synchronously; the program then reads the fresh
  values out of ``recv``;
- steady (``wait=False``): the program first reads the previous call's values out of the
  buffers, and the op takes that read in ``after``: a data dependency, so it runs after the
  read whatever the scheduler does. It then starts this call's exchange into the buffers and
  returns a token; c10d's work registry holds the exchange's works against the token, and
  ``join_exchanges``, the program's last op, waits for them. No exchange is in flight between
  calls, so each phase can be one CUDA graph.

Between a steady op's return and the join, the collective writes the buffers while nothing in
the program touches them: the reads come before, the next call after the join. The ops accept
only the buffers the runtime allocated: a compiler that handed them a copy (as Inductor may for
a mutated input that is read after the mutation) would have the exchange land in the copy, so
they stop with an error instead of returning a wrong image.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from .collectives import (
    REDUCE_OPS,
    all_gather_single,
    chunks,
    exchanging,
    halo_plan,
    halo_shapes,
    post_p2p,
    run,
)
from .errors import DistriCompileError

_OWNED = "_districompile_exchange_buffer"  # marks the buffers the runtime allocated


def allocate_buffers(specs: list[tuple[int, torch.dtype, torch.device]]) -> list[torch.Tensor]:
    """One flat buffer per ``(numel, dtype, device)``: the exchange state of one compiled shape."""
    buffers = []
    for numel, dtype, device in specs:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        setattr(buffer, _OWNED, True)
        buffers.append(buffer)
    return buffers


def _check_owned(op: str, *buffers: torch.Tensor):
    for buffer in buffers:
        base = buffer if buffer._base is None else buffer._base
        if not getattr(base, _OWNED, False):
            raise DistriCompileError(
                f"districompile::{op} was handed a copy of its exchange buffer, not the buffer the runtime "
                "owns: the compiler did not keep the buffer's mutation in place, and the exchange would be "
                "lost. Report this with your torch version; lowering='eager' avoids it"
            )


def _started(works: list, wait: bool, like: torch.Tensor, what: str) -> torch.Tensor:
    """The op's token: the works are finished (``wait``) or registered against it for the join."""
    token = like.new_empty(0)
    with exchanging(what, like):
        for work in works:
            if wait:
                work.wait()
            else:
                torch._C._distributed_c10d._register_work(token, work)
    return token


@torch.library.custom_op("districompile::exchange_rows", mutates_args=("send", "recv"))
def exchange_rows(
    outgoing: torch.Tensor, send: torch.Tensor, recv: torch.Tensor, shape: list[int], bounds: list[int],
    need_lo: list[int], need_hi: list[int], rank: int, pad_mode: int, group: str, wait: bool, after: list[torch.Tensor],
) -> torch.Tensor:
    """``collectives.fetch_rows`` through buffers: send ``outgoing`` (the rows other ranks read of this
    rank's tensor of canonical ``shape``, packed by the program: ``pack_outgoing_rows``) from
    ``send``; receive theirs into ``recv``, laid out as ``fetch_rows`` returns them."""
    _check_owned("exchange_rows", send, recv)
    plan = halo_plan(tuple(bounds), tuple(need_lo), tuple(need_hi), rank, pad_mode)
    send.copy_(outgoing)
    sends = list(zip((peer for peer, _ in plan.sends), chunks(run, send, halo_shapes(shape, plan.send_rows()))))
    receives = [(peer, chunk) for (peer, _), chunk in zip(plan.receives, chunks(run, recv, halo_shapes(shape, plan.receive_rows())))]
    with exchanging("displaced halo exchange", outgoing, shape):
        works = post_p2p(receives, sends, _resolve_process_group(group))
    return _started(works, wait, outgoing, "displaced halo exchange")


@torch.library.custom_op("districompile::exchange_blocks", mutates_args=("send", "recv"))
def exchange_blocks(
    x: torch.Tensor, send: torch.Tensor, recv: torch.Tensor, rows: int, group: str, wait: bool,
    after: list[torch.Tensor],
) -> torch.Tensor:
    """All-gather every rank's row block (canonical 4-d, padded to ``rows``) from ``send`` into ``recv``."""
    _check_owned("exchange_blocks", send, recv)
    # Rows past x's own are left as they are: readers cut every block to its rank's rows.
    send.view(x.shape[0], x.shape[1], rows, x.shape[3]).narrow(2, 0, x.shape[2]).copy_(x)
    with exchanging("displaced block all-gather", x):
        work = all_gather_single(recv, send, group=_resolve_process_group(group), async_op=True)
    return _started([work], wait, x, "displaced block all-gather")


@torch.library.custom_op("districompile::exchange_reduce", mutates_args=("send", "recv"))
def exchange_reduce(
    x: torch.Tensor, send: torch.Tensor, recv: torch.Tensor, op: str, group: str, wait: bool,
    after: list[torch.Tensor],
) -> torch.Tensor:
    """All-reduce ``x`` into ``recv``; ``send`` keeps this rank's part (the corrected mode swaps it out)."""
    _check_owned("exchange_reduce", send, recv)
    send.copy_(x.reshape(-1))
    recv.copy_(send)
    with exchanging(f"displaced all-reduce ({op})", x):
        work = dist.all_reduce(recv, op=REDUCE_OPS[op], group=_resolve_process_group(group), async_op=True)
    return _started([work], wait, x, f"displaced all-reduce ({op})")


for _op in (exchange_rows, exchange_blocks, exchange_reduce):
    _op.register_fake(lambda x, *args, **kwargs: x.new_empty(0))


@torch.library.custom_op("districompile::snapshot", mutates_args=())
def snapshot(buffer: torch.Tensor) -> torch.Tensor:
    """A copy of a buffer's contents, for a read made of nothing else.

    Inductor treats a plain clone as a no-op: readers would be left on the buffer itself, the
    exchange would then overwrite it under them, and Inductor would copy the buffer for the
    exchange instead (which the ops refuse). This copy is opaque, so it stays.
    """
    return buffer.clone()


@snapshot.register_fake
def _(buffer):
    return torch.empty_like(buffer)


@torch.library.custom_op("districompile::join_exchanges", mutates_args=())
def join_exchanges(tokens: list[torch.Tensor], outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The program's outputs, once every exchange this call started (its ``tokens``) has finished.

    On CUDA the stream waits, the host does not. Returning copies keeps it a functional op
    that the program's outputs depend on, so it is neither dropped nor moved earlier.
    """
    for token in tokens:
        with exchanging("join of the displaced exchanges", token):
            torch.ops._c10d_functional.wait_tensor(token)
    return [x.clone() for x in outputs]


@join_exchanges.register_fake
def _(tokens, outputs):
    return [torch.empty_like(x) for x in outputs]
