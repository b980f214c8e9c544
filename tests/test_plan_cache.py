"""The plan cache's key covers what the per-rank programs depend on, and nothing else; an entry
that cannot serve this process is planned again. (A restarted process loading every program from
the cache: ``tests/test_compile_cache.py``; the loaded programs under the invariants:
``tests/test_invariants.py``.)"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from districompile import plan_cache
from districompile.compiler import RankPrograms
from districompile.config import PROGRAM_OPTIONS, RUN_OPTIONS, DistriConfig


class Scaled(torch.nn.Module):
    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = scale

    def forward(self, x, w):
        return torch.nn.functional.conv2d(x, w, padding=1) * self.scale


def graph(scale=None) -> fx.GraphModule:
    """A graph as Dynamo gives one: weights are inputs; ``scale`` a tensor it holds as a constant."""
    return fx.symbolic_trace(Scaled(torch.tensor([2.0]) if scale is None else scale))


def inputs(height=8) -> list:
    return [torch.randn(2, 3, height, 8), torch.nn.Parameter(torch.randn(4, 3, 3, 3))]


def key(gm=None, args=None, config=DistriConfig(), rank=0, world=2, group="0") -> str | None:
    return plan_cache.key(gm if gm is not None else graph(), args if args is not None else inputs(), config, rank, world, group)


def test_every_option_is_classified():
    """An option that changes the programs must be in the key: a new one is listed on one side."""
    names = {f.name for f in dataclasses.fields(DistriConfig)}
    assert set(PROGRAM_OPTIONS) | set(RUN_OPTIONS) == names
    assert not set(PROGRAM_OPTIONS) & set(RUN_OPTIONS)


def test_the_key_changes_with_what_the_programs_depend_on():
    base = key()
    assert key() == base  # a function of its arguments only
    changed = {
        "sync_mode": key(config=DistriConfig(sync_mode="full_sync")),
        "split_batch": key(config=DistriConfig(split_batch=False)),
        "single_rank_exchanges": key(config=DistriConfig(single_rank_exchanges=True)),
        "input height": key(args=inputs(height=16)),
        "input dtype": key(args=[x.double() for x in inputs()]),
        "rank": key(rank=1),
        "world": key(world=3),
        "group": key(group="3"),
        "constant": key(gm=graph(torch.tensor([3.0]))),
        "code": key(gm=fx.symbolic_trace(lambda x, w: torch.nn.functional.conv2d(x, w, padding=1))),
    }
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed


def test_the_key_ignores_how_programs_run_and_the_weights():
    base = key()
    assert key(config=DistriConfig(host_checks="deferred", warmup_steps=1, compile_workers=False, check_ranks=False)) == base
    assert key(args=inputs()) == base  # other values, other weights: the same programs


def test_a_graph_holding_a_parameter_is_not_cached():
    assert key(gm=graph(torch.nn.Parameter(torch.tensor([2.0])))) is None
    assert key(gm=graph(torch.zeros(plan_cache.MAX_CONSTANT_BYTES // 4 + 1))) is None


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    counters["districompile"].clear()
    return tmp_path


def entry(group: str) -> RankPrograms:
    program = fx.symbolic_trace(lambda x: (x + 1,))
    return RankPrograms({"synchronous": program}, [], None, group, (0, 4, 8), ("a warning",))


def test_an_entry_loads_as_it_was_stored(cache_dir):
    stored = plan_cache.store("k", entry("0"))
    assert plan_cache.holds("k")
    loaded = plan_cache.load("k", SimpleNamespace(group_name="0"))
    assert (loaded.group, loaded.bounds, loaded.warnings) == ("0", (0, 4, 8), ("a warning",))
    assert loaded.programs["synchronous"].code == stored.programs["synchronous"].code
    assert dict(counters["districompile"]) == {"plan_cache_hit": 1}


def test_an_entry_for_another_group_is_planned_again(cache_dir):
    """Groups created in another order have other names: the cached programs would exchange over the wrong one."""
    plan_cache.store("k", entry("5"))
    assert plan_cache.load("k", SimpleNamespace(group_name="0")) is None
    assert dict(counters["districompile"]) == {"plan_cache_miss": 1}


def test_an_unreadable_entry_is_a_miss_with_a_warning(cache_dir, caplog):
    plan_cache.store("k", entry("0"))
    (path,) = (cache_dir / "districompile_plans").glob("k.pkl")
    path.write_bytes(path.read_bytes()[:20])  # cut short
    with caplog.at_level(logging.WARNING, logger="districompile"):
        assert plan_cache.load("k", SimpleNamespace(group_name="0")) is None
    assert "unreadable" in caplog.text and "planning again" in caplog.text
    assert dict(counters["districompile"]) == {"plan_cache_miss": 1}
    assert not plan_cache.holds("absent") and counters["districompile"]["plan_cache_miss"] == 2
