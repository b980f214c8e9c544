"""``explain`` names exchange sites and fallbacks by the model's module paths (what Dynamo records for
each node, kept through the capture into ATen) and source lines; no process group."""

import logging

import pytest
import torch
from models import tiny_sdxl_unet
from torch import nn

import districompile

ATTN1 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"


@pytest.fixture(scope="module")
def sdxl_report():
    model, args, kwargs = tiny_sdxl_unet()
    return districompile.explain(model, *args, world_size=2, verbose=False, **kwargs)


def test_sites_are_named_by_module_path_and_source_line(sdxl_report):
    by_module = {}
    for e in sdxl_report.exchanges:
        by_module.setdefault(e.module, []).append(e)
    # The self-attention of SDXL's first transformer block gathers its keys and values, and nothing else.
    assert [(e.kind, e.module_type) for e in by_module[ATTN1]] == [("kv_gather", "Attention")] * 2
    assert all(e.source.startswith("attention_processor.py:") for e in by_module[ATTN1])
    # A ResNet's 3x3 conv needs a halo, its GroupNorm the statistics of the other ranks.
    ((conv,), (norm,)) = by_module["down_blocks.1.resnets.0.conv1"], by_module["down_blocks.1.resnets.0.norm1"]
    assert (conv.kind, conv.module_type, norm.kind, norm.module_type) == ("halo", "Conv2d", "stats_allgather", "GroupNorm")
    assert conv.source.startswith("resnet.py:")
    assert not [e for e in sdxl_report.exchanges if "L['self']" in e.module or "_modules" in e.module]


def test_report_opens_with_the_summary_and_lists_sites_on_request(sdxl_report):
    families = sdxl_report.families()
    assert list(families[("kv_gather", "Attention")]) == [
        "down_blocks.*.attentions.*.transformer_blocks.*.attn1",
        "mid_block.attentions.*.transformer_blocks.*.attn1",
        "up_blocks.*.attentions.*.transformer_blocks.*.attn1",
    ]
    assert sum(map(len, families[("halo", "Conv2d")].values())) == sdxl_report.count("halo")
    summary = sdxl_report.format()
    assert summary.splitlines()[1].startswith("per kind: halo x")
    assert "kv_gather in Attention" in summary and "stats_allgather in GroupNorm" in summary
    assert ATTN1 not in summary  # the per-site rows only on request
    sites = sdxl_report.format(sites=True)
    assert sites.startswith(summary) and "exchange sites:" in sites
    (row,) = [line for line in sites.splitlines() if line.strip().startswith(ATTN1) and " transpose_1 " in line]
    assert "kv_gather" in row and "attention_processor.py:" in row


class FlipInABlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
        self.head = Flip()

    def forward(self, x):
        return self.head(self.block(x))


class Flip(nn.Module):
    def forward(self, x):
        return torch.flip(x, dims=[2])  # no sharding rule along the rows


def test_fallback_is_named_by_module_in_report_and_log(caplog):
    with caplog.at_level(logging.WARNING, logger="districompile"):
        report = districompile.explain(FlipInABlock(), torch.randn(1, 4, 16, 8), world_size=2, verbose=False)
    (fallback,) = report.fallbacks
    assert (fallback.module, fallback.op) == ("head", "aten.flip.default")
    assert fallback.source.startswith("test_explain_names.py:")
    assert f"  head: aten.flip.default ({fallback.node}) at {fallback.source}: no sharding rule" in report.format()
    assert any("head: aten.flip.default" in record.getMessage() for record in caplog.records)
    (gather,) = [e for e in report.exchanges if e.kind == "gather"]
    assert gather.module == "head"  # the gather is for the op that needs the whole tensor


def test_names_survive_the_batch_split():
    """The half-batch program is captured and planned again; its sites keep their module paths."""
    model, args, kwargs = tiny_sdxl_unet(batch=2)
    report = districompile.explain(model, *args, world_size=4, verbose=False, **kwargs)  # two ranks per half
    assert report.batch_split
    assert {e.module for e in report.exchanges if e.kind == "halo"} >= {"conv_in", "conv_out", "down_blocks.1.resnets.0.conv1"}
