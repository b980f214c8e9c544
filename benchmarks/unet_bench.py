"""Time one UNet call in each of these modes and print one table:

- ``eager``: the uncompiled UNet;
- ``reduce-overhead``: ``torch.compile(mode="reduce-overhead")``, the best single-GPU baseline;
- ``distri1``: ``backend="distri"`` (full_sync) in a one-rank group, with its error against eager;
- ``distri1-steady``: ``backend="distri"`` in the default displaced mode on one rank with the
  exchange ops kept (``single_rank_exchanges``: 1-rank NCCL collectives inside the CUDA graph),
  timed in the steady phase: what the exchange ops and their join cost beyond the compute;
- ``projected``: one rank's program of an N-rank plan with every exchange replaced by a local
  stand-in (a *projection* of compute scaling: no communication is timed), with the bytes all
  ranks exchange per call and the peak memory of the run plus the stale buffers it would keep.

Under torchrun with several processes, ``distri`` runs for real at that world size instead
(full_sync and displaced steady phase, per-call time on rank 0).

    python benchmarks/unet_bench.py --model sdxl --sizes 1024 2048 --dtype fp16   # one GPU
    torchrun --nproc-per-node 2 benchmarks/unet_bench.py --model sdxl --modes distri  # several GPUs
    python benchmarks/unet_bench.py --model tiny --sizes 256 --dtype fp32          # a CPU
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
from districompile.backends.cudagraphs import PhaseGraph
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
DISPLACED_KINDS = ("halo", "kv_gather", "stats_allgather", "allreduce")  # explain's kinds kept as stale buffers
MODES = ("eager", "reduce-overhead", "distri1", "distri1-steady", "projected")


def build(model: str, size: int, batch: int, dtype, device):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not a minute on the CPU
        unet = UNet2DConditionModel(**(SDXL if model == "sdxl" else TINY)).to(dtype).eval()
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


def timed(fn, device, warmup: int, iters: int) -> tuple[float, float | None]:
    """Median milliseconds per call after a first call (printed) and ``warmup`` calls: wall time
    from host to synchronized device, and on CUDA the device time between events around the call."""
    start = time.perf_counter()
    fn()
    sync(device)
    print(f"  first call {time.perf_counter() - start:.1f} s (compiles, unless compiled already)", flush=True)
    for _ in range(warmup):
        fn()
    wall, on_device = [], []
    for _ in range(iters):
        sync(device)
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            end.record()
        sync(device)
        wall.append((time.perf_counter() - start) * 1e3)
        if device.type == "cuda":
            on_device.append(begin.elapsed_time(end))
    return statistics.median(wall), statistics.median(on_device) if on_device else None


def record_time(row, name, times):
    """``name ms`` (wall) and, on CUDA, ``name GPU ms`` (the stream's time from first to last kernel)."""
    row[f"{name} ms"], on_device = times
    if on_device is not None:
        row[f"{name} GPU ms"] = on_device


def output(result):
    return result.sample if hasattr(result, "sample") else result[0]


def relative_error(out, reference) -> float:
    return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def graph_counts(unet) -> str:
    counts = [r.graph_counts() for r in districompile.runtimes(unet)]
    return "/".join(str(sum(c[k] for c in counts)) for k in ("captures", "replays"))


def run_distri(row, key, unet, args, kwargs, reference, device, opts, **options):
    """``backend="distri"`` with ``options``; in a displaced mode only steady-phase calls are timed."""
    torch._dynamo.reset()
    distri = torch.compile(unet, backend="distri", options={"lowering": opts.lowering, **options})
    out = output(distri(*args, **kwargs))
    row[f"{key} rel err"] = relative_error(out, reference)
    # Timesteps must not go up within a trajectory (that restarts it): the same one every call.
    record_time(row, key, timed(lambda: distri(*args, **kwargs), device, max(opts.warmup, 4), opts.iters))
    if device.type == "cuda":
        row[f"{key} captures/replays"] = graph_counts(unet)


def run_projection(row, world, unet, args, kwargs, device, opts):
    torch._dynamo.reset()
    report = districompile.explain(unet, *args, world_size=world, verbose=False, **kwargs)
    rank = min(1, world - 1)  # an edge rank with a full halo on one side
    program = localize(report.plan.program(rank, "projection"))
    inputs = report.example_inputs
    run = lower(program, inputs, DistriConfig(lowering=opts.lowering), "projection")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    name = f"projected N={world}, per rank"
    record_time(row, name, timed(lambda: run(*inputs), device, opts.warmup, opts.iters))
    if isinstance(run, PhaseGraph):
        row[f"{name} captures/replays"] = f"{run.captures}/{run.replays}"
    row[f"N={world} MiB/call"] = report.total_bytes / 2**20
    # Each rank keeps what it receives at the displaced sites as stale buffers.
    stale = sum(e.bytes_per_call for e in report.exchanges if e.kind in DISPLACED_KINDS) / world
    row[f"N={world} stale MiB/rank"] = stale / 2**20
    if device.type == "cuda":
        row[f"N={world} peak GiB/rank"] = (torch.cuda.max_memory_allocated() + stale) / 2**30


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sdxl", "tiny"), default="sdxl")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--modes", nargs="+", default=["eager", "reduce-overhead", "distri1", "projected"],
                        choices=MODES + ("distri",))
    parser.add_argument("--worlds", type=int, nargs="+", default=[2], help="world sizes of the projections")
    parser.add_argument("--lowering", choices=("inductor", "eager"), default="inductor",
                        help="of distri and the projections (eager: no compile, for a quick CPU check)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None, help="folder for the JSON results")
    opts = parser.parse_args()

    launched = "WORLD_SIZE" in os.environ  # torchrun
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.float16 if opts.dtype == "fp16" else torch.float32
    backend = "nccl" if device.type == "cuda" else "gloo"
    if launched:
        dist.init_process_group(backend)
    else:  # distri at world 1 still runs through a process group
        store = tempfile.NamedTemporaryFile(delete=False).name
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    world, rank = dist.get_world_size(), dist.get_rank()
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    rows = []
    for size in opts.sizes:
        for batch in opts.batch:
            unet, args, kwargs = build(opts.model, size, batch, dtype, device)
            row = {"size": size, "batch": batch}
            if rank == 0:
                print(f"== {opts.model} {size}x{size} batch {batch} {opts.dtype} on {world} x {device_name}", flush=True)
            with torch.no_grad():
                reference = output(unet(*args, **kwargs))
                if "eager" in opts.modes and not launched:
                    record_time(row, "eager", timed(lambda: unet(*args, **kwargs), device, opts.warmup, opts.iters))
                if "reduce-overhead" in opts.modes and not launched:
                    torch._dynamo.reset()
                    compiled = torch.compile(unet, mode="reduce-overhead")
                    record_time(row, "reduce-overhead", timed(lambda: compiled(*args, **kwargs), device, opts.warmup, opts.iters))
                    print(f"  {row}", flush=True)
                if "distri1" in opts.modes and not launched:
                    run_distri(row, "distri N=1", unet, args, kwargs, reference, device, opts, sync_mode="full_sync")
                    print(f"  {row}", flush=True)
                if "distri1-steady" in opts.modes and not launched:
                    run_distri(row, "distri N=1 steady, exchanges kept", unet, args, kwargs, reference, device, opts, single_rank_exchanges=True)
                    print(f"  {row}", flush=True)
                if "projected" in opts.modes and not launched:
                    for projected_world in opts.worlds:
                        run_projection(row, projected_world, unet, args, kwargs, device, opts)
                        print(f"  {row}", flush=True)
                if "distri" in opts.modes and launched:
                    run_distri(row, f"distri N={world}", unet, args, kwargs, reference, device, opts, sync_mode="full_sync")
                    run_distri(row, f"distri N={world} steady", unet, args, kwargs, reference, device, opts)
                    if rank == 0:
                        print(f"  {row}", flush=True)
            rows.append(row)
            del unet
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if rank == 0:
        if opts.out:
            os.makedirs(opts.out, exist_ok=True)
            with open(os.path.join(opts.out, f"bench_{opts.model}_{world}.json"), "w") as f:
                json.dump({"device": device_name, "world": world, "dtype": opts.dtype, "torch": torch.__version__, "rows": rows}, f, indent=1)
        print_table(rows, f"{opts.model}, {opts.dtype}, {world} x {device_name}, torch {torch.__version__}")
    dist.destroy_process_group()


def print_table(rows, title):
    """One column per key that some row has, in the order they were measured."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print(f"\n{title}")
    print(f"| {' | '.join(columns)} |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in columns]
        print(f"| {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
