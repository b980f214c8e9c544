"""Displace: turn a synchronous per-rank program into the warm-up and steady programs of a sync mode.

Each exchange the mode displaces becomes a *site* with two buffers that the programs take as
extra inputs (``send``, ``recv``; the runtime owns them) and two parts, both written into the
graph where the compiler sees them:

- the exchange op (``displaced.exchange_*``), which declares that it writes the buffers;
- the read: the value the consumers use, assembled by ATen ops from this rank's fresh input
  and the other ranks' values in ``recv``.

A halo's two parts are in the synchronous program already (``Emitter.fetch_rows``): the rows
sent, packed, and the assembly of the rows received, the read, tagged ``exchange_read``. The
pass only puts ``exchange_rows`` in place of ``fetch_rows`` and has the assembly read ``recv``.

Warm-up: exchange (synchronous), then read the fresh values. Steady: read the previous
call's values, then exchange, asynchronously, with the read in the op's ``after``, so that no
schedule can move the read past the write; the read takes the buffers through snapshots (opaque
copies), so no kernel after the op can recompute it from the buffers either. The steady program
ends in ``join_exchanges``.
Fallback and output gathers stay synchronous (``no_sync`` displaces the output gather too).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..collectives import chunks, halo_plan, join_blocks, row_counts

aten = torch.ops.aten
districompile = torch.ops.districompile

# How a steady read combines the previous call's values with this rank's fresh ones.
CORRECTED, STALE, SEPARATE = "corrected", "stale", "separate"

# sync_mode -> (GroupNorm statistics, spatial reductions, output gather displaced?)
MODES = {
    "corrected_async_gn": (CORRECTED, CORRECTED, False),
    "stale_gn": (STALE, STALE, False),
    "separate_gn": (SEPARATE, CORRECTED, False),
    "no_sync": (STALE, STALE, True),
}


@dataclass
class DisplacedProgram:
    warmup: fx.GraphModule
    steady: fx.GraphModule
    # Per buffer input, after the program's own inputs: (numel, dtype, device), site by site (send, recv).
    buffers: list[tuple[int, torch.dtype, torch.device]]


def displace(program: fx.GraphModule, sync_mode: str, rank: int) -> DisplacedProgram:
    _propagate_shapes(program)
    phases, buffers = [], None
    for stale in (False, True):
        graph = fx.Graph()
        graph.output(graph.graph_copy(program.graph, {}))  # node meta (with "val") is shared
        phase_buffers = _Displacer(graph, MODES[sync_mode], rank, stale).run()
        phases.append(fx.GraphModule(program, graph))
        buffers = phase_buffers
    return DisplacedProgram(phases[0], phases[1], buffers)


def _propagate_shapes(program: fx.GraphModule):
    """``meta["val"]`` on every node: the buffers' sizes follow from the exchanged tensors' shapes."""
    inputs = [n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"]
    FakeTensorProp(program, detect_fake_mode(inputs)).propagate_dont_convert_inputs(*inputs)


class _Displacer:
    """Rewrites one phase's graph. Every node it adds gets its ``meta["val"]`` (a fake tensor), as
    the nodes it keeps have theirs: later passes (``pieces``) read them instead of propagating the
    whole program again. A read replaces an exchange's value with one of the same shape and layout."""

    def __init__(self, graph: fx.Graph, modes, rank: int, stale: bool):
        self.graph, self.rank, self.stale = graph, rank, stale
        self.stats_mode, self.reduce_mode, self.displace_output = modes
        self.buffers: list[tuple[int, torch.dtype, torch.device]] = []
        self.tokens: list[fx.Node] = []  # the steady program's exchanges in flight
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        self.last_input = inputs[-1]
        self.fake_mode = detect_fake_mode([n.meta["val"] for n in inputs])

    def call(self, op, *args, **kwargs) -> fx.Node:
        node = self.graph.call_function(op, args, kwargs)
        values = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        with self.fake_mode:
            node.meta["val"] = op(*values[0], **values[1])
        return node

    def run(self) -> list:
        for node in list(self.graph.nodes):
            kind = node.meta.get("exchange")
            rewrite = {
                "halo": self._halo, "kv_gather": self._blocks, "stats_allgather": self._stats, "allreduce": self._reduce,
            }.get(kind)
            if kind == "output_gather" and self.displace_output:
                rewrite = self._blocks
            if rewrite is not None:
                with self.graph.inserting_before(node):
                    value = rewrite(kind, node)
                node.replace_all_uses_with(value)
                self.graph.erase_node(node)
        if self.tokens:
            self._join_before_output()
        return self.buffers

    def _buffers(self, x: fx.Node, send_numel: int, recv_numel: int) -> tuple[fx.Node, fx.Node]:
        val = x.meta["val"]
        nodes = []
        for role, numel in (("send", send_numel), ("recv", recv_numel)):
            with self.graph.inserting_after(self.last_input):
                self.last_input = self.graph.placeholder(f"site{len(self.buffers) // 2}_{role}")
            self.last_input.meta["exchange_buffer"] = role
            with self.fake_mode:
                self.last_input.meta["val"] = torch.empty(numel, dtype=val.dtype, device=val.device)
            self.buffers.append((numel, val.dtype, val.device))
            nodes.append(self.last_input)
        return nodes[0], nodes[1]

    def _snapshot(self, buffer: fx.Node) -> fx.Node:
        """For a read made of buffer contents alone: a plain copy would be dropped (``displaced.snapshot``)."""
        return self.call(districompile.snapshot.default, buffer)

    def _readable(self, buffer: fx.Node) -> fx.Node:
        """What a read takes of a buffer. Steady: a snapshot, so that no kernel but the snapshot reads
        the buffer. Inductor may recompute a pointwise read inside a consumer it schedules after the
        exchange op, which by then is writing the buffer: in the first compile of a process (a
        compile worker's), the corrected all-reduce's ``recv - send + x`` was recomputed so and read
        this call's half-written total. The op's ``after`` orders the read, not its recomputations."""
        return self._snapshot(buffer) if self.stale else buffer

    def _site(self, kind: str, read, exchange) -> fx.Node:
        """Warm-up: exchange, then read the fresh values. Steady: read, then exchange (after the read).

        ``read()`` writes the read and returns it: the value the exchange's consumers get, or, for
        a halo, the assembly that the program already holds (see ``_halo``); a steady exchange goes
        right after it."""
        site = len(self.buffers) // 2 - 1  # the buffers were made just before

        def start(wait: bool, after: list) -> fx.Node:
            node = exchange(wait, after)
            node.meta.update(exchange=kind, site=site)
            return node

        if self.stale:
            value = read()
            with self.graph.inserting_after(value):
                self.tokens.append(start(False, [value]))
        else:
            start(True, [])
            value = read()
        value.meta["exchange_read"] = kind
        return value

    def _halo(self, kind: str, node: fx.Node) -> fx.Node:
        """The program already packs the rows sent and assembles the halo around the exchange
        (``Emitter.fetch_rows``): the exchange goes through the buffers, and the assembly reads the
        received rows out of ``recv``. The read is that assembly, the next node tagged
        ``exchange_read`` after the exchange."""
        outgoing, shape, bounds, need_lo, need_hi, rank, pad_mode, group, _ = node.args
        plan = halo_plan(tuple(bounds), tuple(need_lo), tuple(need_hi), rank, pad_mode)
        send, recv = self._buffers(node, outgoing.meta["val"].numel(), node.meta["val"].numel())
        assembly = node.next
        while assembly.meta.get("exchange_read") != "halo":
            assert assembly.op != "output", f"{node.name}: no halo assembly follows it"
            assembly = assembly.next
        own_rows = any(source == -1 for source, _, _ in plan.segments)
        received = []

        def read():
            received.append(self._readable(recv) if own_rows else self._snapshot(recv))
            return assembly

        self._site(kind, read, lambda wait, after: self.call(
            districompile.exchange_rows.default, outgoing, send, recv, shape, bounds, need_lo, need_hi, rank, pad_mode,
            group, wait, after,
        ))
        return received[0]

    def _blocks(self, kind: str, node: fx.Node) -> fx.Node:
        """Row blocks of every rank (self-attention K/V; ``no_sync``'s output): this rank's always fresh."""
        x, bounds, rank, group, _ = node.args
        shape = list(x.meta["val"].shape)
        rows = max(row_counts(bounds))
        block = [shape[0], shape[1], rows, shape[3]]
        world = len(bounds) - 1
        send, recv = self._buffers(x, math.prod(block), world * math.prod(block))

        def read():
            blocks = chunks(self.call, self._readable(recv), [block] * world)
            blocks[rank] = x
            return join_blocks(self.call, blocks, bounds)

        return self._site(kind, read, lambda wait, after: self.call(
            districompile.exchange_blocks.default, x, send, recv, rows, group, wait, after))

    def _stats(self, kind: str, node: fx.Node) -> fx.Node:
        """Every rank's GroupNorm statistics, stacked; once stale, this rank's fresh unless ``stale``."""
        x, world, group, _ = node.args
        val = x.meta["val"]
        shape, numel = list(val.shape), val.numel()
        send, recv = self._buffers(x, numel, world * numel)
        mode = self.stats_mode if self.stale else CORRECTED  # fresh values: the same in every mode

        def read():
            if mode == SEPARATE:  # the others' statistics left out (count 0: they drop out of the merge)
                entries = [self.call(aten.full.default, shape, 0.0, dtype=val.dtype, device=val.device) for _ in range(world)]
            else:
                entries = chunks(self.call, self._readable(recv), [shape] * world)  # STALE is steady: a snapshot
            if mode != STALE:
                entries[self.rank] = x
            return self.call(aten.stack.default, entries)

        if self.stale and mode == SEPARATE:  # nothing to exchange
            value = read()
            value.meta["exchange_read"] = kind
            return value
        canonical = self.call(aten.view.default, x, [1, 1, 1, numel])
        return self._site(kind, read, lambda wait, after: self.call(
            districompile.exchange_blocks.default, canonical, send, recv, 1, group, wait, after))

    def _reduce(self, kind: str, node: fx.Node) -> fx.Node:
        """An all-reduce; once stale, the previous total, with this rank's part fresh if ``corrected``."""
        x, op, group, _ = node.args
        shape, numel = list(x.meta["val"].shape), x.meta["val"].numel()
        send, recv = self._buffers(x, numel, numel)

        def read():
            if not self.stale or self.reduce_mode != CORRECTED:
                return self.call(aten.view.default, self._snapshot(recv), shape)
            total = self.call(aten.view.default, self._snapshot(recv), shape)
            if op == "sum":  # the previous total, this rank's previous part swapped for its fresh one
                own = self.call(aten.view.default, self._snapshot(send), shape)
                return self.call(aten.add.Tensor, self.call(aten.sub.Tensor, total, own), x)
            return self.call(aten.maximum.default if op == "max" else aten.minimum.default, total, x)

        return self._site(kind, read, lambda wait, after: self.call(
            districompile.exchange_reduce.default, x, send, recv, op, group, wait, after))

    def _join_before_output(self):
        output = next(n for n in self.graph.nodes if n.op == "output")
        # Program outputs are tensors (static shapes leave no symbolic sizes to return).
        tensors = [n for n in output.all_input_nodes if isinstance(n.meta.get("val", torch.empty(0)), torch.Tensor)]
        with self.graph.inserting_before(output):
            joined = self.call(districompile.join_exchanges.default, self.tokens, tensors)
            joined.meta["exchange"] = "join"
            replacements = {node: self.call(operator.getitem, joined, i) for i, node in enumerate(tensors)}
        output.args = fx.node.map_arg(output.args, lambda n: replacements.get(n, n))
