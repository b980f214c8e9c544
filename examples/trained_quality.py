"""Fidelity of patch parallelism on a trained UNet: images against one process, and a picture of the seams.

Samples the shipped shapes UNet (``districompile.unets.trained_shapes_unet``, trained at 32x32 by
``train_tiny.py``) by DDIM at a larger size (default 64x64, 2x the training size) from the same
noise, once in this process and once patch-parallel per configuration (``full_sync``, each
displaced sync mode at each warm-up length, ``naive_patch``) at each world size, over CPU ranks
(gloo, one process per rank, eager lowering). Prints PSNR and SSIM of the final images against
the one-process ones as a markdown table, and saves a grid of the world's largest run:

    python examples/trained_quality.py                               # worlds 2 and 4, 50 and 20 steps
    python examples/trained_quality.py --worlds 2 --steps 20 --modes corrected_async_gn --images 1
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import districompile
from districompile.unets import sample_shapes, trained_shapes_unet
from generate import psnr, ssim
from launch import launch

ROOT = Path(__file__).resolve().parents[1]
# no_sync is left out: its ranks' samples drift apart within a trajectory, and the backend's rank
# agreement check (option check_ranks) stops the run (docs/QUALITY.md).
DISPLACED_MODES = ("corrected_async_gn", "stale_gn", "separate_gn")
WARMUPS = (1, 2, 4)
GRID_WARMUP = 4  # the displaced column of the grid: the first mode given (default: the default mode) at warm-up 4


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="ranks per run (default: 2 4)")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 20], help="DDIM steps per trajectory (default: 50 20)")
    parser.add_argument("--modes", nargs="+", default=list(DISPLACED_MODES), help="displaced sync modes (default: all)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default: 64)")
    parser.add_argument("--images", type=int, default=2, help="images per trajectory, one noise seed (default: 2)")
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "images" / "trained_seams.png", help="grid PNG")
    return parser.parse_args()


def initial_noise(args):
    return torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))


def configurations(modes):
    """``(row label, options)`` in table order."""
    yield "full_sync", {"sync_mode": "full_sync"}
    for mode in modes:
        for warmup in WARMUPS:
            yield f"{mode}, warm-up {warmup}", {"sync_mode": mode, "warmup_steps": warmup}
    yield "naive_patch", {"parallelism": "naive_patch"}


def run(args, rank, world_size, device):
    """Every configuration and step count on every rank; rank 0 saves the images to ``args.results``."""
    unet = trained_shapes_unet().to(device)
    noise = initial_noise(args).to(device)
    images = {}
    for row, options in configurations(args.modes):
        torch._dynamo.reset()  # a fresh compile per configuration, clear of Dynamo's recompile limit
        # split_batch off: the images are one batch of samples, not a CFG pair to spread over ranks.
        options = {"lowering": "eager", "split_batch": False, **options}
        compiled = torch.compile(unet, backend="distri", options=options)
        for steps in args.steps:
            districompile.reset(unet)
            images[row, steps] = sample_shapes(compiled, noise, steps).cpu()
        if rank == 0:
            print(f"world {world_size}: {row} done", flush=True)
    if rank == 0:
        torch.save(images, args.results / f"world{world_size}.pt")


def to_numpy(image):
    """(C, H, W) in [-1, 1] to (H, W, C) in [0, 1], as the image metrics take it."""
    return ((image.double() + 1) / 2).permute(1, 2, 0).numpy()


def scores(images, reference):
    """Mean PSNR (dB, peak 1) and SSIM over the batch, on images in [0, 1]."""
    pairs = [(to_numpy(a), to_numpy(b)) for a, b in zip(images, reference)]
    return float(np.mean([psnr(a, b) for a, b in pairs])), float(np.mean([ssim(a, b) for a, b in pairs]))


def table(results, args) -> str:
    """Markdown: a row per configuration, PSNR and SSIM per (world, steps)."""
    columns = [(world, steps) for world in args.worlds for steps in args.steps]
    head = " | ".join(f"W={w}, {s} steps" for w, s in columns)
    lines = [f"| configuration | {head} |", "|---|" + "---:|" * len(columns)]
    for row, _ in configurations(args.modes):
        cells = []
        for column in columns:
            value, similarity = results[column][row]
            cells.append(f"{'inf' if math.isinf(value) else f'{value:.1f}'} / {similarity:.3f}")
        lines.append(f"| {row} | {' | '.join(cells)} |")
    return "\n".join(lines)


def save_grid(reference, images, displaced_row, path, scale=3):
    """Rows: the images of one trajectory. Columns: one process, full_sync, displaced, naive_patch,
    then |displaced - one process| and |naive_patch - one process|, both x4, on black."""
    displaced, naive = images[displaced_row], images["naive_patch"]
    columns = [reference, images["full_sync"], displaced, naive,
               ((displaced - reference).abs() * 4 - 1).clamp(-1, 1), ((naive - reference).abs() * 4 - 1).clamp(-1, 1)]
    tiles = [F.interpolate(torch.stack([column[i] for column in columns]), scale_factor=scale, mode="nearest")
             for i in range(len(reference))]
    count, _, height, width = tiles[0].shape
    canvas = torch.ones(3, len(tiles) * (height + 4) - 4, count * (width + 4) - 4)
    for row, tile in enumerate(tiles):
        for column, image in enumerate(tile):
            top, left = row * (height + 4), column * (width + 4)
            canvas[:, top : top + height, left : left + width] = (image + 1) / 2
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def main():
    args = parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    unet, noise = trained_shapes_unet(), initial_noise(args)
    references = {steps: sample_shapes(unet, noise, steps) for steps in args.steps}
    results, outputs = {}, {}
    with tempfile.TemporaryDirectory() as results_dir:
        args.results = Path(results_dir)
        for world in args.worlds:
            args.world_size = world
            launch(run, args)
            outputs[world] = torch.load(args.results / f"world{world}.pt")
    for world in args.worlds:
        for steps in args.steps:
            results[world, steps] = {row: scores(outputs[world][row, steps], references[steps])
                                     for row, _ in configurations(args.modes)}
    # The grid shows the most ranks (most seams) over the longest trajectory.
    world, steps = max(args.worlds), max(args.steps)
    images = {row: outputs[world][row, steps] for row, _ in configurations(args.modes)}
    save_grid(references[steps], images, f"{args.modes[0]}, warm-up {GRID_WARMUP}", args.grid)
    print(f"\nPSNR (dB) / SSIM of the final images against one process, {args.size}x{args.size}, "
          f"{args.images} images; grid (W={world}, {steps} steps) in {args.grid}\n")
    print(table(results, args))
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
