"""Annotate: which inputs are spatial, and how their rows are split across the ranks.

Spatial inputs are the user's 4-d floating tensors (N, C, H, W), split along H; parameters,
buffers, timesteps and text embeddings are replicated. The split deals out blocks of F rows,
F being the network's total downsampling, so every resolution level splits evenly and skip
connections line up without moving rows.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.fx as fx

from ..errors import ShapeError
from ..sharding import RowSplit, Shard
from .propagate import propagate

ROW_DIM = 2


def source_name(node: fx.Node) -> str | None:
    """The Python expression Dynamo read a placeholder from, e.g. ``L['sample']``."""
    arg = node.meta.get("grapharg")
    if arg is None or arg.source is None:
        return None
    name = arg.source.name
    return name() if callable(name) else name


def is_model_state(node: fx.Node, value) -> bool:
    """A parameter or buffer of the module (never split), as opposed to an input of the call."""
    return isinstance(value, torch.nn.Parameter) or (source_name(node) or node.name).startswith("L['self']")


def spatial_inputs(dynamo_gm: fx.GraphModule, inputs: list, names: tuple[str, ...] | None) -> list[int]:
    """Positions of the placeholders to split: ``names`` if given, else 4-d floating user inputs."""
    positions = []
    placeholders = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    for position, (node, value) in enumerate(zip(placeholders, inputs)):
        source = source_name(node) or node.name
        if names is not None:
            if any(f"['{name}']" in source or source == name for name in names):
                positions.append(position)
            continue
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point() and not is_model_state(node, value):
            positions.append(position)
    return positions


def _downsampling(specs) -> list[Fraction]:
    strides = []
    for spec in specs.values():
        for s in spec if isinstance(spec, tuple) else (spec,):
            if isinstance(s, Shard):
                strides.append(s.split.stride)
    return strides


def nearest_heights(height: int, multiple: int, world: int) -> list[int]:
    low = max(height // multiple * multiple, multiple * world)
    return sorted({low, low + multiple} - {height})


def split_rows(aten_gm: fx.GraphModule, positions: list[int], world: int) -> tuple[dict, RowSplit]:
    """The input specs of the ATen graph, with a row split every resolution level can follow."""
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    heights = {placeholders[p].meta["val"].shape[ROW_DIM] for p in positions}
    if len(heights) != 1:
        raise ShapeError(f"spatial inputs have different heights {sorted(heights)}; name the ones to split with spatial_inputs=")
    height = heights.pop()

    # A one-rank probe finds how far the network downsamples (and where a height stops dividing).
    probe_split = RowSplit((0, height))
    probe = propagate(aten_gm, {placeholders[p]: Shard(ROW_DIM, probe_split) for p in positions}, 1, exchange=False)
    multiple = math.lcm(*(s.numerator for s in _downsampling(probe.specs)), 1)
    if height % multiple:
        culprit = _first_uneven(aten_gm, probe.specs)
        raise ShapeError(
            f"{culprit}: height {height} does not split into blocks of {multiple} rows (the network downsamples "
            f"{multiple}x); each rank's rows must be a multiple of {multiple}: nearest valid heights "
            f"{nearest_heights(height, multiple, world)}"
        )
    if height // multiple < world:
        raise ShapeError(
            f"{world} ranks but height {height} has only {height // multiple} blocks of {multiple} rows "
            f"(the network downsamples {multiple}x); use at most {height // multiple} ranks or height >= {multiple * world}"
        )
    split = RowSplit.even(height, world, multiple)
    return {placeholders[p]: Shard(ROW_DIM, split) for p in positions}, split


def _first_uneven(aten_gm, specs) -> str:
    """The first node whose output rows are not its input rows divided by its stride."""
    for node in aten_gm.graph.nodes:
        spec = specs.get(node)
        first = spec[0] if isinstance(spec, tuple) else spec
        if not isinstance(first, Shard):
            continue
        for arg in node.all_input_nodes:
            before = specs.get(arg)
            if isinstance(before, Shard) and first.split.stride > before.split.stride:
                ratio = first.split.stride / before.split.stride
                if before.split.extent % ratio:
                    return f"node {node.name} ({node.target}) gets {before.split.extent} rows with stride {ratio}"
    return "the network"
