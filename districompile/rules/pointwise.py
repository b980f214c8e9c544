"""Elementwise ops, ops that keep their input's layout, and tuple indexing."""

from __future__ import annotations

import operator

import torch

from ..sharding import Replicate, Shard
from .registry import Decision, register, replicate_all

aten = torch.ops.aten


def _broadcast_operands(ctx, node, out_ndim: int):
    """The output sharding of a broadcasting op and the sharding each tensor operand needs."""
    tensors = [a for a in node.all_input_nodes if ctx.spec(a) is not None]
    target = None
    for arg in tensors:
        spec = ctx.spec(arg)
        if isinstance(spec, Shard):
            target = spec.with_dim(spec.dim + out_ndim - len(ctx.shape(arg)))
            break
    if target is None:
        return None, {}
    require = {}
    for arg in tensors:
        dim = target.dim - (out_ndim - len(ctx.shape(arg)))
        broadcast = dim < 0 or ctx.shape(arg)[dim] == 1
        require[arg] = Replicate() if broadcast else target.with_dim(dim)
    return target, require


@register("pointwise", flanks=True)
def pointwise(ctx, node):
    val = node.meta["val"]
    if not isinstance(val, torch.Tensor):
        return None
    out, require = _broadcast_operands(ctx, node, val.dim())
    return Decision(out or Replicate(), require)


@register(aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, flanks=True)
def where(ctx, node):
    return pointwise(ctx, node)


@register(
    aten.clone,
    aten._to_copy,
    aten.alias,
    aten.detach,
    aten.lift_fresh_copy,
    aten.contiguous,
    aten.zeros_like,
    aten.ones_like,
    aten.empty_like,
    aten.full_like,
    aten.rand_like,
    aten.randn_like,
    aten.native_dropout,
    flanks=True,
)
def same_layout(ctx, node):
    spec = ctx.spec(node.args[0])
    val = node.meta["val"]
    if isinstance(val, (list, tuple)):  # native_dropout: (out, mask)
        return Decision((spec, spec))
    return Decision(spec)


@register(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, aten.new_empty_strided, flanks=True)
def new_tensor(ctx, node):
    # The size argument is explicit, so the result is a whole (replicated) tensor; the input
    # lends only its dtype and device. Where it meets a sharded tensor it is sliced.
    return Decision(Replicate())


@register(operator.getitem, flanks=True)
def getitem(ctx, node):
    source, index = node.args
    spec = ctx.spec(source)
    if isinstance(spec, tuple):
        return Decision(spec[index])
    return Decision(replicate_all(node))
