"""Run a small SDXL-like diffusers UNet patch-parallel with the ``distri`` backend.

Prints the exchange plan, the error against the single-device eager UNet, and the time per
call of both (on CPU processes, what that comparison does and does not show). Runs on all GPUs with
NCCL when CUDA is available, else on CPU processes with gloo:

    python examples/demo.py                          # spawns its own ranks
    torchrun --nproc-per-node 2 examples/demo.py     # or under torchrun
"""

import argparse
import contextlib
import os
import time

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel

import districompile
from districompile.unets import sdxl_config, sdxl_time_ids
from launch import launch

TEXT_TOKENS, TEXT_DIM, TIME_EMBED_DIM = 77, 128, 32

CPU_NOTE = """\
What this CPU run shows: the plan (the exchange report above: which layers exchange what, and how
many bytes) and that the split is exact (the error above, against one process). It is not a speed
test: the ranks split this machine's cores between them (the one-process baseline had them all)
and every exchange is a gloo round trip over local TCP, so the ranks come out slower than one
process. Speed needs GPUs joined by NVLink (NCCL exchanges, overlapped with compute in the
displaced sync modes) and CUDA graphs (on by default on CUDA: one launch per call, collectives
inside). The GPU benchmark: torchrun --nproc-per-node N benchmarks/multi_gpu.py;
docs/PERFORMANCE.md has single-GPU and projected per-rank figures."""


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-size", type=int, help="ranks to spawn (default: all GPUs, or 2 on CPU)")
    parser.add_argument("--height", type=int, default=64, help="latent height (default: 64)")
    parser.add_argument("--width", type=int, default=64, help="latent width (default: 64)")
    parser.add_argument(
        "--lowering",
        choices=("eager", "inductor"),
        help="default: inductor on GPU, eager on CPU (compiles faster)",
    )
    parser.add_argument("--sync-mode", default="full_sync", help="default: full_sync (exact)")
    parser.add_argument("--iters", type=int, default=5, help="timed calls (default: 5)")
    args = parser.parse_args()
    if args.lowering is None:
        args.lowering = "inductor" if torch.cuda.is_available() else "eager"
    return args


def build_unet(height, width, device):
    """An SDXL-shaped UNet (block types, text_time conditioning, linear projections), scaled down.

    Seeded, so that every rank builds the same weights and inputs.
    """
    torch.manual_seed(0)
    config = sdxl_config(
        widths=(64, 128, 256), transformer_layers=(1, 2, 2), heads=(2, 4, 8),
        text_dim=TEXT_DIM, pooled_dim=TEXT_DIM, time_embed_dim=TIME_EMBED_DIM,
    )
    unet = UNet2DConditionModel(sample_size=(height, width), **config).eval().to(device)
    args = (
        torch.randn(1, 4, height, width, device=device),
        torch.tensor(500, device=device),
        torch.randn(1, TEXT_TOKENS, TEXT_DIM, device=device),
    )
    kwargs = {
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, TEXT_DIM, device=device),
            "time_ids": sdxl_time_ids(1, height, width, device),
        }
    }
    return unet, args, kwargs


def seconds_per_call(call, device, iters):
    """Mean time of ``iters`` calls; ``call`` must have run once already (compilation, lazy init)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


@contextlib.contextmanager
def cpu_threads(count):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(args, rank, world_size, device):
    unet, model_args, model_kwargs = build_unet(args.height, args.width, device)
    options = {"sync_mode": args.sync_mode, "lowering": args.lowering}

    eager_seconds = reference = None
    if rank == 0:
        districompile.explain(unet, *model_args, world_size=world_size, **model_kwargs, **options)
        # The single-device baseline gets the whole machine while the other ranks wait.
        with torch.no_grad(), cpu_threads(os.cpu_count()):
            reference = unet(*model_args, **model_kwargs).sample
            eager_seconds = seconds_per_call(lambda: unet(*model_args, **model_kwargs), device, args.iters)
    dist.barrier()

    compiled = torch.compile(unet, backend="distri", options=options)
    with torch.no_grad():
        if rank == 0:
            print(f"compiling for {world_size} ranks ({args.lowering} lowering)...", flush=True)
        output = compiled(*model_args, **model_kwargs).sample
        distri_seconds = seconds_per_call(lambda: compiled(*model_args, **model_kwargs), device, args.iters)

    if rank == 0:
        error = ((output - reference).abs().max() / reference.abs().max()).item()
        print(f"max relative error vs eager: {error:.2e}  (max |distri - eager| / max |eager|)")
        print(f"{'eager, 1 device:':<20}{eager_seconds * 1e3:8.1f} ms/call")
        print(f"{f'distri, {world_size} ranks:':<20}{distri_seconds * 1e3:8.1f} ms/call")
        if device.type == "cpu":
            print(CPU_NOTE)


def main():
    launch(run, parse_args())


if __name__ == "__main__":
    main()
