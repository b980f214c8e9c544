"""Time one UNet call in each of these modes and print one table:

- ``eager``: the uncompiled UNet;
- ``reduce-overhead``: ``torch.compile(mode="reduce-overhead")``, the best single-GPU baseline;
- ``distri1``: ``backend="distri"`` (full_sync) in a one-rank group, with its error against eager;
- ``distri1-unchecked``: the same with ``check_ranks=False``: what the ranks' agreement check
  (one small all-gather per call) costs;
- ``distri1-steady``: ``backend="distri"`` in the default displaced mode on one rank with the
  exchange ops kept (``single_rank_exchanges``: 1-rank NCCL collectives inside the CUDA graph),
  timed in the steady phase: what the exchange ops and their join cost beyond the compute;
- ``projected``: one rank's program of an N-rank plan with every exchange replaced by a local
  stand-in (a *projection* of compute scaling: no communication is timed), with the bytes all
  ranks exchange per call and the peak memory of the run plus the stale buffers it would keep.

Under torchrun with several processes, ``distri`` runs for real at that world size instead
(full_sync and displaced steady phase, per-call time on rank 0).

With ``--jobs K`` each measurement (a mode at a size and batch; a projection per world) runs in
its own process, K of them compiling at once, then timed one after another while the others wait
idle: an SDXL compile is about a minute of mostly single-threaded Python, the timing seconds.

    python benchmarks/unet_bench.py --model sdxl --sizes 1024 2048 --dtype fp16   # one GPU
    python benchmarks/unet_bench.py --model sdxl --sizes 3840 --modes reduce-overhead projected \
        --worlds 2 4 8 --jobs 4                                                   # compiles at once
    torchrun --nproc-per-node 2 benchmarks/unet_bench.py --model sdxl --modes distri  # several GPUs
    python benchmarks/unet_bench.py --model tiny --sizes 256 --dtype fp32          # a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist

import districompile
from districompile.backends.cudagraphs import PhaseGraph
from districompile.backends.lowering import lower
from districompile.config import DistriConfig
from districompile.metrics import relative_error
from districompile.passes.localize import localize
from districompile.unets import SDXL, TINY_SDXL, sdxl_unet

MODELS = {"sdxl": SDXL, "tiny": TINY_SDXL}
DISPLACED_KINDS = ("halo", "kv_gather", "stats_allgather", "allreduce")  # explain's kinds kept as stale buffers
MODES = ("eager", "reduce-overhead", "distri1", "distri1-unchecked", "distri1-steady", "projected")


def build(model: str, size: int, batch: int, dtype, device):
    return sdxl_unet(MODELS[model], size, batch, dtype, device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup: int, iters: int, before_timing=lambda: None) -> tuple[float, float | None]:
    """Median milliseconds per call after a first call (printed), ``before_timing()`` and ``warmup``
    calls: wall time from host to synchronized device, and on CUDA the device time between events
    around the call."""
    start = time.perf_counter()
    fn()
    sync(device)
    print(f"  first call {time.perf_counter() - start:.1f} s (compiles, unless compiled already)", flush=True)
    before_timing()
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


def graph_counts(runtimes) -> str:
    counts = [r.graph_counts() for r in runtimes]
    return "/".join(str(sum(c[k] for c in counts)) for k in ("captures", "replays"))


def run_distri(row, key, unet, args, kwargs, reference, timing, opts, **options):
    """``backend="distri"`` with ``options``; in a displaced mode only steady-phase calls are timed."""
    torch._dynamo.reset()
    # Dynamo may keep an earlier mode's runtime alive past its reset: count this compile's alone.
    earlier = set(districompile.runtimes(unet))
    distri = torch.compile(unet, backend="distri", options={"lowering": opts.lowering, **options})
    out = output(distri(*args, **kwargs))
    row[f"{key} rel err"] = relative_error(out, reference)
    # Timesteps must not go up within a trajectory (that restarts it): the same one every call.
    record_time(row, key, timed(lambda: distri(*args, **kwargs), **{**timing, "warmup": max(opts.warmup, 4)}))
    if timing["device"].type == "cuda":
        row[f"{key} captures/replays"] = graph_counts(set(districompile.runtimes(unet)) - earlier)


def run_projection(row, world, unet, args, kwargs, timing, opts):
    """Patch parallelism alone (``split_batch`` off): with the CFG split, each rank of a pair runs
    half the batch on the whole image, which the world-1 rows already time."""
    device = timing["device"]
    torch._dynamo.reset()
    report = districompile.explain(unet, *args, world_size=world, verbose=False, split_batch=False, **kwargs)
    rank = min(1, world - 1)  # an edge rank with a full halo on one side
    program = localize(report.plan.program(rank, "projection"))
    inputs = report.example_inputs
    run = lower(program, inputs, DistriConfig(lowering=opts.lowering), "projection")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    name = f"projected N={world}, per rank"
    record_time(row, name, timed(lambda: run(*inputs), **timing))
    if isinstance(run, PhaseGraph):
        row[f"{name} captures/replays"] = f"{run.captures}/{run.replays}"
    row[f"N={world} MiB/call"] = report.total_bytes / 2**20
    row[f"N={world} exchanges"] = " ".join(f"{kind}:{report.count(kind)}" for kind in sorted({e.kind for e in report.exchanges}))
    # Each rank keeps what it receives at the displaced sites as stale buffers.
    stale = sum(e.bytes_per_call for e in report.exchanges if e.kind in DISPLACED_KINDS) / world
    row[f"N={world} stale MiB/rank"] = stale / 2**20
    if device.type == "cuda":
        row[f"N={world} peak GiB/rank"] = (torch.cuda.max_memory_allocated() + stale) / 2**30


def parse_args():
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
    parser.add_argument("--jobs", type=int, default=1,
                        help="measurements compiled at once, each in its own process; they are timed one at a time")
    parser.add_argument("--out", default=None, help="folder for the JSON results")
    parser.add_argument("--measurement", help=argparse.SUPPRESS)  # set by --jobs: what one worker process measures
    return parser.parse_args()


def measurements(opts) -> list[dict]:
    """What to measure, one entry per (size, batch): its modes and projected worlds."""
    return [{"size": size, "batch": batch, "modes": opts.modes, "worlds": opts.worlds} for size in opts.sizes for batch in opts.batch]


def one_per_process(work: dict) -> list[dict]:
    """``work`` split into its modes (each projected world apart): what one worker process measures."""
    split = []
    for mode in work["modes"]:
        for world in work["worlds"] if mode == "projected" else [None]:
            split.append({**work, "modes": [mode], "worlds": [world] if world else []})
    return split


def measure(work: dict, opts, device, dtype, launched: bool, before_timing=lambda: None) -> dict:
    """One row: ``work``'s modes at its size and batch. ``before_timing`` runs after each first
    (compiling) call, before the timed calls: a worker waits there for its turn at the GPU."""
    world, rank = dist.get_world_size(), dist.get_rank()
    size, batch, modes = work["size"], work["batch"], work["modes"]
    unet, args, kwargs = build(opts.model, size, batch, dtype, device)
    row = {"size": size, "batch": batch}
    if rank == 0:
        print(f"== {opts.model} {size}x{size} batch {batch} {opts.dtype} {'/'.join(modes)} on {world} x {device_name(device)}", flush=True)
    timing = dict(device=device, warmup=opts.warmup, iters=opts.iters, before_timing=before_timing)
    with torch.no_grad():
        # The distri modes report their error against the uncompiled UNet.
        reference = output(unet(*args, **kwargs)) if {"distri1", "distri1-unchecked", "distri1-steady", "distri"} & set(modes) else None
        if "eager" in modes and not launched:
            record_time(row, "eager", timed(lambda: unet(*args, **kwargs), **timing))
        if "reduce-overhead" in modes and not launched:
            torch._dynamo.reset()
            compiled = torch.compile(unet, mode="reduce-overhead")
            record_time(row, "reduce-overhead", timed(lambda: compiled(*args, **kwargs), **timing))
        if "distri1" in modes and not launched:
            run_distri(row, "distri N=1", unet, args, kwargs, reference, timing, opts, sync_mode="full_sync")
        if "distri1-unchecked" in modes and not launched:
            run_distri(row, "distri N=1 unchecked", unet, args, kwargs, reference, timing, opts, sync_mode="full_sync", check_ranks=False)
        if "distri1-steady" in modes and not launched:
            run_distri(row, "distri N=1 steady, exchanges kept", unet, args, kwargs, reference, timing, opts, single_rank_exchanges=True)
        if "projected" in modes and not launched:
            for projected_world in work["worlds"]:
                run_projection(row, projected_world, unet, args, kwargs, timing, opts)
        if "distri" in modes and launched:
            run_distri(row, f"distri N={world}", unet, args, kwargs, reference, timing, opts, sync_mode="full_sync")
            run_distri(row, f"distri N={world} steady", unet, args, kwargs, reference, timing, opts)
    if rank == 0:
        print(f"  {row}", flush=True)
    return row


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_workers(opts) -> tuple[list[dict], list[str]]:
    """``--jobs``: each measurement in its own process, ``opts.jobs`` at a time. A group of workers
    compiles at once (compiling is mostly single-threaded Python), then each in turn times its
    calls while the others wait idle, so no timing shares the GPU or the CPU with a compile."""
    work = [one for entry in measurements(opts) for one in one_per_process(entry)]
    rows, failed, workers = [], [], []
    # A stopped run (timeout's SIGTERM) must not leave workers holding the GPU: stop them too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(f"stopped; {len(work) - len(rows)} measurements not done"))
    with tempfile.TemporaryDirectory() as turns:
        try:
            for first in range(0, len(work), opts.jobs):
                workers = [Worker(i, one, turns) for i, one in enumerate(work[first:first + opts.jobs], first)]
                while not all(w.ready() or w.process.poll() is not None for w in workers):
                    time.sleep(0.5)
                for worker in workers:
                    row = worker.take_turn()
                    if row is None:
                        failed.append(worker.label)
                    else:
                        rows.append(row)
        finally:
            for worker in workers:
                worker.process.kill()
    return merge_rows(rows), failed


class Worker:
    """One measurement in a child process; its output is echoed with a label."""

    def __init__(self, index: int, work: dict, turns: str):
        self.label = f"{work['size']}/b{work['batch']}/{work['modes'][0]}" + "".join(f"/N={w}" for w in work["worlds"])
        self.path = os.path.join(turns, str(index))
        argv = sys.argv[1:] + ["--measurement", json.dumps(work), "--out", self.path]
        self.process = subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(__file__), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.echo = threading.Thread(target=self._echo, daemon=True)
        self.echo.start()

    def _echo(self):
        for line in self.process.stdout:
            print(f"[{self.label}] {line}", end="", flush=True)

    def ready(self) -> bool:
        return os.path.exists(self.path + ".ready")

    def take_turn(self) -> dict | None:
        open(self.path + ".go", "w").close()
        code = self.process.wait()
        self.echo.join()
        if code != 0 or not os.path.exists(self.path + ".json"):
            print(f"[{self.label}] failed with exit code {code}", flush=True)
            return None
        with open(self.path + ".json") as f:
            return json.load(f)


def wait_for_turn(path: str):
    """In a worker: say the compiling is done, then wait until the parent gives the GPU to us."""
    open(path + ".ready", "w").close()
    parent = os.getppid()
    while not os.path.exists(path + ".go"):
        if os.getppid() != parent:  # the parent died without stopping us
            sys.exit("the benchmark's parent process is gone")
        time.sleep(0.2)


def merge_rows(rows: list[dict]) -> list[dict]:
    merged: dict[tuple, dict] = {}
    for row in rows:
        merged.setdefault((row["size"], row["batch"]), {}).update(row)
    return list(merged.values())


def main():
    opts = parse_args()
    launched = "WORLD_SIZE" in os.environ  # torchrun
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if opts.jobs > 1 and not opts.measurement:
        if launched:
            raise SystemExit("--jobs is for one device; under torchrun every rank runs each measurement")
        rows, failed = run_workers(opts)
        finish(opts, rows, device, 1, failed)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.float16 if opts.dtype == "fp16" else torch.float32
    backend = "nccl" if device.type == "cuda" else "gloo"
    if launched:
        dist.init_process_group(backend)
    else:  # distri at world 1 still runs through a process group
        store = tempfile.NamedTemporaryFile(delete=False).name
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    if opts.measurement:  # a worker of --jobs: one measurement, its row to the file the parent reads
        row = measure(json.loads(opts.measurement), opts, device, dtype, False, lambda: wait_for_turn(opts.out))
        with open(opts.out + ".json", "w") as f:
            json.dump(row, f)
    else:
        rows = []
        for work in measurements(opts):
            rows.append(measure(work, opts, device, dtype, launched))
            if device.type == "cuda":  # the last model's memory back before the next one's
                torch.cuda.empty_cache()
        if dist.get_rank() == 0:
            finish(opts, rows, device, dist.get_world_size(), [])
    dist.destroy_process_group()


def finish(opts, rows, device, world, failed):
    """Write the JSON results and print the table, last."""
    name = device_name(device)
    if opts.out:
        os.makedirs(opts.out, exist_ok=True)
        with open(os.path.join(opts.out, f"bench_{opts.model}_{world}.json"), "w") as f:
            json.dump({"device": name, "world": world, "dtype": opts.dtype, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print_table(rows, f"{opts.model}, {opts.dtype}, {world} x {name}, torch {torch.__version__}")
    if failed:
        raise SystemExit(f"failed measurements (their rows are missing): {', '.join(failed)}")


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
