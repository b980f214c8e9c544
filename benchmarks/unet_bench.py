"""Time one UNet call in each of these modes and print one table:

- ``eager``: the uncompiled UNet;
- ``reduce-overhead``: ``torch.compile(mode="reduce-overhead")``, the best single-GPU baseline;
- ``distri1``: ``backend="distri"`` (full_sync) in a one-rank group, with its error against eager;
- ``distri1-unchecked``: the same with ``check_ranks=False``: what the ranks' agreement check
  (one small all-gather per call) costs;
- ``distri1-steady``: ``backend="distri"`` in the default displaced mode on one rank with the
  exchange ops kept (``single_rank_exchanges``: 1-rank NCCL collectives inside the CUDA graph),
  timed in the steady phase: what the exchange ops and their join cost beyond the compute;
- ``distri1-deferred``: the same with ``host_checks="deferred"`` (as ``parallelize`` runs it): no
  call waits for the device before it runs; compare the ``queued`` columns;
- ``projected``: one rank's program of an N-rank plan with every exchange replaced by a local
  stand-in (a *projection* of compute scaling: no communication is timed), with the bytes all
  ranks exchange per call and the peak memory of the run plus the stale buffers it would keep;
- ``projected-cfg``: one rank's program of the CFG batch split at world 2: in the row of batch b,
  a batch of 2b split in two halves, each rank running b on the whole image (a plan of one rank:
  no exchange), with its error against eager at batch b. To compare with reduce-overhead in the
  same row: what the split adds per rank. The pair's all-gather of the output after the program
  is not timed: ``explain`` does not give the batch split's outputs, and the runtime calls that
  gather outside the program, where ``localize`` cannot stand in for it.

Each mode reports the median milliseconds of a call synchronized on its own (``ms``; on CUDA
``GPU ms`` too, between events around the call) and the mean of calls back to back (``queued
ms``), as a denoising loop makes them. On CUDA each mode also reports its peak memory (``peak GiB``; with ``--jobs``, of its own
process alone).

Under torchrun with several processes, ``distri`` runs for real at that world size instead
(full_sync and displaced steady phase, per-call time on rank 0).

With ``--jobs K`` each measurement (a mode at a size and batch; a projection per world) runs in
its own process, K of them compiling at once, then timed one after another while the others wait
idle: an SDXL compile is about a minute of mostly single-threaded Python, the timing seconds.

    python benchmarks/unet_bench.py --model sdxl --sizes 1024 2048 --dtype fp16   # one GPU
    python benchmarks/unet_bench.py --model sdxl --sizes 1024 --modes reduce-overhead projected-cfg --jobs 2
    python benchmarks/unet_bench.py --model sdxl --sizes 3840 --modes reduce-overhead projected \
        --worlds 2 4 8 --jobs 4                                                   # compiles at once
    torchrun --nproc-per-node 2 benchmarks/unet_bench.py --model sdxl --modes distri  # several GPUs
    python benchmarks/unet_bench.py --model tiny --sizes 256 --dtype fp32          # a CPU
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from common import DISTRI, DISTRI1, EAGER, PROJECTED, Benchmark, Case, Mode, compiled_mode, main, output, project, run_distri, time_mode

from districompile.metrics import relative_error
from districompile.unets import SDXL, TINY_SDXL, sdxl_unet

MODELS = {"sdxl": SDXL, "tiny": TINY_SDXL}


def build(model: str, size: int, batch: int, dtype, device):
    return sdxl_unet(MODELS[model], size, batch, dtype, device)


def run_unchecked(row, case: Case, ctx):
    run_distri(row, "distri N=1 unchecked", case, ctx, sync_mode="full_sync", check_ranks=False)


def run_steady(row, case: Case, ctx):
    run_distri(row, "distri N=1 steady, exchanges kept", case, ctx, single_rank_exchanges=True)


def run_deferred(row, case: Case, ctx):
    run_distri(row, "distri N=1 steady, checks deferred", case, ctx, single_rank_exchanges=True, host_checks="deferred")


def run_cfg_projection(row, case: Case, ctx):
    """The per-rank program of the CFG split at world 2 of the case's inputs doubled (a batch of
    2b, halves alike): each rank's half is the case's batch b, so its output is eager's."""
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda x: torch.cat([x, x]) if x.dim() else x, (case.args, case.kwargs))
    run, report = project(Case(case.model, args, kwargs, case.options), 2, ctx.opts.lowering, split_batch=True)
    if not report.batch_split:
        raise SystemExit("projected-cfg: the batch is not split (TORCH_LOGS=districompile says why)")
    inputs = report.example_inputs
    name = "projected-cfg N=2, per rank, no pair gather"
    row[f"{name} rel err"] = relative_error(output(run(*inputs)), ctx.reference)
    time_mode(row, name, lambda: run(*inputs), ctx.timing)


BENCH = Benchmark(
    models=tuple(MODELS),
    build=lambda *args: Case(*build(*args)),
    modes={
        "eager": EAGER,
        "reduce-overhead": compiled_mode("reduce-overhead"),
        "distri1": DISTRI1,
        "distri1-unchecked": Mode(run_unchecked, reference=True),
        "distri1-steady": Mode(run_steady, reference=True),
        "distri1-deferred": Mode(run_deferred, reference=True),
        "projected": PROJECTED,
        "projected-cfg": Mode(run_cfg_projection, reference=True),
        "distri": DISTRI,
    },
    default_modes=("eager", "reduce-overhead", "distri1", "projected"),
    dtypes=("fp16", "fp32"),
    default_worlds=(2,),
    results="bench_{model}_{world}.json",
)


if __name__ == "__main__":
    main(BENCH, __doc__)
