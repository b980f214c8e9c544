"""Normalizations: GroupNorm needs statistics over the whole image, LayerNorm over channels none."""

from __future__ import annotations

import math

import torch

from .. import local_ops
from ..sharding import Replicate, Shard
from .registry import Decision, Exchange, register, sharded_along_batch

aten = torch.ops.aten


def _contiguous(em, x):
    """native_group_norm wants a contiguous input; a local tensor's layout can differ from the
    traced one's (a patch's rows out of a permuted view). A no-op where it is contiguous already."""
    return em.call(aten.clone.default, x, memory_format=torch.contiguous_format)


@register(aten.native_group_norm)
def group_norm(ctx, node):
    x, weight, bias, n, channels, hxw, groups, eps = node.args
    spec = ctx.spec(x)
    if sharded_along_batch(spec):  # statistics are per sample: the local samples, counted locally
        return Decision((spec, spec, spec), emit=lambda em, node, args, kw: em.call(
            node.target, _contiguous(em, args[0]), *args[1:3], spec.local_size(em.rank), *args[4:]))
    if not isinstance(spec, Shard) or spec.dim < 2:
        return None
    out = (spec, Replicate(), Replicate())
    if not ctx.exchange:  # separate statistics per patch
        return Decision(out, emit=lambda em, node, args, kw: em.call(
            node.target, _contiguous(em, args[0]), *args[1:5], math.prod(em.local_shape(x)[2:]), *args[6:]))
    # One rank's statistics: (count, mean, M2) per sample and group in fp32; every rank receives the others'.
    stats_bytes = n * groups * 3 * 4

    def emit(em, node, args, kwargs):
        local_shape = em.local_shape(x)
        stats = local_ops.local_group_stats(em.call, args[0], local_shape, groups)
        every = em.all_gather_stack(stats)
        dtype = x.meta["val"].dtype
        return local_ops.group_norm_from_stats(em.call, args[0], local_shape, dtype, every, args[1], args[2], groups, eps)

    exchange = Exchange(node.name, "stats_allgather", f"{n}x{groups} groups", stats_bytes * ctx.world * (ctx.world - 1))
    return Decision(out, emit=emit, exchanges=[exchange])


# RMSNorm captures to _fused_rms_norm on CUDA (torch >= 2.8: diffusers' RMSNorm in every Flux and
# SD3 attention), to its decomposition on CPU.
@register(aten.native_layer_norm, aten._fused_rms_norm, flanks=True)
def layer_norm(ctx, node):
    """Normalized over the trailing ``normalized_shape`` dims: local when the split is outside them.
    Outputs: the result and its statistics (kept dims), all split alike."""
    x, normalized_shape = node.args[:2]
    spec = ctx.spec(x)
    if spec.dim >= len(ctx.shape(x)) - len(normalized_shape):
        return None
    return Decision(tuple(spec for _ in node.meta["val"]))
