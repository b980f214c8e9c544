"""The error measures that the tests, examples and benchmarks report (docs/QUALITY.md, docs/PERFORMANCE.md)."""

from __future__ import annotations

import math

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in fp32 (outputs may be fp16)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).abs().max() / ref.abs().max()).item()


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """In dB, with the reference's range as the peak; in fp64, so that fp16 outputs lose nothing."""
    out, ref = out.double(), ref.double()
    mse = (out - ref).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10((ref.max() - ref.min()).item() ** 2 / mse)
