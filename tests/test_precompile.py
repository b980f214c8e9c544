"""A precompiled model (``districompile.precompile``) restarts without Dynamo: torch's AOT compile
saves Dynamo's trace, the runtime saves its graph, the graph's input layout and the options, and
a fresh process loads them and compiles its phases from the shipped caches.

Fresh processes, as in test_compile_cache: the first precompiles a diffusers UNet (its forward
is decorated, as SDXL's is), calls it until the steady phase and saves; the second loads and
calls. Whether Dynamo traced is read from torch's own compile timers.
"""

from __future__ import annotations

import os

import pytest
import torch
from dist import run_ranks
from models import micro_sd_unet, micro_sdxl_unet, tiny_sd15_unet

from districompile import precompile
from districompile.errors import DistriCompileError

CALLS = 3  # warm-up, then two steady calls (warmup_steps=1)


MODELS = {"micro_sd": micro_sd_unet, "micro_sdxl": micro_sdxl_unet}
INPUT_NAMES = {
    "micro_sd": ["sample", "timestep", "encoder_hidden_states"],
    "micro_sdxl": ["sample", "timestep", "added_cond_kwargs", "added_cond_kwargs", "encoder_hidden_states"],
}


def precompile_and_call(rank, world_size, directory, restart, lowering, batch, options, name="micro_sdxl"):
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(directory, f"inductor-{'restart' if restart else 'cold'}-{rank}")
    from torch._dynamo.utils import compilation_time_metrics, counters

    import districompile
    from districompile import warm

    model, args, kwargs = MODELS[name](batch=batch)
    with torch.no_grad():
        if restart:
            warm.load(directory, model)
        else:
            precompile.precompile(model, args, kwargs, {"warmup_steps": 1, "lowering": lowering, **options})
        outputs = [model(*args, **kwargs).sample for _ in range(CALLS)]
        alone = type(model).forward(model, *args, **kwargs).sample  # the model itself, uncompiled
    if not restart:
        warm.save(directory, model) if lowering == "inductor" else precompile.save(model, warm.artifact_path(directory, ".forward"))
    (runtime,) = districompile.runtimes(model)
    (trajectory,) = runtime.trajectories.values()
    return {
        "outputs": outputs,
        "alone": alone,
        "traced": any(key in compilation_time_metrics for key in ("fullgraph_capture", "_compile.compile_inner")),
        "inductor": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
        "plans": dict(counters["districompile"]),
        "names": [runtime.input_names[i] for i in runtime.data_positions] == INPUT_NAMES[name],
        "spatial": [runtime.input_names[i] for i in runtime.spatial],
        "batch_split": trajectory.batch_split is not None,
    }


def check_restart(cold: dict, restarted: dict):
    assert cold["traced"] and not restarted["traced"], (cold["traced"], restarted["traced"])
    for run in (cold, restarted):
        assert run["names"], "the inputs are named by the model's parameters"
        assert run["spatial"] == ["sample"], run["spatial"]
    for fresh, loaded in zip(cold["outputs"], restarted["outputs"]):
        torch.testing.assert_close(loaded, fresh, rtol=0, atol=0)
        torch.testing.assert_close(fresh, cold["alone"])  # the same inputs every call: the model's output


def test_restart_loads_the_trace_the_program_and_its_phase(tmp_path):
    """Inductor, a patch rank's program with its exchange ops at world 1 (``full_sync``: one phase,
    to keep the test short; the restarts below run both phases): restarted, nothing is traced,
    planned or compiled, and every call is the cold process's bit for bit."""
    options = {"single_rank_exchanges": True, "sync_mode": "full_sync"}
    (cold,) = run_ranks(precompile_and_call, 1, str(tmp_path), False, "inductor", 2, options, "micro_sd", timeout=600)
    (restarted,) = run_ranks(precompile_and_call, 1, str(tmp_path), True, "inductor", 2, options, "micro_sd", timeout=600)
    check_restart(cold, restarted)
    assert cold["plans"] == {"plan_cache_miss": 1} and restarted["plans"] == {"plan_cache_hit": 1}, (cold["plans"], restarted["plans"])
    assert restarted["inductor"] == {"fxgraph_cache_hit": 1}, restarted["inductor"]


@pytest.mark.parametrize("batch", [1, 2], ids=["patch", "cfg-split"])
def test_restarted_ranks_plan_again_from_the_saved_graph(tmp_path, batch):
    """The eager lowering keeps no plan: two restarted ranks plan their programs from the graph the
    runtime saved (its placeholders' sources kept: the batch split still tells inputs from
    weights) and run the default displaced mode as the cold ranks did."""
    cold = run_ranks(precompile_and_call, 2, str(tmp_path), False, "eager", batch, {}, timeout=300)
    restarted = run_ranks(precompile_and_call, 2, str(tmp_path), True, "eager", batch, {}, timeout=300)
    for rank in range(2):
        check_restart(cold[rank], restarted[rank])
        assert cold[rank]["batch_split"] == restarted[rank]["batch_split"] == (batch == 2)


def test_a_saved_forward_refuses_another_model_and_other_inputs(tmp_path):
    """Before any call: a forward saved for one config is refused on another, naming the config;
    a call with other shapes fails the saved guards, with the fix."""
    model, args, kwargs = micro_sdxl_unet(batch=2)
    with torch.no_grad():
        precompile.precompile(model, args, kwargs, {"lowering": "eager"})
    path = precompile.save(model, tmp_path / "forward")

    other, _, _ = micro_sdxl_unet(batch=2)
    other.register_to_config(norm_eps=1e-6)
    with pytest.raises(DistriCompileError, match=r"precompiled for another model: its config differs: norm_eps=1e-05 \(this model: 1e-06\);"):
        precompile.load(other, path)
    sd15, _, _ = tiny_sd15_unet()
    with pytest.raises(DistriCompileError, match="its config differs: .* and .* more; its parameters or buffers differ"):
        precompile.load(sd15, path)

    same, _, _ = micro_sdxl_unet(batch=2)
    precompile.load(same, path)
    _, smaller, smaller_kwargs = micro_sdxl_unet(batch=1)
    with torch.no_grad(), pytest.raises(DistriCompileError, match=r"(?s)precompiled for other inputs .*size mismatch.*precompile it for these"):
        same(*smaller, **smaller_kwargs)
    with pytest.raises(DistriCompileError, match="the saved guards fail: 'GLOBAL_STATE changed: grad_mode"):
        same(*args, **kwargs)  # traced under no_grad


def test_what_cannot_be_precompiled_is_refused(tmp_path):
    from districompile import warm

    model, args, kwargs = micro_sdxl_unet()
    with pytest.raises(DistriCompileError, match="is not precompiled"):
        precompile.save(model, tmp_path / "forward")
    with pytest.raises(DistriCompileError, match="no traced forward at .*rank0-of-1.forward"):
        warm.load(tmp_path, model)  # its calls would run the model uncompiled
    model.register_forward_hook(lambda module, inputs, output: output)
    with pytest.raises(DistriCompileError, match="not the model's own forward hooks"):
        precompile.precompile(model, args, kwargs)
