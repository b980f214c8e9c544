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

from districompile.metrics import psnr
from districompile.unets import TINY_SD15, TINY_SDXL, pooled_dim, sdxl_time_ids
from launch import launch

DISPLACED_MODES = ("corrected_async_gn", "stale_gn", "separate_gn", "no_sync")
WARMUPS = (1, 2, 4)
TEXT_TOKENS = 7


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=2, help="ranks to spawn (default: 2)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    parser.add_argument("--size", type=int, default=32, help="latent height and width (default: 32)")
    return parser.parse_args()


# ----------------------------------------------------------------------------- models


def tiny_sd15(size):
    return UNet2DConditionModel(sample_size=size, **TINY_SD15), {}


def tiny_sdxl(size):
    unet = UNet2DConditionModel(sample_size=size, **TINY_SDXL)
    added = {"text_embeds": torch.randn(1, pooled_dim(TINY_SDXL)), "time_ids": sdxl_time_ids(1, size, size)}
    return unet, {"added_cond_kwargs": added}


MODELS = {"tiny SD-1.5": tiny_sd15, "tiny SDXL": tiny_sdxl}


def build(name, size, device):
    """The UNet, its inputs and the initial latent, seeded: every rank builds the same ones."""
    torch.manual_seed(0)
    unet, kwargs = MODELS[name](size)
    context = torch.randn(1, TEXT_TOKENS, unet.config.cross_attention_dim)
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
