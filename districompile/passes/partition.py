"""Partition: write the per-rank program.

Every node becomes its local counterpart: shape constants made local, inputs sliced to this
rank's rows, explicit exchange ops where a rule asked for them, sharded outputs gathered so
every rank returns the whole result.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import local_ops
from ..collectives import (
    assemble_halo,
    chunks,
    halo_plan,
    halo_shapes,
    pack_outgoing_rows,
)
from ..sharding import Replicate, Shard, Spec
from .capture import NAMING_META
from .propagate import Propagation

aten = torch.ops.aten
districompile = torch.ops.districompile


class Emitter:
    """Builds one rank's graph; rules call it to emit local code and exchanges."""

    def __init__(self, graph: fx.Graph, specs: dict, rank: int, world: int, group: str):
        self.graph, self.specs = graph, specs
        self.rank, self.world, self.group = rank, world, group
        self.names = {}  # the module path and source line of the node being emitted, for every node written for it

    def call(self, target, *args, **kwargs) -> fx.Node:
        node = self.graph.call_function(target, tuple(args), kwargs)
        node.meta.update(self.names)
        return node

    def exchange(self, kind: str, target, *args) -> fx.Node:
        """An exchange op, tagged with its kind for the displace and sequence passes and the tests.

        Its last argument, ``after``, is left empty: ``passes/sequence.py`` fills it in."""
        node = self.call(target, *args)
        node.meta["exchange"] = kind
        return node

    def local_shape(self, node: fx.Node) -> list[int]:
        shape, spec = list(node.meta["val"].shape), self.specs[node]
        return spec.local_shape(shape, self.rank) if isinstance(spec, Shard) else shape

    def fetch_rows(self, local_x: fx.Node, x: fx.Node, need_lo, need_hi, pad_mode: int, fill: float) -> fx.Node:
        """``local_x`` extended (or trimmed) to global rows ``need_lo[rank]:need_hi[rank]``.

        Written as ATen ops around the exchange, so that Inductor sees them: the rows the other
        ranks read, packed (``pack_outgoing_rows``); the exchange (``fetch_rows``), which returns
        only the rows received; their assembly with this rank's rows and the edge padding
        (``assemble_halo``), tagged ``exchange_read`` (the displace pass finds it by the tag)."""
        spec: Shard = self.specs[x]
        val = x.meta["val"]
        shape = list(val.shape)
        canonical_shape = spec.canonical_shape(shape, spec.split.rows(self.rank))
        canonical = self.call(aten.reshape.default, local_x, canonical_shape)
        bounds, need_lo, need_hi = list(spec.split.bounds), list(need_lo), list(need_hi)
        plan = halo_plan(tuple(bounds), tuple(need_lo), tuple(need_hi), self.rank, pad_mode)
        outgoing = pack_outgoing_rows(self.call, canonical, plan, val.dtype, val.device)
        received = self.exchange(
            "halo", districompile.fetch_rows.default, outgoing, canonical_shape, bounds, need_lo, need_hi, self.rank,
            pad_mode, self.group, [],
        )
        blocks = chunks(self.call, received, halo_shapes(canonical_shape, plan.receive_rows()))
        assembled = assemble_halo(self.call, canonical, canonical_shape, plan, blocks, fill, val.dtype, val.device)
        assembled.meta["exchange_read"] = "halo"
        rows = need_hi[self.rank] - need_lo[self.rank]
        extended = list(shape)
        extended[spec.dim] = spec.outer * rows * spec.inner
        return self.call(aten.reshape.default, assembled, extended)

    def narrow_rows(self, wide: fx.Node, out: Shard, first: int) -> fx.Node:
        """Rows ``first:first + local rows`` of a locally computed (over-wide) spatial result."""
        rows = out.split.rows(self.rank)
        return self.call(aten.slice.Tensor, wide, out.dim, first, first + rows)

    def gather(self, local_x: fx.Node, x: fx.Node, kind: str) -> fx.Node:
        if self.world == 1:
            return local_x
        spec: Shard = self.specs[x]
        shape = list(x.meta["val"].shape)
        rows = spec.split.rows(self.rank)
        if spec.flanked:  # only the rows are exchanged; every rank has the flanks
            blocks = self.call(aten.reshape.default, local_x, spec.block_shape(shape, rows))
            local_x = self.call(aten.slice.Tensor, blocks, 2, spec.lead, spec.lead + rows * spec.inner)
        canonical = self.call(aten.reshape.default, local_x, spec.unflanked().canonical_shape(shape, rows))
        whole = self.exchange(kind, districompile.gather_rows.default, canonical, list(spec.split.bounds), self.rank, self.group, [])
        if spec.flanked:
            block_rows = spec.block_shape(shape, spec.split.extent)
            block_rows[2] = spec.split.extent * spec.inner
            middle = self.call(aten.reshape.default, whole, block_rows)
            tail = spec.lead + rows * spec.inner
            lead = self.call(aten.slice.Tensor, blocks, 2, 0, spec.lead)
            parts = [lead, middle, self.call(aten.slice.Tensor, blocks, 2, tail, tail + spec.tail)]
            whole = self.call(aten.cat.default, parts, 2)
        return self.call(aten.reshape.default, whole, shape)

    def take(self, whole: fx.Node, x: fx.Node, spec: Shard) -> fx.Node:
        shape = list(x.meta["val"].shape)
        split = spec.split
        if spec.flanked:  # the flanks and this rank's rows of a whole joint sequence
            blocks = self.call(aten.reshape.default, whole, spec.block_shape(shape, split.extent))
            rows = [spec.lead + split.start(self.rank) * spec.inner, spec.lead + split.stop(self.rank) * spec.inner]
            bounds = [(0, spec.lead), rows, (spec.lead + split.extent * spec.inner, spec.block(split.extent))]
            parts = [self.call(aten.slice.Tensor, blocks, 2, start, stop) for start, stop in bounds]
            return self.call(aten.reshape.default, self.call(aten.cat.default, parts, 2), spec.local_shape(shape, self.rank))
        canonical = spec.canonical_shape(shape, split.extent)
        return local_ops.take_rows(
            self.call, whole, canonical, split.start(self.rank), split.stop(self.rank), spec.local_shape(shape, self.rank)
        )

    def all_gather_stack(self, x: fx.Node) -> fx.Node:
        return self.exchange("stats_allgather", districompile.all_gather_stack.default, x, self.world, self.group, [])

    def all_reduce(self, x: fx.Node, op: str) -> fx.Node:
        return self.exchange("allreduce", districompile.all_reduce.default, x, op, self.group, [])


# Gathered and fallback results are contiguous where the traced tensor may have been a
# strided view, so views are re-emitted as reshapes (a view wherever strides allow).
_VIEWS = {aten.view.default, aten._unsafe_view.default}


def _default_emit(em: Emitter, node: fx.Node, args, kwargs) -> fx.Node:
    if node.target is operator.getitem and isinstance(args[0], tuple):  # a rule wrote a multi-output op as nodes
        return args[0][args[1]]
    target = aten.reshape.default if node.target in _VIEWS else node.target
    return em.call(target, *args, **kwargs)


def partition(
    gm: fx.GraphModule, prop: Propagation, rank: int, world: int, group: str, whole_io: bool = True
) -> fx.GraphModule:
    """``whole_io=False``: the program takes and returns only this rank's part of each sharded
    input and output (the batch split slices and gathers around it)."""
    graph = fx.Graph()
    em = Emitter(graph, prop.specs, rank, world, group)
    env: dict[fx.Node, fx.Node] = {}
    redistributed: dict[tuple[fx.Node, Spec], fx.Node] = {}

    def redistribute(arg: fx.Node, want: Spec, kind: str) -> fx.Node:
        have = prop.specs[arg]
        if have == want:
            return env[arg]
        key = (arg, want)
        if key not in redistributed:
            local = env[arg]
            kind = kind if isinstance(want, Replicate) else "resplit"
            whole = em.gather(local, arg, kind) if isinstance(have, Shard) else local
            redistributed[key] = em.take(whole, arg, want) if isinstance(want, Shard) else whole
        return redistributed[key]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            whole = graph.placeholder(node.name)
            whole.meta = dict(node.meta)
            spec = prop.specs[node]
            env[node] = em.take(whole, node, spec) if isinstance(spec, Shard) and whole_io else whole
        elif node.op == "get_attr":
            env[node] = graph.get_attr(node.target)
        elif node.op == "output":
            em.names = {}
            outputs = fx.node.map_arg(node.args[0], lambda n: redistribute(n, Replicate(), "output_gather") if isinstance(prop.specs.get(n), Shard) and whole_io else env[n])
            graph.output(outputs)
        else:
            decision = prop.decisions[node]
            # The half-batch program is captured and planned again: its nodes keep the model's names.
            em.names = {key: node.meta[key] for key in NAMING_META if key in node.meta}
            args, kwargs = fx.node.map_arg(
                (node.args, node.kwargs), lambda a: redistribute(a, decision.require.get(a, prop.specs[a]), decision.gather_kind)
            )
            env[node] = (decision.emit or _default_emit)(em, node, args, kwargs)
            if node.target is not operator.getitem and isinstance(env[node], fx.Node):
                env[node].meta["source_node"] = node.name
    graph.eliminate_dead_code()
    return fx.GraphModule(gm, graph)

