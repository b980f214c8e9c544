"""Generate an image with an SDXL-architecture pipeline whose UNet runs patch-parallel over ranks.

By default the pipeline is a small SDXL-like model with random weights (SDXL's UNet block layout
and text_time conditioning, a 4-level VAE, the Euler scheduler), so the script runs anywhere,
in about a minute on a CPU; ``--model PATH`` loads a local diffusers checkpoint folder instead.
No text encoder runs: the prompt embeddings are random (seeded), so the image follows no prompt.
Rank 0 saves the image (PNG) and a JSON report (settings, time per step) next to it.

    python examples/generate.py                          # spawns 2 CPU ranks, or one per GPU
    python examples/generate.py --compare                # + PSNR/SSIM against one device
    torchrun --nproc-per-node 4 examples/generate.py --model /path/to/sdxl --height 1024 --width 1024
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

import districompile
from launch import launch
from districompile.config import LOWERINGS, PARALLELISMS, SYNC_MODES
from districompile.unets import pooled_dim, sdxl_config

TEXT_TOKENS = 77  # CLIP's sequence length


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local diffusers SDXL checkpoint folder (default: small random SDXL-like)")
    parser.add_argument("--world-size", type=int, help="ranks to spawn (default: all GPUs, or 2 on CPU)")
    parser.add_argument("--height", type=int, default=256, help="image height in pixels (default: 256)")
    parser.add_argument("--width", type=int, default=256, help="image width in pixels (default: 256)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    parser.add_argument("--sync-mode", default="corrected_async_gn", choices=SYNC_MODES)
    parser.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps first (default: 4)")
    parser.add_argument("--parallelism", default="patch", choices=PARALLELISMS)
    parser.add_argument(
        "--lowering", choices=LOWERINGS,
        help="default: inductor on GPU, eager on CPU (compiles faster)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents and embeddings (default: 0)")
    parser.add_argument("--out", default="generate.png", help="image path; the report goes next to it as .json")
    parser.add_argument("--compare", action="store_true", help="also run on one device (rank 0): PSNR, SSIM")
    args = parser.parse_args()
    if args.lowering is None:
        args.lowering = "inductor" if torch.cuda.is_available() else "eager"
    return args


# ----------------------------------------------------------------------------- the pipeline


def small_sdxl(height, width):
    """SDXL's architecture (block types, text_time conditioning, 4-level VAE) at a fraction of its width."""
    torch.manual_seed(0)  # every rank builds the same weights
    config = sdxl_config(
        widths=(32, 64, 128), transformer_layers=(1, 1, 2), heads=(2, 4, 8), text_dim=64, pooled_dim=64, time_embed_dim=16
    )
    unet = UNet2DConditionModel(sample_size=(height // 8, width // 8), **config)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        latent_channels=4,
        norm_num_groups=16,
        scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        unet=unet, scheduler=scheduler, add_watermarker=False,
    )


def build_pipeline(args, device):
    if args.model:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = StableDiffusionXLPipeline.from_pretrained(
            args.model, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
            dtype=dtype, add_watermarker=False,
        )
    else:
        pipe = small_sdxl(args.height, args.width)
    return pipe.to(device)


def random_embeddings(pipe, seed):
    """Seeded stand-ins for both text encoders' outputs, sized from the UNet's config."""
    config, generator = pipe.unet.config, torch.Generator().manual_seed(seed)
    pooled = pooled_dim(config)
    shapes = {
        "prompt_embeds": (1, TEXT_TOKENS, config.cross_attention_dim),
        "negative_prompt_embeds": (1, TEXT_TOKENS, config.cross_attention_dim),
        "pooled_prompt_embeds": (1, pooled),
        "negative_pooled_prompt_embeds": (1, pooled),
    }
    return {
        name: torch.randn(shape, generator=generator).to(pipe.device, pipe.unet.dtype) for name, shape in shapes.items()
    }


def generate(pipe, embeds, args, steps):
    """Run the pipeline once; returns its images (a tensor on ranks other than 0 once parallelized)
    and the seconds that each denoising step took."""
    device = pipe.device
    stamps = []

    def stamp(pipe, step, timestep, tensors):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
        return tensors

    start = time.perf_counter()
    images = pipe(
        **embeds, height=args.height, width=args.width, num_inference_steps=steps, output_type="np",
        generator=torch.Generator().manual_seed(args.seed), callback_on_step_end=stamp,
    ).images
    return images, np.diff([start, *stamps]).tolist()


# ----------------------------------------------------------------------------- image metrics


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = float(np.mean((image.astype(np.float64) - reference) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def ssim(image, reference, window=11, sigma=1.5) -> float:
    """Mean structural similarity of (H, W, C) images in [0, 1], per channel, with a Gaussian window
    (Wang et al. 2004: 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03), over the window's valid positions."""
    a, b = (torch.from_numpy(x).double().permute(2, 0, 1)[None] for x in (image, reference))
    offsets = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    gauss = torch.exp(-(offsets**2) / (2 * sigma**2))
    gauss /= gauss.sum()
    channels = a.shape[1]
    kernel = (gauss[:, None] * gauss[None, :]).expand(channels, 1, window, window)

    def mean(x):
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_b = mean(a), mean(b)
    var_a, var_b = mean(a * a) - mu_a**2, mean(b * b) - mu_b**2
    cov = mean(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean().item()


# ----------------------------------------------------------------------------- ranks


def run(args, rank, world_size, device):
    pipe = build_pipeline(args, device)
    embeds = random_embeddings(pipe, args.seed)
    settings = {**vars(args), "model": args.model or "small random SDXL-like"}
    del settings["world_size"]  # the option; the world size in effect follows
    report = {
        "settings": settings,
        "world_size": world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(pipe.unet.dtype),
    }

    if args.compare and rank == 0:
        # The single-device baseline, while the other ranks wait.
        pipe.set_progress_bar_config(desc="1 device")
        reference, reference_steps = generate(pipe, embeds, args, args.steps)
    if args.compare:
        dist.barrier()

    districompile.parallelize(
        pipe, sync_mode=args.sync_mode, warmup_steps=args.warmup_steps, parallelism=args.parallelism,
        lowering=args.lowering,
    )
    pipe.set_progress_bar_config(desc=f"{world_size} ranks", disable=rank != 0)
    # A first, short call compiles both phases (warm-up and steady) and runs each once.
    start = time.perf_counter()
    generate(pipe, embeds, args, max(args.warmup_steps, 1) + 1)
    report["compile_call_seconds"] = time.perf_counter() - start
    images, step_seconds = generate(pipe, embeds, args, args.steps)
    if rank != 0:
        return

    report["seconds_per_step"] = float(np.mean(step_seconds))
    report["step_seconds"] = step_seconds
    out = Path(args.out)
    Image.fromarray((images[0] * 255).round().astype(np.uint8)).save(out)
    print(f"{world_size} ranks: {report['seconds_per_step'] * 1e3:.1f} ms/step; image saved to {out}")
    if args.compare:
        report["compare"] = {
            "psnr_db": psnr(images[0], reference[0]),
            "ssim": ssim(images[0], reference[0]),
            "single_device_seconds_per_step": float(np.mean(reference_steps)),
        }
        compare = report["compare"]
        print(
            f"1 device: {compare['single_device_seconds_per_step'] * 1e3:.1f} ms/step; "
            f"PSNR {compare['psnr_db']:.2f} dB, SSIM {compare['ssim']:.4f} against it"
        )
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report saved to {out.with_suffix('.json')}")


def main():
    launch(run, parse_args())


if __name__ == "__main__":
    main()
