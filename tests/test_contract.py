"""No silent wrong result: the contract between the ranks and the trajectory, and what happens
when it is broken. Each case gives a correct result or a districompile error that names the fix,
on every rank, at worlds 2 and 3 (gloo, CPU, eager lowering).

- a new image after a finished one, with no ``reset``, whose timesteps do not rise: it equals
  that image alone (the sample jumped);
- per-sample timesteps (shape (B,), batch 3) of a diffusers UNet: recognised, so a rise restarts;
- a graph break in the forward: the model's graphs restart together, and a graph that runs on
  some calls only is an error;
- ranks that pass different samples, timesteps or heights, or reset alone: an error on every
  rank before any exchange, and the next agreeing call is right;
- a rank that fails midway through a call, one that stops calling, one whose process exits: the
  others get an error naming districompile and the call within the collective timeout;
- autograd: an error naming ``torch.no_grad()``;
- rank 0 prints each compile stage (option ``progress``), the other ranks nothing.
"""

import contextlib
import io
import time

import pytest
import torch
from dist import run_ranks
from models import MicroUNet, as_tensor, micro_sd_unet, micro_unet

import districompile
from districompile import DistriCompileError

DISPLACED = {"lowering": "eager", "warmup_steps": 2}
A_STEPS = (900, 700, 500, 300)
LOW_STEPS = (250, 200, 150, 100)  # below A's last: the timesteps alone show no new trajectory


class SteppedUNet(MicroUNet):
    """MicroUNet with a graph break after its stem: two graphs per call, the second with no
    timestep input. With ``shortcut`` set, the forward skips the second graph."""

    def __init__(self):
        super().__init__()
        self.shortcut = False

    def forward(self, x, timestep):
        h0 = self.stem(x, timestep)
        torch._dynamo.graph_break()
        return h0[:, :4] if self.shortcut else self.body(h0)


def denoise(model, x, timesteps, *rest):
    for t in timesteps:
        x = x - 0.1 * as_tensor(model(x, torch.full((x.shape[0],), float(t)) if x.shape[0] > 2 else torch.tensor(float(t)), *rest))
    return x


def error_text(call) -> str:
    """The message of the DistriCompileError ``call`` raises (any other exception fails the test)."""
    try:
        call()
    except DistriCompileError as error:
        return str(error)
    return "no error"


def compiled(factory, **options):
    torch._dynamo.reset()
    model, args, kwargs = factory()
    return model, torch.compile(model, backend="distri", options={**DISPLACED, **options}, dynamic=False), args


def _agreeing(rank, world):
    out = {}
    torch.manual_seed(0)
    with torch.no_grad():
        # A new image after a finished one, its timesteps below A's last, no reset.
        model, unet, (x_a, _) = compiled(micro_unet)
        x_b = torch.randn_like(x_a)
        with contextlib.redirect_stderr(io.StringIO()) as progress:
            denoise(unet, x_a, A_STEPS)
        out["progress"] = progress.getvalue()
        out["b_after_a"] = denoise(unet, x_b, LOW_STEPS)
        districompile.reset(model)
        out["b_alone"] = denoise(unet, x_b, LOW_STEPS)
        # The same under the default lowering (Inductor) at the CFG batch of 2, split over the ranks
        # where the world is even.
        model, unet, (x_a, _) = compiled(lambda: micro_unet(batch=2), lowering="inductor")
        x_b = torch.randn_like(x_a)
        denoise(unet, x_a, A_STEPS)
        out["inductor_b_after_a"] = denoise(unet, x_b, LOW_STEPS)
        districompile.reset(model)
        out["inductor_b_alone"] = denoise(unet, x_b, LOW_STEPS)

        # Per-sample timesteps: the sample continues A's, only the timesteps rise.
        model, unet, (x, _, context) = compiled(lambda: micro_sd_unet(batch=3))  # the smallest diffusers UNet
        end_of_a = denoise(unet, x, A_STEPS, context)
        out["sd_restart"] = denoise(unet, end_of_a, A_STEPS, context)
        districompile.reset(model)
        out["sd_after_reset"] = denoise(unet, end_of_a, A_STEPS, context)
        out["sd_timesteps"] = [[r.input_names[i] for i in r.timesteps] for r in districompile.runtimes(model)]

        # A graph break: A then B on the same schedule; the second graph sees no timestep.
        torch._dynamo.reset()
        model = SteppedUNet().eval()
        unet = torch.compile(model, backend="distri", options=DISPLACED, dynamic=False)
        x_a, x_b = torch.randn(1, 4, 16, 8), torch.randn(1, 4, 16, 8)
        denoise(unet, x_a, A_STEPS)
        out["broken_b_after_a"] = denoise(unet, x_b, A_STEPS)
        districompile.reset(model)
        out["broken_b_alone"] = denoise(unet, x_b, A_STEPS)
        out["broken_graphs"] = len(districompile.runtimes(model))

        def skip_the_second_graph():
            for t in (900.0, 800.0, 700.0):  # a new trajectory (the timestep rose); steady from the third call
                unet(x_a, torch.tensor(t))
            model.shortcut = True  # the fourth call runs the first graph, then another one
            unet(x_a, torch.tensor(600.0))
            model.shortcut = False  # in the fifth, the second graph's stale values are two steps old
            unet(x_a, torch.tensor(500.0))

        out["skipped_graph"] = error_text(skip_the_second_graph)

        # Ranks that disagree: each call errs on every rank, then an agreeing call is right.
        model, unet, (x, t) = compiled(micro_unet)
        reference = unet(x, t)
        out["other_sample"] = error_text(lambda: unet(x + rank, t))
        out["other_timestep"] = error_text(lambda: unet(x, t + rank))
        out["other_height"] = error_text(lambda: unet(torch.randn(1, 4, 16 if rank == 0 else 12, 8), t))
        if rank == 0:
            districompile.reset(model)
        out["reset_alone"] = error_text(lambda: unet(x, t))
        districompile.reset(model)
        out["agreeing_again"] = unet(x, t)
        out["reference"] = reference
    out["autograd"] = error_text(lambda: unet(x, t))
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"world{world}")
def agreeing(request):
    return request.param, run_ranks(_agreeing, request.param, timeout=600.0)


def test_new_image_without_reset_equals_that_image_alone(agreeing):
    for rank, out in enumerate(agreeing[1]):
        torch.testing.assert_close(out["b_after_a"], out["b_alone"], rtol=0, atol=0, msg=f"rank {rank}")
        torch.testing.assert_close(out["inductor_b_after_a"], out["inductor_b_alone"], rtol=0, atol=0, msg=f"rank {rank}: inductor")


def test_per_sample_timesteps_restart_the_trajectory(agreeing):
    for rank, out in enumerate(agreeing[1]):
        assert out["sd_timesteps"] == [["timestep"]], f"rank {rank}: {out['sd_timesteps']}"
        torch.testing.assert_close(out["sd_restart"], out["sd_after_reset"], rtol=0, atol=0, msg=f"rank {rank}")


def test_graphs_of_one_model_restart_together(agreeing):
    for rank, out in enumerate(agreeing[1]):
        assert out["broken_graphs"] == 2
        torch.testing.assert_close(out["broken_b_after_a"], out["broken_b_alone"], rtol=0, atol=0, msg=f"rank {rank}")


def test_a_graph_skipped_on_some_calls_is_an_error(agreeing):
    for out in agreeing[1]:
        assert "out of step" in out["skipped_graph"] and "last ran in call 3 of the trajectory and now runs in call 5" in out["skipped_graph"]


@pytest.mark.parametrize(
    "case, differs",
    [("other_sample", "inputs sum"), ("other_timestep", "inputs sum"), ("other_height", "shapes"), ("reset_alone", "trajectory")],
)
def test_ranks_that_disagree_get_an_error_naming_the_difference(agreeing, case, differs):
    world, per_rank = agreeing
    for rank, out in enumerate(per_rank):
        text = out[case]
        assert "the ranks disagree" in text and differs in text and "Nothing was exchanged" in text, f"rank {rank}: {text}"
        assert all(f"rank {r}:" in text for r in range(world)), text  # each rank's inputs, side by side


def test_agreeing_call_after_the_errors_is_right(agreeing):
    for rank, out in enumerate(agreeing[1]):
        torch.testing.assert_close(out["agreeing_again"], out["reference"], rtol=0, atol=0, msg=f"rank {rank}")


def test_rank_0_prints_each_compile_stage(agreeing):
    zero, *others = agreeing[1]
    assert "planning the per-rank programs" in zero["progress"], zero["progress"]
    assert "lowering the warm-up phase" in zero["progress"] and "lowering the steady phase" in zero["progress"]
    assert all(out["progress"] == "" for out in others)


def test_autograd_is_refused_with_the_fix(agreeing):
    for out in agreeing[1]:
        assert "torch.no_grad()" in out["autograd"]


# ----------------------------------------------------------------------------- deferred checks

DEFERRED = {"host_checks": "deferred"}


def _deferred(rank, world):
    """``host_checks="deferred"``: what the host reads before a call, and what one call late."""
    from districompile import runtime

    read_before = []  # device rows the host waited for before a call ran
    gather = runtime.gather_rows_of_ranks
    runtime.gather_rows_of_ranks = lambda *args: read_before.append(args[2]) or gather(*args)
    out = {}
    torch.manual_seed(0)
    model, args, _ = micro_unet()
    x_a, x_b, t = args[0], torch.randn_like(args[0]), args[1]
    with torch.no_grad():
        for checks in ("per_call", "deferred"):
            torch._dynamo.reset()
            unet = torch.compile(model, backend="distri", options={**DISPLACED, "host_checks": checks}, dynamic=False)
            districompile.reset(model)
            del read_before[:]
            denoise(unet, x_a, A_STEPS)
            districompile.reset(model)
            out[checks, "b"] = denoise(unet, x_b, LOW_STEPS)
            out[checks, "read before"] = list(read_before)

        # B after A without reset, its timesteps rising: its first call reuses A's stale activations;
        # its second says so.
        districompile.reset(model)
        denoise(unet, x_a, A_STEPS)
        steps = []
        out["unannounced"] = error_text(lambda: [steps.append(unet(x_b, torch.tensor(float(s)))) for s in A_STEPS])
        out["unannounced steps"] = len(steps)

        # Ranks that disagree in a steady call: it runs, the next call (or reset) raises on every rank.
        districompile.reset(model)
        for s in A_STEPS[:3]:
            unet(x_a, torch.tensor(float(s)))
        unet(x_a + rank, torch.tensor(200.0))
        out["other_sample"] = error_text(lambda: unet(x_a, torch.tensor(100.0)))
        unet(x_a + rank, torch.tensor(50.0))
        out["other_sample_then_reset"] = error_text(lambda: districompile.reset(model))
        districompile.reset(model)
        unet(x_a, t)
        # What the host knows (the trajectory) is still compared before the call: nothing runs.
        if rank == 0:
            districompile.reset(model)
        out["reset_alone"] = error_text(lambda: unet(x_a, t))
    return out


@pytest.fixture(scope="module")
def deferred():
    return run_ranks(_deferred, 2, timeout=600.0)


def test_deferred_checks_wait_for_no_device_row_once_compiled(deferred):
    """Per call, the host waits for each call's device row; deferred, only for the compile's first."""
    for out in deferred:
        assert len(out["per_call", "read before"]) == len(A_STEPS) + len(LOW_STEPS), out["per_call", "read before"]
        assert out["deferred", "read before"] == ["call 1 of MicroUNet's trajectory (graph of forward)"], out["deferred", "read before"]
        torch.testing.assert_close(out["deferred", "b"], out["per_call", "b"], rtol=0, atol=0)


def test_deferred_checks_report_a_new_image_without_reset_at_its_next_call(deferred):
    for out in deferred:
        assert out["unannounced steps"] == 1, out
        text = out["unannounced"]
        assert "began a new image" in text and "without districompile.reset(model)" in text and "output is wrong" in text, text


def test_deferred_checks_report_disagreeing_ranks_one_call_late(deferred):
    for out in deferred:
        # The call that raised at its start did not run: the next one is call 5.
        for case, call in (("other_sample", 4), ("other_sample_then_reset", 5)):
            text = out[case]
            assert f"the ranks disagree at call {call} " in text and "inputs sum" in text and "The call ran" in text, f"{case}: {text}"
        text = out["reset_alone"]
        assert "the ranks disagree" in text and "trajectory" in text and "Nothing was exchanged" in text, text


# ----------------------------------------------------------------------------- failing ranks

FAIL_AT = 3  # the call at which a rank fails, stops or exits
TIMEOUT = 8.0  # the collective timeout of these runs (option ``timeout``), seconds


def injected_fault(ops):
    raise RuntimeError("injected fault")



def _failing(rank, world, how):
    model, unet, (x, t) = compiled(micro_unet, timeout=TIMEOUT)
    out = {}
    with torch.no_grad():
        for call in range(1, FAIL_AT + 2):
            if rank == 0 and call == FAIL_AT:
                if how == "exits":
                    return {"exited": True}  # the process ends: its connections close
                if how == "stops":  # alive, but not calling, until the others have had their errors
                    wait_for_the_others(world, deadline=2 * TIMEOUT)
                    return {"stopped": True}
                if how == "fails":  # its first exchange of the call raises
                    torch.distributed.batch_isend_irecv = injected_fault
            start = time.monotonic()
            out[call] = error_text(lambda: unet(x, t))
            out[call, "seconds"] = time.monotonic() - start
    if how == "stops":
        torch.distributed.distributed_c10d._get_default_store().add(FINISHED, 1)
    return out


FINISHED = "test_contract: ranks finished"


def wait_for_the_others(world, deadline):
    """Sleep until the other ranks have counted themselves finished in the job's store (rank 0
    serves it), at most ``deadline`` seconds: no longer than their errors take."""
    store, start = torch.distributed.distributed_c10d._get_default_store(), time.monotonic()
    while store.add(FINISHED, 0) < world - 1 and time.monotonic() - start < deadline:
        time.sleep(0.1)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("how", ["fails", "stops", "exits"])
def test_a_failing_rank_gives_every_other_rank_an_error_naming_the_call(world, how):
    per_rank = run_ranks(_failing, world, how, timeout=120.0)
    for rank, out in enumerate(per_rank[1:], start=1):
        text = out[FAIL_AT]
        assert text.startswith("districompile:") and f"call {FAIL_AT} of MicroUNet's trajectory" in text, f"rank {rank}: {text}"
        assert out[FAIL_AT, "seconds"] < 2 * TIMEOUT, f"rank {rank} waited {out[FAIL_AT, 'seconds']:.1f} s"
        assert "out of step" in out[FAIL_AT + 1] or "agreement check" in out[FAIL_AT + 1], f"rank {rank}: {out[FAIL_AT + 1]}"
    if how == "fails":
        failed = per_rank[0]
        assert "injected fault" in failed[FAIL_AT] and "halo exchange" in failed[FAIL_AT], failed[FAIL_AT]
        assert "Restart the processes" in failed[FAIL_AT + 1], failed[FAIL_AT + 1]
