"""Ops with a sliding window along the rows: convolutions, pooling, and padding.

Each rank computes the output rows whose windows are centred on its own input rows, and
fetches the rows its windows reach beyond them (the halo) from its neighbours. The halo
exchange also produces the padding at the image's real top and bottom edges, so the op
itself then runs with no padding along the rows.
"""

from __future__ import annotations

import math

import torch

from ..collectives import PAD_CONSTANT, PAD_REFLECT, PAD_REPLICATE, source_row
from ..errors import ShapeError
from ..sharding import Replicate, RowSplit, Shard
from .registry import Decision, Exchange, register, sharded_along_batch

aten = torch.ops.aten


def _spatial_shard(ctx, x) -> Shard | None:
    """The sharding of an (N, C, *spatial) input if its rows are a whole spatial dimension."""
    spec = ctx.spec(x)
    if isinstance(spec, Shard) and spec.dim >= 2 and spec.outer == 1 and spec.inner == 1:
        return spec
    return None


def _check_rows(node, bounds, what: str):
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ShapeError(
            f"{node.name} ({node.target}): {what} gives some rank no rows (row bounds {list(bounds)}); "
            "use fewer ranks or a taller image"
        )


def window_split(node, split: RowSplit, out_extent: int, kernel: int, stride: int, pad: int, dilation: int):
    """Output row blocks and the input rows each rank's windows read, ``[need_lo, need_hi)``."""
    centre = -pad + dilation * (kernel - 1) // 2  # input row under output row 0's window centre
    bounds = [0]
    for rank in range(1, split.world):
        bounds.append(min(max(math.ceil((split.start(rank) - centre) / stride), 0), out_extent))
    bounds.append(out_extent)
    _check_rows(node, bounds, f"a window of {kernel} rows with stride {stride}")
    need_lo = [stride * a - pad for a in bounds[:-1]]
    need_hi = [stride * (b - 1) - pad + dilation * (kernel - 1) + 1 for b in bounds[1:]]
    return RowSplit(tuple(bounds), split.stride * stride), need_lo, need_hi


def halo_exchange(node, x, spec: Shard, need_lo, need_hi, pad_mode: int, itemsize: int, row_elems: int) -> list[Exchange]:
    """The explain entry for a row fetch: rows each rank receives from the others."""
    received, deepest = 0, 0
    bounds = spec.split.bounds
    for rank in range(spec.split.world):
        rows = {source_row(r, bounds[-1], pad_mode) for r in range(need_lo[rank], need_hi[rank])}
        foreign = [r for r in rows if r is not None and not bounds[rank] <= r < bounds[rank + 1]]
        received += len(foreign)
        deepest = max(deepest, bounds[rank] - need_lo[rank], need_hi[rank] - bounds[rank + 1])
    if received == 0:
        return []
    return [Exchange(node.name, "halo", f"{deepest} rows", received * row_elems * itemsize)]


def _needs_fetch(spec: Shard, need_lo, need_hi) -> bool:
    return any(
        (lo, hi) != (spec.split.start(r), spec.split.stop(r)) for r, (lo, hi) in enumerate(zip(need_lo, need_hi))
    )


def _row_elems(shape, spec: Shard) -> int:
    return math.prod(shape) // shape[spec.dim]


def _windowed(ctx, node, x, kernel, stride, pad, dilation, pad_mode, fill, run_local):
    """Shared plan for conv and pooling: fetch the halo, then ``run_local(em, extended_x, args)``."""
    spec = _spatial_shard(ctx, x)
    if spec is None:
        return None
    out_shape = ctx.shape(node) if not isinstance(node.meta["val"], (list, tuple)) else list(node.meta["val"][0].shape)
    if not ctx.exchange:  # naive patches: each rank pads its own patch as if it were the image
        return _naive_window(node, spec, out_shape[spec.dim], kernel, stride, pad, dilation)
    out_split, need_lo, need_hi = window_split(node, spec.split, out_shape[spec.dim], kernel, stride, pad, dilation)
    out = Shard(spec.dim, out_split)
    exchanges = halo_exchange(node, x, spec, need_lo, need_hi, pad_mode, ctx.itemsize(x), _row_elems(ctx.shape(x), spec))

    def emit(em, node, args, kwargs):
        extended = em.fetch_rows(args[0], x, need_lo, need_hi, pad_mode, fill) if _needs_fetch(spec, need_lo, need_hi) else args[0]
        return run_local(em, node, extended, args, kwargs)

    outs = out if not isinstance(node.meta["val"], (list, tuple)) else (out, None)
    return Decision(outs, emit=emit, exchanges=exchanges)


def _naive_window(node, spec, out_extent, kernel, stride, pad, dilation):
    bounds = [0]
    for rank in range(spec.split.world):
        rows = (spec.split.rows(rank) + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        bounds.append(bounds[-1] + rows)
    if bounds[-1] != out_extent:  # the patches' outputs do not tile the image's output
        return None
    _check_rows(node, bounds, f"a window of {kernel} rows with stride {stride}")
    out = Shard(spec.dim, RowSplit(tuple(bounds), spec.split.stride * stride))
    return Decision(out if not isinstance(node.meta["val"], (list, tuple)) else (out, None))


def _with(seq, index: int, value) -> list:
    seq = list(seq)
    seq[index] = value
    return seq


@register(aten.convolution)
def convolution(ctx, node):
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = node.args
    if ctx.spec(weight) != Replicate() or isinstance(ctx.spec(bias), Shard):
        return None
    if sharded_along_batch(ctx.spec(x)):
        return Decision(ctx.spec(x))
    if _pointwise_along_rows(ctx, x, weight, stride, padding, transposed):
        return Decision(ctx.spec(x))
    spec = _spatial_shard(ctx, x)
    if spec is None:
        return None
    axis = spec.dim - 2
    kernel = ctx.shape(weight)[spec.dim]
    if transposed:
        return _conv_transpose(ctx, node, spec, axis, kernel)

    def run_local(em, node, extended, args, kwargs):
        return em.call(aten.convolution.default, extended, *args[1:4], _with(padding, axis, 0), *args[5:])

    return _windowed(ctx, node, x, kernel, stride[axis], padding[axis], dilation[axis], PAD_CONSTANT, 0.0, run_local)


def _pointwise_along_rows(ctx, x, weight, stride, padding, transposed) -> bool:
    """A kernel of 1 along the sharded dim (stride 1, no padding): each output position reads its
    own input position only, so the conv is local even where the rows are merged with other
    positions into one dim (the tokens of a guided-diffusion attention's 1x1 conv1d)."""
    spec = ctx.spec(x)
    if not isinstance(spec, Shard) or spec.dim < 2 or transposed:
        return False
    axis = spec.dim - 2
    return ctx.shape(weight)[spec.dim] == 1 and stride[axis] == 1 and padding[axis] == 0


def _conv_transpose(ctx, node, spec: Shard, axis: int, kernel: int):
    """Output row o gathers input rows i with o = i*stride - pad + dilation*t, t < kernel."""
    x, weight, bias, stride, padding, dilation, transposed, output_padding, groups = node.args
    s, p, d = stride[axis], padding[axis], dilation[axis]
    out_extent = ctx.shape(node)[spec.dim]
    if not ctx.exchange:  # naive patches: each rank transposes its own patch, padded as written
        bounds = [0]
        for rank in range(spec.split.world):
            rows = (spec.split.rows(rank) - 1) * s - 2 * p + d * (kernel - 1) + output_padding[axis] + 1
            bounds.append(bounds[-1] + rows)
        if bounds[-1] != out_extent:
            return None
        _check_rows(node, bounds, f"a transposed convolution with stride {s}")
        return Decision(Shard(spec.dim, RowSplit(tuple(bounds), spec.split.stride / s)))
    bounds = [0] + [min(s * spec.split.start(r), out_extent) for r in range(1, spec.split.world)] + [out_extent]
    _check_rows(node, bounds, f"a transposed convolution with stride {s}")
    need_lo, need_hi, first = [], [], []
    for a, b in zip(bounds, bounds[1:]):
        lo = math.ceil((a + p - d * (kernel - 1)) / s)
        hi = (b - 1 + p) // s + 1
        while (hi - 1) * s + d * (kernel - 1) + 1 < b + p:  # enough rows to reach output row b-1
            hi += 1
        need_lo.append(lo)
        need_hi.append(hi)
        first.append(a - lo * s + p)  # output row a within the local result
    out = Shard(spec.dim, RowSplit(tuple(bounds), spec.split.stride / s))
    exchanges = halo_exchange(node, x, spec, need_lo, need_hi, PAD_CONSTANT, ctx.itemsize(x), _row_elems(ctx.shape(x), spec))

    def emit(em, node, args, kwargs):
        extended = em.fetch_rows(args[0], x, need_lo, need_hi, PAD_CONSTANT, 0.0)
        full = em.call(
            aten.convolution.default, extended, *args[1:4], _with(padding, axis, 0), dilation, True,
            _with(output_padding, axis, 0), groups,
        )
        return em.narrow_rows(full, out, first[em.rank])

    return Decision(out, emit=emit, exchanges=exchanges)


def _pool_args(node, defaults):
    args = list(node.args) + list(defaults[len(node.args) - 1 :])
    return args


@register(aten.avg_pool2d)
def avg_pool2d(ctx, node):
    x, kernel, stride, padding, ceil_mode, count_include_pad, divisor = _pool_args(
        node, [None, [], [0, 0], False, True, None]
    )
    stride = stride or kernel
    if sharded_along_batch(ctx.spec(x)):
        return Decision(ctx.spec(x))
    spec = _spatial_shard(ctx, x)
    if spec is None or ceil_mode or spec.dim != 2:
        return None
    if padding[0] and not count_include_pad:  # edge windows would count fewer cells
        return None

    def run_local(em, node, extended, args, kwargs):
        return em.call(aten.avg_pool2d.default, extended, kernel, stride, [0, padding[1]], False, count_include_pad, divisor)

    return _windowed(ctx, node, x, kernel[0], stride[0], padding[0], 1, PAD_CONSTANT, 0.0, run_local)


@register(aten.max_pool2d_with_indices, aten.max_pool2d)
def max_pool2d(ctx, node):
    x, kernel, stride, padding, dilation, ceil_mode = _pool_args(node, [None, [], [0, 0], [1, 1], False])
    stride = stride or kernel
    if sharded_along_batch(ctx.spec(x)):  # indices are positions within each sample's plane
        return Decision(ctx.spec(x) if isinstance(node.meta["val"], torch.Tensor) else (ctx.spec(x),) * 2)
    spec = _spatial_shard(ctx, x)
    if spec is None or ceil_mode or spec.dim != 2:
        return None
    with_indices = node.target.overloadpacket == aten.max_pool2d_with_indices

    def run_local(em, node, extended, args, kwargs):
        # The returned indices would be local positions: the rule leaves them unavailable.
        return em.call(node.target, extended, kernel, stride, [0, padding[1]], dilation, False)

    decision = _windowed(ctx, node, x, kernel[0], stride[0], padding[0], dilation[0], PAD_CONSTANT, float("-inf"), run_local)
    if decision is not None and not with_indices:
        decision.out = decision.out[0] if isinstance(decision.out, tuple) else decision.out
    return decision


_PAD_MODES = {
    aten.constant_pad_nd: PAD_CONSTANT,
    aten.reflection_pad2d: PAD_REFLECT,
    aten.replication_pad2d: PAD_REPLICATE,
    aten.reflection_pad1d: PAD_REFLECT,
    aten.replication_pad1d: PAD_REPLICATE,
    aten.reflection_pad3d: PAD_REFLECT,
    aten.replication_pad3d: PAD_REPLICATE,
}


@register(*_PAD_MODES)
def pad(ctx, node):
    """Padding along the rows exists only at the image's edges: the first and last ranks add it."""
    x, pads = node.args[0], list(node.args[1])
    fill = float(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else 0.0
    spec = ctx.spec(x)
    ndim = len(ctx.shape(x))
    pair = ndim - 1 - spec.dim  # pads list the last dimension first, two entries each
    if not (isinstance(spec, Shard) and spec.outer == 1 and spec.inner == 1) or 2 * pair >= len(pads):
        return Decision(spec) if isinstance(spec, Shard) and spec.outer == 1 and spec.inner == 1 else None
    top, bottom = pads[2 * pair], pads[2 * pair + 1]
    split = spec.split
    if not ctx.exchange:  # naive patches: every patch is padded as if it were the image
        bounds = [0]
        for rank in range(split.world):
            bounds.append(bounds[-1] + split.rows(rank) + top + bottom)
        return Decision(Shard(spec.dim, RowSplit(tuple(bounds), split.stride)))
    pad_mode = _PAD_MODES[node.target.overloadpacket]
    bounds = [0] + [b + top for b in split.bounds[1:-1]] + [split.extent + top + bottom]
    out = Shard(spec.dim, RowSplit(tuple(bounds), split.stride))
    need_lo = [split.start(r) - (top if r == 0 else 0) for r in range(split.world)]
    need_hi = [split.stop(r) + (bottom if r == split.world - 1 else 0) for r in range(split.world)]
    other_pads = _with(_with(pads, 2 * pair, 0), 2 * pair + 1, 0)

    def emit(em, node, args, kwargs):
        extended = em.fetch_rows(args[0], x, need_lo, need_hi, pad_mode, fill)
        if not any(other_pads):
            return extended
        return em.call(node.target, extended, other_pads, *args[2:])

    exchanges = halo_exchange(node, x, spec, need_lo, need_hi, pad_mode, ctx.itemsize(x), _row_elems(ctx.shape(x), spec))
    return Decision(out, emit=emit, exchanges=exchanges)
