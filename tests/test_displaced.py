"""Displaced patch parallelism on 2 CPU ranks: warm-up exactness, stale steady phases, reset, graphs.

A trajectory is a short denoising loop ``x <- x - 0.1 * eps(x, t)`` over falling timesteps on
the tiny SD-1.5-like UNet. Compiling the UNet costs seconds, so ONE spawn compiles each
configuration once, runs every trajectory the tests need and returns the outputs and a summary
of the programs; the tests check them. The default mode runs through ``torch.compile`` (its
trajectories restart with the model); the other configurations compile one Dynamo trace.
"""


import pytest
import torch
from checks import dynamo_graph, exchanges, graph_caller, packed_flat
from dist import run_ranks
from models import as_tensor, tiny_sd15_unet

import districompile
from districompile.metrics import psnr, relative_error

TOLERANCE = 1e-4
WORLD = 2
TIMESTEPS = (900, 750, 600, 450, 300, 150)
LATER = (150, 125, 100, 75, 50, 25)  # starts where TIMESTEPS ends: the timesteps alone show no restart
WARMUP = 4  # the default warmup_steps
SYNC_MODES = ("corrected_async_gn", "stale_gn", "separate_gn", "no_sync", "full_sync")
DISPLACED_KINDS = {"halo", "kv_gather", "stats_allgather", "allreduce"}  # and output_gather in no_sync
HALO_OPS = (torch.ops.districompile.exchange_rows.default, torch.ops.districompile.fetch_rows.default)  # displaced, synchronous


def trajectory(model, x, context, timesteps):
    for t in timesteps:
        x = x - 0.1 * as_tensor(model(x, torch.tensor(t), context))
    return x


def ordering(program) -> list[tuple]:
    """Per exchange op: ``(kind, its "after" inputs as kinds, its buffer inputs)``, in program order.

    An ``after`` input is the previous exchange (its kind) or this site's read ("read"); buffer
    inputs are placeholders ("send", "recv")."""
    rows = []
    for node in program.graph.nodes:
        if node.meta.get("exchange") not in (None, "join"):
            *_, after = node.args
            kinds = ["read" if "exchange_read" in a.meta else a.meta["exchange"] for a in after]
            buffers = [a.meta["exchange_buffer"] for a in node.args if isinstance(a, torch.fx.Node) and "exchange_buffer" in a.meta]
            rows.append((node.meta["exchange"], kinds, buffers))
    return rows


def program_summary(runtime) -> dict:
    (trajectory,) = runtime.trajectories.values()  # one input shape
    programs = trajectory.programs
    summary = {"compilations": runtime.compilations, "buffers": len(trajectory.buffers)}
    for phase, program in programs.items():
        summary[phase] = exchanges(program)
        summary[phase, "ordering"] = ordering(program)
        summary[phase, "inputs"] = sum(n.op == "placeholder" for n in program.graph.nodes)
        halo_ops = [n for n in program.graph.nodes if n.target in HALO_OPS]
        summary[phase, "halo sends packed"] = [packed_flat(n.args[0]) for n in halo_ops]
        buffers = [n for n in program.graph.nodes if n.meta.get("exchange_buffer")]
        summary[phase, "buffer readers"] = sorted({str(user.target) for n in buffers for user in n.users})
    return summary


def _run(rank, world_size):
    """Every trajectory of the tests, on each rank: ``{name: final latent}`` and program summaries."""
    eager, args, kwargs = tiny_sd15_unet()
    x_a, _, context = args
    x_b = torch.randn(x_a.shape, generator=torch.Generator().manual_seed(1))

    gm, inputs = dynamo_graph(eager, args, kwargs)

    def traced(**options):
        """A configuration of its own: Dynamo's graph of the UNet, compiled by the backend."""
        return graph_caller(gm, inputs, args, kwargs, {"lowering": "eager", **options})

    # The default mode (corrected_async_gn, warmup_steps=4) through torch.compile, on a model of its
    # own: runtimes(model) finds its runtime, reset(model) restarts it.
    model, _, _ = tiny_sd15_unet()
    unet = torch.compile(model, backend="distri", options={"lowering": "eager"})

    out, programs = {}, {}
    with torch.no_grad():
        out["exact_warmup"] = trajectory(eager, x_a, context, TIMESTEPS[:WARMUP])
        out["exact"] = trajectory(eager, out["exact_warmup"], context, TIMESTEPS[WARMUP:])

        out["b_alone"] = trajectory(unet, x_b, context, LATER)
        out["corrected_async_gn"] = trajectory(unet, x_a, context, TIMESTEPS)  # timestep went up: restart
        districompile.reset(model)
        out["b_after_reset"] = trajectory(unet, x_b, context, LATER)
        out["b_after_restart"] = trajectory(unet, x_b, context, LATER)  # 150 > 25: automatic restart
        trajectory(unet, x_a, context, TIMESTEPS)  # restart; then B straight after, with no reset:
        out["b_after_jump"] = trajectory(unet, x_b, context, LATER)  # B's noise is no step from A's sample: restart
        districompile.reset(model)
        out["warmup_only"] = trajectory(unet, x_a, context, TIMESTEPS[:WARMUP])
        (runtime,) = districompile.runtimes(model)  # the UNet is one Dynamo graph
        programs["corrected_async_gn"] = program_summary(runtime)

        unet = traced(sync_mode="full_sync")
        out["full_sync_warmup"] = trajectory(unet, x_a, context, TIMESTEPS[:WARMUP])
        out["full_sync"] = trajectory(unet, out["full_sync_warmup"], context, TIMESTEPS[WARMUP:])
        programs["full_sync"] = program_summary(unet.runtime)

        # The seam baseline over the steps that the default mode runs displaced, from the same
        # (exact) latent: both then differ from single-device only in how the seams are handled.
        unet = traced(parallelism="naive_patch")
        out["naive_patch_steady"] = trajectory(unet, out["exact_warmup"], context, TIMESTEPS[WARMUP:])

        for mode in ("stale_gn", "separate_gn", "no_sync"):
            unet = traced(sync_mode=mode, warmup_steps=1)
            out[mode] = trajectory(unet, x_a, context, TIMESTEPS)
            programs[mode] = program_summary(unet.runtime)
    return out, programs


@pytest.fixture(scope="module")
def ranks():
    """Per rank: ``(outputs, programs)``."""
    return run_ranks(_run, WORLD, timeout=300.0)


def test_warmup_only_trajectory_is_exact(ranks):
    for rank, (out, _) in enumerate(ranks):
        assert relative_error(out["full_sync"], out["exact"]) < TOLERANCE, f"rank {rank}"
        assert relative_error(out["warmup_only"], out["exact_warmup"]) < TOLERANCE, f"rank {rank}"
        assert relative_error(out["warmup_only"], out["full_sync_warmup"]) < TOLERANCE, f"rank {rank}"


def test_steady_phase_uses_stale_values_and_beats_naive_patch(ranks):
    for rank, (out, _) in enumerate(ranks):
        displaced, exact = out["corrected_async_gn"], out["exact"]
        assert relative_error(displaced, exact) > 1e-6, f"rank {rank}: steady phase ran exact"
        naive = out["naive_patch_steady"]
        assert psnr(displaced, exact) > psnr(naive, exact), (
            f"rank {rank}: PSNR {psnr(displaced, exact):.1f} dB displaced, {psnr(naive, exact):.1f} dB naive_patch"
        )


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_sync_mode_runs(ranks, mode):
    for rank, (out, _) in enumerate(ranks):
        assert out[mode].shape == out["exact"].shape
        assert torch.isfinite(out[mode]).all(), f"rank {rank}"


def test_reset_prevents_leaks(ranks):
    for rank, (out, _) in enumerate(ranks):
        torch.testing.assert_close(out["b_after_reset"], out["b_alone"], rtol=0, atol=0, msg=f"rank {rank}: reset")
        torch.testing.assert_close(out["b_after_restart"], out["b_alone"], rtol=0, atol=0, msg=f"rank {rank}: restart")
        torch.testing.assert_close(out["b_after_jump"], out["b_alone"], rtol=0, atol=0, msg=f"rank {rank}: new sample")


@pytest.mark.parametrize("mode", ("corrected_async_gn", "stale_gn", "separate_gn", "no_sync"))
def test_displaced_programs(ranks, mode):
    summaries = [programs[mode] for _, programs in ranks]
    assert all(summary == summaries[0] for summary in summaries), "the ranks' programs differ"
    summary = summaries[0]
    steady, warmup = summary["steady"], summary["warm-up"]
    kinds = {kind for kind, *_ in steady}
    assert {"halo", "kv_gather", "output_gather"} <= kinds
    # separate_gn's steady statistics are this rank's alone: nothing to exchange.
    assert ("stats_allgather" in kinds) == (mode != "separate_gn")
    # The steady program joins its exchanges once, last, so nothing is in flight between calls.
    assert [row[0] for row in steady].count("join") == 1 and steady[-1][0] == "join"
    assert "join" not in {kind for kind, *_ in warmup}
    steady = steady[:-1]

    displaced_kinds = DISPLACED_KINDS | ({"output_gather"} if mode == "no_sync" else set())
    for phase, rows, wait in (("warm-up", warmup, True), ("steady", steady, False)):
        for kind, op, site, wait_arg in rows:
            if kind in displaced_kinds:
                assert op.startswith("districompile.exchange_"), (phase, kind, op)
                assert wait_arg is wait, (phase, kind, site)
            else:  # the output gather and fallback gathers stay synchronous
                assert not op.startswith("districompile.exchange_"), (phase, kind, op)
    # Both phases share the sites, hence the buffers: each site is the same exchange in both,
    # except that separate_gn's steady statistics exchange nothing.
    sites = {phase: [(kind, site) for kind, _, site, _ in rows if site is not None] for phase, rows in (("warm-up", warmup), ("steady", steady))}
    assert [s for s in sites["warm-up"] if not (mode == "separate_gn" and s[0] == "stats_allgather")] == sites["steady"]
    assert [site for _, site in sites["warm-up"]] == list(range(len(sites["warm-up"])))
    # Two buffers per site, after the program's own inputs, the same for both phases.
    assert summary["buffers"] == 2 * len(sites["warm-up"])
    assert summary["warm-up", "inputs"] == summary["steady", "inputs"]
    # A halo exchange is given the rows it sends, packed in the graph, not the whole tensor.
    for phase in ("warm-up", "steady"):
        packed = summary[phase, "halo sends packed"]
        assert packed and all(packed), (phase, packed)
    # Steady, only the exchange ops and snapshots read the buffers: nothing a compiler could
    # recompute after an exchange op has begun writing them.
    readers = summary["steady", "buffer readers"]
    assert readers and all(r.startswith("districompile.exchange_") or r == "districompile.snapshot.default" for r in readers), readers


@pytest.mark.parametrize("mode", ("corrected_async_gn", "stale_gn", "separate_gn", "no_sync"))
def test_exchanges_are_sequenced_after_their_reads(ranks, mode):
    """Every exchange op takes the previous one in ``after`` (one order on every rank), and a steady
    exchange also takes its site's read of the buffers it is about to overwrite."""
    _, programs = ranks[0]
    for phase in ("warm-up", "steady"):
        rows = programs[mode][phase, "ordering"]
        for i, (kind, after, buffers) in enumerate(rows):
            previous = [] if i == 0 else [rows[i - 1][0]]
            displaced = buffers == ["send", "recv"]
            read = ["read"] if displaced and phase == "steady" else []
            assert after == read + previous, (phase, i, kind, after)
            assert displaced or buffers == [], (phase, i, kind, buffers)


def test_full_sync_halo_exchanges_take_packed_rows(ranks):
    """As the displaced ones: the synchronous halo exchange is given the rows it sends, packed in the
    graph (test_graph.py checks what it returns and the assembly)."""
    for rank, (_, programs) in enumerate(ranks):
        packed = programs["full_sync"]["synchronous", "halo sends packed"]
        assert packed and all(packed), (rank, packed)


def test_one_compilation_per_phase(ranks):
    for _, programs in ranks:
        # Two phases compiled once each, however many steps and trajectories ran.
        assert programs["corrected_async_gn"]["compilations"] == 2
        full_sync = programs["full_sync"]
        assert full_sync["compilations"] == 1 and "steady" not in full_sync and full_sync["buffers"] == 0
        assert not any(op.startswith("districompile.exchange_") for _, op, *_ in full_sync["synchronous"])
