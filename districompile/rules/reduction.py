"""Reductions: over the rows they become a local reduction plus an all-reduce."""

from __future__ import annotations

import math

import torch

from ..sharding import Replicate
from .registry import Decision, Exchange, register, sharded_along_batch

aten = torch.ops.aten


def all_reduce_exchange(node) -> Exchange:
    val = node.meta["val"]
    return Exchange(node.name, "allreduce", str(list(val.shape)), val.numel() * val.dtype.itemsize)


def _dims(node, ndim: int) -> list[int]:
    dims = node.args[1] if len(node.args) > 1 and node.args[1] is not None else list(range(ndim))
    dims = [dims] if isinstance(dims, int) else dims
    return sorted({d % ndim for d in dims}) or list(range(ndim))


_COMBINE = {aten.sum: "sum", aten.mean: "sum", aten.amax: "max", aten.amin: "min"}


@register(
    aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.sum.default, aten.mean.default, flanks=True
)
def reduce(ctx, node):
    x = node.args[0]
    spec = ctx.spec(x)
    ndim = len(ctx.shape(x))
    dims = _dims(node, ndim) if node.target not in (aten.sum.default, aten.mean.default) else list(range(ndim))
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if spec.dim not in dims:
        return Decision(spec.with_dim(spec.dim if keepdim else spec.dim - sum(d < spec.dim for d in dims)))
    if spec.flanked:
        return None  # every rank would add the replicated flanks into the total
    if not ctx.exchange:
        return Decision(Replicate())
    packet = node.target.overloadpacket
    combine = _COMBINE[packet]
    count = math.prod(ctx.shape(x)[d] for d in dims)

    def emit(em, node, args, kwargs):
        if packet == aten.mean:  # sum the local parts, divide by the global count
            total = em.call(aten.sum.dim_IntList, args[0], dims, keepdim, dtype=kwargs.get("dtype"))
            return em.call(aten.div.Tensor, em.all_reduce(total, "sum"), count)
        return em.all_reduce(em.call(node.target, *args, **kwargs), combine)

    return Decision(Replicate(), emit=emit, exchanges=[all_reduce_exchange(node)])


@register(aten._adaptive_avg_pool2d)
def adaptive_avg_pool(ctx, node):
    x, size = node.args[:2]
    spec = ctx.spec(x)
    if sharded_along_batch(spec):
        return Decision(spec)
    if list(size) != [1, 1] or spec.dim != 2:
        return None
    if not ctx.exchange:
        return Decision(Replicate())
    count = ctx.shape(x)[2] * ctx.shape(x)[3]

    def emit(em, node, args, kwargs):
        total = em.call(aten.sum.dim_IntList, args[0], [2, 3], True)
        return em.call(aten.div.Tensor, em.all_reduce(total, "sum"), count)

    return Decision(Replicate(), emit=emit, exchanges=[all_reduce_exchange(node)])
