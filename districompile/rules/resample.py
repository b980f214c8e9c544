"""Resampling along the rows by whole factors: nearest needs nothing, bilinear one halo row."""

from __future__ import annotations

from fractions import Fraction

import torch

from ..collectives import PAD_REPLICATE
from ..sharding import Shard
from .conv import _spatial_shard, halo_exchange, _row_elems
from .registry import Decision, register, sharded_along_batch

aten = torch.ops.aten


def _factor(ctx, node, spec: Shard) -> int | None:
    """The whole upsampling factor along the rows, or None."""
    in_rows, out_rows = ctx.shape(node.args[0])[spec.dim], ctx.shape(node)[spec.dim]
    return out_rows // in_rows if out_rows % in_rows == 0 else None


@register(aten.upsample_nearest2d.default, aten._upsample_nearest_exact2d.default, aten.upsample_nearest1d.default)
def nearest(ctx, node):
    if sharded_along_batch(ctx.spec(node.args[0])):
        return Decision(ctx.spec(node.args[0]))
    spec = _spatial_shard(ctx, node.args[0])
    factor = _factor(ctx, node, spec) if spec else None
    if factor is None:
        return None
    out = Shard(spec.dim, spec.split.scaled(Fraction(factor)))
    axis = spec.dim - 2

    def emit(em, node, args, kwargs):
        size = list(args[1])
        size[axis] = out.local_size(em.rank)
        return em.call(node.target, args[0], size, *args[2:], **kwargs)

    return Decision(out, emit=emit)


@register(aten.upsample_bilinear2d.default)
def bilinear(ctx, node):
    x, size, align_corners = node.args[:3]
    if sharded_along_batch(ctx.spec(x)):
        return Decision(ctx.spec(x))
    spec = _spatial_shard(ctx, x)
    factor = _factor(ctx, node, spec) if spec and spec.dim == 2 else None
    if factor is None or align_corners:
        return None  # align_corners ties every output row to the global height
    out = Shard(spec.dim, spec.split.scaled(Fraction(factor)))
    split = spec.split
    # One neighbour row each side; past the image edge the row is repeated (bilinear clamps).
    need_lo = [split.start(r) - 1 for r in range(split.world)]
    need_hi = [split.stop(r) + 1 for r in range(split.world)]
    if not ctx.exchange:
        need_lo, need_hi = [split.start(r) for r in range(split.world)], [split.stop(r) for r in range(split.world)]

    def emit(em, node, args, kwargs):
        if not ctx.exchange:
            size = [out.local_size(em.rank), args[1][1]]
            return em.call(node.target, args[0], size, *args[2:])
        extended = em.fetch_rows(args[0], x, need_lo, need_hi, PAD_REPLICATE, 0.0)
        rows = split.rows(em.rank) + 2
        wide = em.call(node.target, extended, [rows * factor, args[1][1]], align_corners, *args[3:])
        return em.narrow_rows(wide, out, factor)

    exchanges = halo_exchange(node, x, spec, need_lo, need_hi, PAD_REPLICATE, ctx.itemsize(x), _row_elems(ctx.shape(x), spec))
    return Decision(out, emit=emit, exchanges=exchanges if ctx.exchange else [])
