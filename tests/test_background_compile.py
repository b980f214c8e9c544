"""``background_compile``: the first images run the eager lowering while worker processes compile
every phase through Inductor; the Inductor phases take over at the first trajectory that begins
once every rank's workers are done, on every rank at once.

Two CPU ranks (gloo), Inductor, with empty cache directories of their own, so the workers really
compile. The same inputs on every call: each call, eager or Inductor, warm-up or steady, must equal
the uncompiled model's output (the invariant of tests/test_invariants.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from dist import _free_port, run_ranks
from models import micro_unet

import districompile
from districompile.backends.compile_workers import CompileWorker

IMAGE = 3  # calls per image: warm-up, then two steady calls (warmup_steps=1)


def images_in_background(rank, world_size, cache_dir, split_batch, host_checks, pieces):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    from torch._dynamo.utils import counters

    model, args, kwargs = micro_unet(batch=2)
    options = {
        "warmup_steps": 1, "background_compile": True, "split_batch": split_batch, "host_checks": host_checks,
        "compile_pieces": pieces,
    }
    compiled = torch.compile(model, backend="distri", options=options)

    def image():
        districompile.reset(model)
        outputs, lowerings = [], []
        for _ in range(IMAGE):
            outputs.append(compiled(*args, **kwargs))
            (trajectory,) = districompile.runtimes(model)[0].trajectories.values()
            lowerings.append(trajectory.lowering)
        return outputs, lowerings

    with torch.no_grad():
        first = image()
        districompile.finish_compiles(model)
        if rank == 1:  # this rank's workers look busy at the next trajectory's start: no rank may take over
            done = CompileWorker.done
            CompileWorker.done = lambda self, block=False: False
        held_back = image()
        if rank == 1:
            CompileWorker.done = done
        taken_over = image()
        eager = model(*args, **kwargs)
    (runtime,) = districompile.runtimes(model)
    return {
        "images": [first, held_back, taken_over],
        "eager": eager,
        "inductor": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
        "workers_started": runtime.workers_started,
        "programs": len(set(p.code for t in runtime.trajectories.values() for p in t.programs.values())),
    }


@pytest.mark.parametrize(
    "split_batch, host_checks, pieces",
    [(False, "per_call", None), (True, "per_call", None), (False, "deferred", None), (False, "per_call", 2)],
    ids=["patch", "cfg_split", "deferred", "pieces"],
)
def test_first_images_run_eager_until_every_rank_can_take_over(tmp_path, split_batch, host_checks, pieces):
    """Patch: two different phases, each a worker's; the CFG split: each rank runs its half whole
    (a patch group of one), so its two phases are one program and one worker compiles it; deferred
    host checks (``parallelize``'s), whose images begin at ``reset``; patch with each phase in two
    pieces, each a worker's."""
    results = run_ranks(images_in_background, 2, str(tmp_path / "cache"), split_batch, host_checks, pieces, timeout=900)
    units = (1 if split_batch else 2) * (pieces or 1)  # distinct ones: the CFG split's phases are one program
    for rank, run in enumerate(results):
        first, held_back, taken_over = run["images"]
        assert first[1] == held_back[1] == ["eager"] * IMAGE, (rank, run["images"])
        assert taken_over[1] == ["inductor"] * IMAGE, (rank, run["images"])
        # The rank compiled nothing itself: a worker per unit, and every unit loaded from the cache they filled.
        assert run["programs"] == (1 if split_batch else 2), run
        assert run["workers_started"] == units, run
        assert run["inductor"] == {"fxgraph_cache_hit": 2 * (pieces or 1)}, run
        for outputs, _ in run["images"]:
            for output in outputs:
                torch.testing.assert_close(output, run["eager"])


def images_with_a_graph_break(rank, world_size, cache_dir):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    from test_contract import SteppedUNet

    torch.manual_seed(0)  # the same weights and inputs on every rank
    model = SteppedUNet().eval()
    x, t = torch.randn(1, 4, 16, 8), torch.tensor(500.0)
    compiled = torch.compile(model, backend="distri", options={"warmup_steps": 1, "background_compile": True})
    lowerings, outputs = [], []
    with torch.no_grad():
        for image in range(2):
            districompile.reset(model)
            outputs += [compiled(x, t) for _ in range(IMAGE)]
            lowerings.append([trajectory.lowering for graph in districompile.runtimes(model) for trajectory in graph.trajectories.values()])
            if image == 0:
                districompile.finish_compiles(model)
        eager = model(x, t)
    return lowerings, outputs, eager


def test_each_graph_of_a_model_takes_over(tmp_path):
    """A graph break makes two graphs, each split, each with its own workers: both run eager in the
    first image, both Inductor in the next, and the model's output is the uncompiled one's."""
    for lowerings, outputs, eager in run_ranks(images_with_a_graph_break, 2, str(tmp_path / "cache"), timeout=900):
        assert lowerings == [["eager", "eager"], ["inductor", "inductor"]], lowerings
        for output in outputs:
            torch.testing.assert_close(output, eager)


def test_background_compile_needs_inductor():
    with pytest.raises(ValueError, match="background_compile.*lowering='inductor'"):
        districompile.DistriConfig(background_compile=True, lowering="eager")


def one_image_then_exit(cache_dir: str, port: int):
    """A process's whole life: one image, its phases still compiling when it exits; prints the
    workers' process ids."""
    import torch.distributed as dist

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    model, args, kwargs = micro_unet(batch=2)
    options = {"warmup_steps": 1, "background_compile": True, "single_rank_exchanges": True}
    compiled = torch.compile(model, backend="distri", options=options)
    with torch.no_grad():
        for _ in range(IMAGE):
            compiled(*args, **kwargs)
    (trajectory,) = districompile.runtimes(model)[0].trajectories.values()
    print("WORKERS", *[worker.process.pid for worker in trajectory.background.values() if not worker.done()], flush=True)
    dist.destroy_process_group()


def test_a_process_that_exits_leaves_no_compile_running(tmp_path):
    """Workers whose phases nothing will load are stopped when the process exits (they would
    otherwise hold their device memory for minutes)."""
    script = f"import test_background_compile as t; t.one_image_then_exit({str(tmp_path)!r}, {_free_port()})"
    tests = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("WORKERS")]
    workers = [int(pid) for pid in line.split()[1:]]
    assert len(workers) == 2, line  # both phases were still compiling at the exit
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
