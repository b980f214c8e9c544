"""Diffusion transformers through the same compiler: SD3's MMDiT and PixArt's DiT (tiny configs).

- SD3's joint attention runs on a joint sequence (the image's rows, the text's tokens a replicated
  flank): image queries local, the text's outputs computed alike on every rank, only the image
  rows of K/V gathered; the output is split back into the image's tokens and the text's;
- patch embedding (a conv of stride = patch size), SD3's positional table cropped to the grid,
  AdaLN modulation and the final unpatchify are local.

``full_sync`` equals one process at worlds 2 and 3 (fp32, 1e-4) with no fallback gather in the
plan, and the default displaced mode stays closer to one process than ``naive_patch`` over a
short trajectory (world 2); their pipelines (StableDiffusion3Pipeline, PixArtSigmaPipeline) through
``parallelize`` equal one process. Flux's packed tokens are refused with an error that says why.
One spawn per world runs every model; the tests check what it returns.
"""

import pytest
import torch
from checks import dynamo_graph
from dist import world_fixtures
from models import as_tensor, tiny_flux_transformer, tiny_pixart_transformer, tiny_sd3_transformer

import districompile
from districompile import DistriCompileError
from districompile.backends.distri import distri_backend
from districompile.metrics import psnr, relative_error

TOLERANCE = 1e-4
TIMESTEPS = (900, 700, 500, 300)
TRANSFORMERS = {"sd3": tiny_sd3_transformer, "pixart": tiny_pixart_transformer}


def trajectory(model, args, kwargs, reset=lambda: None) -> torch.Tensor:
    """A short denoising loop over falling timesteps: ``x <- x - 0.1 * eps(x, t)`` (PixArt also
    predicts a variance: its leading channels are the noise)."""
    reset()
    (x,) = args
    for t in TIMESTEPS:
        eps = as_tensor(model(x, **{**kwargs, "timestep": torch.full_like(kwargs["timestep"], t)}))
        x = x - 0.1 * eps[:, : x.shape[1]]
    return x


def tiny_dit_pipeline(kind):
    """An SD3 or PixArt-Sigma pipeline of tiny seeded models (no text encoders: embeddings are passed),
    and its call arguments: 32x32 pixels, a 16x16 latent, 3 steps with guidance (a batch of 2)."""
    from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, PixArtSigmaPipeline, StableDiffusion3Pipeline

    transformer, _, _ = TRANSFORMERS[kind]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, shift_factor=0.0,
        )
        text, negative = torch.randn(1, 7, 24), torch.randn(1, 7, 24)
        call = {"prompt_embeds": text, "negative_prompt_embeds": negative, "height": 32, "width": 32, "num_inference_steps": 3}
        if kind == "sd3":
            call.update(pooled_prompt_embeds=torch.randn(1, 12), negative_pooled_prompt_embeds=torch.randn(1, 12))
            encoders = {f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
            pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, **encoders)
        else:
            call.update(
                negative_prompt=None, prompt_attention_mask=torch.ones(1, 7), negative_prompt_attention_mask=torch.ones(1, 7),
                use_resolution_binning=False,
            )
            pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


def generate(pipe, call):
    return pipe(**call, output_type="np", generator=torch.Generator().manual_seed(0)).images


def _run(rank, world):
    errors, quality = {}, {}
    with torch.no_grad():
        for name, factory in TRANSFORMERS.items():
            model, args, kwargs = factory()
            reference = as_tensor(model(*args, **kwargs))
            gm, inputs = dynamo_graph(model, args, kwargs)
            (output,) = distri_backend(gm, inputs, {"sync_mode": "full_sync", "lowering": "eager"})(*inputs)
            errors[name] = relative_error(output, reference)
            if world == 2:
                quality[name] = {"exact": trajectory(model, args, kwargs)}
                for mode, options in (("displaced", {}), ("naive_patch", {"parallelism": "naive_patch"})):
                    torch._dynamo.reset()
                    compiled = torch.compile(model, backend="distri", options={"lowering": "eager", "warmup_steps": 1, **options})
                    quality[name][mode] = trajectory(compiled, args, kwargs, lambda: districompile.reset(model))
            # The pipeline through parallelize (the CFG batch split, where the world is even).
            pipe, call = tiny_dit_pipeline(name)
            reference = generate(pipe, call)
            districompile.parallelize(pipe, sync_mode="full_sync", lowering="eager")
            if rank == 0:  # the other ranks get the images as a tensor
                errors[f"{name} pipeline"] = float(abs(generate(pipe, call) - reference).max())
            else:
                generate(pipe, call)
    return errors, quality


world2, world3, ranks = world_fixtures(_run, timeout=900.0)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_full_sync_equals_one_process(ranks, name):
    world, per_rank = ranks
    for rank, (errors, _) in enumerate(per_rank):
        assert errors[name] < TOLERANCE, f"world {world} rank {rank}: {name} {errors[name]:.2e}"


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_displaced_beats_naive_patch(world2, name):
    for rank, (_, quality) in enumerate(world2):
        runs = quality[name]
        displaced, naive = psnr(runs["displaced"], runs["exact"]), psnr(runs["naive_patch"], runs["exact"])
        if rank == 0:
            print(f"\n{name}: displaced {displaced:.1f} dB, naive_patch {naive:.1f} dB")
        assert displaced > 30, f"rank {rank}: {name} displaced {displaced:.1f} dB"
        assert displaced > naive, f"rank {rank}: {name} displaced {displaced:.1f} dB, naive_patch {naive:.1f} dB"


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_pipeline_through_parallelize_equals_one_process(ranks, name):
    world, per_rank = ranks
    errors, _ = per_rank[0]
    assert errors[f"{name} pipeline"] < TOLERANCE, f"world {world}: {name} pipeline, max |parallel - one process| {errors[f'{name} pipeline']:.2e}"


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_plan_has_no_fallback_and_gathers_only_keys_and_values(name):
    model, args, kwargs = TRANSFORMERS[name]()
    report = districompile.explain(model, *args, world_size=2, verbose=False, split_batch=False, **kwargs)
    assert report.fallbacks == [], [str(f) for f in report.fallbacks]
    # Two layers, K and V each: the image rows of the self- (PixArt) or joint (SD3) attention's K/V.
    # Nothing else is gathered: the patch embedding, positional table, modulation and unpatchify are local.
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


def test_packed_tokens_compiled_unsplit_say_so(caplog):
    # With no process group: a graph with no spatial input needs none, and runs whole.
    model, args, kwargs = tiny_flux_transformer()
    compiled = torch.compile(model, backend="distri", options={"lowering": "eager"})
    with torch.no_grad():
        output = as_tensor(compiled(*args, **kwargs))
        torch.testing.assert_close(output, as_tensor(model(*args, **kwargs)))
    assert any(r.levelname == "WARNING" and "hidden_states" in r.getMessage() and "nothing in parallel" in r.getMessage()
               for r in caplog.records), caplog.text


def test_packed_tokens_are_refused_by_name():
    model, args, kwargs = tiny_flux_transformer()
    with pytest.raises(DistriCompileError, match=r"hidden_states .*packed tokens.*Not built yet"):
        districompile.explain(model, *args, world_size=2, verbose=False, split_batch=False, **kwargs)
    with pytest.raises(DistriCompileError, match=r"hidden_states .*packed tokens.*Not built yet"):
        districompile.explain(
            model, *args, world_size=2, verbose=False, split_batch=False, spatial_inputs=("hidden_states",), **kwargs
        )
