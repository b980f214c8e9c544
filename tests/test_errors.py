"""Errors and fallbacks: heights that do not split, too many ranks, ops with no sharding rule,
bad options, and a compiled model called without a process group."""

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed

import districompile
from districompile import DistriCompileError, DistriConfig, ShapeError

OPTIONS = {"sync_mode": "full_sync", "lowering": "eager"}
TOLERANCE = 1e-4


class ThreeDownsamples(nn.Module):
    """Three stride-2 convolutions: every rank's rows must be a multiple of 8."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(*(nn.Conv2d(4, 4, 3, stride=2, padding=1) for _ in range(3)))

    def forward(self, x):
        return self.down(x)


class FlipRows(nn.Module):
    """``torch.flip`` along the rows: no sharding rule, so it runs on the gathered image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.flip(self.conv(x), dims=[2]))


class CumsumRows(nn.Module):
    """``torch.cumsum`` along the rows: each row depends on every row above it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.cumsum(self.conv(x), dim=2) / x.shape[2])


class FlipTokensThenMergeDims(nn.Module):
    """A fallback whose output feeds a view merging dimensions (views are re-emitted as reshapes)."""

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = torch.flip(x.flatten(2).transpose(1, 2), dims=[2])  # (B, H*W, C), channels reversed
        return tokens.transpose(1, 2).reshape(b, c * h * w).reshape(b, c, h, w)


FALLBACK_MODELS = {"flip": FlipRows, "cumsum": CumsumRows, "flip_tokens_view": FlipTokensThenMergeDims}


def build(name, height=20, width=12, batch=2):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FALLBACK_MODELS[name]().eval(), torch.randn(batch, 4, height, width)


# ----------------------------------------------------------------------------- shapes


def test_indivisible_height_names_node_multiple_and_nearest_heights():
    with pytest.raises(ShapeError) as info:
        districompile.explain(ThreeDownsamples(), torch.randn(1, 4, 60, 16), world_size=2, verbose=False)
    message = str(info.value)
    # 60 -> 30 -> 15 rows: the third stride-2 convolution gets an odd number of rows.
    assert "convolution_2" in message
    assert "blocks of 8 rows" in message
    assert "[56, 64]" in message


def test_more_ranks_than_row_blocks_is_a_shape_error():
    # Height 16 holds only two blocks of 8 rows: at most two ranks.
    with pytest.raises(ShapeError, match=r"4 ranks but height 16 has only 2 blocks of 8 rows"):
        districompile.explain(ThreeDownsamples(), torch.randn(1, 4, 16, 16), world_size=4, verbose=False)


def test_valid_height_and_world_plan_without_error():
    report = districompile.explain(ThreeDownsamples(), torch.randn(1, 4, 64, 16), world_size=4, verbose=False)
    assert report.row_bounds == (0, 16, 32, 48, 64)


# ----------------------------------------------------------------------------- fallbacks


@pytest.mark.parametrize("name, op", [("flip", "aten.flip.default"), ("cumsum", "aten.cumsum.default")])
def test_op_without_rule_is_listed_as_fallback(name, op):
    model, x = build(name)
    report = districompile.explain(model, x, world_size=2, verbose=False)
    assert [f.op for f in report.fallbacks] == [op]
    assert report.fallbacks[0].reason == "no sharding rule"
    assert report.count("gather") == 1  # its sharded input is gathered first


def _run_fallback_models(rank, world_size):
    errors = {}
    for name in FALLBACK_MODELS:
        torch._dynamo.reset()
        model, x = build(name)
        try:
            with torch.no_grad():
                ref = model(x)
                out = torch.compile(model, backend="distri", options=OPTIONS, fullgraph=True)(x)
            errors[name] = ((out - ref).abs().max() / ref.abs().max()).item()
        except Exception as exc:  # every rank fails alike: report it to the test
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


@pytest.fixture(scope="module")
def fallback_errors():
    return run_ranks(_run_fallback_models, 2)


@pytest.mark.parametrize("name", ["flip", "cumsum"])
def test_fallback_result_is_exact_on_every_rank(fallback_errors, name):
    for rank, errors in enumerate(fallback_errors):
        assert isinstance(errors[name], float) and errors[name] < TOLERANCE, f"rank {rank}: {errors[name]}"


def test_fallback_output_feeding_a_merging_view(fallback_errors):
    for rank, errors in enumerate(fallback_errors):
        error = errors["flip_tokens_view"]
        assert isinstance(error, float) and error < TOLERANCE, f"rank {rank}: {error}"


# ----------------------------------------------------------------------------- options and setup


def test_unknown_option_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sync_mod'\]"):
        DistriConfig.from_options({"sync_mod": "full_sync"})


def test_unknown_option_through_torch_compile_names_it():
    compiled = torch.compile(nn.Conv2d(4, 4, 3, padding=1), backend="distri", options={"sync_mod": "full_sync"})
    # Dynamo wraps what a backend raises, keeping it as ``inner_exception``.
    with pytest.raises(BackendCompilerFailed) as info:
        compiled(torch.randn(1, 4, 16, 16))
    inner = info.value.inner_exception
    assert isinstance(inner, ValueError)
    assert "'sync_mod'" in str(inner)


def test_bad_option_value_lists_the_choices():
    with pytest.raises(ValueError, match=r"sync_mode='fulll_sync'.*full_sync"):
        DistriConfig.from_options({"sync_mode": "fulll_sync"})


def test_compiled_model_without_process_group_says_to_init_one():
    assert not dist.is_initialized()
    compiled = torch.compile(nn.Conv2d(4, 4, 3, padding=1), backend="distri", options=OPTIONS)
    with pytest.raises(DistriCompileError, match="init_process_group"), torch.no_grad():
        compiled(torch.randn(1, 4, 16, 16))
