"""Propagate: a sharding for every node of the ATen graph, by the rule of its op family.

An op with no rule (or whose rule declines the case) that touches a sharded tensor runs on
gathered inputs: correct, slower, and listed in ``fallbacks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..rules import Decision, Exchange, RuleContext, lookup
from ..rules.registry import accepts_flanks, replicate_all
from ..sharding import Replicate, Shard, Spec
from .capture import module_path, module_type, source_line


@dataclass
class Fallback:
    node: str
    op: str
    reason: str
    module: str = ""  # the module path the op was traced in, and its source line (``passes/capture.py``)
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.module or '(model)'}: {self.op} ({self.node})"
        return where + (f" at {self.source}" if self.source else "")


@dataclass
class Propagation:
    specs: dict[fx.Node, Spec]
    decisions: dict[fx.Node, Decision]
    fallbacks: list[Fallback] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)


def op_name(node: fx.Node) -> str:
    target = node.target
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def _has_shard(spec) -> bool:
    if isinstance(spec, tuple):
        return any(isinstance(s, Shard) for s in spec)
    return isinstance(spec, Shard)


def _tensor_bytes(node: fx.Node) -> int:
    val = node.meta["val"]
    return val.numel() * val.dtype.itemsize


def _named(exchange: Exchange, node: fx.Node) -> Exchange:
    """``exchange`` named by the module that ``node`` (the op that needs it) was traced in."""
    exchange.module, exchange.module_type, exchange.source = module_path(node), module_type(node), source_line(node)
    return exchange


def _redistribution(arg: fx.Node, have: Spec, want: Spec, consumer: fx.Node, kind: str) -> Exchange | None:
    if have == want:
        return None
    if isinstance(have, Shard):  # gather (then slice again, if a different split is wanted)
        world = have.split.world
        what = f"{list(arg.meta['val'].shape)} for {consumer.name}"
        rows_bytes = _tensor_bytes(arg) * have.outer * have.split.extent * have.inner // have.global_size()  # not the flanks
        return Exchange(arg.name, kind if isinstance(want, Replicate) else "resplit", what, rows_bytes * (world - 1))
    if arg.op != "placeholder":  # a whole computed value cut to this rank's rows
        return Exchange(arg.name, "slice", f"for {consumer.name} (position-dependent value)", 0)
    return None


def propagate(gm: fx.GraphModule, input_specs: dict[fx.Node, Spec], world: int, exchange: bool = True) -> Propagation:
    specs: dict[fx.Node, Spec] = {}
    result = Propagation(specs, {})
    ctx = RuleContext(specs, world, exchange)
    seen_redistributions = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            specs[node] = input_specs.get(node, replicate_all(node))
            continue
        if node.op == "get_attr":
            specs[node] = replicate_all(node)
            continue
        if node.op == "output":
            continue
        if not any(_has_shard(specs.get(a)) for a in node.all_input_nodes):
            decision = Decision(replicate_all(node))
        else:
            rule = lookup(node.target)
            flanked = any(isinstance(specs.get(a), Shard) and specs[a].flanked for a in node.all_input_nodes)
            decision = rule(ctx, node) if rule is not None and (accepts_flanks(rule) or not flanked) else None
            if decision is None:
                reason = "no sharding rule" if rule is None else "rule cannot shard this case"
                reason += " (a joint sequence: rows with replicated flanks)" if flanked else ""
                result.fallbacks.append(Fallback(node.name, op_name(node), reason, module_path(node), source_line(node)))
                decision = Decision(
                    replicate_all(node),
                    {a: Replicate() for a in node.all_input_nodes if isinstance(specs.get(a), Shard)},
                )
        for arg, want in decision.require.items():
            key = (arg, want)
            if key in seen_redistributions:
                continue
            seen_redistributions.add(key)
            entry = _redistribution(arg, specs[arg], want, node, decision.gather_kind)
            if entry is not None:
                result.exchanges.append(_named(entry, node))
        result.exchanges.extend(_named(e, node) for e in decision.exchanges)
        result.decisions[node] = decision
        specs[node] = decision.out
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for arg in _flat_nodes(output.args):
        if isinstance(specs.get(arg), Shard):
            world = specs[arg].split.world
            result.exchanges.append(_named(
                Exchange(arg.name, "output_gather", str(list(arg.meta["val"].shape)), _tensor_bytes(arg) * (world - 1)), arg
            ))
    return result


def _flat_nodes(args) -> list[fx.Node]:
    nodes = []
    fx.node.map_arg(args, nodes.append)
    return nodes

