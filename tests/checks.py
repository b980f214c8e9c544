"""Helpers shared by the tests: Dynamo's graph of a model (and that graph compiled by the distri
backend, called like the model), the exchange ops of a compiled program, halo rows packed flat.

Output errors are ``districompile.metrics``, which the examples and benchmarks report too.
"""

import torch
import torch.utils._pytree as pytree


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


def packed_flat(node) -> bool:
    """Whether ``node`` is rows packed flat by ``pack_outgoing_rows``: a ``reshape(..., [-1])``, a
    ``cat`` of such, or an empty ``full`` for a rank that sends nothing."""
    aten = torch.ops.aten
    if node.target is aten.reshape.default:
        return list(node.args[1]) == [-1]
    if node.target is aten.cat.default:
        return all(packed_flat(part) for part in node.args[0])
    return node.target is aten.full.default and list(node.args[0]) == [0]


def graph_caller(gm, inputs, args, kwargs, options):
    """A callable like the model: Dynamo's graph of it (``gm`` and ``inputs`` from
    ``dynamo_graph(model, args, kwargs)``) compiled by the distri backend with ``options``, called
    with arguments shaped like ``(args, kwargs)``, whose tensors replace the ones they stand for
    among the graph's inputs. One trace then serves several configurations (Dynamo traces a
    diffusers UNet in seconds to tens of seconds on a CPU). Returns the graph's first output; the
    callable's ``runtime`` is the backend's runtime."""
    from districompile.backends.distri import distri_backend

    example = pytree.tree_leaves((args, kwargs))
    positions = {j: i for j, leaf in enumerate(example) for i, x in enumerate(inputs) if x is leaf}
    runtime = distri_backend(gm, inputs, options)

    def call(*args, **kwargs):
        leaves = pytree.tree_leaves((args, kwargs))
        assert len(leaves) == len(example), "called with arguments shaped unlike the traced ones"
        feed = list(inputs)
        for j, leaf in enumerate(leaves):
            if leaf is not example[j]:
                assert j in positions, f"argument {j} is no input of the graph: Dynamo specialized on it"
                feed[positions[j]] = leaf
        return runtime(*feed)[0]

    call.runtime = runtime
    return call
