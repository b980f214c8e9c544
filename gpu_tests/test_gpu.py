"""Checks on CUDA GPUs (not part of CI, which has none), on one GPU or several:

    python -m pytest -q gpu_tests                                  # one GPU: a 1-rank NCCL group
    torchrun --nproc-per-node 2 -m pytest -q gpu_tests             # one process per GPU

- ``full_sync`` (Inductor, a CUDA graph per phase) equals the uncompiled UNet on this GPU, and its
  phase is captured once and then replayed.
- The invariant of ``tests/test_invariants.py`` on the path users run: Inductor, CUDA graphs,
  NCCL, batch 2 (with and without the CFG split where the world is even). Called with the same
  inputs, every call of each displaced mode equals ``full_sync`` (``separate_gn``: in its
  warm-up, and then the eager lowering of the same program). On one GPU the exchange ops are kept
  (``single_rank_exchanges``: 1-rank NCCL collectives inside the captures).
- The plans of SDXL and FLUX.1-dev (their real architectures) and of small SD3 and PixArt
  transformers have no fallback on CUDA: some ops capture differently there (diffusers' RMSNorm
  is ``_fused_rms_norm`` on CUDA and decomposed on the CPU), so CI cannot see a missing rule.
- With ``host_checks="deferred"``, a replayed steady call makes no synchronizing CUDA call.
- With ``background_compile``, the first image runs the eager lowering's CUDA graphs and the next
  one Inductor's, every call equal to ``full_sync``.
- A precompiled forward (``districompile.precompile``) saved from one instance loads onto
  another without Dynamo tracing again, every call equal to ``full_sync``.
- A displaced steady phase replayed as a CUDA graph keeps its stale state right: with
  ``stale_gn`` (GroupNorm statistics of the previous call), the replayed trajectory equals the
  eager lowering of the same program, call by call, also after ``reset``.
"""

import gc
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from models import as_tensor, micro_unet, tiny_pixart_transformer, tiny_sd3_transformer, tiny_sdxl_unet  # noqa: E402

import districompile  # noqa: E402
from districompile.config import DistriConfig  # noqa: E402
from districompile.metrics import relative_error  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WARMUP, CALLS = 2, 5


@pytest.fixture(scope="module", autouse=True)
def process_group():
    # fp32 comparisons between programs: TF32 convolutions (cuDNN's default) would differ by 5e-4
    # with the layout each program picks, which is not what these tests are about.
    torch.backends.cudnn.allow_tf32 = False
    if "WORLD_SIZE" in os.environ:  # torchrun: one process per GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    else:
        store = tempfile.NamedTemporaryFile(delete=False).name
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def fresh_dynamo():
    """Drop earlier compilations (Dynamo's caches) before compiling again."""
    torch._dynamo.reset()
    gc.collect()


def sdxl_on_gpu(dtype, height=64):
    return on_gpu(*tiny_sdxl_unet(height=height, width=height), dtype)


def test_full_sync_matches_uncompiled_unet_and_replays():
    fresh_dynamo()
    model, (x, t, context), kwargs = sdxl_on_gpu(torch.float16)
    compiled = torch.compile(model, backend="distri", options={"sync_mode": "full_sync"})
    with torch.no_grad():
        for step in range(4):
            x_step = x + 0.1 * step  # new values each call: a replay must see them
            reference = as_tensor(model(x_step, t, context, **kwargs))
            out = as_tensor(compiled(x_step, t, context, **kwargs))
            assert relative_error(out, reference) < 1e-2, f"call {step}"
    (runtime,) = [r for r in districompile.runtimes(model) if r.config.sync_mode == "full_sync"]
    # Call 1 runs eagerly, call 2 captures, every call after the first replays.
    assert runtime.graph_counts() == {"captures": 1, "replays": 3, "eager_calls": 1}


def compiled_calls(model, args, kwargs, **options):
    """``CALLS`` calls with the same inputs, and the runtime's graph counts and calls per phase."""
    fresh_dynamo()
    options = {"warmup_steps": WARMUP, "single_rank_exchanges": dist.get_world_size() == 1, **options}
    compiled = torch.compile(model, backend="distri", options=options)
    with torch.no_grad():
        outputs = [as_tensor(compiled(*args, **kwargs)) for _ in range(CALLS)]
    (runtime,) = [r for r in districompile.runtimes(model) if r.config == DistriConfig.from_options(options)]
    (trajectory,) = runtime.trajectories.values()
    return outputs, runtime.graph_counts(), trajectory.phase_calls


def on_gpu(model, args, kwargs, dtype):
    to_gpu = lambda x: x.to("cuda", dtype if x.is_floating_point() else x.dtype)  # noqa: E731
    return model.to("cuda", dtype), [to_gpu(a) for a in args], torch.utils._pytree.tree_map_only(torch.Tensor, to_gpu, kwargs)


# The CFG split needs an even world: on one GPU, split_batch=True would run unsplit, as False does.
SPLITS = (False, True) if int(os.environ.get("WORLD_SIZE", 1)) % 2 == 0 else (False,)
# Every mode on our micro UNet (it compiles in seconds), the default one on the SDXL-like UNet too,
# and compiled in pieces by worker processes (SDXL's own phases are 4 pieces each).
PIECES = {"compile_pieces": 3, "compile_workers": True}
CASES = [("micro", mode, {}) for mode in ("corrected_async_gn", "stale_gn", "no_sync", "separate_gn")]
CASES += [("tiny_sdxl", "corrected_async_gn", {}), ("tiny_sdxl", "corrected_async_gn", PIECES)]


@pytest.fixture(scope="module")
def batch2():
    """Per model: the model in fp32 on this GPU at batch 2 (a CFG pair), and ``full_sync``'s first
    output per ``split_batch`` (built on first use)."""
    built = {}

    def get(name):
        if name not in built:
            factory = {"micro": lambda: micro_unet(height=32, width=32, batch=2), "tiny_sdxl": lambda: tiny_sdxl_unet(batch=2)}[name]
            model, args, kwargs = on_gpu(*factory(), torch.float32)
            full_sync = {split: compiled_calls(model, args, kwargs, sync_mode="full_sync", split_batch=split)[0][0] for split in SPLITS}
            built[name] = model, args, kwargs, full_sync
        return built[name]

    return get


@pytest.mark.parametrize("split_batch", SPLITS, ids=lambda split: f"split_batch={split}")
@pytest.mark.parametrize("name, mode, extra", CASES, ids=[f"{n}-{m}{'-pieces' if e else ''}" for n, m, e in CASES])
def test_every_call_equals_full_sync(batch2, name, mode, extra, split_batch):
    model, args, kwargs, full_sync = batch2(name)
    outputs, counts, phases = compiled_calls(model, args, kwargs, sync_mode=mode, split_batch=split_batch, **extra)
    assert phases == {"warm-up": WARMUP, "steady": CALLS - WARMUP}
    # Each phase: its first call eager, then one capture, then replays.
    assert counts == {"captures": 2, "replays": CALLS - 2, "eager_calls": 2}
    if mode == "separate_gn":  # once steady, its own statistics: the same program run eagerly is the reference
        eager, _, _ = compiled_calls(model, args, kwargs, sync_mode=mode, split_batch=split_batch, lowering="eager", cuda_graphs=False)
    errors = [
        relative_error(out, eager[call] if mode == "separate_gn" and call >= WARMUP else full_sync[split_batch])
        for call, out in enumerate(outputs)
    ]
    print(f"\n{name} {mode} split_batch={split_batch}: rel err per call {[f'{e:.1e}' for e in errors]}")
    assert max(errors) < 1e-4, errors


def test_background_compile_takes_over_between_images(batch2, tmp_path, monkeypatch):
    """``background_compile``: the first image replays the eager lowering's CUDA graphs while
    workers compile; after ``finish_compiles`` the next image replays Inductor's, captured in a
    pool of their own. Every call equals ``full_sync``."""
    model, args, kwargs, full_sync = batch2("micro")
    # Caches of its own: the programs an earlier test planned would be loaded at once (a restart's).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    fresh_dynamo()
    split = SPLITS[-1]
    options = {
        "warmup_steps": WARMUP, "single_rank_exchanges": dist.get_world_size() == 1, "background_compile": True, "split_batch": split,
    }
    compiled = torch.compile(model, backend="distri", options=options)
    lowerings, errors = [], []
    with torch.no_grad():
        for image in range(2):
            districompile.reset(model)
            for _ in range(CALLS):
                errors.append(relative_error(as_tensor(compiled(*args, **kwargs)), full_sync[split]))
                (runtime,) = [r for r in districompile.runtimes(model) if r.config == DistriConfig.from_options(options)]
                (trajectory,) = runtime.trajectories.values()
                lowerings.append(trajectory.lowering)
            if image == 0:
                districompile.finish_compiles(model)
    print(f"\nbackground_compile: rel err per call {[f'{e:.1e}' for e in errors]}")
    assert lowerings == ["eager"] * CALLS + ["inductor"] * CALLS
    assert runtime.graph_counts() == {"captures": 2, "replays": CALLS - 2, "eager_calls": 2}  # Inductor's phases
    assert max(errors) < 1e-4, errors


def test_a_precompiled_forward_loads_onto_another_instance(batch2, tmp_path, monkeypatch):
    """``districompile.precompile`` on the path users run (Inductor, CUDA graphs, batch 2) and on
    this GPU's torch: the forward saved from one instance of the tiny SDXL is loaded onto another
    without Dynamo tracing it again, and every call of both equals ``full_sync``, the loaded
    instance's the first's bit for bit."""
    from torch._dynamo.utils import compilation_time_metrics

    from districompile import precompile

    _, args, kwargs, full_sync = batch2("tiny_sdxl")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    fresh_dynamo()
    split = SPLITS[-1]
    options = {"warmup_steps": WARMUP, "single_rank_exchanges": dist.get_world_size() == 1, "split_batch": split}
    # Two instances of the seeded model, not the fixture's (precompile installs itself on the module).
    first, second = (on_gpu(*tiny_sdxl_unet(batch=2), torch.float32)[0] for _ in range(2))
    with torch.no_grad():
        precompile.precompile(first, args, kwargs, options)
        outputs = [as_tensor(first(*args, **kwargs)) for _ in range(CALLS)]
        path = precompile.save(first, tmp_path / "forward")
        traces = len(compilation_time_metrics.get("fullgraph_capture", []))
        precompile.load(second, path)
        loaded = [as_tensor(second(*args, **kwargs)) for _ in range(CALLS)]
    assert traces == 1 and len(compilation_time_metrics["fullgraph_capture"]) == 1
    errors = [relative_error(out, full_sync[split]) for out in outputs + loaded]
    print(f"\nprecompiled: rel err per call {[f'{e:.1e}' for e in errors]}")
    assert max(errors) < 1e-4, errors
    for fresh, again in zip(outputs, loaded):
        torch.testing.assert_close(again, fresh, rtol=0, atol=0)


def test_deferred_checks_queue_steady_calls_without_a_host_sync():
    """With ``host_checks="deferred"`` a replayed steady call makes no synchronizing CUDA call (the
    sync debug mode raises on one); with ``per_call`` its check's host read does. Same outputs."""
    model, args, kwargs = on_gpu(*micro_unet(height=32, width=32, batch=2), torch.float32)
    outputs, errors = {}, {}
    for checks in ("per_call", "deferred"):
        fresh_dynamo()
        options = {"warmup_steps": WARMUP, "single_rank_exchanges": dist.get_world_size() == 1, "host_checks": checks}
        compiled = torch.compile(model, backend="distri", options=options)
        with torch.no_grad():
            # Warm-up calls, then the steady phase's eager call and its capture: the next call replays.
            outputs[checks] = [as_tensor(compiled(*args, **kwargs)).clone() for _ in range(WARMUP + 2)]
            torch.cuda.set_sync_debug_mode("error")
            try:
                outputs[checks].append(as_tensor(compiled(*args, **kwargs)).clone())
            except RuntimeError as error:
                errors[checks] = str(error)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            districompile.settle(model)
    assert "deferred" not in errors, errors["deferred"]
    assert "synchronizing" in errors.get("per_call", ""), errors
    for call, (ours, per_call) in enumerate(zip(outputs["deferred"], outputs["per_call"])):
        assert relative_error(ours, per_call) < 1e-6, f"call {call}"
    assert len(outputs["deferred"]) == WARMUP + 3


def stale_trajectory(model, x, t_values, context, kwargs, **options):
    fresh_dynamo()
    options = {"sync_mode": "stale_gn", "warmup_steps": 2, "single_rank_exchanges": True, **options}
    compiled = torch.compile(model, backend="distri", options=options)
    outputs = []
    with torch.no_grad():
        for _ in range(2):  # the second trajectory checks that reset restarts replayed phases
            districompile.reset(model)
            latent = x
            for t in t_values:
                out = as_tensor(compiled(latent, torch.tensor(t, device="cuda"), context, **kwargs))
                outputs.append(out)
                latent = latent - 0.1 * out
    # Dynamo may keep an earlier test's runtime alive past its reset: pick this one by its options.
    (runtime,) = [r for r in districompile.runtimes(model) if r.config == DistriConfig.from_options(options)]
    return outputs, runtime.graph_counts()


def test_replayed_steady_phase_keeps_stale_state():
    model, (x, _, context), kwargs = sdxl_on_gpu(torch.float32)
    t_values = [900.0, 800.0, 700.0, 600.0, 500.0, 400.0]
    replayed, counts = stale_trajectory(model, x, t_values, context, kwargs)
    eager, eager_counts = stale_trajectory(model, x, t_values, context, kwargs, lowering="eager", cuda_graphs=False)
    exact, _ = stale_trajectory(model, x, t_values, context, kwargs, sync_mode="full_sync", lowering="eager", cuda_graphs=False)

    # Each phase: its first call eager, one capture, then replays (2 warm-up + 4 steady calls, twice).
    assert counts == {"captures": 2, "replays": 12 - 2, "eager_calls": 2}
    assert eager_counts == {"captures": 0, "replays": 0, "eager_calls": 0}
    for step, (out, ref) in enumerate(zip(replayed, eager)):
        assert relative_error(out, ref) < 1e-3, f"call {step}: replay differs from the eager lowering"
    # The steady calls really used stale statistics (else the comparison above proves nothing).
    assert relative_error(eager[3], exact[3]) > 1e-4
    # The second trajectory, after reset, repeats the first.
    for step in range(len(t_values)):
        assert relative_error(replayed[step + len(t_values)], replayed[step]) < 1e-5, f"step {step} after reset"


def _sdxl_2048():
    from districompile.unets import SDXL, sdxl_unet

    return (*sdxl_unet(SDXL, 2048, 2, torch.float16, "cuda"), {"split_batch": False})


def _flux_1024():
    from districompile.unets import FLUX_DEV, flux_transformer

    model, args, kwargs, token_grids = flux_transformer(FLUX_DEV, 1024, 1, torch.bfloat16, "cuda")
    return model, args, kwargs, {"token_grids": token_grids}


def _small_transformer(factory):
    return lambda: (*on_gpu(*factory(), torch.float16), {"split_batch": False})


PLANS = {
    "sdxl_2048": _sdxl_2048, "flux_dev_1024": _flux_1024,
    "sd3_small": _small_transformer(tiny_sd3_transformer), "pixart_small": _small_transformer(tiny_pixart_transformer),
}


@pytest.mark.parametrize("name", PLANS)
def test_cuda_plan_has_no_fallback(name):
    """A 2-rank plan (``explain``: fake tensors, nothing computed) of the model as captured on CUDA."""
    fresh_dynamo()
    model, args, kwargs, options = PLANS[name]()
    report = districompile.explain(model, *args, world_size=2, verbose=False, **options, **kwargs)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    assert report.fallbacks == [], [f"{f}: {f.reason}" for f in report.fallbacks]
    assert report.count("kv_gather") > 0
