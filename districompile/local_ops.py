"""Local computations that the partitioner writes into the per-rank program, as ATen ops.

Each takes ``call`` (``Emitter.call``: write one op, return its node). Only ATen ops and the
exchange ops go into a program: a plain Python function there would make Inductor bypass its FX
graph cache and AOTAutograd's, so a restarted process would compile every phase again.
The exchanges themselves live in ``collectives``.
"""

from __future__ import annotations

import operator

import torch

aten = torch.ops.aten


def take_rows(call, x, canonical: list[int], start: int, stop: int, local_shape: list[int]):
    """This rank's rows of a replicated tensor (the full input, a positional table); contiguous, as
    a computed local tensor would be (ATen kernels such as native_group_norm require it)."""
    rows = call(aten.slice.Tensor, call(aten.reshape.default, x, canonical), 2, start, stop)
    return call(aten.clone.default, call(aten.reshape.default, rows, local_shape), memory_format=torch.contiguous_format)


def _grouped(call, x, local_shape: list[int], groups: int):
    """``x`` as (sample, group, elements), in float32."""
    return call(aten._to_copy.default, call(aten.reshape.default, x, [local_shape[0], groups, -1]), dtype=torch.float32)


def local_group_stats(call, x, local_shape: list[int], groups: int):
    """Per (sample, group): this rank's element count, mean and sum of squared deviations, in float32.

    One pass over ``x``: ``var_mean`` is a single (Welford) reduction under Inductor, where a mean
    and then the squared deviations from it were two reductions, each reading the whole input."""
    grouped = _grouped(call, x, local_shape, groups)
    moments = call(aten.var_mean.correction, grouped, [-1], correction=0)
    variance, mean = (call(operator.getitem, moments, i) for i in range(2))
    count = torch.Size(local_shape[1:]).numel() // groups
    m2 = call(aten.mul.Tensor, variance, count)
    return call(aten.stack.default, [call(aten.full_like.default, mean, count), mean, m2], -1)


def group_norm_from_stats(
    call, x, local_shape: list[int], dtype: torch.dtype, all_stats, weight, bias, groups: int, eps: float
) -> tuple:
    """GroupNorm of ``x`` and its mean and rstd (``native_group_norm``'s three outputs) with
    statistics merged over the ranks.

    ``all_stats[r]`` is rank r's ``local_group_stats``. Merging counts, means and squared
    deviations (Chan et al.) is exact and stable, unlike E[x^2] - E[x]^2; a rank whose
    statistics are left out (count 0) drops out of the merge.
    """
    counts, means, m2s = (call(aten.select.int, all_stats, -1, i) for i in range(3))
    total = call(aten.sum.dim_IntList, counts, [0])
    mean = call(aten.div.Tensor, call(aten.sum.dim_IntList, call(aten.mul.Tensor, counts, means), [0]), total)
    spread = call(aten.sub.Tensor, means, mean)
    between = call(aten.sum.dim_IntList, call(aten.mul.Tensor, counts, call(aten.mul.Tensor, spread, spread)), [0])
    m2 = call(aten.add.Tensor, call(aten.sum.dim_IntList, m2s, [0]), between)
    rstd = call(aten.rsqrt.default, call(aten.add.Tensor, call(aten.div.Tensor, m2, total), eps))
    grouped = _grouped(call, x, local_shape, groups)
    centred = call(aten.sub.Tensor, grouped, call(aten.unsqueeze.default, mean, -1))
    normed = call(aten.reshape.default, call(aten.mul.Tensor, centred, call(aten.unsqueeze.default, rstd, -1)), local_shape)
    out = call(aten._to_copy.default, normed, dtype=dtype)
    affine_shape = [1, -1] + [1] * (len(local_shape) - 2)
    if weight is not None:
        out = call(aten.mul.Tensor, out, call(aten.reshape.default, weight, affine_shape))
    if bias is not None:
        out = call(aten.add.Tensor, out, call(aten.reshape.default, bias, affine_shape))
    return out, mean, rstd
