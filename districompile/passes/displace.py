"""Displace: turn a synchronous per-rank program into the warm-up or steady program of a sync mode.

Each exchange that the mode displaces becomes its ``*_displaced`` op with a site number
(the same on every rank: sites are numbered in program order) and the phase flag ``stale``.
Fallback gathers always stay synchronous: they exist for correctness. A steady program ends
in ``join_exchanges``: the exchanges it started finish within the call (behind its compute),
so no call leaves work in flight and each phase can be replayed as one CUDA graph.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx

from .. import displaced  # noqa: F401  (registers the displaced ops)
from ..displaced import CORRECTED, SEPARATE, STALE

districompile = torch.ops.districompile

# sync_mode -> (GroupNorm statistics mode, spatial reduction mode, output gather displaced?)
MODES = {
    "corrected_async_gn": (CORRECTED, CORRECTED, False),
    "stale_gn": (STALE, STALE, False),
    "separate_gn": (SEPARATE, CORRECTED, False),
    "no_sync": (STALE, STALE, True),
}


def displace(program: fx.GraphModule, sync_mode: str, state_id: int, stale: bool, rank: int) -> fx.GraphModule:
    stats_mode, reduce_mode, displace_output = MODES[sync_mode]
    gm = fx.GraphModule(program, copy.deepcopy(program.graph))
    site = 0
    for node in gm.graph.nodes:
        kind = node.meta.get("exchange")
        tail = (state_id, site, stale)
        if kind == "halo":
            node.target = districompile.fetch_rows_displaced.default
        elif kind == "kv_gather" or (kind == "output_gather" and displace_output):
            node.target = districompile.gather_rows_displaced.default
        elif kind == "stats_allgather":
            x, world, group = node.args
            node.args = (x, world, rank, group)
            node.target = districompile.all_gather_stack_displaced.default
            tail += (stats_mode,)
        elif kind == "allreduce":
            node.target = districompile.all_reduce_displaced.default
            tail += (reduce_mode,)
        else:
            continue
        node.args = tuple(node.args) + tail
        site += 1
    if stale and site:
        _join_before_output(gm.graph, state_id)
    gm.recompile()
    return gm


def _join_before_output(graph: fx.Graph, state_id: int):
    output = next(n for n in graph.nodes if n.op == "output")
    # Program outputs are tensors (static shapes leave no symbolic sizes to return).
    tensors = [n for n in output.all_input_nodes if isinstance(n.meta.get("val", torch.empty(0)), torch.Tensor)]
    if not tensors:
        return
    with graph.inserting_before(output):
        joined = graph.call_function(districompile.join_exchanges.default, (tensors, state_id))
        joined.meta["exchange"] = "join"
        replacements = {}
        for i, node in enumerate(tensors):
            replacements[node] = graph.call_function(operator.getitem, (joined, i))
    output.args = fx.node.map_arg(output.args, lambda n: replacements.get(n, n))

