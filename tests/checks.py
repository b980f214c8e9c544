"""Checks shared by the tests: output errors and the exchange ops of a compiled program."""

import math

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in fp32 (outputs may be fp16)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """In dB, with the reference's range as the peak."""
    mse = (out - ref).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10((ref.max() - ref.min()).item() ** 2 / mse)


def exchanges(program) -> list[tuple]:
    """``(kind, op, site, stale)`` of each exchange node of a program, in program order."""
    rows = []
    for node in program.graph.nodes:
        if "exchange" in node.meta:
            named = dict(zip((a.name for a in node.target._schema.arguments), node.args))
            rows.append((node.meta["exchange"], str(node.target), named.get("site"), named.get("stale")))
    return rows
