"""Where the GPU time of one compiled UNet call goes: a torch.profiler trace and a kernel table.

Compiles the UNet (``unet_bench.build``) with ``torch.compile(backend="distri", options=...)``
in a one-rank group, runs enough calls to reach the phase asked for (a displaced mode's steady
phase after its warm-up), then profiles ``--calls`` replays. Prints the GPU time per call and
the kernels grouped by name (count and microseconds per call), and saves the Chrome trace.

    python benchmarks/profile_phase.py --size 1024 --options '{"single_rank_exchanges": true}' \\
        --trace benchmarks/results/h100/steady_1024.json
    python benchmarks/compile_bench.py --sizes 2048 --modes distri-exchanges --artifacts art
    python benchmarks/profile_phase.py --size 2048 --batch 2 --load-artifacts art/distri-exchanges-2048 \
        --options '{"single_rank_exchanges": true}'     # compiles from the caches the first one left
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import tempfile

import torch
import torch.distributed as dist
from common import output
from unet_bench import build

WARMUP_CALLS = 8  # past the default warm-up (4 calls), its capture and the steady phase's


def kernel_family(name: str) -> str:
    """A kernel name without the parts that differ between instances (Triton's fused op lists, sizes)."""
    name = re.sub(r"^(triton_[a-z]+)_.*", r"\1", name)
    return re.sub(r"<.*", "", name)[:80]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sdxl", "tiny"), default="sdxl")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--options", default="{}", help="backend options as JSON")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--trace", default=None, help="where to save the Chrome trace")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--load-artifacts", help="compile from these cache artifacts (districompile.warm.load), "
                        "e.g. compile_bench.py --artifacts DIR's DIR/distri-exchanges-2048 at batch 2")
    opts = parser.parse_args()

    store = tempfile.NamedTemporaryFile(delete=False).name
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    if opts.load_artifacts:
        from districompile import warm

        warm.load(opts.load_artifacts)
    device = torch.device("cuda")
    unet, args, kwargs = build(opts.model, opts.size, opts.batch, torch.float16, device)
    compiled = torch.compile(unet, backend="distri", options=json.loads(opts.options))
    with torch.no_grad():
        for _ in range(WARMUP_CALLS):
            output(compiled(*args, **kwargs))
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(opts.calls):
                compiled(*args, **kwargs)
            torch.cuda.synchronize()
    if opts.trace:
        prof.export_chrome_trace(opts.trace)

    kernels = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels[kernel_family(event.name)]
            entry[0] += 1
            entry[1] += event.device_time_total
    total = sum(us for _, us in kernels.values()) / opts.calls
    count = sum(n for n, _ in kernels.values()) / opts.calls
    print(f"\n{opts.model} {opts.size}x{opts.size} batch {opts.batch} {opts.options}: "
          f"{count:.0f} kernels, {total / 1e3:.2f} ms of kernel time per call (torch {torch.__version__})")
    print("| kernel | per call | us per call |")
    print("|---|---|---|")
    for name, (n, us) in sorted(kernels.items(), key=lambda item: -item[1][1])[: opts.top]:
        print(f"| {name} | {n / opts.calls:.0f} | {us / opts.calls:.1f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
