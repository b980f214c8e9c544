"""CFG batch split (``split_batch``): half the ranks run each half of a batch of 2, patch-parallel
within their half, and every rank gets the whole batch back.

One spawn per world size runs that world's cases and reports errors and how the split was made;
the tests check them: the SDXL-like UNet on 2 ranks, the hand-written UNets on 4 (tracing and
importing diffusers in 4 processes on a small CI machine costs tens of seconds). Dynamo traces
each model once and the backend compiles that graph with and without the split. The batch split
plan itself (a diffusers UNet on 4 ranks, models that do not split) is checked without a process
group through ``explain``.
"""

import logging

import pytest
import torch
import torch.distributed as dist
from checks import dynamo_graph, exchanges
from dist import run_ranks
from models import as_tensor, hand_unet_a, hand_unet_b, micro_sdxl_unet, tiny_sd15_unet
from torch import nn

import districompile
from districompile.backends.distri import distri_backend
from districompile.metrics import psnr, relative_error

TOLERANCE = 1e-4
FULL_SYNC = {"sync_mode": "full_sync", "lowering": "eager"}
TIMESTEPS = (900, 600, 300)


def run_backend(gm, inputs, **options):
    """The graph compiled by the distri backend and called once: ``(output, its trajectory)``."""
    runtime = distri_backend(gm, inputs, options)
    out = runtime(*inputs)[0]
    (trajectory,) = runtime.trajectories.values()
    return out, trajectory


def split_summary(trajectory) -> dict | None:
    """This rank's half and groups, and the groups and row bounds of its program's exchanges."""
    split = trajectory.batch_split
    if split is None:
        return None
    named = [
        dict(zip((a.name for a in n.target._schema.arguments), n.args))
        for n in next(iter(trajectory.programs.values())).graph.nodes if "exchange" in n.meta  # warm-up or synchronous
    ]
    return {
        "half": split.half,
        "patch_ranks": dist.get_process_group_ranks(split.patch_group),
        "pair_ranks": dist.get_process_group_ranks(split.pair_group),
        "patch_group": split.patch_group.group_name,
        "exchange_groups": {args["group"] for args in named},
        "row_bounds": {tuple(args["bounds"]) for args in named if "bounds" in args},
    }


def compare_split(model, args, kwargs, **options) -> dict:
    """Relative errors of the split and unsplit runs against the single-device model, and the split made."""
    with torch.no_grad():
        reference = as_tensor(model(*args, **kwargs))
        gm, inputs = dynamo_graph(model, args, kwargs)
        split, trajectory = run_backend(gm, inputs, **options)
        unsplit, _ = run_backend(gm, inputs, split_batch=False, **options)
    return {
        "split_vs_single": relative_error(split, reference),
        "split_vs_unsplit": relative_error(split, unsplit),
        "unsplit_vs_single": relative_error(unsplit, reference),
        "split": split_summary(trajectory),
    }


def _run_world2(rank, world_size):
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("districompile.batch_split").addHandler(handler)
    logging.getLogger("districompile.batch_split").setLevel(logging.INFO)

    results = {"sdxl": compare_split(*micro_sdxl_unet(batch=2), **FULL_SYNC)}
    model, args, kwargs = hand_unet_a(batch=1)
    with torch.no_grad():
        out, trajectory = run_backend(*dynamo_graph(model, args, kwargs), **FULL_SYNC)
        results["odd_batch"] = {"error": relative_error(out, model(*args, **kwargs)), "split": split_summary(trajectory)}
    results["log"] = messages
    return results


def _run_world4(rank, world_size):
    results = {"hand_a": compare_split(*hand_unet_a(batch=2), **FULL_SYNC)}

    # Displaced (the default sync_mode) within each half: a short trajectory over falling timesteps.
    model, (x, _), _ = hand_unet_b(batch=2)
    torch._dynamo.reset()
    unet = torch.compile(model, backend="distri", options={"lowering": "eager", "warmup_steps": 1})
    with torch.no_grad():
        exact, displaced = x, x
        for t in TIMESTEPS:
            exact = exact - 0.1 * model(exact, torch.full((2,), float(t)))
            displaced = displaced - 0.1 * unet(displaced, torch.full((2,), float(t)))
    (runtime,) = districompile.runtimes(model)
    (trajectory,) = runtime.trajectories.values()
    results["displaced"] = {
        "exact": exact, "displaced": displaced, "steady": exchanges(trajectory.programs["steady"]), "split": split_summary(trajectory)
    }

    # A group of two ranks (the job has four): each of its ranks runs one half of the batch alone.
    pairs = [dist.new_group(ranks) for ranks in ([0, 1], [2, 3])]
    results["subgroup"] = compare_split(*hand_unet_b(batch=2), group=pairs[rank // 2], **FULL_SYNC)
    return results


@pytest.fixture(scope="module")
def world2():
    return run_ranks(_run_world2, 2, timeout=300.0)


@pytest.fixture(scope="module")
def world4():
    return run_ranks(_run_world4, 4, timeout=300.0)


def check_errors(errors: dict, rank: int):
    for name in ("split_vs_single", "split_vs_unsplit", "unsplit_vs_single"):
        assert errors[name] < TOLERANCE, f"rank {rank}: {errors}"


def test_full_sync_split_matches_unsplit_and_single_device(world2, world4):
    for rank, results in enumerate(world2):
        check_errors(results["sdxl"], rank)
    for rank, results in enumerate(world4):
        check_errors(results["hand_a"], rank)
        check_errors(results["subgroup"], rank)


def test_each_half_of_the_ranks_runs_a_patch_plan_of_its_own(world4):
    for rank, results in enumerate(world4):
        split = results["hand_a"]["split"]
        half = rank // 2
        assert split["half"] == half
        assert split["patch_ranks"] == [2 * half, 2 * half + 1]
        assert split["pair_ranks"] == [rank % 2, rank % 2 + 2]
        # The program exchanges over its half only: a 2-rank row split of the 32 rows.
        assert split["exchange_groups"] == {split["patch_group"]}
        assert (0, 16, 32) in split["row_bounds"] and {len(b) for b in split["row_bounds"]} == {3}


def test_two_ranks_split_into_single_rank_halves(world2):
    for rank, results in enumerate(world2):
        split = results["sdxl"]["split"]
        assert split["half"] == rank and split["patch_ranks"] == [rank] and split["pair_ranks"] == [0, 1]
        assert split["exchange_groups"] == set()  # a whole image per rank: nothing to exchange


def test_odd_batch_runs_unsplit_and_says_why(world2):
    for rank, results in enumerate(world2):
        assert results["odd_batch"]["split"] is None
        assert results["odd_batch"]["error"] < TOLERANCE, f"rank {rank}"
        assert any("a batch of 1 does not halve" in message for message in results["log"]), results["log"]


def test_subgroup_parent_splits_within_its_own_ranks(world4):
    for rank, results in enumerate(world4):
        split = results["subgroup"]["split"]
        first = rank // 2 * 2
        assert split["half"] == rank % 2 and split["patch_ranks"] == [rank] and split["pair_ranks"] == [first, first + 1]


def test_displaced_split_stays_close_to_single_device(world4):
    for rank, results in enumerate(world4):
        out = results["displaced"]
        assert out["split"]["exchange_groups"] == {out["split"]["patch_group"]}
        assert {"halo", "kv_gather", "allreduce"} <= {kind for kind, *_ in out["steady"]}
        assert torch.isfinite(out["displaced"]).all()
        assert psnr(out["displaced"], out["exact"]) > 30, f"rank {rank}: {psnr(out['displaced'], out['exact']):.1f} dB"


# ----------------------------------------------------------------------------- the plan, no process group


class MixesSamples(nn.Module):
    """Subtracts the batch mean: no half of the batch can be computed alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        return h - h.mean(0, keepdim=True)


def sample_batch(report) -> int:
    """The batch of the sample the plan was made for (the one 4-d input that is not a parameter)."""
    (sample,) = [x for x in report.example_inputs if x.dim() == 4 and not isinstance(x, nn.Parameter)]
    return sample.shape[0]


def test_explain_plans_one_half_on_half_the_ranks():
    model, args, kwargs = tiny_sd15_unet(batch=2)
    report = districompile.explain(model, *args, world_size=4, verbose=False, **kwargs)
    assert report.batch_split and report.world_size == 2 and report.row_bounds == (0, 16, 32)
    assert sample_batch(report) == 1 and report.fallbacks == []
    assert "each half of the batch on 2 ranks" in str(report)
    # All ranks' bytes: both halves' exchanges, and each rank receiving the other half of the output.
    (gather,) = report.batch_gathers
    output_bytes = 2 * 4 * 32 * 32 * 4  # the whole batch's (2, 4, 32, 32) float32 output
    assert gather.bytes_per_call == 4 * output_bytes // 2
    assert report.total_bytes == 2 * sum(e.bytes_per_call for e in report.exchanges) + gather.bytes_per_call


def test_explain_counts_the_pair_gather_where_halves_exchange_nothing():
    """At world 2 each half runs on one rank: the only bytes are the output's all-gather over the pair."""
    model, args, kwargs = tiny_sd15_unet(batch=2)
    report = districompile.explain(model, *args, world_size=2, verbose=False, **kwargs)
    assert report.batch_split and sum(e.bytes_per_call for e in report.exchanges) == 0  # a 1-rank output "gather"
    assert report.total_bytes == 2 * (2 * 4 * 32 * 32 * 4) // 2 > 0
    assert "of which the pairs' output gathers 32,768 bytes" in str(report)


@pytest.mark.parametrize(
    "build, options",
    [
        (lambda: (MixesSamples(), (torch.randn(2, 4, 16, 16),)), {}),
        (lambda: hand_unet_a(batch=2)[:2], {"split_batch": False}),
        (lambda: hand_unet_a(batch=2)[:2], {"world_size": 3}),
    ],
    ids=["mixes_samples", "split_batch_off", "odd_world"],
)
def test_explain_without_split_plans_the_whole_batch(build, options):
    model, args = build()
    report = districompile.explain(model, *args, verbose=False, **{"world_size": 2, **options})
    assert not report.batch_split
    assert sample_batch(report) == 2


def _split_group_names(rank, world_size, host_checks):
    """The split's group names after three calls with ``host_checks``, in a process of its own. The
    group is not plain gloo (as NCCL's is not), so deferred checks create a CPU group of their own."""
    group = dist.new_group([0, 1], backend="cpu:gloo,cuda:gloo")
    model, (x, t), _ = hand_unet_a(batch=2)
    options = {"lowering": "eager", "warmup_steps": 1, "host_checks": host_checks, "group": group}
    unet = torch.compile(model, backend="distri", options=options)
    with torch.no_grad():
        for step in range(3):
            unet(x, t - step)
    (runtime,) = districompile.runtimes(model)
    (trajectory,) = runtime.trajectories.values()
    return trajectory.batch_split.patch_group.group_name, trajectory.batch_split.pair_group.group_name


def test_the_split_groups_are_named_alike_whatever_the_host_checks():
    """Torch numbers groups in order of creation and the programs name the split's groups: deferred
    checks create their CPU group after the first call's compile, so a cache built with per-call
    checks (``districompile.warm``) holds the programs that ``parallelize`` (deferred) runs."""
    per_call = run_ranks(_split_group_names, 2, "per_call", timeout=300.0)
    deferred = run_ranks(_split_group_names, 2, "deferred", timeout=300.0)
    assert per_call == deferred, (per_call, deferred)
