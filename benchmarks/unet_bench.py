"""Time one UNet call: eager, torch.compile reduce-overhead, backend="distri" at world 1, and the
per-rank program of N ranks with its exchanges replaced by local stand-ins (a *projection* of
compute scaling: no communication is timed).

    python benchmarks/unet_bench.py --model sdxl --sizes 1024 2048 --dtype fp16   # on a GPU
    python benchmarks/unet_bench.py --model tiny --sizes 256 --dtype fp32          # on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import districompile
from districompile.backends.distri import distri_backend
from districompile.backends.lowering import lower
from districompile.config import DistriConfig
from districompile.passes.localize import localize

SDXL = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
TINY = dict(
    in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 64, norm_num_groups=8,
)
TEXT = {"sdxl": (2048, 1280), "tiny": (64, 64)}


def build(model: str, size: int, batch: int, dtype, device):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SDXL if model == "sdxl" else TINY)).to(device, dtype).eval()
    text_dim, pooled_dim = TEXT[model]
    latent = size // 8
    args = (
        torch.randn(batch, 4, latent, latent, device=device, dtype=dtype),
        torch.tensor(500.0, device=device),
        torch.randn(batch, 77, text_dim, device=device, dtype=dtype),
    )
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype)
    kwargs = {"added_cond_kwargs": {"text_embeds": torch.randn(batch, pooled_dim, device=device, dtype=dtype), "time_ids": time_ids}}
    return unet, args, kwargs


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, iters: int) -> float:
    """Median milliseconds per call (the first warm-up call compiles; its time is printed)."""
    start = time.perf_counter()
    fn()
    sync(device)
    print(f"  first call (compile) {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def output(result):
    return result.sample if hasattr(result, "sample") else result[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sdxl", "tiny"), default="sdxl")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--modes", nargs="+", default=["eager", "reduce-overhead", "distri1", "projected"])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="folder for the JSON results")
    opts = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if opts.dtype == "fp16" else torch.float32
    if not dist.is_initialized():  # distri at world 1 still runs through a process group
        store = tempfile.NamedTemporaryFile(delete=False).name
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}", rank=0, world_size=1)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = []
    for size in opts.sizes:
        for batch in opts.batch:
            unet, args, kwargs = build(opts.model, size, batch, dtype, device)
            row = {"size": size, "batch": batch}
            print(f"== {opts.model} {size}x{size} batch {batch} {opts.dtype} on {device_name}", flush=True)
            with torch.no_grad():
                reference = output(unet(*args, **kwargs))
                if "eager" in opts.modes:
                    row["eager_ms"] = timed(lambda: unet(*args, **kwargs), device, opts.warmup, opts.iters)
                    print(f"  {row}", flush=True)
                if "reduce-overhead" in opts.modes:
                    torch._dynamo.reset()
                    compiled = torch.compile(unet, mode="reduce-overhead")
                    row["reduce_overhead_ms"] = timed(lambda: compiled(*args, **kwargs), device, opts.warmup, opts.iters)
                    print(f"  {row}", flush=True)
                if "distri1" in opts.modes:
                    torch._dynamo.reset()
                    distri = torch.compile(unet, backend=distri_backend, options={"sync_mode": "full_sync"})
                    out = output(distri(*args, **kwargs))
                    row["distri1_rel_err"] = ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
                    row["distri1_ms"] = timed(lambda: distri(*args, **kwargs), device, opts.warmup, opts.iters)
                    print(f"  {row}", flush=True)
                if "projected" in opts.modes:
                    for world in opts.worlds:
                        torch._dynamo.reset()
                        report = districompile.explain(unet, *args, world_size=world, verbose=False, **kwargs)
                        rank = min(1, world - 1)  # an edge rank with a full halo on one side
                        program = localize(report.plan.program(rank, "projection"))
                        inputs = report.example_inputs
                        run = lower(program, inputs, DistriConfig(lowering="inductor"))
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        row[f"projected{world}_ms"] = timed(lambda: run(*inputs), device, opts.warmup, opts.iters)
                        if device.type == "cuda":
                            row[f"projected{world}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                        row[f"exchange{world}_mib"] = report.total_bytes / 2**20
                        row[f"rows{world}"] = list(report.row_bounds)
                        print(f"  {row}", flush=True)
            print(json.dumps(row), flush=True)
            rows.append(row)
            del unet
            torch.cuda.empty_cache() if device.type == "cuda" else None

    if opts.out:
        os.makedirs(opts.out, exist_ok=True)
        with open(os.path.join(opts.out, f"bench_{opts.model}.json"), "w") as f:
            json.dump({"device": device_name, "dtype": opts.dtype, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print_table(rows, opts.worlds, device_name)
    dist.destroy_process_group()


def print_table(rows, worlds, device_name):
    columns = [("size", "size"), ("batch", "batch"), ("eager_ms", "eager ms"), ("reduce_overhead_ms", "reduce-overhead ms"),
               ("distri1_ms", "distri N=1 ms"), ("distri1_rel_err", "distri N=1 rel err")]
    for world in worlds:
        columns += [(f"projected{world}_ms", f"projected N={world} ms/rank"), (f"exchange{world}_mib", f"N={world} MiB/call"),
                    (f"projected{world}_peak_gib", f"N={world} peak GiB")]
    print(f"\n| {' | '.join(title for _, title in columns)} |   ({device_name})")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        print(f"| {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
