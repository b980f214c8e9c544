"""Train the small shapes UNet that districompile ships (``districompile.unets.trained_shapes_unet``).

A diffusers ``UNet2DModel`` (``districompile.unets.SHAPES_UNET``: GroupNorm, self-attention at two
resolutions, two downsamplings) learns to predict the noise of a DDPM (diffusers' default linear
schedule) on 32x32 images drawn on the fly: a two-colour gradient background, a rectangle and a
disc, from a palette of eight colours. Seeded, on one CPU thread; the exponential moving average
of the weights is saved as safetensors, and a grid of DDIM samples at 32x32 and 64x64 as PNG:

    python examples/train_tiny.py                     # about 15 minutes on one CPU core
    python examples/train_tiny.py --steps 200 --out /tmp/unet.safetensors --grid /tmp/grid.png
"""

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image
from safetensors.torch import save_file

from districompile.unets import SHAPES_UNET, SHAPES_WEIGHTS, sample_shapes

ROOT = Path(__file__).resolve().parents[1]
PALETTE = torch.tensor(
    [
        [0.90, 0.10, 0.10],  # red
        [0.10, 0.70, 0.20],  # green
        [0.15, 0.30, 0.90],  # blue
        [0.95, 0.85, 0.10],  # yellow
        [0.95, 0.95, 0.95],  # white
        [0.05, 0.05, 0.05],  # black
        [0.60, 0.20, 0.80],  # purple
        [0.10, 0.80, 0.85],  # cyan
    ]
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=700, help="optimiser steps (default: 700)")
    parser.add_argument("--batch", type=int, default=32, help="images per step (default: 32)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="to try a recipe quickly elsewhere (default: cpu)")
    parser.add_argument("--out", type=Path, default=SHAPES_WEIGHTS, help="safetensors file (default: the shipped weights)")
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "images" / "shapes_samples.png", help="sample grid PNG")
    return parser.parse_args()


def draw_shapes(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` images of ``size`` x ``size`` in [-1, 1]: gradient background, a rectangle, a disc on top."""

    def uniform(low, high):
        return low + (high - low) * torch.rand(batch, 1, 1, generator=generator)

    coords = (torch.arange(size) + 0.5) / size
    ys, xs = coords[:, None], coords[None, :]
    # Four different colours per image, so that each shape stands out from what lies under it.
    picks = torch.rand(batch, len(PALETTE), generator=generator).argsort(1)[:, :4]
    background_a, background_b, rectangle, disc = PALETTE[picks].unbind(1)

    angle = uniform(0, 2 * math.pi)
    ramp = (xs - 0.5) * torch.cos(angle) + (ys - 0.5) * torch.sin(angle)
    low, high = ramp.amin((1, 2), keepdim=True), ramp.amax((1, 2), keepdim=True)
    ramp = ((ramp - low) / (high - low))[:, None]
    image = background_a[:, :, None, None] * (1 - ramp) + background_b[:, :, None, None] * ramp

    top, left = uniform(0.05, 0.55), uniform(0.05, 0.55)
    height, width = uniform(0.2, 0.4), uniform(0.2, 0.4)
    in_rectangle = (ys >= top) & (ys < top + height) & (xs >= left) & (xs < left + width)
    image = torch.where(in_rectangle[:, None], rectangle[:, :, None, None], image)

    center_y, center_x, radius = uniform(0.25, 0.75), uniform(0.25, 0.75), uniform(0.1, 0.22)
    in_disc = (ys - center_y) ** 2 + (xs - center_x) ** 2 < radius**2
    image = torch.where(in_disc[:, None], disc[:, :, None, None], image)
    return image * 2 - 1


def learning_rate(step, steps, peak):
    """Linear warm-up over the first 5% of steps, then cosine decay to a tenth of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args, device):
    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed)
    unet = UNet2DModel(**SHAPES_UNET).to(device).train()
    average = copy.deepcopy(unet).eval().requires_grad_(False)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = DDPMScheduler()
    print(f"{sum(p.numel() for p in unet.parameters()):,} parameters, {args.steps} steps of {args.batch} images", flush=True)

    start, recent = time.perf_counter(), []
    for step in range(args.steps):
        clean = draw_shapes(args.batch, SHAPES_UNET["sample_size"], data)
        noise = torch.randn(clean.shape, generator=data)
        t = torch.randint(0, schedule.config.num_train_timesteps, (args.batch,), generator=data)
        noisy = schedule.add_noise(clean, noise, t)
        loss = F.mse_loss(unet(noisy.to(device), t.to(device)).sample, noise.to(device))

        for group in optimiser.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        # Averaging window ramps up to ~200 steps: early weights are poor and the run is short.
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for kept, live in zip(average.parameters(), unet.parameters()):
                kept.lerp_(live, 1 - decay)

        recent.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}: loss {np.mean(recent):.4f} (mean of the last {len(recent)}), "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            recent = []
    print(f"training wall time {time.perf_counter() - start:.1f} s", flush=True)
    return average


def to_pil(images: torch.Tensor, columns: int, scale: int = 1) -> Image.Image:
    """A grid of images in [-1, 1], 2 px apart on white, each enlarged ``scale`` times (nearest)."""
    images = F.interpolate(images.float().cpu(), scale_factor=scale, mode="nearest") if scale > 1 else images.float().cpu()
    count, _, height, width = images.shape
    rows = math.ceil(count / columns)
    grid = torch.ones(3, rows * (height + 2) - 2, columns * (width + 2) - 2)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = row * (height + 2), column * (width + 2)
        grid[:, top : top + height, left : left + width] = (image + 1) / 2
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def save_grid(unet, path, device):
    """Training data, then DDIM samples at the training size and at 2x, stacked vertically."""
    size = SHAPES_UNET["sample_size"]
    noise = torch.Generator().manual_seed(1)
    unet = unet.to(device)
    parts = [
        to_pil(draw_shapes(8, size, torch.Generator().manual_seed(2)), 8, scale=4),
        to_pil(sample_shapes(unet, torch.randn(16, 3, size, size, generator=noise).to(device)), 8, scale=4),
        to_pil(sample_shapes(unet, torch.randn(4, 3, 2 * size, 2 * size, generator=noise).to(device)), 4, scale=4),
    ]
    width = max(part.width for part in parts)
    grid = Image.new("RGB", (width, sum(part.height + 8 for part in parts) - 8), "white")
    top = 0
    for part in parts:
        grid.paste(part, (0, top))
        top += part.height + 8
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    print(f"sample grid (data row, 16 samples at {size}x{size}, 4 at {2 * size}x{2 * size}) in {path}")


def main():
    args = parse_args()
    torch.set_num_threads(1)  # the recorded time is one core's
    device = torch.device(args.device)
    unet = train(args, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous().cpu() for name, tensor in unet.state_dict().items()}, args.out)
    print(f"weights ({args.out.stat().st_size / 2**20:.1f} MiB) in {args.out}")
    save_grid(unet, args.grid, device)


if __name__ == "__main__":
    main()
