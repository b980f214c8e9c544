"""``districompile.parallelize`` on tiny StableDiffusion, StableDiffusionControlNet, StableDiffusionXL and
StableDiffusionImg2Img pipelines (random weights), 2 CPU ranks; the VAE split across them by default."""

from collections import Counter

import numpy as np
import pytest
import torch
from dist import run_ranks
from models import MICRO_SDXL

import districompile
from districompile.metrics import relative_error
from districompile.unets import TINY_SD15

WORLD = 2
SEED = 0
STEPS = 4
TEXT_TOKENS = 7
KINDS = ("sd", "controlnet", "sdxl", "img2img")
# The UNets: SD-1.5's layout with attention at its first level only (plain mid and up blocks), half
# the nodes of districompile.unets.TINY_SD15, and SDXL's at its smallest (models.MICRO_SDXL). What
# these tests check (guidance, the batch split, the VAE split, ControlNet residuals) does not depend
# on the UNet's size; Dynamo's trace and the plan of each of the five UNets do.
SD15 = {**TINY_SD15, "mid_block_type": "UNetMidBlock2D", "up_block_types": ("UpBlock2D", "UpBlock2D")}


def tiny_pipeline(kind="sd"):
    """A pipeline of tiny seeded models, and its call arguments (embeddings, the size or the input
    image): ``kind`` is "sd" (StableDiffusionPipeline), "controlnet" (StableDiffusionControlNetPipeline,
    with its conditioning image), "sdxl" (StableDiffusionXLPipeline) or "img2img"
    (StableDiffusionImg2ImgPipeline); no text encoder, tokenizer or safety checker."""
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    assert kind in KINDS, kind
    config = MICRO_SDXL if kind == "sdxl" else SD15
    text_dim = config["cross_attention_dim"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(sample_size=32, **config)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            latent_channels=4,
            norm_num_groups=8,
        )
        # 64x64 pixels: a 32x32 latent (the VAE downsamples by 2).
        call = {
            "prompt_embeds": torch.randn(1, TEXT_TOKENS, text_dim),
            "negative_prompt_embeds": torch.randn(1, TEXT_TOKENS, text_dim),
            "height": 64,
            "width": 64,
        }
        if kind == "controlnet":  # the image at the pipeline's resolution, 2x the latent: one downsampling
            control = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
            for parameter in control.controlnet_down_blocks.parameters():  # not the zero init: a visible effect
                torch.nn.init.normal_(parameter, std=0.1)
            call["image"] = torch.rand(1, 3, 64, 64)
        if kind == "sdxl":
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            call["pooled_prompt_embeds"] = torch.randn(1, pooled)
            call["negative_pooled_prompt_embeds"] = torch.randn(1, pooled)
        if kind == "img2img":  # the size is the input image's
            del call["height"], call["width"]
            call["image"] = torch.rand(1, 3, 64, 64)
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
            scheduler=scheduler, add_watermarker=False,
        )
    else:
        parts = dict(
            vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipeline = {"sd": StableDiffusionPipeline, "img2img": StableDiffusionImg2ImgPipeline}.get(kind)
        pipe = StableDiffusionControlNetPipeline(controlnet=control, **parts) if kind == "controlnet" else pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


def generate(pipe, call, output_type="np"):
    # Guidance doubles the UNet batch.
    return pipe(**call, num_inference_steps=STEPS, output_type=output_type, generator=torch.Generator().manual_seed(SEED)).images


def vae_runs(pipe):
    """Per compiled VAE graph (the decoder's; the encoder's where the pipeline encodes): the exchanges of
    its per-rank program by kind, and how many times it ran; sorted."""
    runs, owners = [], {id(p) for p in pipe.vae.parameters()}
    for runtime in districompile.runtimes(pipe.vae.decode) + districompile.runtimes(pipe.vae.encode):
        # Dynamo may share a graph, and so a runtime, between the pipelines' VAEs: this one's trajectories only.
        for (owner, _), trajectory in runtime.trajectories.items():
            if owner not in owners:
                continue
            (program,) = trajectory.programs.values()
            kinds = Counter(node.meta["exchange"] for node in program.graph.nodes if "exchange" in node.meta)
            runs.append((dict(kinds), sum(trajectory.phase_calls.values())))
    return sorted(runs, key=str)


def _run(rank, world_size):
    out = {}
    sd, call = tiny_pipeline()
    out["reference"] = {"np": generate(sd, call), "latent": generate(sd, call, "latent")}
    districompile.parallelize(sd, sync_mode="full_sync", lowering="eager")
    sd.set_progress_bar_config(disable=True)
    out["exact"] = generate(sd, call)
    # Guidance's batch of 2 is split (split_batch, the default): each rank denoises one half.
    out["splits"] = [t.batch_split is not None for r in districompile.runtimes(sd.unet) for t in r.trajectories.values()]
    out["vae"] = vae_runs(sd)

    unsplit, call = tiny_pipeline()
    # Unsplit: split at 2 ranks, each half of the batch would run on a rank of its own, with nothing to displace.
    districompile.parallelize(unsplit, split_vae=False, warmup_steps=2, lowering="eager", split_batch=False)  # corrected_async_gn
    unsplit.set_progress_bar_config(disable=True)
    out["displaced"] = [generate(unsplit, call) for _ in range(2)]
    out["unsplit vae compiled"] = "decode" in unsplit.vae.__dict__

    controlled, call = tiny_pipeline("controlnet")
    plain = {k: v for k, v in call.items() if k != "image"}
    out["controlnet"] = {"np": generate(controlled, call), "plain": generate(tiny_pipeline()[0], plain)}
    controlnet = controlled.controlnet
    districompile.parallelize(controlled, sync_mode="full_sync", lowering="eager", split_batch=False)
    out["controlnet"]["parallel"] = generate(controlled, call)
    out["controlnet"]["runtimes"] = [len(districompile.runtimes(model)) for model in (controlled.unet, controlnet)]

    for kind in ("sdxl", "img2img"):
        pipe, call = tiny_pipeline(kind)
        reference = generate(pipe, call)
        districompile.parallelize(pipe, sync_mode="full_sync", lowering="eager")
        out[kind] = {"np": reference, "parallel": generate(pipe, call), "vae": vae_runs(pipe)}
    return out


@pytest.fixture(scope="module")
def ranks():
    """Per rank: the single-process outputs and the parallel ones of each pipeline, with what its VAE ran."""
    return run_ranks(_run, WORLD, timeout=600.0)


def test_full_sync_matches_single_process(ranks):
    first, other = ranks
    assert first["splits"] == [True]
    images = first["exact"]
    assert isinstance(images, np.ndarray) and images.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(images, first["reference"]["np"], rtol=0, atol=1e-4)
    # The other ranks decode with rank 0 and get the same images, as a tensor (output_type "pt").
    decoded = other["exact"]
    assert isinstance(decoded, torch.Tensor) and decoded.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(decoded.permute(0, 2, 3, 1).numpy(), images, rtol=0, atol=1e-6)


def test_vae_decode_runs_split(ranks):
    """The decoder ran once per call (reference excluded), on its rows, exchanging halos and GroupNorm
    statistics, its output gathered on every rank."""
    for out in ranks:
        ((kinds, calls),) = out["vae"]
        assert calls == 1
        assert kinds["halo"] > 0 and kinds["stats_allgather"] > 0 and kinds["output_gather"] == 1


@pytest.mark.parametrize("kind", ["sdxl", "img2img"])
def test_pipeline_with_split_vae_matches_single_process(ranks, kind):
    first, other = (out[kind] for out in ranks)
    np.testing.assert_allclose(first["parallel"], first["np"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(other["parallel"].permute(0, 2, 3, 1).numpy(), first["np"], rtol=0, atol=1e-4)
    # img2img also encodes its input image: the encoder runs split too.
    graphs = first["vae"]
    assert len(graphs) == (2 if kind == "img2img" else 1)
    assert all(kinds["halo"] > 0 and calls == 1 for kinds, calls in graphs)


def test_displaced_mode(ranks):
    first, other = ranks
    images, images_again = first["displaced"]
    latents, latents_again = other["displaced"]
    assert np.isfinite(images).all() and torch.isfinite(latents).all()
    # split_vae=False: the VAE is not compiled, and the other ranks skip it: they return the final latents.
    assert not first["unsplit vae compiled"] and latents.shape == (1, 4, 32, 32)
    # The options reach the compiled UNet: steps after the warm-up used stale values.
    assert relative_error(latents, other["reference"]["latent"]) > 1e-6
    # Every call is a new trajectory (parallelize resets; the timestep going up would restart it
    # too), so the same seed gives the same output again.
    np.testing.assert_array_equal(images, images_again)
    torch.testing.assert_close(latents, latents_again, rtol=0, atol=0)


def test_controlnet_pipeline_matches_single_process(ranks):
    """The UNet and the ControlNet both compiled: the ControlNet's residuals (whole on every rank)
    enter the UNet split at their own resolutions."""
    controlled = ranks[0]["controlnet"]
    assert controlled["runtimes"] == [1, 1]
    np.testing.assert_allclose(controlled["parallel"], controlled["np"], rtol=0, atol=1e-4)
    assert np.abs(controlled["np"] - controlled["plain"]).max() > 1e-3  # the ControlNet changed the image


def test_unknown_option_names_it():
    pipe, _ = tiny_pipeline()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['split_vea'\]"):
        districompile.parallelize(pipe, split_vea=False)
