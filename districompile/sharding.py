"""Shardings of tensors: replicated, or split into horizontal row blocks across ranks.

A spatial tensor's rows (image height at some resolution) are split into one contiguous
block per rank. After views the rows may sit inside a merged dimension, e.g. the token
dimension H*W of a (N, H*W, C) tensor, or the N*H*W rows of a linear layer's input. So a
sharded dimension is described as three factors ``outer x rows x inner``: rank ``r`` holds
``outer * (stop_r - start_r) * inner`` elements of that dimension.

A joint sequence (SD3's image tokens then text tokens; a text's K/V then an image's) has
replicated *flanks* around the rows: each of the ``outer`` blocks of the dimension is ``lead``
elements every rank holds, the rows x inner, then ``tail`` elements every rank holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction


@dataclass(frozen=True)
class RowSplit:
    """Global row extent cut into one block per rank: ``bounds[r]:bounds[r + 1]``."""

    bounds: tuple[int, ...]
    # Cumulative downsampling from the model's input rows (2 after one stride-2 conv).
    stride: Fraction = Fraction(1)

    @property
    def world(self) -> int:
        return len(self.bounds) - 1

    @property
    def extent(self) -> int:
        return self.bounds[-1]

    def start(self, rank: int) -> int:
        return self.bounds[rank]

    def stop(self, rank: int) -> int:
        return self.bounds[rank + 1]

    def rows(self, rank: int) -> int:
        return self.bounds[rank + 1] - self.bounds[rank]

    def owner(self, row: int) -> int:
        for rank in range(self.world):
            if self.bounds[rank] <= row < self.bounds[rank + 1]:
                return rank
        raise IndexError(f"row {row} outside [0, {self.extent})")

    def scaled(self, factor: Fraction) -> RowSplit:
        """The split of a tensor whose rows are ``factor`` times as many (nearest upsampling)."""
        bounds = tuple(b * factor for b in self.bounds)
        assert all(b.denominator == 1 for b in bounds), (self, factor)
        return RowSplit(tuple(int(b) for b in bounds), self.stride / factor)

    @staticmethod
    def even(extent: int, world: int, multiple: int = 1) -> RowSplit:
        """Blocks of ``multiple`` rows dealt out as evenly as possible, earlier ranks first."""
        units = extent // multiple
        base, extra = divmod(units, world)
        bounds, row = [0], 0
        for rank in range(world):
            row += (base + (rank < extra)) * multiple
            bounds.append(row)
        bounds[-1] = extent  # rows past the last whole block go to the last rank
        return RowSplit(tuple(bounds))


@dataclass(frozen=True)
class Replicate:
    """Every rank holds the whole tensor."""

    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Shard:
    """Dimension ``dim`` is ``outer x (lead + rows x inner + tail)`` with the rows split by ``split``."""

    dim: int
    split: RowSplit
    outer: int = 1
    inner: int = 1
    lead: int = 0  # replicated flanks (joint sequences), in elements of ``dim``
    tail: int = 0

    @property
    def flanked(self) -> bool:
        return bool(self.lead or self.tail)

    def block(self, rows: int) -> int:
        """One of the ``outer`` blocks of the dimension, holding ``rows`` rows."""
        return self.lead + rows * self.inner + self.tail

    def global_size(self) -> int:
        return self.outer * self.block(self.split.extent)

    def local_size(self, rank: int) -> int:
        return self.outer * self.block(self.split.rows(rank))

    def local_shape(self, shape, rank: int) -> list[int]:
        shape = list(shape)
        shape[self.dim] = self.local_size(rank)
        return shape

    def canonical_shape(self, shape, rows: int) -> list[int]:
        """The 4-d view ``(before, outer, rows, after)`` that exchange ops work on."""
        before = math.prod(shape[: self.dim])
        assert not self.flanked, "flanked: take the rows out first (Emitter.gather)"
        after = self.inner * math.prod(shape[self.dim + 1 :])
        return [before, self.outer, rows, after]

    def block_shape(self, shape, rows: int) -> list[int]:
        """The 4-d view ``(before, outer, block, after)`` whose dim 2 holds the flanks and the rows."""
        return [math.prod(shape[: self.dim]), self.outer, self.block(rows), math.prod(shape[self.dim + 1 :])]

    def with_dim(self, dim: int) -> Shard:
        return replace(self, dim=dim)

    def unflanked(self) -> Shard:
        return replace(self, lead=0, tail=0)

    def __str__(self) -> str:
        factors = f"{self.outer}x" if self.outer != 1 else ""
        factors += f"{self.lead}+" if self.lead else ""
        factors += f"rows{list(self.split.bounds)}"
        factors += f"x{self.inner}" if self.inner != 1 else ""
        factors += f"+{self.tail}" if self.tail else ""
        return f"S({self.dim}: {factors})"


Spec = Replicate | Shard | None  # None: not a tensor


def is_sharded(spec) -> bool:
    return isinstance(spec, Shard)
