"""A restarted process compiles from Inductor's caches: the per-rank programs are plain ATen and
districompile exchange ops, compiled under a tracing context with a shape env, so AOTAutograd's
cache and Inductor's FX graph cache both key them, and a second process loads every phase
instead of compiling it.

Counted through the caches' own counters, in two fresh processes with empty cache directories of
their own: the first compiles and saves its portable cache artifacts (``districompile.warm.save``),
the second loads them (``districompile.warm.load``), as a shipped container would. The default
displaced mode: its warm-up and steady programs with their exchange ops (kept at world 1 with
``single_rank_exchanges``: one process compiles, so the test stays short on a CPU).
"""

from __future__ import annotations

import os

import torch
from dist import run_ranks
from models import micro_unet

PHASES = 2  # the warm-up and steady programs
CALLS = 3  # warm-up, then two steady calls (warmup_steps=1)


def compile_and_count(rank, world_size, cache_dir, artifacts, restart):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    from torch._dynamo.utils import counters

    from districompile import warm

    if restart:
        assert warm.load(artifacts)

    model, args, kwargs = micro_unet(batch=2)
    options = {"warmup_steps": 1, "single_rank_exchanges": True}
    compiled = torch.compile(model, backend="distri", options=options)
    with torch.no_grad():
        outputs = [compiled(*args, **kwargs) for _ in range(CALLS)]
    if not restart:
        warm.save(artifacts)
    return {
        "outputs": outputs,
        "inductor": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
        "aot": {k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")},
    }


def test_second_process_compiles_every_phase_from_the_caches(tmp_path):
    artifacts = str(tmp_path / "artifacts")
    (cold,) = run_ranks(compile_and_count, 1, str(tmp_path / "cold"), artifacts, False, timeout=600)
    (restarted,) = run_ranks(compile_and_count, 1, str(tmp_path / "restarted"), artifacts, True, timeout=600)
    assert cold["inductor"] == {"fxgraph_cache_miss": PHASES}, cold
    assert cold["aot"] == {"autograd_cache_miss": PHASES, "autograd_cache_saved": PHASES}, cold
    assert restarted["aot"] == {"autograd_cache_hit": PHASES}, restarted
    assert restarted["inductor"] == {"fxgraph_cache_hit": PHASES}, restarted
    for fresh, loaded in zip(cold["outputs"], restarted["outputs"]):
        torch.testing.assert_close(loaded, fresh, rtol=0, atol=0)


def test_programs_compile_with_static_shapes(monkeypatch):
    """The tracing context's shape env is there for the caches' keys only: no input size becomes a
    symbol (dynamic-shape kernels would be slower, and some programs fail to compile that way)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from districompile.backends.lowering import compile_program
    from districompile.config import DistriConfig

    symbols = []
    create_symbol = ShapeEnv.create_symbol
    monkeypatch.setattr(ShapeEnv, "create_symbol", lambda self, *a, **k: symbols.append(a) or create_symbol(self, *a, **k))
    # Seeded: drawn from the global generator, the inputs depended on which tests ran before, and about
    # one draw in 40 put Inductor's convolution (another summation order) just past assert_close's
    # default float32 tolerance.
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 3, 8, 8, generator=generator), torch.randn(4, 3, 3, 3, generator=generator), torch.tensor(3)]
    program = make_fx(lambda x, w, t: ((torch.nn.functional.conv2d(x, w, padding=1) * t).sum(dim=(2, 3)),))(*inputs)
    compiled = compile_program(program, inputs, DistriConfig())
    torch.testing.assert_close(compiled(*inputs)[0], program(*inputs)[0])
    assert symbols == []
