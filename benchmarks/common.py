"""What the model benchmarks (``unet_bench.py``, ``transformer_bench.py``) share: timing, peak
memory, the modes every model has (eager, ``torch.compile``, ``backend="distri"``, projections),
``--jobs`` workers, the table and the JSON. A benchmark script names its models and modes in a
``Benchmark`` and calls ``main``; the timing helpers serve the other scripts here too.
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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import districompile
from districompile.backends.cudagraphs import PhaseGraph
from districompile.backends.lowering import lower
from districompile.config import DistriConfig
from districompile.metrics import relative_error
from districompile.passes.localize import localize
from districompile.warm import DTYPES

DISPLACED_KINDS = ("halo", "kv_gather", "stats_allgather", "allreduce")  # explain's kinds kept as stale buffers


# ----------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(
    fn, device, warmup: int, iters: int, before_timing=lambda: None, queued: bool = False
) -> tuple[float, float | None, float | None]:
    """Median milliseconds per call after a first call (printed), ``before_timing()`` and ``warmup``
    calls: wall time from host to synchronized device, and on CUDA the device time between events
    around the call; with ``queued``, also the mean of ``iters`` calls back to back, synchronized
    once, as a denoising loop makes them (the host may run ahead of the device, unless a call
    waits for it)."""
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
    back_to_back = None
    if queued:
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        back_to_back = (time.perf_counter() - start) * 1e3 / iters
    return statistics.median(wall), statistics.median(on_device) if on_device else None, back_to_back


def record_time(row, name, times):
    """``name ms`` (wall), on CUDA ``name GPU ms`` (the stream's time from first to last kernel), and
    where timed, ``name queued ms`` (calls back to back)."""
    row[f"{name} ms"], on_device, queued = times
    if queued is not None:
        row[f"{name} queued ms"] = queued
    if on_device is not None:
        row[f"{name} GPU ms"] = on_device


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def record_peak(row, key: str, device, extra_bytes: float = 0):
    """On CUDA, ``row[key]``: the allocator's peak since ``reset_peak`` plus ``extra_bytes``, in GiB."""
    if device.type == "cuda":
        row[key] = (torch.cuda.max_memory_allocated(device) + extra_bytes) / 2**30


def time_mode(row, name: str, fn, timing: dict):
    """``fn`` timed (``record_time``) and, on CUDA, ``name peak GiB``: the allocator's peak over
    the timed series, its first call included (with the compile where that call compiles),
    weights included."""
    reset_peak(timing["device"])
    record_time(row, name, timed(fn, **timing, queued=True))
    record_peak(row, f"{name} peak GiB", timing["device"])


def output(result):
    return result.sample if hasattr(result, "sample") else result[0]


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def print_table(rows, title):
    """One column per key that some row has, in the order they were measured."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print(f"\n{title}")
    print(f"| {' | '.join(columns)} |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in columns]
        print(f"| {' | '.join(cells)} |")


# ----------------------------------------------------------------------------- what a benchmark runs


@dataclass(frozen=True)
class Case:
    """A model, the inputs of one call, and the backend options the model needs (Flux's ``token_grids``)."""

    model: Callable  # a module, or a module's method (the VAE's decode)
    args: tuple
    kwargs: dict
    options: dict = field(default_factory=dict)

    def __call__(self):
        return self.model(*self.args, **self.kwargs)


@dataclass(frozen=True)
class Context:
    opts: argparse.Namespace
    device: torch.device
    timing: dict  # ``timed``'s keyword arguments
    reference: torch.Tensor | None  # the eager output, for the modes that report their error
    worlds: list[int]  # of the projections


@dataclass(frozen=True)
class Mode:
    run: Callable[[dict, Case, Context], None]  # measures into the row
    reference: bool = False  # reports its error against the eager output
    launched: bool = False  # runs under torchrun (several ranks) only; the others in one process only
    per_world: bool = False  # one measurement per projected world (``--jobs``)


@dataclass(frozen=True)
class Benchmark:
    models: tuple[str, ...]  # the first is the default
    build: Callable[..., Case]  # (model, size, batch, dtype, device)
    modes: dict[str, Mode]
    default_modes: tuple[str, ...]
    dtypes: tuple[str, ...]  # the first is the default
    default_worlds: tuple[int, ...]
    results: str  # the JSON file's name, formatted with model and world


def graph_counts(runtimes) -> str:
    counts = [r.graph_counts() for r in runtimes]
    return "/".join(str(sum(c[k] for c in counts)) for k in ("captures", "replays"))


def run_eager(row, case: Case, ctx: Context):
    time_mode(row, "eager", case, ctx.timing)


def compiled_mode(mode: str) -> Mode:
    """``torch.compile(mode=mode)``, timed as the row's ``mode``, with its error against eager
    (the yardstick for distri's: both compile the same model)."""

    def run(row, case: Case, ctx: Context):
        torch._dynamo.reset()
        compiled = torch.compile(case.model, mode=mode)
        row[f"{mode} rel err"] = relative_error(output(compiled(*case.args, **case.kwargs)), ctx.reference)
        time_mode(row, mode, lambda: compiled(*case.args, **case.kwargs), ctx.timing)

    return Mode(run, reference=True)


def run_distri(row, key: str, case: Case, ctx: Context, **options):
    """``backend="distri"`` with the case's options and ``options``; in a displaced mode only steady-phase calls are timed."""
    torch._dynamo.reset()
    # Dynamo may keep an earlier mode's runtime alive past its reset: count this compile's alone.
    earlier = set(districompile.runtimes(case.model))
    distri = torch.compile(case.model, backend="distri", options={"lowering": ctx.opts.lowering, **case.options, **options})
    row[f"{key} rel err"] = relative_error(output(distri(*case.args, **case.kwargs)), ctx.reference)
    # Timesteps must not go up within a trajectory (that restarts it): the same one every call.
    timing = {**ctx.timing, "warmup": max(ctx.opts.warmup, 4)}
    time_mode(row, key, lambda: distri(*case.args, **case.kwargs), timing)
    if ctx.device.type == "cuda":
        row[f"{key} captures/replays"] = graph_counts(set(districompile.runtimes(case.model)) - earlier)


def run_distri1(row, case: Case, ctx: Context):
    run_distri(row, "distri N=1", case, ctx, sync_mode="full_sync")


def run_distri_launched(row, case: Case, ctx: Context):
    world = dist.get_world_size()
    run_distri(row, f"distri N={world}", case, ctx, sync_mode="full_sync")
    run_distri(row, f"distri N={world} steady", case, ctx)


def project(case: Case, world: int, lowering: str, **options):
    """One rank's program of the ``world``-rank plan (``explain``'s, with ``options``), every exchange
    replaced by a local stand-in (``localize``), lowered: ``(run, report)``, ``run`` taking
    ``report.example_inputs``. The rank is 1 where the plan has several (an edge rank, with a full
    halo on one side), else 0."""
    torch._dynamo.reset()
    report = districompile.explain(case.model, *case.args, world_size=world, verbose=False, **case.options, **options, **case.kwargs)
    program = localize(report.plan.program(min(1, report.plan.world - 1), "projection"))
    return lower(program, report.example_inputs, DistriConfig(lowering=lowering), "projection"), report


def record_plan(row, world: int, report):
    """The bytes all ranks exchange per call and the exchanges by kind, of ``report``'s plan."""
    row[f"N={world} MiB/call"] = report.total_bytes / 2**20
    row[f"N={world} exchanges"] = " ".join(f"{kind}:{report.count(kind)}" for kind in sorted({e.kind for e in report.exchanges}))
    row[f"N={world} fallbacks"] = len(report.fallbacks)
    for reason in sorted({f"{f.op}: {f.reason}" for f in report.fallbacks}):  # why ops ran on whole tensors
        print(f"  N={world} fallback {reason}", flush=True)


def run_projection(row, world: int, case: Case, ctx: Context):
    """Patch parallelism alone (``split_batch`` off): with the CFG split, each rank of a pair runs
    half the batch on the whole image, which the world-1 rows already time."""
    run, report = project(case, world, ctx.opts.lowering, split_batch=False)
    name = f"projected N={world}, per rank"
    reset_peak(ctx.device)
    record_time(row, name, timed(lambda: run(*report.example_inputs), **ctx.timing))
    if isinstance(run, PhaseGraph):
        row[f"{name} captures/replays"] = f"{run.captures}/{run.replays}"
    record_plan(row, world, report)
    # Each rank keeps what it receives at the displaced sites as stale buffers.
    stale = sum(e.bytes_per_call for e in report.exchanges if e.kind in DISPLACED_KINDS) / world
    row[f"N={world} stale MiB/rank"] = stale / 2**20
    record_peak(row, f"N={world} peak GiB/rank", ctx.device, stale)


def run_projections(row, case: Case, ctx: Context):
    for world in ctx.worlds:
        run_projection(row, world, case, ctx)


EAGER = Mode(run_eager)
DISTRI1 = Mode(run_distri1, reference=True)
DISTRI = Mode(run_distri_launched, reference=True, launched=True)
PROJECTED = Mode(run_projections, per_world=True)


# ----------------------------------------------------------------------------- the driver


def parse_args(bench: Benchmark, doc: str):
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=bench.models, default=bench.models[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--dtype", choices=bench.dtypes, default=bench.dtypes[0])
    parser.add_argument("--modes", nargs="+", default=list(bench.default_modes), choices=tuple(bench.modes))
    parser.add_argument("--worlds", type=int, nargs="+", default=list(bench.default_worlds), help="world sizes of the projections")
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


def one_per_process(bench: Benchmark, work: dict) -> list[dict]:
    """``work`` split into its modes (each projected world apart): what one worker process measures."""
    split = []
    for mode in work["modes"]:
        for world in work["worlds"] if bench.modes[mode].per_world else [None]:
            split.append({**work, "modes": [mode], "worlds": [world] if world else []})
    return split


def measure(bench: Benchmark, work: dict, opts, device, launched: bool, before_timing=lambda: None) -> dict:
    """One row: ``work``'s modes at its size and batch. ``before_timing`` runs after each first
    (compiling) call, before the timed calls: a worker waits there for its turn at the GPU."""
    world, rank = dist.get_world_size(), dist.get_rank()
    size, batch = work["size"], work["batch"]
    modes = {name: mode for name, mode in bench.modes.items() if name in work["modes"] and mode.launched == launched}
    case = bench.build(opts.model, size, batch, DTYPES[opts.dtype], device)
    row = {"size": size, "batch": batch}
    if rank == 0:
        print(f"== {opts.model} {size}x{size} batch {batch} {opts.dtype} {'/'.join(work['modes'])} on {world} x {device_name(device)}", flush=True)
    with torch.no_grad():
        reference = output(case()) if any(mode.reference for mode in modes.values()) else None
        if reference is not None and not torch.isfinite(reference).all():
            raise SystemExit(f"{opts.model}'s eager output is not finite at {size}x{size} in {opts.dtype}: no error can be measured")
        timing = {"device": device, "warmup": opts.warmup, "iters": opts.iters, "before_timing": before_timing}
        context = Context(opts, device, timing, reference, work["worlds"])
        for mode in modes.values():
            mode.run(row, case, context)
    if rank == 0:
        print(f"  {row}", flush=True)
    return row


def run_workers(bench: Benchmark, opts) -> tuple[list[dict], list[str]]:
    """``--jobs``: each measurement in its own process, ``opts.jobs`` at a time. A group of workers
    compiles at once (compiling is mostly single-threaded Python), then each in turn times its
    calls while the others wait idle, so no timing shares the GPU or the CPU with a compile."""
    work = [one for entry in measurements(opts) for one in one_per_process(bench, entry)]
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
    """One measurement in a child process (the benchmark script again); its output is echoed with a label."""

    def __init__(self, index: int, work: dict, turns: str):
        self.label = f"{work['size']}/b{work['batch']}/{work['modes'][0]}" + "".join(f"/N={w}" for w in work["worlds"])
        self.path = os.path.join(turns, str(index))
        argv = sys.argv[1:] + ["--measurement", json.dumps(work), "--out", self.path]
        self.process = subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(sys.argv[0]), *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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


def main(bench: Benchmark, doc: str):
    """Run ``bench`` as its command line (``doc`` is the script's help) says."""
    opts = parse_args(bench, doc)
    launched = "WORLD_SIZE" in os.environ  # torchrun
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    if opts.jobs > 1 and not opts.measurement:
        if launched:
            raise SystemExit("--jobs is for one device; under torchrun every rank runs each measurement")
        rows, failed = run_workers(bench, opts)
        finish(bench, opts, rows, device, 1, failed)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if launched:
        dist.init_process_group(backend)
    else:  # distri at world 1 still runs through a process group
        store = tempfile.NamedTemporaryFile(delete=False).name
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    if opts.measurement:  # a worker of --jobs: one measurement, its row to the file the parent reads
        row = measure(bench, json.loads(opts.measurement), opts, device, False, lambda: wait_for_turn(opts.out))
        with open(opts.out + ".json", "w") as f:
            json.dump(row, f)
    else:
        rows = []
        for work in measurements(opts):
            rows.append(measure(bench, work, opts, device, launched))
            if device.type == "cuda":  # the last model's memory back before the next one's
                torch.cuda.empty_cache()
        if dist.get_rank() == 0:
            finish(bench, opts, rows, device, dist.get_world_size(), [])
    dist.destroy_process_group()


def finish(bench: Benchmark, opts, rows, device, world, failed):
    """Write the JSON results and print the table, last."""
    name = device_name(device)
    if opts.out:
        os.makedirs(opts.out, exist_ok=True)
        with open(os.path.join(opts.out, bench.results.format(model=opts.model, world=world)), "w") as f:
            json.dump({"device": name, "world": world, "dtype": opts.dtype, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print_table(rows, f"{opts.model}, {opts.dtype}, {world} x {name}, torch {torch.__version__}")
    if failed:
        raise SystemExit(f"failed measurements (their rows are missing): {', '.join(failed)}")
