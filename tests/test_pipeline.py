"""``districompile.parallelize`` on tiny StableDiffusion and StableDiffusionControlNet pipelines
(random weights), 2 CPU ranks."""

import numpy as np
import pytest
import torch
from dist import run_ranks

import districompile
from districompile.metrics import relative_error
from districompile.unets import TINY_SD15

WORLD = 2
SEED = 0
STEPS = 4
TEXT_TOKENS, TEXT_DIM = 7, TINY_SD15["cross_attention_dim"]


def tiny_pipeline(controlnet=False):
    """A StableDiffusionPipeline of tiny seeded models (or, with ``controlnet``, a
    StableDiffusionControlNetPipeline, its conditioning image in the returned call arguments);
    no text encoder, tokenizer or safety checker."""
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(sample_size=32, **TINY_SD15)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            latent_channels=4,
            norm_num_groups=8,
        )
        embeds = {
            "prompt_embeds": torch.randn(1, TEXT_TOKENS, TEXT_DIM),
            "negative_prompt_embeds": torch.randn(1, TEXT_TOKENS, TEXT_DIM),
        }
        if controlnet:  # the image at the pipeline's resolution, 2x the latent: one downsampling
            control = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
            for parameter in control.controlnet_down_blocks.parameters():  # not the zero init: a visible effect
                torch.nn.init.normal_(parameter, std=0.1)
            embeds["image"] = torch.rand(1, 3, 64, 64)
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    parts = dict(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe = StableDiffusionControlNetPipeline(controlnet=control, **parts) if controlnet else StableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, embeds


def generate(pipe, embeds, output_type="np"):
    # 64x64 pixels: a 32x32 latent (the VAE downsamples by 2). Guidance doubles the UNet batch.
    return pipe(
        **embeds, height=64, width=64, num_inference_steps=STEPS, output_type=output_type,
        generator=torch.Generator().manual_seed(SEED),
    ).images


def _run(rank, world_size):
    pipe, embeds = tiny_pipeline()
    reference = {"np": generate(pipe, embeds), "latent": generate(pipe, embeds, "latent")}

    districompile.parallelize(pipe, sync_mode="full_sync", lowering="eager")
    pipe.set_progress_bar_config(disable=True)
    exact = generate(pipe, embeds)
    # Guidance's batch of 2 is split (split_batch, the default): each rank denoises one half.
    splits = [t.batch_split is not None for r in districompile.runtimes(pipe.unet) for t in r.trajectories.values()]

    pipe, embeds = tiny_pipeline()
    # Unsplit: split at 2 ranks, each half of the batch would run on a rank of its own, with nothing to displace.
    districompile.parallelize(pipe, warmup_steps=2, lowering="eager", split_batch=False)  # corrected_async_gn
    pipe.set_progress_bar_config(disable=True)
    displaced = [generate(pipe, embeds) for _ in range(2)]

    pipe, embeds = tiny_pipeline(controlnet=True)
    controlled = {"np": generate(pipe, embeds), "plain": generate(tiny_pipeline()[0], {k: v for k, v in embeds.items() if k != "image"})}
    controlnet = pipe.controlnet
    districompile.parallelize(pipe, sync_mode="full_sync", lowering="eager", split_batch=False)
    controlled["parallel"] = generate(pipe, embeds)
    controlled["runtimes"] = [len(districompile.runtimes(model)) for model in (pipe.unet, controlnet)]
    return reference, (exact, splits), displaced, controlled


@pytest.fixture(scope="module")
def ranks():
    """Per rank: the single-process outputs, the full_sync output and two displaced outputs."""
    return run_ranks(_run, WORLD, timeout=300.0)


def test_full_sync_matches_single_process(ranks):
    (reference, (images, splits), *_), (_, (latents, _), *_) = ranks
    assert splits == [True]
    assert isinstance(images, np.ndarray) and images.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(images, reference["np"], rtol=0, atol=1e-4)
    # The other ranks skip the VAE: they return the final latents.
    assert isinstance(latents, torch.Tensor) and latents.shape == (1, 4, 32, 32)
    assert relative_error(latents, reference["latent"]) < 1e-4


def test_displaced_mode(ranks):
    (_, _, (images, images_again), _), (reference, _, (latents, latents_again), _) = ranks
    assert np.isfinite(images).all() and torch.isfinite(latents).all()
    # The options reach the compiled UNet: steps after the warm-up used stale values.
    assert relative_error(latents, reference["latent"]) > 1e-6
    # Every call is a new trajectory (parallelize resets; the timestep going up would restart it
    # too), so the same seed gives the same output again.
    np.testing.assert_array_equal(images, images_again)
    torch.testing.assert_close(latents, latents_again, rtol=0, atol=0)


def test_controlnet_pipeline_matches_single_process(ranks):
    """The UNet and the ControlNet both compiled: the ControlNet's residuals (whole on every rank)
    enter the UNet split at their own resolutions."""
    (*_, controlled), _ = ranks
    assert controlled["runtimes"] == [1, 1]
    np.testing.assert_allclose(controlled["parallel"], controlled["np"], rtol=0, atol=1e-4)
    assert np.abs(controlled["np"] - controlled["plain"]).max() > 1e-3  # the ControlNet changed the image
