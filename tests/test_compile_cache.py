"""A restarted process compiles from the caches: the per-rank programs are plain ATen and
districompile exchange ops, compiled under a tracing context with a shape env, so AOTAutograd's
cache and Inductor's FX graph cache both key them, and a second process loads every phase
instead of compiling it, and the programs themselves from the plan cache instead of planning.

Counted through the caches' own counters, in fresh processes with empty cache directories of
their own: the first compiles and saves its portable cache artifacts (``districompile.warm.save``),
the second loads them (``districompile.warm.load``), as a shipped container would. The default
displaced mode: its warm-up and steady programs with their exchange ops (kept at world 1 with
``single_rank_exchanges``: one process compiles, so the test stays short on a CPU).

With ``compile_workers``, a worker process compiles the steady phase while the rank compiles the
warm-up one, and the rank loads the steady phase from the cache entry the worker wrote.
"""

from __future__ import annotations

import logging
import os

import torch
from dist import run_ranks
from models import micro_unet

import districompile

PHASES = 2  # the warm-up and steady programs
CALLS = 3  # warm-up, then two steady calls (warmup_steps=1)


@torch.library.custom_op("districompile_tests::scaled", mutates_args=())
def scaled(t: torch.Tensor) -> torch.Tensor:
    """An op of the user's: a worker process that did not import its library cannot load the program."""
    return t * 1.0


@scaled.register_fake
def _(t):
    return torch.empty_like(t)


def compile_and_count(rank, world_size, cache_dir, artifacts, restart, workers, user_op=False, pieces=None):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    from torch._dynamo.utils import counters

    from districompile import warm

    if restart:
        assert warm.load(artifacts)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("districompile").addHandler(handler)

    model, args, kwargs = micro_unet(batch=2)
    options = {"warmup_steps": 1, "single_rank_exchanges": True, "compile_workers": workers, "compile_pieces": pieces}
    forward = model.forward
    if user_op:
        model.forward = lambda x, t: forward(x, scaled(t))
    compiled = torch.compile(model, backend="distri", options=options)
    with torch.no_grad():
        outputs = [compiled(*args, **kwargs) for _ in range(CALLS)]
        eager = model(*args, **kwargs)
    if artifacts and not restart:
        warm.save(artifacts)
    return {
        "outputs": outputs,
        "eager": eager,
        "inductor": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
        "aot": {k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")},
        "plans": dict(counters["districompile"]),
        "worker_cache_hits": sum(runtime.worker_cache_hits for runtime in districompile.runtimes(model)),
        "workers_started": sum(runtime.workers_started for runtime in districompile.runtimes(model)),
        "warnings": warnings,
    }


def test_second_process_compiles_every_phase_from_the_caches(tmp_path):
    """Cold, the steady phase is the worker's; restarted, the programs and every phase are loaded,
    and no worker is started (programs from the plan cache are a restart's)."""
    artifacts = str(tmp_path / "artifacts")
    (cold,) = run_ranks(compile_and_count, 1, str(tmp_path / "cold"), artifacts, False, True, timeout=600)
    (restarted,) = run_ranks(compile_and_count, 1, str(tmp_path / "restarted"), artifacts, True, True, timeout=600)
    assert cold["worker_cache_hits"] == cold["workers_started"] == 1, cold
    assert cold["inductor"] == {"fxgraph_cache_miss": 1, "fxgraph_cache_hit": 1}, cold
    assert cold["aot"] == {"autograd_cache_miss": 1, "autograd_cache_saved": 1, "autograd_cache_hit": 1}, cold
    assert restarted["worker_cache_hits"] == restarted["workers_started"] == 0, restarted
    assert restarted["aot"] == {"autograd_cache_hit": PHASES}, restarted
    assert restarted["inductor"] == {"fxgraph_cache_hit": PHASES}, restarted
    # The per-rank programs too: planned once, shipped in the artifacts, loaded (districompile.plan_cache).
    assert cold["plans"] == {"plan_cache_miss": 1}, cold
    assert restarted["plans"] == {"plan_cache_hit": 1}, restarted
    for run in (cold, restarted):
        assert run["warnings"] == [], run["warnings"]
    for fresh, loaded in zip(cold["outputs"], restarted["outputs"]):
        torch.testing.assert_close(loaded, fresh, rtol=0, atol=0)
        torch.testing.assert_close(fresh, cold["eager"])  # the same inputs every call: the model's output


def test_pieces_compile_in_workers_and_load_from_the_caches(tmp_path):
    """Each phase cut in 2 pieces (``passes/pieces.py``): cold, this process compiles the first
    piece and a worker each of the 3 others; restarted, all 4 are loaded and no worker starts.
    The outputs are the model's, and the same bit for bit cold and restarted."""
    artifacts, units = str(tmp_path / "artifacts"), 2 * PHASES
    (cold,) = run_ranks(compile_and_count, 1, str(tmp_path / "cold"), artifacts, False, True, False, 2, timeout=600)
    (restarted,) = run_ranks(compile_and_count, 1, str(tmp_path / "restarted"), artifacts, True, True, False, 2, timeout=600)
    assert cold["worker_cache_hits"] == cold["workers_started"] == units - 1, cold
    assert cold["inductor"] == {"fxgraph_cache_miss": 1, "fxgraph_cache_hit": units - 1}, cold
    assert restarted["worker_cache_hits"] == restarted["workers_started"] == 0, restarted
    assert restarted["inductor"] == {"fxgraph_cache_hit": units}, restarted
    assert restarted["plans"] == {"plan_cache_hit": 1}, restarted
    for run in (cold, restarted):
        assert run["warnings"] == [], run["warnings"]
    for fresh, loaded in zip(cold["outputs"], restarted["outputs"]):
        torch.testing.assert_close(loaded, fresh, rtol=0, atol=0)
        torch.testing.assert_close(fresh, cold["eager"])


def test_a_failed_worker_leaves_the_phase_to_this_process(tmp_path):
    """A program calling an op the worker cannot load (its library is imported here only): the
    worker fails, a warning says so and why, and this process compiles the phase itself."""
    (run,) = run_ranks(compile_and_count, 1, str(tmp_path / "cache"), None, False, True, True, timeout=600)
    assert run["worker_cache_hits"] == 0
    assert run["inductor"] == {"fxgraph_cache_miss": PHASES}, run
    (warning,) = run["warnings"]
    assert "worker compiling the steady phase failed" in warning and "districompile_tests" in warning, warning
    for output in run["outputs"]:  # warm-up, then steady: the same inputs, the model's output
        torch.testing.assert_close(output, run["eager"])


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


def test_a_withdrawn_worker_exits_without_compiling(tmp_path, monkeypatch):
    """A worker told it is not needed before it compiles leaves the cache as it was; one let run
    writes its phase there (so the first half observes something)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from districompile.backends.compile_workers import CompileWorker, InputSpec

    inputs = [torch.randn(4, 8)]
    program = make_fx(lambda x: (torch.sin(x) + 1,))(*inputs)

    def cache_entries(name):
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / name))
        worker = CompileWorker("the steady phase", program, [InputSpec.of(x) for x in inputs], compile_threads=1)
        worker.withdraw() if name == "withdrawn" else worker.wait()
        assert worker.process.returncode == 0
        return list((tmp_path / name).glob("fxgraph/*/*"))

    assert cache_entries("withdrawn") == []
    assert len(cache_entries("compiled")) == 1
