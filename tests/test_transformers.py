"""Diffusion transformers through the same compiler: SD3's MMDiT, PixArt's DiT and Flux (tiny configs).

- SD3's joint attention runs on a joint sequence (the image's rows, the text's tokens a replicated
  flank): image queries local, the text's outputs computed alike on every rank, only the image
  rows of K/V gathered; the output is split back into the image's tokens and the text's;
- patch embedding (a conv of stride = patch size), SD3's positional table cropped to the grid,
  AdaLN modulation and the final unpatchify are local;
- Flux takes its latent as packed tokens: ``token_grids`` names their grid, and the tokens and
  their positions ``img_ids`` split by whole grid rows (RoPE computed locally).

``full_sync`` equals one process at worlds 2 and 3 (fp32, 1e-4) with no fallback gather in the
plan, and the default displaced mode stays closer to one process than ``naive_patch`` over a
short trajectory (world 2); their pipelines (StableDiffusion3Pipeline, PixArtSigmaPipeline,
FluxPipeline) through ``parallelize`` equal one process. Packed tokens with no grid are refused
with an error that names the fix. One spawn per world runs every model; the tests check what it
returns.
"""

import pytest
import torch
from dist import world_fixtures
from models import as_tensor, tiny_flux_transformer, tiny_pixart_transformer, tiny_sd3_transformer

import districompile
from districompile import DistriCompileError, ShapeError
from districompile.metrics import psnr, relative_error
from districompile.sharding import Shard

TOLERANCE = 1e-4
TIMESTEPS = (900, 700, 500, 300)
TRANSFORMERS = {"sd3": tiny_sd3_transformer, "pixart": tiny_pixart_transformer, "flux": tiny_flux_transformer}
# Flux's packed latent and its positions: a 16 x 16 latent in 2 x 2 patches, an 8 x 8 token grid.
FLUX_GRIDS = {"hidden_states": (8, 8), "img_ids": (8, 8)}
OPTIONS = {"flux": {"token_grids": FLUX_GRIDS}}
# (model, options) by case; Flux with its positions left whole too: its RoPE table computed in full, sliced to the rows.
FULL_SYNC_CASES = {name: (name, OPTIONS.get(name, {})) for name in TRANSFORMERS}
FULL_SYNC_CASES["flux, img_ids whole"] = ("flux", {"token_grids": {"hidden_states": (8, 8)}})
TIMESTEP_UNITS = {"flux": 1e-3}  # Flux takes timesteps in [0, 1]
# (model, image size) by case; Flux at a second size too: its transformer is compiled per token grid.
PIPELINE_CASES = {f"{name} pipeline": (name, {}) for name in TRANSFORMERS}
PIPELINE_CASES["flux pipeline 48x32"] = ("flux", {"height": 48})


def trajectory(model, args, kwargs, reset=lambda: None, unit=1.0) -> torch.Tensor:
    """A short denoising loop over falling timesteps: ``x <- x - 0.1 * eps(x, t)`` (PixArt also
    predicts a variance: its leading channels are the noise)."""
    reset()
    (x,) = args
    for t in TIMESTEPS:
        eps = as_tensor(model(x, **{**kwargs, "timestep": torch.full_like(kwargs["timestep"], t * unit)}))
        x = x - 0.1 * eps[:, : x.shape[1]]
    return x


def compile_distri(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="distri", options={"lowering": "eager", **options})


def phases_run(model) -> set[str]:
    """The phases a compiled model ran: "synchronous" where it ran split in full_sync, "unsplit" where it ran whole."""
    return {
        phase for runtime in districompile.runtimes(model) for compiled in runtime.trajectories.values()
        for phase, calls in compiled.phase_calls.items() if calls
    }


def tiny_dit_pipeline(kind):
    """An SD3, PixArt-Sigma or Flux pipeline of tiny seeded models (no text encoders: embeddings are
    passed), and its call arguments: 32x32 pixels, a 16x16 latent, 3 steps; SD3 and PixArt with
    guidance (a batch of 2), Flux without (guidance-distilled: a batch of 1)."""
    from diffusers import (
        AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline,
    )

    transformer, _, _ = TRANSFORMERS[kind]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, shift_factor=0.0,
        )
        text, negative = torch.randn(1, 7, 24), torch.randn(1, 7, 24)
        call = {"prompt_embeds": text, "height": 32, "width": 32, "num_inference_steps": 3}
        if kind == "flux":
            call.update(pooled_prompt_embeds=torch.randn(1, 12))
            encoders = {f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2")}
            pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, **encoders)
        elif kind == "sd3":
            call.update(
                negative_prompt_embeds=negative, pooled_prompt_embeds=torch.randn(1, 12),
                negative_pooled_prompt_embeds=torch.randn(1, 12),
            )
            encoders = {f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
            pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, **encoders)
        else:
            call.update(
                negative_prompt_embeds=negative, negative_prompt=None, prompt_attention_mask=torch.ones(1, 7),
                negative_prompt_attention_mask=torch.ones(1, 7), use_resolution_binning=False,
            )
            pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


def generate(pipe, call):
    return pipe(**call, output_type="np", generator=torch.Generator().manual_seed(0)).images


def _run(rank, world):
    errors, quality, phases = {}, {}, {}
    with torch.no_grad():
        for case, (name, options) in FULL_SYNC_CASES.items():
            model, args, kwargs = TRANSFORMERS[name]()
            reference = as_tensor(model(*args, **kwargs))
            output = as_tensor(compile_distri(model, sync_mode="full_sync", **options)(*args, **kwargs))
            errors[case], phases[case] = relative_error(output, reference), phases_run(model)
        for name, factory in TRANSFORMERS.items():
            model, args, kwargs = factory()
            if world == 2:
                unit = TIMESTEP_UNITS.get(name, 1.0)
                quality[name] = {"exact": trajectory(model, args, kwargs, unit=unit)}
                for mode, options in (("displaced", {}), ("naive_patch", {"parallelism": "naive_patch"})):
                    compiled = compile_distri(model, warmup_steps=1, **OPTIONS.get(name, {}), **options)
                    quality[name][mode] = trajectory(compiled, args, kwargs, lambda: districompile.reset(model), unit)
            # The pipeline through parallelize (the CFG batch split, where the world and the batch are even).
            pipe, call = tiny_dit_pipeline(name)
            calls = {case: {**call, **size} for case, (model_name, size) in PIPELINE_CASES.items() if model_name == name}
            references = {case: generate(pipe, case_call) for case, case_call in calls.items()}
            districompile.parallelize(pipe, sync_mode="full_sync", lowering="eager")
            for case, case_call in calls.items():
                if rank == 0:  # the other ranks get the images as a tensor
                    errors[case] = float(abs(generate(pipe, case_call) - references[case]).max())
                else:
                    generate(pipe, case_call)
                phases[case] = phases_run(pipe.transformer)
    return errors, quality, phases


world2, world3, ranks = world_fixtures(_run, timeout=900.0)


@pytest.mark.parametrize("name", FULL_SYNC_CASES)
def test_full_sync_equals_one_process(ranks, name):
    world, per_rank = ranks
    for rank, (errors, _, phases) in enumerate(per_rank):
        assert errors[name] < TOLERANCE, f"world {world} rank {rank}: {name} {errors[name]:.2e}"
        assert phases[name] == {"synchronous"}, f"world {world} rank {rank}: {name} ran {phases[name]}, not split"


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_displaced_beats_naive_patch(world2, name):
    for rank, (_, quality, _) in enumerate(world2):
        runs = quality[name]
        displaced, naive = psnr(runs["displaced"], runs["exact"]), psnr(runs["naive_patch"], runs["exact"])
        if rank == 0:
            print(f"\n{name}: displaced {displaced:.1f} dB, naive_patch {naive:.1f} dB")
        assert displaced > 30, f"rank {rank}: {name} displaced {displaced:.1f} dB"
        assert displaced > naive, f"rank {rank}: {name} displaced {displaced:.1f} dB, naive_patch {naive:.1f} dB"


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_pipeline_through_parallelize_equals_one_process(ranks, case):
    world, per_rank = ranks
    errors, _, phases = per_rank[0]
    assert errors[case] < TOLERANCE, f"world {world}: {case}, max |parallel - one process| {errors[case]:.2e}"
    assert phases[case] == {"synchronous"}, f"world {world}: {case} ran {phases[case]}, not split"


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_plan_has_no_fallback_and_gathers_only_keys_and_values(name):
    model, args, kwargs = TRANSFORMERS[name]()
    options = OPTIONS.get(name, {})
    report = districompile.explain(model, *args, world_size=2, verbose=False, split_batch=False, **options, **kwargs)
    assert report.fallbacks == [], [str(f) for f in report.fallbacks]
    # Two layers, K and V each: the image rows of the self- (PixArt) or joint (SD3, Flux) attention's K/V.
    # Nothing else is gathered: the patch embedding, positional table or RoPE, modulation and unpatchify are local.
    assert report.count("kv_gather") == 4 and report.count("gather") == 0 and report.count("halo") == 0


def test_joint_attention_keeps_image_queries_local():
    """SD3: the joint sequence is the image's rows (4 of the 8 x 8 grid's per rank, 8 tokens each) with
    the text (7 tokens) as a replicated tail; a K/V gather exchanges the image rows only, and the
    attention's output keeps the sharding."""
    model, args, kwargs = tiny_sd3_transformer()
    report = districompile.explain(model, *args, world_size=2, verbose=False, split_batch=False, **kwargs)
    specs = report.plan.propagation.specs
    attentions = [n for n in specs if "scaled_dot_product" in str(n.target)]
    assert len(attentions) == 2
    for node in attentions:
        out = specs[node][0]
        assert (out.dim, out.lead, out.inner, out.tail, out.split.bounds) == (2, 0, 8, 7, (0, 4, 8))
    # [1, 2, 71, 8] fp32 K (or V): the 64 image tokens' rows cross ranks, the 7 text tokens do not.
    assert {e.bytes_per_call for e in report.exchanges if e.kind == "kv_gather"} == {64 * 2 * 8 * 4}


def test_packed_tokens_split_by_whole_grid_rows():
    """Flux at world 3: the 8 grid rows split 3, 3, 2, so rank r holds the 8-token rows of its block,
    its positions alike; the RoPE tables are computed from the local positions (nothing sliced)."""
    model, args, kwargs = tiny_flux_transformer()
    report = districompile.explain(model, *args, world_size=3, verbose=False, token_grids=FLUX_GRIDS, **kwargs)
    inputs = [spec for node, spec in report.plan.propagation.specs.items() if node.op == "placeholder" and isinstance(spec, Shard)]
    # img_ids (64, 3) and hidden_states (1, 64, 16): their tokens, 8 per grid row.
    assert sorted((s.dim, s.inner, s.split.bounds) for s in inputs) == [(0, 8, (0, 3, 6, 8)), (1, 8, (0, 3, 6, 8))]
    assert report.fallbacks == [] and report.count("slice") == 0 and report.count("output_gather") == 1


def test_packed_tokens_compiled_without_grid_run_whole_and_say_how_to_split(caplog):
    # With no process group: a graph with no spatial input needs none, and runs whole.
    model, args, kwargs = tiny_flux_transformer()
    compiled = torch.compile(model, backend="distri", options={"lowering": "eager"})
    with torch.no_grad():
        output = as_tensor(compiled(*args, **kwargs))
        torch.testing.assert_close(output, as_tensor(model(*args, **kwargs)))
    assert any(
        r.levelname == "WARNING" and "hidden_states" in r.getMessage() and "nothing in parallel" in r.getMessage()
        and "token_grids=" in r.getMessage() for r in caplog.records
    ), caplog.text


def test_packed_tokens_without_grid_are_refused_naming_the_fix():
    model, args, kwargs = tiny_flux_transformer()
    fix = r"hidden_states \(1, 64, 16\).*packed tokens.*token_grids=\{'hidden_states'.*parallelize"
    with pytest.raises(DistriCompileError, match=fix):
        districompile.explain(model, *args, world_size=2, verbose=False, **kwargs)
    with pytest.raises(DistriCompileError, match=fix):
        districompile.explain(model, *args, world_size=2, verbose=False, spatial_inputs=("hidden_states",), **kwargs)


@pytest.mark.parametrize(("token_grids", "message"), [
    ({"hidden_states": (8, 7)}, r"token_grids: hidden_states \(1, 64, 16\) .*8 x 7 = 56 tokens of its grid \(8, 7\)"),
    ({"img_ids": (4, 8)}, r"token_grids: img_ids \(64, 3\) .*4 x 8 = 32 tokens"),
    ({"latents": (8, 8)}, r"token_grids=\('latents',\): no input is named \['latents'\].*'hidden_states'"),
])
def test_token_grid_that_does_not_fit_names_the_input_and_grid(token_grids, message):
    model, args, kwargs = tiny_flux_transformer()
    with pytest.raises(DistriCompileError, match=message):
        districompile.explain(model, *args, world_size=2, verbose=False, token_grids=token_grids, **kwargs)


def test_more_ranks_than_grid_rows_is_a_shape_error():
    model, args, kwargs = tiny_flux_transformer()
    with pytest.raises(ShapeError, match=r"9 ranks but height 8 has only 8 blocks of 1 rows"):
        districompile.explain(model, *args, world_size=9, verbose=False, token_grids=FLUX_GRIDS, **kwargs)


@pytest.mark.parametrize("token_grids", [{"hidden_states": (8,)}, {"hidden_states": (0, 8)}, ["hidden_states"]])
def test_malformed_token_grids_are_a_value_error(token_grids):
    with pytest.raises(ValueError, match=r"token_grids=.*grid of image rows and columns by its name"):
        districompile.DistriConfig(token_grids=token_grids)
