"""Time one VAE decode (SDXL's VAE, random weights) on one device and its peak memory, per image size:

- ``plain``: ``vae.decode`` as diffusers runs it;
- ``compiled``: ``torch.compile(vae.decode)`` (default mode);
- ``tiled``: diffusers' tiled decode (``vae.enable_tiling()``: 1024-pixel tiles, blended; at 1024 one tile);
- ``projected``: one rank's program of the N-rank ``full_sync`` plan of the decode (what
  ``parallelize(pipe)`` runs per rank), every exchange replaced by a local stand-in
  (``districompile.passes.localize``, as ``unet_bench.py``'s projections): per-rank compute and
  memory, no communication timed; with the bytes all ranks exchange per call.

A measurement that runs out of memory reads "OOM" in its row (the plain decoder at 4K on a small
GPU: what the split is for). Peak memory is the allocator's peak over the measurement (its first
call and compile included), weights, input and the whole decoded image included (every rank gets
the whole image). Prints the table last; ``--out`` writes it as JSON, after every size.

    python benchmarks/vae_bench.py --out benchmarks/results/h100/vae   # one GPU: 1024, 2048, 3840, 4096; N = 2, 4, 8
    python benchmarks/vae_bench.py --model tiny --sizes 64 --dtype fp32   # a CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import torch
from common import Case, device_name, print_table, project, record_peak, record_plan, record_time, reset_peak, sync, timed

from districompile.unets import SDXL_VAE, TINY_VAE

MODELS = {"sdxl": SDXL_VAE, "tiny": TINY_VAE}
MODES = ("plain", "compiled", "tiled", "projected")


def build(model: str, dtype, device):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not a minute on the CPU
        return AutoencoderKL(**MODELS[model]).to(dtype).eval()


def out_of_memory(error: BaseException | None) -> bool:
    """A CUDA OOM, or an error raised because of one (Dynamo and Inductor wrap what they catch)."""
    while error is not None:
        if isinstance(error, torch.OutOfMemoryError):
            return True
        error = error.__cause__ or error.__context__
    return False


def measure(row: dict, name: str, setup, timing: dict):
    """``row[name ms]`` (and ``name GPU ms``, ``name peak GiB`` on CUDA) of the callable ``setup()``
    returns; "OOM" where the device runs out of memory, in the setup or the calls."""
    device = timing["device"]
    reset_peak(device)
    try:
        times = timed(setup(), **timing)
    except Exception as error:
        if not out_of_memory(error):
            raise
        print(f"  {name}: out of memory", flush=True)
        row[f"{name} ms"] = "OOM"
    else:
        record_time(row, name, times)
        record_peak(row, f"{name} peak GiB", device)
    # What the measurement left (a failed one's traceback holds tensors) back to the allocator.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def projection(vae, latent, world: int, row: dict, opts):
    """The per-rank program of rank 1 (an edge rank with a halo on one side) of the ``world``-rank plan."""
    run, report = project(Case(vae.decode, (latent,), {}), world, opts.lowering, sync_mode="full_sync")
    record_plan(row, world, report)
    return lambda: run(*report.example_inputs)


def measure_size(vae, size: int, opts, device, dtype) -> dict:
    row = {"size": size}
    latent = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=dtype)
    print(f"== {opts.model} VAE decode {size}x{size} {opts.dtype} on {device_name(device)}", flush=True)
    timing = dict(device=device, warmup=opts.warmup, iters=opts.iters)
    with torch.no_grad():
        if "plain" in opts.modes:
            measure(row, "plain", lambda: lambda: vae.decode(latent), timing)
        if "compiled" in opts.modes:
            torch._dynamo.reset()
            compiled = torch.compile(vae.decode)
            measure(row, "compiled", lambda: lambda: compiled(latent), timing)
            del compiled
        if "tiled" in opts.modes:
            vae.enable_tiling()
            measure(row, "tiled", lambda: lambda: vae.decode(latent), timing)
            vae.disable_tiling()
        if "projected" in opts.modes:
            for world in opts.worlds:
                measure(row, f"projected N={world}, per rank", lambda: projection(vae, latent, world, row, opts), timing)
    sync(device)
    print(f"  {row}", flush=True)
    return row


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="sdxl")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 3840, 4096], help="image sizes in pixels")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8], help="world sizes of the projections")
    parser.add_argument("--lowering", choices=("eager", "inductor"), default="eager",
                        help="of the projections (eager: the plain decoder's kernels, no compile per size and world)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for the JSON results")
    return parser.parse_args()


def main():
    opts = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if opts.dtype == "fp16" else torch.float32
    vae = build(opts.model, dtype, device)
    name, rows = device_name(device), []
    for size in opts.sizes:
        rows.append(measure_size(vae, size, opts, device, dtype))
        if opts.out:  # after every size: a run stopped by a time limit keeps the sizes it finished
            os.makedirs(opts.out, exist_ok=True)
            with open(os.path.join(opts.out, f"vae_{opts.model}.json"), "w") as f:
                json.dump({"device": name, "dtype": opts.dtype, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print_table(rows, f"{opts.model} VAE decode, {opts.dtype}, {name}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
