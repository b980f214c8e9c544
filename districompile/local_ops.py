"""Local computations that the partitioner emits into the per-rank program.

Plain functions of tensors: the eager lowering calls them, Inductor traces through them.
The exchanges themselves live in ``collectives``.
"""

from __future__ import annotations

import torch


def take_rows(x: torch.Tensor, canonical: list[int], start: int, stop: int, local_shape: list[int]) -> torch.Tensor:
    """This rank's rows of a replicated tensor (the full input, a positional table); contiguous, as
    a computed local tensor would be (ATen kernels such as native_group_norm require it)."""
    return x.reshape(canonical)[:, :, start:stop].reshape(local_shape).contiguous()


def local_group_stats(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Per (sample, group): this rank's element count, mean and sum of squared deviations, in float32."""
    grouped = x.reshape(x.shape[0], groups, -1).float()
    mean = grouped.mean(-1)
    m2 = ((grouped - mean.unsqueeze(-1)) ** 2).sum(-1)
    return torch.stack([torch.full_like(mean, grouped.shape[-1]), mean, m2], -1)


def group_norm_from_stats(
    x: torch.Tensor,
    all_stats: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    groups: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm of ``x`` (and its mean and rstd) with statistics merged over the ranks.

    ``all_stats[r]`` is rank r's ``local_group_stats``. Merging counts, means and squared
    deviations (Chan et al.) is exact and stable, unlike E[x^2] - E[x]^2; a rank whose
    statistics are left out (count 0) drops out of the merge.
    """
    n, means, m2s = all_stats.unbind(-1)
    total = n.sum(0)
    mean = (n * means).sum(0) / total
    m2 = m2s.sum(0) + (n * (means - mean) ** 2).sum(0)
    rstd = torch.rsqrt(m2 / total + eps)
    return apply_group_norm(x, mean, rstd, weight, bias, groups), mean, rstd


def apply_group_norm(x, mean, rstd, weight, bias, groups: int) -> torch.Tensor:
    grouped = x.reshape(x.shape[0], groups, -1).float()
    out = ((grouped - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(x.shape).to(x.dtype)
    affine_shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        out = out * weight.reshape(affine_shape)
    if bias is not None:
        out = out + bias.reshape(affine_shape)
    return out

