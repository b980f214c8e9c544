"""Annotate: which inputs are spatial, and how their rows are split across the ranks.

Spatial inputs are the user's 4-d floating tensors (N, C, H, W), split along H, and the packed
tokens (B, rows * cols, C) that ``token_grids`` names, split by whole rows of their grid;
parameters, buffers, timesteps and text embeddings are replicated. The split deals out blocks of F rows,
F being the network's total downsampling, so every resolution level splits evenly and skip
connections line up without moving rows.
"""

from __future__ import annotations

import gc
import inspect
import math
import re
from fractions import Fraction

import torch
import torch.fx as fx

from ..errors import DistriCompileError, ShapeError
from ..sharding import RowSplit, Shard
from .propagate import propagate

# Where a graph saved for another process (``precompile.portable_graph``) keeps a placeholder's source.
SAVED_SOURCE = "districompile_source"


def source_name(node: fx.Node) -> str | None:
    """The Python expression Dynamo read a placeholder from, e.g. ``L['sample']``."""
    arg = node.meta.get("grapharg")
    if arg is None or arg.source is None:
        return node.meta.get(SAVED_SOURCE)
    name = arg.source.name
    return name() if callable(name) else name


def is_model_state(node: fx.Node, value) -> bool:
    """A parameter or buffer of the module (never split), as opposed to an input of the call."""
    return isinstance(value, torch.nn.Parameter) or (source_name(node) or node.name).startswith("L['self']")


def _traced_function_parameters() -> tuple[str | None, str | None, list[str]]:
    """``(*args name, **kwargs name, the parameter each of *args stands for)`` of the function
    Dynamo traced. diffusers wraps ``forward`` in ``wrapper(self, *args, **kwargs)``, so Dynamo
    sees ``args[0]`` where the model says ``sample``: the wrapped function (the one of the
    wrapper's functions whose code Dynamo inlined) names them. Only inside a backend call."""
    context = torch._guards.TracingContext.try_get()
    if context is None or not context.traced_code:
        return None, None, []
    root = context.traced_code[0]
    named = root.co_argcount + root.co_kwonlyargcount
    varargs = root.co_varnames[named] if root.co_flags & inspect.CO_VARARGS else None
    varkw = root.co_varnames[named + bool(varargs)] if root.co_flags & inspect.CO_VARKEYWORDS else None
    if varargs:
        traced = set(context.traced_code)
        for function in gc.get_referrers(root):
            inner = inspect.unwrap(function) if inspect.isfunction(function) else None
            if inspect.isfunction(inner) and inner is not function and inner.__code__ in traced:
                params = inspect.signature(inner).parameters.values()
                positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                return varargs, varkw, positional[root.co_argcount :]  # the wrapper's own (self) come first
    return varargs, varkw, []


def input_names(placeholders: list[fx.Node]) -> list[tuple[str, ...]]:
    """The names each placeholder answers to in ``spatial_inputs=``: the model's parameter name
    (``sample``), with the index or key of an element (``down_block_additional_residuals[0]``),
    and Dynamo's source (``L['args'][0]``). Only inside a backend call."""
    varargs, varkw, positional = _traced_function_parameters()
    names = []
    for node in placeholders:
        source = source_name(node)
        if source is None or not source.startswith("L["):
            names.append((node.name,))
            continue
        path = [key if key else int(index) for key, index in re.findall(r"\['([^']*)'\]|\[(\d+)\]", source)]
        if path and path[0] == varargs and len(path) > 1 and isinstance(path[1], int) and path[1] < len(positional):
            path = [positional[path[1]], *path[2:]]
        elif path and path[0] == varkw and len(path) > 1:
            path = path[1:]
        element = path[0] + "".join(f"[{key!r}]" if isinstance(key, str) else f"[{key}]" for key in path[1:])
        leaf = [path[-1]] if isinstance(path[-1], str) else []  # a dict entry's own key: text_embeds
        names.append(tuple(dict.fromkeys([str(path[0]), element, *leaf, source])))
    return names


class TokenInput(int):
    """The position of a packed-token input (..., rows * cols, C) among the graph's inputs, with its
    ``grid`` (rows, cols): tokens packed row-major, split by whole grid rows. An int wherever
    positions are used (the runtime, the batch split); ``split_rows`` reads the grid."""

    grid: tuple[int, int]

    def __new__(cls, position: int, grid: tuple[int, int]):
        token_input = super().__new__(cls, position)
        token_input.grid = grid
        return token_input

    def __getnewargs__(self):  # pickled with a precompiled model's input layout
        return int(self), self.grid


def spatial_inputs(
    dynamo_gm: fx.GraphModule, inputs: list, names: tuple[str, ...] | None, token_grids: dict[str, tuple[int, int]] | None = None,
) -> list[int]:
    """Positions of the placeholders to split: those ``names`` name, else the floating user inputs
    of 4 dims (N, C, H, W) or 5 (a video's N, C, F, H, W); and the packed-token inputs that
    ``token_grids`` name (``TokenInput``). Only inside a backend call."""
    placeholders = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    known = input_names(placeholders) if names is not None or token_grids else []
    tokens = _token_inputs(placeholders, known, inputs, token_grids or {})
    if names is None:
        positions = [
            position for position, (node, value) in enumerate(zip(placeholders, inputs))
            if isinstance(value, torch.Tensor) and value.dim() in (4, 5) and value.is_floating_point()
            and not is_model_state(node, value)
        ]
    else:
        positions = _named_positions("spatial_inputs", names, placeholders, known, inputs)
        packed = [
            f"{known[p][0]} {tuple(inputs[p].shape)}" for p in positions
            if p not in tokens and isinstance(inputs[p], torch.Tensor) and inputs[p].dim() == 3
        ]
        if packed:
            raise packed_tokens_error(packed, named=True)
    # The first is the sample the runtime watches (and the rows the others line up with): never Flux's img_ids.
    ordered = sorted({*positions, *tokens}, key=lambda position: (not has_batch(inputs[position]), position))
    return [tokens.get(position, position) for position in ordered]


def _named_positions(option: str, names, placeholders: list[fx.Node], known: list[tuple[str, ...]], inputs: list) -> list[int]:
    unknown = [name for name in names if not any(name in answers for answers in known)]
    if unknown:
        offered = [answers[0] for node, answers, value in zip(placeholders, known, inputs) if not is_model_state(node, value)]
        raise DistriCompileError(
            f"{option}={tuple(names)}: no input is named {unknown}; the inputs of this graph are "
            f"{list(dict.fromkeys(offered))} (an element of a tuple or dict argument also answers to name[index] or name['key'])"
        )
    return [position for position, answers in enumerate(known) if any(name in answers for name in names)]


def _token_inputs(placeholders, known, inputs, token_grids: dict[str, tuple[int, int]]) -> dict[int, TokenInput]:
    """The inputs ``token_grids`` names, by position, each holding rows x cols tokens in its dim -2."""
    tokens = {}
    for position in _named_positions("token_grids", tuple(token_grids), placeholders, known, inputs):
        name = next(name for name in token_grids if name in known[position])
        rows, cols = token_grids[name]
        value = inputs[position]
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[-2] != rows * cols:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise DistriCompileError(
                f"token_grids: {name} {shape} does not hold the {rows} x {cols} = {rows * cols} tokens of its grid "
                f"{(rows, cols)} in its dim -2 (tokens, then channels: (B, L, C) or Flux's img_ids (L, 3)); give the "
                "grid of image rows and columns its tokens were packed from"
            )
        tokens[position] = TokenInput(position, (rows, cols))
    return tokens


def token_sequences(dynamo_gm: fx.GraphModule, inputs: list) -> list[str]:
    """The floating user inputs of 3 dims (B, L, C), named with their shapes: token sequences, such as
    Flux's packed latent (or a text's embeddings). Only inside a backend call."""
    placeholders = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    return [
        f"{answers[0]} {tuple(value.shape)}" for node, answers, value in zip(placeholders, input_names(placeholders), inputs)
        if isinstance(value, torch.Tensor) and value.dim() == 3 and value.is_floating_point() and not is_model_state(node, value)
    ]


def packed_tokens_error(tokens: list[str], named: bool) -> DistriCompileError:
    # Splitting a token sequence by image rows needs its grid (tokens per row): a split that ignored
    # it would cut image rows apart (docs/DESIGN.md, packed-token inputs).
    what = (
        f"spatial_inputs names {', '.join(tokens)}: packed tokens (B, L, C), not a latent (N, C, H, W)" if named else
        f"no spatial input (N, C, H, W); the token sequences {', '.join(tokens)} may hold an image's packed tokens (Flux)"
    )
    return DistriCompileError(f"{what}: {PACKED_TOKENS_FIX}")


PACKED_TOKENS_FIX = (
    "to split packed tokens by image rows, name their grid of rows and columns with token_grids= "
    "(Flux: token_grids={'hidden_states': (H / 16, W / 16), 'img_ids': (H / 16, W / 16)} for an H x W image), "
    "or let districompile.parallelize(pipe) fill it in from the call's height and width"
)


_EMBEDDING_OPS = {torch.sin, torch.cos, torch.Tensor.sin, torch.Tensor.cos, "sin", "cos"}


def timestep_inputs(dynamo_gm: fx.GraphModule, inputs: list, spatial: list[int]) -> list[int]:
    """Positions of the timesteps: 0-d inputs, or 1-d ones of one value or one per sample, that
    feed a sinusoidal time embedding (a ``sin`` or ``cos`` downstream); where none does (a learned
    embedding of the raw value), the floating ones of that shape. The runtime watches them to see
    a new trajectory begin. Only inside a backend call."""
    placeholders = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    batch = {inputs[p].shape[0] for p in spatial if has_batch(inputs[p])}
    candidates = [
        position for position, (node, value) in enumerate(zip(placeholders, inputs))
        if isinstance(value, torch.Tensor) and position not in spatial and not is_model_state(node, value)
        and not value.is_complex() and (value.dim() == 0 or (value.dim() == 1 and (value.numel() == 1 or value.numel() in batch)))
    ]
    sinusoidal = [position for position in candidates if _feeds_sinusoid(placeholders[position])]
    return sinusoidal or [position for position in candidates if inputs[position].is_floating_point()]


def _feeds_sinusoid(node: fx.Node) -> bool:
    seen, frontier = {node}, [node]
    while frontier:
        users = [u for n in frontier for u in n.users if u not in seen]
        if any(u.target in _EMBEDDING_OPS for u in users if u.op in ("call_function", "call_method")):
            return True
        seen.update(users)
        frontier = users
    return False


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


def row_dim(value) -> int:
    """The rows of a spatial tensor: H of (N, C, H, W), and of a video's (N, C, F, H, W); the tokens
    (rows x columns of their grid) of packed tokens (B, L, C) and of Flux's positions ``img_ids`` (L, 3)."""
    return value.dim() - 2


def has_batch(value) -> bool:
    """Whether a spatial input's dim 0 is the batch: all but a token input with no batch (Flux's ``img_ids``)."""
    return row_dim(value) > 0


def split_rows(aten_gm: fx.GraphModule, positions: list[int], world: int) -> tuple[dict, RowSplit]:
    """The input specs of the ATen graph, with a row split every resolution level can follow.

    Spatial inputs may come at several resolutions (a UNet's skip residuals from a ControlNet,
    a ControlNet's conditioning image at 8x the latent): each is split at its own resolution, the
    rows that line up with the rank's rows of the first spatial input (the sample, by argument
    order). The returned split is the first input's.
    """
    placeholders = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    values = {p: placeholders[p].meta["val"] for p in positions}
    # A token input's rows are its grid's, each of ``cols`` tokens (the inner factor of its token dim).
    heights = {p: p.grid[0] if isinstance(p, TokenInput) else v.shape[row_dim(v)] for p, v in values.items()}
    cols = {p: p.grid[1] if isinstance(p, TokenInput) else 1 for p in positions}
    height = heights[positions[0]]
    scales = {p: Fraction(h, height) for p, h in heights.items()}
    for p, scale in scales.items():
        if scale.numerator != 1 and scale.denominator != 1:
            raise ShapeError(
                f"spatial input {placeholders[p].name} has {heights[p]} rows against {height} of "
                f"{placeholders[positions[0]].name}: not a whole multiple or fraction, so their rows cannot be "
                f"split alike; name the inputs to split with spatial_inputs="
            )
    # Inputs at 1/k of the resolution need rank bounds divisible by k.
    coarsest = math.lcm(*(scale.denominator for scale in scales.values()))
    if height % coarsest:
        raise ShapeError(f"height {height} has spatial inputs at 1/{coarsest} of its resolution; use a multiple of {coarsest}")

    # A one-rank probe finds how far the network downsamples (and where a height stops dividing).
    probe_split = RowSplit((0, height))
    probe_specs = {placeholders[p]: Shard(row_dim(values[p]), probe_split.scaled(scales[p]), inner=cols[p]) for p in positions}
    probe = propagate(aten_gm, probe_specs, 1, exchange=False)
    multiple = math.lcm(*(s.numerator for s in _downsampling(probe.specs)), coarsest)
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
    return {placeholders[p]: Shard(row_dim(values[p]), split.scaled(scales[p]), inner=cols[p]) for p in positions}, split


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
