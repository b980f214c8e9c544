"""Invariants of every mode, across lowerings, batch sizes, batch splits and worlds.

Called with the same inputs every time, a model's steady calls read stale values that equal the
fresh ones (the neighbours' values of the previous call are this call's), so:

- every call of a displaced mode that reads only stale values (``corrected_async_gn``,
  ``stale_gn``, ``no_sync``) equals ``full_sync``;
- ``separate_gn`` equals ``full_sync`` in its warm-up; its steady calls (GroupNorm on this rank's
  statistics only, the rest stale) change from call to call, the same under both lowerings;
- ``full_sync`` equals one process; ``naive_patch`` returns the same on every call;
- every rank returns the same (whole) output.

These hold for any correct implementation, whatever its schedule: the displaced steady phase
under Inductor broke the first one (issue 10: Inductor reused the memory of a tensor that an
exchange was still sending). One spawn per world traces each model once with Dynamo and
compiles every configuration of that graph through the backend; the tests check the
outputs. Under Inductor the configurations that share programs (same mode, other ways to run it)
load them from the plan cache, so the invariants cover planned and loaded programs alike. Inductor compiles every kernel of a program with a C++ compiler, seconds each on a CPU:
its cases use the smallest models, and each world covers a batch kind once (see ``RUNS``).
"""

import os

import pytest
import torch
from checks import dynamo_graph
from torch._dynamo.utils import counters
from dist import run_ranks
from models import as_tensor, micro_sd_unet, micro_sdxl_unet, micro_unet

from districompile import DistriCompileError
from districompile.backends.distri import distri_backend
from districompile.metrics import relative_error
from districompile.passes.pieces import pieces
from districompile.runtime import settle_checks

EXACT = 1e-5  # fp32: a different program (fusions, summation order) for the same function
ONE_PROCESS = 1e-4  # the tolerance of the other full_sync tests
WARMUP, CALLS = 2, 5  # two warm-up calls, then three steady ones: the second reads what the first sent
STALE_ONLY = ("corrected_async_gn", "stale_gn", "no_sync")
INDUCTOR_ONLY = ("compile_workers", "compile_pieces")
DEFAULT_PROGRAMS = ("deferred_checks",)  # corrected_async_gn's programs, run another way
ALL_MODES = {
    "full_sync": {"sync_mode": "full_sync"},
    # The default mode, its steady phase compiled in a process of its own (a compile worker), as
    # SDXL's is, and before the same program is in the cache: there, in the first compile of its
    # process, Inductor once recomputed a read of the buffers after the exchange had begun.
    "compile_workers": {"sync_mode": "corrected_async_gn", "compile_workers": True},
    # The same, each phase cut in pieces compiled by workers of their own and run one after another
    # (SDXL's phases are 4 pieces each).
    "compile_pieces": {"sync_mode": "corrected_async_gn", "compile_workers": True, "compile_pieces": 2},
    # The default mode as parallelize(pipe) runs it: the ranks' device rows read a call late, so
    # the host queues calls without waiting (its compiled programs are corrected_async_gn's).
    "deferred_checks": {"sync_mode": "corrected_async_gn", "host_checks": "deferred"},
    **{mode: {"sync_mode": mode} for mode in (*STALE_ONLY, "separate_gn")},
    "naive_patch": {"parallelism": "naive_patch"},
}
MODELS = {"micro": micro_unet, "micro_sdxl": micro_sdxl_unet, "micro_sd": micro_sd_unet}
# (batch, split_batch) per world: a batch of 2 splits (CFG) on an even world only.
BATCHES = {2: ((1, False), (2, False), (2, True)), 3: ((1, False), (2, False))}
# What each spawn runs: (lowering, model) -> (its batches per world, its modes). Eager: our micro
# UNet (einsum attention, a spatial mean) in every configuration, and SDXL's layout at its smallest
# (diffusers' SDPA attention, two resolutions) in every one but a world of 3 at batch 1, which the
# micro UNet covers. Inductor: the micro UNet in every mode, once per batch kind: a batch of 1 and
# the CFG split of a batch of 2 at world 2 (each rank then runs its half of the batch whole), an
# unsplit batch of 2 at world 3 (an interior rank); and the smallest diffusers UNet
# in the default configuration (batch 2 unsplit, corrected_async_gn), with full_sync and
# naive_patch (which refuses the micro UNet's einsum attention).
RUNS = {
    ("eager", "micro"): (BATCHES, tuple(m for m in ALL_MODES if m not in INDUCTOR_ONLY)),
    ("eager", "micro_sdxl"): ({2: BATCHES[2], 3: ((2, False),)}, tuple(m for m in ALL_MODES if m not in INDUCTOR_ONLY)),
    ("inductor", "micro"): ({2: ((1, False), (2, True)), 3: ((2, False),)}, tuple(ALL_MODES)),
    ("inductor", "micro_sd"): ({2: ((2, False),)}, ("full_sync", "corrected_async_gn", "naive_patch")),
}


def _run(rank, world, cache_dir):
    """``{(lowering, model, batch, split, mode): result}`` and ``{(model, batch): one process's output}``.

    A result holds the outputs of ``CALLS`` calls with the same inputs and the calls per phase,
    or the ``DistriCompileError`` a mode refuses the model with."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # Inductor's caches empty: every program compiles
    results, references = {}, {}
    for (lowering, name), (batches, modes) in RUNS.items():
        for batch, split in batches.get(world, ()):
            model, args, kwargs = MODELS[name](batch=batch)
            with torch.no_grad():
                references[name, batch] = as_tensor(model(*args, **kwargs))
                gm, inputs = dynamo_graph(model, args, kwargs)
                for mode in modes:
                    options = {**ALL_MODES[mode], "lowering": lowering, "split_batch": split, "warmup_steps": WARMUP}
                    runtime = distri_backend(gm, inputs, options)
                    counters["districompile"].clear()
                    try:
                        outputs = [runtime(*inputs)[0] for _ in range(CALLS)]
                        for model_runtime in runtime.served:
                            settle_checks(model_runtime)  # the last call's deferred checks: ranks that disagreed raise
                    except DistriCompileError as error:
                        results[lowering, name, batch, split, mode] = {"refused": str(error)}
                        continue
                    (trajectory,) = runtime.trajectories.values()
                    results[lowering, name, batch, split, mode] = {
                        "outputs": outputs, "phases": trajectory.phase_calls, "split": trajectory.batch_split is not None,
                        "plans": dict(counters["districompile"]),
                        "pieces": {phase: len(pieces(program)) for phase, program in trajectory.programs.items()},
                    }
    return results, references


@pytest.fixture(scope="module", params=sorted(BATCHES), ids=lambda world: f"world{world}")
def ranks(request, tmp_path_factory):
    """``(world, per-rank results)``."""
    return request.param, run_ranks(_run, request.param, str(tmp_path_factory.mktemp("inductor")), timeout=1500.0)


def cases(ranks, mode):
    """``(model, label, result, full_sync result, one process's output)`` per rank and configuration run with ``mode``."""
    world, per_rank = ranks
    for rank, (results, references) in enumerate(per_rank):
        for (lowering, name, batch, split, case_mode), result in results.items():
            if case_mode == mode:
                label = f"world {world} rank {rank}: {lowering} {name} batch {batch} split_batch={split} {mode}"
                full_sync = results[lowering, name, batch, split, "full_sync"]
                yield name, label, result, full_sync, references[name, batch]


def test_full_sync_equals_one_process(ranks):
    for _, label, result, _, reference in cases(ranks, "full_sync"):
        for call, out in enumerate(result["outputs"]):
            assert relative_error(out, reference) < ONE_PROCESS, f"{label}, call {call}"
        assert result["phases"] == {"synchronous": CALLS}, label


@pytest.mark.parametrize("mode", STALE_ONLY + INDUCTOR_ONLY + DEFAULT_PROGRAMS)
def test_every_call_equals_full_sync(ranks, mode):
    for _, label, result, full_sync, _ in cases(ranks, mode):
        assert result["phases"] == {"warm-up": WARMUP, "steady": CALLS - WARMUP}, label
        for call, out in enumerate(result["outputs"]):
            assert relative_error(out, full_sync["outputs"][0]) < EXACT, f"{label}, call {call}"


def test_separate_gn_warms_up_exactly(ranks):
    for _, label, result, full_sync, _ in cases(ranks, "separate_gn"):
        assert result["phases"] == {"warm-up": WARMUP, "steady": CALLS - WARMUP}, label
        for call in range(WARMUP):
            assert relative_error(result["outputs"][call], full_sync["outputs"][0]) < EXACT, f"{label}, call {call}"


def test_separate_gn_is_the_same_under_both_lowerings(ranks):
    world, per_rank = ranks
    compared = 0
    for rank, (results, _) in enumerate(per_rank):
        for (lowering, name, batch, split, mode), result in results.items():
            if lowering == "inductor" and mode == "separate_gn":
                eager = results["eager", name, batch, split, mode]["outputs"]
                for call, (out, ref) in enumerate(zip(result["outputs"], eager)):
                    assert relative_error(out, ref) < EXACT, f"world {world} rank {rank}: {name} batch {batch} call {call}"
                compared += 1
    assert compared


def test_naive_patch_is_deterministic(ranks):
    ran = refused = 0
    for name, label, result, _, _ in cases(ranks, "naive_patch"):
        if "refused" in result:  # attention written as einsum, over keys split by rows: refused, by node, with the fix
            assert name == "micro" and "bmm" in result["refused"] and "scaled_dot_product_attention" in result["refused"], label
            refused += 1
            continue
        for call, out in enumerate(result["outputs"]):
            torch.testing.assert_close(out, result["outputs"][0], rtol=0, atol=0, msg=f"{label}, call {call}")
        ran += 1
    assert ran and refused


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_rank_returns_the_same_output(ranks, mode):
    _, per_rank = ranks
    first, _ = per_rank[0]
    for rank, (results, _) in enumerate(per_rank):
        for key, result in results.items():
            if key[-1] == mode and "outputs" in result:
                for call, (out, out0) in enumerate(zip(result["outputs"], first[key]["outputs"])):
                    torch.testing.assert_close(out, out0, rtol=0, atol=0, msg=f"rank {rank} {key} call {call} against rank 0")


def test_programs_planned_once_are_loaded_from_the_plan_cache(ranks):
    """Under Inductor the default mode's programs are planned by its ``compile_workers`` run, which
    comes first, and loaded from the plan cache by ``deferred_checks`` and ``corrected_async_gn``:
    those invariants hold for loaded programs, the ``compile_workers`` ones for planned programs."""
    world, per_rank = ranks
    loaded = 0
    for rank, (results, _) in enumerate(per_rank):
        for (lowering, name, batch, split, mode), result in results.items():
            label = f"world {world} rank {rank}: {lowering} {name} batch {batch} split_batch={split} {mode}"
            if lowering == "eager" or "refused" in result:
                assert result.get("plans", {}) == {}, label  # the plan cache serves the Inductor lowering only
                continue
            planned_before = mode in ("deferred_checks", "corrected_async_gn") and (lowering, name, batch, split, "compile_workers") in results
            assert result["plans"] == {"plan_cache_hit" if planned_before else "plan_cache_miss": 1}, label
            loaded += planned_before
    assert loaded


def test_phases_ran_in_pieces_where_asked(ranks):
    """``compile_pieces`` cut every phase; the other modes' programs are small enough to stay whole."""
    cut = 0
    for rank_results, _ in ranks[1]:
        for key, result in rank_results.items():
            if "outputs" in result:
                expected = 2 if key[-1] == "compile_pieces" else 0
                assert set(result["pieces"].values()) == {expected}, (key, result["pieces"])
                cut += expected > 0
    assert cut


def test_batch_split_ran_where_it_applies(ranks):
    for _, label, result, _, _ in cases(ranks, "full_sync"):
        assert result["split"] == ("split_batch=True" in label), label
