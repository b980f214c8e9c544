"""``single_rank_exchanges``: the exchange ops kept at world 1, to test or time them on one device.

On one rank a halo is only padding and a statistics all-gather has one block, so
``full_sync`` stays exact; a displaced mode that reads stale statistics (``stale_gn``) does not,
which is what lets one GPU check a replayed steady phase (gpu_tests/test_gpu.py).
"""

import logging
import re

import torch
from checks import exchanges
from dist import run_ranks
from models import as_tensor, micro_sdxl_unet

import districompile
from districompile.metrics import relative_error

TIMESTEPS = (900, 800, 700, 600)


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _run(rank, world_size):
    runtime_log, messages = logging.getLogger("districompile.runtime"), Messages()
    runtime_log.setLevel(logging.INFO)
    runtime_log.addHandler(messages)
    model, (x, _, context), kwargs = micro_sdxl_unet()
    with torch.no_grad():
        expected = [as_tensor(model(x, torch.tensor(t), context, **kwargs)) for t in TIMESTEPS]
        results = {}
        for mode in ("full_sync", "stale_gn"):
            options = {"sync_mode": mode, "lowering": "eager", "warmup_steps": 1, "single_rank_exchanges": True}
            compiled = torch.compile(model, backend="distri", options=options)
            outputs = [as_tensor(compiled(x, torch.tensor(t), context, **kwargs)) for t in TIMESTEPS]
            (runtime,) = [r for r in districompile.runtimes(model) if r.config.sync_mode == mode]
            (trajectory,) = runtime.trajectories.values()
            results[mode] = (outputs, [exchanges(p) for p in trajectory.programs.values()])
            torch._dynamo.reset()
    return expected, results, messages.messages


def test_single_rank_exchanges():
    ((expected, results, messages),) = run_ranks(_run, 1)

    outputs, (program,) = results["full_sync"]
    # Gathers of a single block are left out; halos (edge padding) and statistics stay.
    assert {"halo", "stats_allgather"} <= {kind for kind, *_ in program}
    for out, ref in zip(outputs, expected):
        assert relative_error(out, ref) < 1e-5

    outputs, (warmup, steady) = results["stale_gn"]
    assert relative_error(outputs[0], expected[0]) < 1e-5  # the warm-up call is synchronous
    assert all(relative_error(out, ref) > 1e-4 for out, ref in zip(outputs[1:], expected[1:]))
    assert steady[-1][0] == "join" and "join" not in {kind for kind, *_ in warmup}


    # Progress on long work: each phase's lowering is logged as it starts and when it is done.
    started = [re.fullmatch(r"districompile: graph of \w+: lowering the (\S+) phase \(\d+ nodes, eager\)", m) for m in messages]
    done = [re.fullmatch(r"districompile: graph of \w+: lowering the (\S+) phase \(\d+ nodes, eager\) took \d+\.\d s", m) for m in messages]
    assert [m.group(1) for m in started if m] == ["synchronous", "warm-up", "steady"]
    assert [m.group(1) for m in done if m] == ["synchronous", "warm-up", "steady"]


def test_explain_plans_single_rank_exchanges():
    model, args, kwargs = micro_sdxl_unet()
    kinds = {
        keep: {e.kind for e in districompile.explain(model, *args, world_size=1, verbose=False, single_rank_exchanges=keep, **kwargs).exchanges}
        for keep in (False, True)
    }
    assert "stats_allgather" not in kinds[False] and "stats_allgather" in kinds[True]
