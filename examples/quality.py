"""How far each sync mode's final latent lands from the single-device one, on tiny UNets.

Runs a DDIM trajectory (diffusers' DDIMScheduler) from a random latent with a tiny SD-1.5-like and
a tiny SDXL-like UNet (random weights), once on one device and once patch-parallel per sync mode
and warm-up length, and prints the PSNR of each final latent against the single-device one as a
markdown table (last). Eager lowering, ranks started by ``launch.py`` (CPU ranks with gloo, or one
per GPU):

    python examples/quality.py                  # 2 ranks, 20 steps, 32x32 latents
"""

import argparse
import math

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from launch import launch

DISPLACED_MODES = ("corrected_async_gn", "stale_gn", "separate_gn", "no_sync")
WARMUPS = (1, 2, 4)
TEXT_TOKENS, TEXT_DIM = 7, 32


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2, help="ranks to spawn (default: 2)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    parser.add_argument("--size", type=int, default=32, help="latent height and width (default: 32)")
    return parser.parse_args()


# ----------------------------------------------------------------------------- models


def tiny_sd15(size):
    unet = UNet2DConditionModel(
        sample_size=size,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet, {}


def tiny_sdxl(size):
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=size,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=TEXT_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_DIM,  # time ids + pooled text
        norm_num_groups=8,
    )
    pixels = 8 * size  # SDXL's micro-conditioning: original size, crop corner, target size
    time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]], dtype=torch.float32)
    return unet, {"added_cond_kwargs": {"text_embeds": torch.randn(1, TEXT_DIM), "time_ids": time_ids}}


MODELS = {"tiny SD-1.5": tiny_sd15, "tiny SDXL": tiny_sdxl}


def build(name, size, device):
    """The UNet, its inputs and the initial latent, seeded: every rank builds the same ones."""
    torch.manual_seed(0)
    unet, kwargs = MODELS[name](size)
    context = torch.randn(1, TEXT_TOKENS, TEXT_DIM)
    latent = torch.randn(1, 4, size, size)
    kwargs = {k: {n: t.to(device) for n, t in v.items()} for k, v in kwargs.items()}
    return unet.eval().to(device), latent.to(device), context.to(device), kwargs


# ----------------------------------------------------------------------------- trajectories


def trajectory(unet, latent, context, kwargs, steps):
    """The final latent of a DDIM trajectory of ``steps`` steps (SD's noise schedule)."""
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    scheduler.set_timesteps(steps)
    latent = latent * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(latent, t, context, **kwargs).sample
            latent = scheduler.step(eps, t, latent).prev_sample
    return latent


def psnr(out, ref) -> float:
    """In dB, with the reference latent's range as the peak."""
    mse = (out - ref).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10((ref.max() - ref.min()).item() ** 2 / mse)


def configurations():
    """``(row label, warm-up column or None for all, options)``; full_sync and naive_patch have no warm-up."""
    for mode in DISPLACED_MODES:
        for warmup in WARMUPS:
            yield mode, warmup, {"sync_mode": mode, "warmup_steps": warmup}
    yield "naive_patch", None, {"parallelism": "naive_patch"}
    yield "full_sync", None, {"sync_mode": "full_sync"}


def run(args, rank, world_size, device):
    """Every configuration on every rank; rank 0 prints the table of PSNRs."""
    results = {}  # {(model, row): {warm-up: PSNR}}
    for name in MODELS:
        unet, latent, context, kwargs = build(name, args.size, device)
        reference = trajectory(unet, latent, context, kwargs, args.steps)
        for row, warmup, options in configurations():
            torch._dynamo.reset()  # a fresh compile each time, clear of Dynamo's recompile limit
            compiled = torch.compile(unet, backend="distri", options={"lowering": "eager", **options})
            value = psnr(trajectory(compiled, latent, context, kwargs, args.steps), reference)
            for column in [warmup] if warmup else WARMUPS:
                results.setdefault((name, row), {})[column] = value
            if rank == 0:
                print(f"{name}, {row}, warm-up {warmup or '-'}: PSNR {value:.1f} dB", flush=True)
    if rank == 0:
        print("\n" + table(results, args, world_size))


def table(results, args, world_size) -> str:
    head = " | ".join(f"warm-up {w}" for w in WARMUPS)
    lines = [
        (
            f"PSNR (dB) of the final latent against single-device, {args.steps} DDIM steps, "
            f"{args.size}x{args.size} latent, {world_size} ranks"
        ),
        "",
        f"| model | sync mode | {head} |",
        "|---|---|" + "---:|" * len(WARMUPS),
    ]
    for (name, row), by_warmup in results.items():
        cells = " | ".join("inf" if math.isinf(by_warmup[w]) else f"{by_warmup[w]:.1f}" for w in WARMUPS)
        lines.append(f"| {name} | {row} | {cells} |")
    return "\n".join(lines)


def main():
    launch(run, parse_args())


if __name__ == "__main__":
    main()
