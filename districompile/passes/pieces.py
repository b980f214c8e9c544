"""Pieces: cut a phase's program into consecutive pieces that Inductor compiles apart.

Inductor's code generation for one SDXL phase takes two minutes or more in one process, most of
it Python that holds the GIL. Cut into pieces, the phase is compiled by several processes at
once (``backends/compile_workers.py``), each piece a program of its own in Inductor's caches.
The phase then runs its compiled pieces one after another (``lowering.compile_program``), all
inside the phase's one CUDA graph.

What a cut costs at run time: Inductor cannot fuse across it, so a value computed just before it
and read just after is written to memory where it might have stayed in registers. The pass cuts
where the fewest values cross, near equal shares of the program's nodes: in a UNet, after a
block, where the skip connections and the block's output cross. The pieces keep the program's
order, so the exchanges run in the order ``sequence`` gave them, and every value that crosses is
a tensor (a multi-output op stays with the ``getitem``s that read it).

Each piece records where its inputs come from (``input_sources``): a program input by position,
or a value of an earlier piece by its ``InputSpec`` (shape, strides, dtype, device), from which a
compile worker and this process build alike example inputs, so both compile the same cache entry.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.split_module import split_module

from ..backends.compile_workers import InputSpec

# Auto mode (``compile_pieces=None``): about this many nodes a piece. Inductor spends about 17 ms
# a node (docs/PERFORMANCE.md), so SDXL's 9,850-node phase is 4 pieces of about 40 s.
NODES_PER_PIECE = 2500
# A cut goes where the fewest values cross within this share of a piece around its ideal place.
CUT_WINDOW = 0.15
PIECE_PREFIX = "piece"


def piece_count(program: fx.GraphModule, requested: int | None) -> int:
    return requested if requested is not None else max(1, math.ceil(len(program.graph.nodes) / NODES_PER_PIECE))


def split_pieces(program: fx.GraphModule, inputs: list[InputSpec], count: int) -> fx.GraphModule:
    """``program`` as ``count`` pieces (or as it is, for one): a program that calls submodules
    ``piece_0``, ``piece_1``, ... in order. ``inputs``: what the program's inputs will be."""
    nodes = list(program.graph.nodes)
    body = [i for i, node in enumerate(nodes) if node.op not in ("placeholder", "get_attr", "output")]
    if count <= 1 or len(body) < 2 * count:
        return program
    values = _values(program, inputs)
    position = {node: i for i, node in enumerate(nodes)}
    crossing, blocked = _crossings(nodes, position, values)
    cuts = []  # index of the last node of each piece but the last
    for k in range(1, count):
        ideal = body[len(body) * k // count]
        reach = max(1, int(len(body) / count * CUT_WINDOW))
        candidates = [i for i in range(ideal - reach, ideal + reach + 1) if body[0] <= i < body[-1] and not blocked[i]]
        candidates = [i for i in candidates if not cuts or i > cuts[-1]]
        if candidates:
            cuts.append(min(candidates, key=lambda i: (crossing[i], abs(i - ideal))))
    if not cuts:
        return program
    split = split_module(
        program, program, lambda node: sum(position[node] > cut for cut in cuts), keep_original_node_name=True,
        keep_original_order=True,
    )
    _rename_pieces(split)
    # A piece's inputs are named after the nodes they stand for (split_module's keep_original_input_name).
    placeholders = {node.name: i for i, node in enumerate(n for n in nodes if n.op == "placeholder")}
    for call in split.graph.find_nodes(op="call_module"):
        piece = split.get_submodule(call.target)
        inputs = piece.graph.find_nodes(op="placeholder")
        piece.input_sources = [placeholders[n.name] if n.name in placeholders else InputSpec.of(values[n.name]) for n in inputs]
        for node in inputs:  # split_module copies the producer's meta: an input is not, say, an exchange
            node.meta = {"val": values[node.name]} if node.name in values else {}
    return split


def pieces(program: fx.GraphModule) -> list[tuple[str, fx.GraphModule]]:
    """The pieces of a split program by attribute name, in the order it calls them; none for an unsplit one."""
    called = [(call.target, program.get_submodule(call.target)) for call in program.graph.find_nodes(op="call_module")]
    return [(name, piece) for name, piece in called if hasattr(piece, "input_sources")]


def piece_inputs(piece: fx.GraphModule, inputs: list) -> list:
    """Example inputs to compile ``piece`` with, given the whole program's: the program's own, and
    uninitialised tensors for the values of earlier pieces."""
    return [inputs[source] if isinstance(source, int) else source.example() for source in piece.input_sources]


def _values(program: fx.GraphModule, inputs: list[InputSpec]) -> dict[str, object]:
    """Every node's value, as a fake tensor (or what the node returns otherwise), by node name:
    those the passes left in ``meta["val"]`` (``displace`` keeps them for the nodes it adds; a
    fake-tensor propagation of an SDXL phase costs seconds), or else propagated here."""
    known = {node.name: node.meta["val"] for node in program.graph.nodes if "val" in node.meta}
    if all(node.name in known for node in program.graph.nodes if node.op != "output"):
        return known
    return _propagate(program, inputs)


def _propagate(program: fx.GraphModule, inputs: list[InputSpec]) -> dict[str, object]:
    mode = FakeTensorMode()
    with mode:
        fakes = [spec.example() for spec in inputs]
        FakeTensorProp(program, mode).propagate_dont_convert_inputs(*fakes)
    return {node.name: node.meta.get("val") for node in program.graph.nodes}


def _crossings(nodes: list[fx.Node], position: dict[fx.Node, int], values: dict) -> tuple[list[int], list[bool]]:
    """For a cut after each node: how many values computed up to it are read after it, and whether
    one of them is not a tensor (a cut there is not allowed)."""
    opened, closed, bad_opened, bad_closed = ([0] * len(nodes) for _ in range(4))
    for i, node in enumerate(nodes):
        if node.op in ("placeholder", "get_attr") or not node.users:
            continue
        last = max(position[user] for user in node.users)
        if last <= i:
            continue
        tensor = isinstance(values.get(node.name), torch.Tensor)
        (opened if tensor else bad_opened)[i] += 1
        (closed if tensor else bad_closed)[last] += 1
    crossing, blocked, live, bad = [], [], 0, 0
    for i in range(len(nodes)):
        live += opened[i] - closed[i]
        bad += bad_opened[i] - bad_closed[i]
        crossing.append(live)
        blocked.append(bad > 0)
    return crossing, blocked


def _rename_pieces(split: fx.GraphModule):
    """``submod_i`` -> ``piece_i``: names that say what they are in a printed program."""
    for call in split.graph.find_nodes(op="call_module"):
        index = call.target.removeprefix("submod_")
        name = f"{PIECE_PREFIX}_{index}"
        split.add_submodule(name, split.get_submodule(call.target))
        split.delete_submodule(call.target)
        call.target = name
        call.name = name
    split.recompile()
