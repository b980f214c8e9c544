"""Planning time: districompile's passes for one rank's programs, whole and cut into pieces.

Runs on a CPU (the passes trace fake tensors; no kernel runs): Dynamo's graph of a UNet is captured
once, then ``compiler.rank_programs`` plans this rank's programs several times with the Inductor
lowering, compiling each phase whole (``compile_pieces=1``) and in pieces (the default): the
difference is what the cut costs. World 1 with ``single_rank_exchanges``: a patch rank's two phases.

    python benchmarks/plan_bench.py                      # SDXL's architecture at 512, bf16
    python benchmarks/plan_bench.py --size 1024 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2, help="plans of each kind; the median is shown")
    opts = parser.parse_args()

    from districompile import warm
    from districompile.compiler import rank_programs
    from districompile.config import DistriConfig
    from districompile.explain import dynamo_graph
    from districompile.passes.pieces import pieces
    from districompile.unets import SDXL, sdxl_unet

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29650")
    dist.init_process_group("gloo", rank=0, world_size=1)
    unet, args, kwargs = sdxl_unet(SDXL, opts.size, 2, warm.DTYPES["bf16"], "cpu")
    with torch.no_grad():
        start = time.perf_counter()
        gm, inputs, spatial = dynamo_graph(unet, args, kwargs, DistriConfig())
        dynamo = time.perf_counter() - start
        kinds = {"whole (compile_pieces=1)": 1, "in pieces (default)": None}
        seconds, cut = {label: [] for label in kinds}, {}
        for _ in range(opts.repeat):  # alternately, so that neither kind gets the warmer caches
            for label, count in kinds.items():
                config = DistriConfig(single_rank_exchanges=True, warmup_steps=1, compile_pieces=count)
                start = time.perf_counter()
                planned = rank_programs(gm, inputs, spatial, config, dist.group.WORLD)
                seconds[label].append(time.perf_counter() - start)
                cut[label] = {phase: len(pieces(program)) or 1 for phase, program in planned.programs.items()}
    dist.destroy_process_group()
    rows = [(label, statistics.median(seconds[label]), cut[label]) for label in kinds]
    print(f"\nSDXL architecture, {opts.size}x{opts.size}, batch 2, bf16, CPU ({os.cpu_count()} cores), torch {torch.__version__}; "
          f"Dynamo {dynamo:.1f} s")
    print("| programs | plan s (median of %d) | pieces per phase |\n| --- | --- | --- |" % opts.repeat)
    for label, seconds, cut in rows:
        print(f"| {label} | {seconds:.1f} | {', '.join(f'{p} {n}' for p, n in cut.items())} |")


if __name__ == "__main__":
    main()
