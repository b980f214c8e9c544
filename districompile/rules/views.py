"""Views, permutations, expansion, slicing, splitting and concatenation.

The sharded rows stay one contiguous factor of one dimension; a view may merge them with
neighbouring dimensions (``outer``/``inner`` factors) but must not cut them apart. These rules
also carry joint sequences (rows with replicated flanks, ``sharding.Shard``): a ``cat`` along the
rows makes them, a ``slice`` at the flanks' edges takes them apart again.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..sharding import Replicate, Shard
from .registry import Decision, register

aten = torch.ops.aten


def _normalize(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _contiguous_strides(shape) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def view_target(spec: Shard, in_shape, out_shape) -> Shard | None:
    """Where the row factor (and its flanks) lands after viewing ``in_shape`` as ``out_shape``, if it stays whole."""
    trailing = math.prod(in_shape[spec.dim + 1 :])
    row_stride = spec.inner * trailing
    block = spec.block(spec.split.extent) * trailing
    lead, tail = spec.lead * trailing, spec.tail * trailing
    candidates = []
    for dim, (size, stride) in enumerate(zip(out_shape, _contiguous_strides(out_shape))):
        whole_units = all(n % stride == 0 for n in (row_stride, lead, tail))
        if stride <= row_stride and whole_units and (size * stride) % block == 0:
            candidates.append(Shard(dim, spec.split, size * stride // block, row_stride // stride, lead // stride, tail // stride))
    # A size-1 dimension can also "hold" the rows when it sits right next to them; prefer a real one.
    candidates.sort(key=lambda s: out_shape[s.dim] == 1)
    return candidates[0] if candidates else None


def _resolve_shape(shape, numel: int) -> list[int]:
    shape = list(shape)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = numel // known
    return shape


@register(aten.view, aten._unsafe_view, aten.reshape, aten.view_copy, flanks=True)
def view(ctx, node):
    src, shape = node.args[0], node.args[1]
    spec = ctx.spec(src)
    in_shape = ctx.shape(src)
    out_shape = _resolve_shape(shape, math.prod(in_shape))
    out = view_target(spec, in_shape, out_shape)
    if out is None:
        return None

    def emit(em, node, args, kwargs):
        # reshape, not view: a gathered or fallback input may have other strides than traced
        return em.call(aten.reshape.default, args[0], out.local_shape(out_shape, em.rank))

    return Decision(out, emit=emit)


@register(aten.permute, flanks=True)
def permute(ctx, node):
    spec = ctx.spec(node.args[0])
    dims = [_normalize(d, len(node.args[1])) for d in node.args[1]]
    return Decision(spec.with_dim(dims.index(spec.dim)))


@register(aten.transpose.int, flanks=True)
def transpose(ctx, node):
    spec = ctx.spec(node.args[0])
    ndim = len(ctx.shape(node.args[0]))
    a, b = (_normalize(d, ndim) for d in node.args[1:3])
    swap = {a: b, b: a}
    return Decision(spec.with_dim(swap.get(spec.dim, spec.dim)))


@register(aten.t, flanks=True)
def t(ctx, node):
    spec = ctx.spec(node.args[0])
    return Decision(spec.with_dim(1 - spec.dim) if len(ctx.shape(node.args[0])) == 2 else spec)


@register(aten.unsqueeze, flanks=True)
def unsqueeze(ctx, node):
    spec = ctx.spec(node.args[0])
    dim = _normalize(node.args[1], len(ctx.shape(node.args[0])) + 1)
    return Decision(spec.with_dim(spec.dim + (dim <= spec.dim)))


@register(aten.squeeze, flanks=True)
def squeeze(ctx, node):
    spec = ctx.spec(node.args[0])
    in_shape = ctx.shape(node.args[0])
    if len(node.args) > 1:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = {_normalize(d, len(in_shape)) for d in dims}
    else:
        dims = set(range(len(in_shape)))
    removed = {d for d in dims if in_shape[d] == 1}
    return Decision(spec.with_dim(spec.dim - sum(d < spec.dim for d in removed)))


@register(aten.expand, flanks=True)
def expand(ctx, node):
    src, sizes = node.args[0], list(node.args[1])
    spec = ctx.spec(src)
    out = spec.with_dim(spec.dim + len(sizes) - len(ctx.shape(src)))

    def emit(em, node, args, kwargs):
        local = list(sizes)
        if local[out.dim] != -1:
            local[out.dim] = out.local_size(em.rank)
        return em.call(node.target, args[0], local)

    return Decision(out, emit=emit)


def _covers(start, end, step, size) -> bool:
    return (start in (None, 0)) and (end is None or end >= size) and step == 1


@register(aten.slice.Tensor, flanks=True)
def slice_(ctx, node):
    src = node.args[0]
    spec = ctx.spec(src)
    ndim = len(ctx.shape(src))
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1 :])[:4]
    dim = _normalize(dim, ndim)
    if dim != spec.dim:
        return Decision(spec)
    size = ctx.shape(src)[dim]
    if _covers(start, end, step, size):
        return Decision(spec, emit=lambda em, node, args, kwargs: args[0])
    piece = _flank_piece(spec, *_clamp(start, end, size)) if step == 1 else None
    if piece is None:
        return None
    out, local_start, local_end = piece
    return Decision(out, emit=lambda em, node, args, kwargs: em.call(
        aten.slice.Tensor, args[0], spec.dim, local_start(em.rank), local_end(em.rank)))


def _clamp(start, end, size) -> tuple[int, int]:
    start, end = start or 0, size if end is None else end
    return tuple(min(max(i + size if i < 0 else i, 0), size) for i in (start, end))


def _flank_piece(spec, start: int, end: int):
    """Elements ``start:end`` of a joint sequence, cut at its flanks' edges (SD3's attention output
    into the image's tokens and the text's): ``(sharding, local start(rank), local end(rank))``. A
    piece within a flank is replicated, one around the rows keeps them (with what is left of the
    flanks). Locally the tail sits earlier by the rows the rank lacks. None: the piece cuts the rows."""
    if spec.outer != 1:
        return None
    rows_start, rows_end = spec.lead, spec.lead + spec.split.extent * spec.inner

    def missing(rank):
        return (spec.split.extent - spec.split.rows(rank)) * spec.inner

    if end <= rows_start:
        return Replicate(), lambda rank: start, lambda rank: end
    if start >= rows_end:
        return Replicate(), lambda rank: start - missing(rank), lambda rank: end - missing(rank)
    if start <= rows_start and end >= rows_end:
        out = Shard(spec.dim, spec.split, 1, spec.inner, rows_start - start, end - rows_end)
        return out, lambda rank: start, lambda rank: end - missing(rank)
    return None


@register(aten.select.int, flanks=True)
def select(ctx, node):
    spec = ctx.spec(node.args[0])
    dim = _normalize(node.args[1], len(ctx.shape(node.args[0])))
    if dim == spec.dim:
        return None
    return Decision(spec.with_dim(spec.dim - (dim < spec.dim)))


@register(aten.split.Tensor, aten.split_with_sizes, aten.unbind.int, aten.chunk, flanks=True)
def split(ctx, node):
    spec = ctx.spec(node.args[0])
    ndim = len(ctx.shape(node.args[0]))
    default_dim = 0
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", default_dim)
    if node.target == aten.unbind.int:
        dim = node.args[1] if len(node.args) > 1 else 0
    dim = _normalize(dim, ndim)
    if dim == spec.dim:
        return _split_at_flanks(spec, node) if node.target == aten.split_with_sizes.default else None
    part = spec if node.target != aten.unbind.int else spec.with_dim(spec.dim - (dim < spec.dim))
    return Decision(tuple(part for _ in node.meta["val"]))


def _split_at_flanks(spec, node):
    """A joint sequence split into its parts (Flux's attention output into the text's and the image's)."""
    ends = list(itertools.accumulate(node.args[1]))
    pieces = [_flank_piece(spec, end - size, end) for size, end in zip(node.args[1], ends)]
    if any(piece is None for piece in pieces):
        return None

    def emit(em, node, args, kwargs):
        sizes = [local_end(em.rank) - local_start(em.rank) for _, local_start, local_end in pieces]
        return em.call(aten.split_with_sizes.default, args[0], sizes, spec.dim)

    return Decision(tuple(out for out, _, _ in pieces), emit=emit)


@register(aten.cat, aten.stack, flanks=True)
def cat(ctx, node):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    ref_ndim = max(len(ctx.shape(t)) for t in tensors)
    stacking = node.target.overloadpacket == aten.stack
    out_ndim = ref_ndim + stacking
    dim = _normalize(dim, out_ndim)
    target = next(ctx.spec(t) for t in tensors if isinstance(ctx.spec(t), Shard))
    if not stacking and target.dim == dim:
        return _cat_along_rows(ctx, node, tensors)
    require = {}
    for t in tensors:
        if len(ctx.shape(t)) != ref_ndim:  # legacy empty 1-d tensors that cat skips
            require[t] = Replicate()
            continue
        require[t] = target
    out = target.with_dim(target.dim + (stacking and dim <= target.dim))
    return Decision(out, require)


def _cat_along_rows(ctx, node, tensors):
    """Replicated parts and one part's rows joined along the rows: a joint sequence, the replicated
    parts its flanks (SD3's image tokens then text tokens; IF's and Kandinsky's text K/V before the
    image's). Each rank joins its own rows with the flanks: no exchange here. Its consumers decide:
    attention keeps the queries local and gathers keys and values (the rows only, the flanks every
    rank has); a slice at a flank's edge takes the parts apart again."""
    sharded = [t for t in tensors if isinstance(ctx.spec(t), Shard)]
    if len(sharded) != 1 or ctx.spec(sharded[0]).outer != 1:
        return None  # several sharded parts would interleave their rows; outer blocks, their flanks
    (part,) = sharded
    position = tensors.index(part)
    spec = ctx.spec(part)
    lead = sum(ctx.shape(t)[spec.dim] for t in tensors[:position] if len(ctx.shape(t)) == len(ctx.shape(part)))
    tail = sum(ctx.shape(t)[spec.dim] for t in tensors[position + 1 :] if len(ctx.shape(t)) == len(ctx.shape(part)))
    return Decision(Shard(spec.dim, spec.split, 1, spec.inner, spec.lead + lead, spec.tail + tail))
