"""The rule registry: one sharding rule per ATen op family, as DTensor's op strategies.

A rule looks at a node's input shardings and decides (``Decision``) the sharding of its
outputs, the sharding each input must be brought to first (the partitioner inserts the
slice or gather), and, where the op needs more than a plain local call, how to emit the
per-rank code (halo exchanges, statistics all-gathers, shape constants made local).
A rule returns ``None`` when it cannot handle the case; the op then runs on gathered inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from ..sharding import Replicate, Shard, Spec


@dataclass
class Exchange:
    """One communication site of the per-rank program, for ``explain``."""

    node: str
    kind: str  # halo, kv_gather, stats_allgather, allreduce, gather, output_gather, slice
    detail: str
    bytes_per_call: int  # summed over ranks: what all ranks receive in one call
    # Where, in the model's terms (filled in by propagate): the module path, its class, the source line.
    module: str = ""
    module_type: str = ""
    source: str = ""


@dataclass
class Decision:
    out: Spec | tuple[Spec, ...]
    require: dict[fx.Node, Spec] = field(default_factory=dict)
    # emit(emitter, node, local_args, local_kwargs) -> local node; None: the same op on local args
    emit: Callable | None = None
    exchanges: list[Exchange] = field(default_factory=list)
    # What a gather of a sharded input is for: "kv_gather" for attention keys and values.
    gather_kind: str = "gather"


class RuleContext:
    """What a rule may ask about the graph during propagation."""

    def __init__(self, specs: dict[fx.Node, Spec], world: int, exchange: bool):
        self.specs = specs
        self.world = world
        # False in ``naive_patch`` mode: every op runs on its own patch, nothing exchanged.
        self.exchange = exchange

    def spec(self, arg) -> Spec:
        return self.specs.get(arg) if isinstance(arg, fx.Node) else None

    @staticmethod
    def shape(arg) -> list[int]:
        return list(arg.meta["val"].shape)

    @staticmethod
    def itemsize(arg) -> int:
        return arg.meta["val"].dtype.itemsize


Rule = Callable[[RuleContext, fx.Node], "Decision | None"]
_RULES: dict[object, Rule] = {}
_FLANK_RULES: set[Rule] = set()


def register(*targets, flanks: bool = False):
    """Register a rule for ATen overloads (or overload packets, which cover every overload).

    ``flanks``: the rule handles inputs sharded with replicated flanks (joint sequences, see
    ``sharding.Shard``); other rules never see them (``accepts_flanks``), their op is a fallback."""

    def wrap(rule: Rule) -> Rule:
        for target in targets:
            _RULES[target] = rule
        if flanks:
            _FLANK_RULES.add(rule)
        return rule

    return wrap


def accepts_flanks(rule: Rule) -> bool:
    return rule in _FLANK_RULES


def lookup(target) -> Rule | None:
    if target in _RULES:
        return _RULES[target]
    if isinstance(target, torch._ops.OpOverload):
        if target.overloadpacket in _RULES:
            return _RULES[target.overloadpacket]
        if torch.Tag.pointwise in target.tags:
            return _RULES["pointwise"]
    return None


def sharded_along_batch(spec, batch_dims: int = 1) -> bool:
    """Sharded along one of an op's ``batch_dims`` leading dimensions (e.g. N of NCHW), which the op
    computes each entry of alone: it runs on the local entries as written (the CFG batch split)."""
    return isinstance(spec, Shard) and spec.dim < batch_dims


def shard_like(spec: Shard, dim: int) -> Shard:
    return spec.with_dim(dim)


def replicate_all(node: fx.Node) -> Spec | tuple[Spec, ...]:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        return tuple(Replicate() if isinstance(v, torch.Tensor) else None for v in val)
    return Replicate() if isinstance(val, torch.Tensor) else None
