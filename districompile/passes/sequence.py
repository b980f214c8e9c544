"""Sequence: every rank issues its collectives in the order of the program.

Collectives match across ranks by order alone, but the ranks' programs differ (the edge ranks
have one neighbour, the others two), so a scheduler that reorders two independent exchanges
can reorder them differently on different ranks: a deadlock, or data delivered to the wrong
exchange. Each exchange op has an ``after`` argument; this pass puts the previous exchange's
result there, a data dependency that any schedule keeps. It runs last, on each finished
program (synchronous, warm-up or steady).
"""

from __future__ import annotations

import torch.fx as fx


def sequence_exchanges(program: fx.GraphModule) -> fx.GraphModule:
    previous = None
    for node in program.graph.nodes:
        if "exchange" not in node.meta or node.meta["exchange"] == "join":  # the join takes every token already
            continue
        *args, after = node.args
        if previous is not None:
            node.args = (*args, [*after, previous])
        previous = node
    program.recompile()
    return program
