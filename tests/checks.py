"""Helpers shared by the tests: Dynamo's graph of a model, the exchange ops of a compiled program.

Output errors are ``districompile.metrics``, which the examples and benchmarks report too.
"""

import torch


def dynamo_graph(model, args, kwargs):
    """Dynamo's graph of ``model(*args, **kwargs)`` and its inputs (parameters included)."""
    captured = {}

    def record(gm, example_inputs):
        captured.update(gm=gm, inputs=list(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record, fullgraph=True)(*args, **kwargs)
    return captured["gm"], captured["inputs"]


def exchanges(program) -> list[tuple]:
    """``(kind, op, site, wait)`` of each exchange node of a program, in program order (site and
    wait: None for synchronous ops)."""
    rows = []
    for node in program.graph.nodes:
        if "exchange" in node.meta:
            named = dict(zip((a.name for a in node.target._schema.arguments), node.args))
            rows.append((node.meta["exchange"], str(node.target), node.meta.get("site"), named.get("wait")))
    return rows
