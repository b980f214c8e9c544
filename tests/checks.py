"""Checks shared by the tests: the exchange ops of a compiled program.

Output errors are ``districompile.metrics``, which the examples and benchmarks report too.
"""


def exchanges(program) -> list[tuple]:
    """``(kind, op, site, stale)`` of each exchange node of a program, in program order."""
    rows = []
    for node in program.graph.nodes:
        if "exchange" in node.meta:
            named = dict(zip((a.name for a in node.target._schema.arguments), node.args))
            rows.append((node.meta["exchange"], str(node.target), named.get("site"), named.get("stale")))
    return rows
