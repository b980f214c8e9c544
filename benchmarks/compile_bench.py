"""Compile time, cold and from shipped caches, per stage: reduce-overhead against ``distri``.

Each measurement is a fresh process. *Cold*: an empty Inductor cache directory; it compiles,
then saves its portable cache artifacts (``districompile.warm.save``). *Restart*: another empty
cache directory, the artifacts loaded first (``districompile.warm.load``), as a fresh container
that was shipped them would. *Restart-replanned* (``--replanned``): the same with the plan cache's
entries dropped after loading, so the programs are planned again, as before the plan cache. Each
times every call until the first steady call (one that replays the phase that runs from then on)
and splits the first call into stages:

- ``dynamo``: Dynamo's tracing (its ``_compile.compile_inner`` less the backend call); with
  ``--precompiled``, torch's AOT compile traces the model before the first call (timed in it),
  and a restart loads the trace with the artifacts (``load``) instead;
- ``plan``: districompile's capture to ATen and its passes, or on a restart, loading their
  programs from the plan cache (``plan cache hits``);
- ``lower``: compiling each phase (AOTAutograd and Inductor: ``inductor`` for reduce-overhead,
  which compiles inside the backend call), with Inductor's codegen and the wait for Triton's
  compile workers shown apart; within it, ``wait``: for the worker processes compiling the other
  phases or pieces meanwhile (``compile_workers``, ``compile_pieces``; their codegen is not in this
  process's ``codegen``), and ``withdraw``: on a restart, for the workers the cached phases made
  unnecessary to exit;
- ``first steady``: seconds from the start to the end of the first steady call, CUDA graph
  captures included; ``first image`` (``--image-steps N``): to the end of the N-th call;
- ``steady ms``: the median of 10 calls after all that (replays of the steady phase's graph);
- ``Inductor from``: for ``distri-background``, to the end of the first steady call of Inductor's
  phases: the first image (run eager), the wait for the workers still compiling, the next image's
  take-over (loading the phases) and its calls.

Modes: ``reduce-overhead``; ``distri`` at world 1 (the default displaced mode: its warm-up and
steady programs are the same program at world 1, the second loaded from the cache the first
filled); ``distri-exchanges``: world 1 with ``single_rank_exchanges``, the two phases of a patch
rank's program with their exchange ops; ``distri-whole``: the same, each phase compiled whole
(``compile_pieces=1``) rather than in pieces; ``distri-background``: the same with
``background_compile`` (the first image runs the eager lowering while worker processes compile
both phases). One GPU cannot show the CFG split (two ranks).

    python benchmarks/compile_bench.py --sizes 1024 2048          # one GPU; logs under --logs
    python benchmarks/compile_bench.py --model tiny --sizes 256 --dtype fp32   # a CPU
    python benchmarks/compile_bench.py --sizes 2048 --modes reduce-overhead distri-background --image-steps 50
    python benchmarks/compile_bench.py --sizes 2048 --modes distri-exchanges distri-whole --pieces 8
    python benchmarks/compile_bench.py --sizes 2048 --modes distri-exchanges --precompiled
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

MODES = ("reduce-overhead", "distri", "distri-exchanges", "distri-whole", "distri-background")
DISTRI_OPTIONS = {
    "distri": {},
    "distri-exchanges": {"single_rank_exchanges": True},
    "distri-whole": {"single_rank_exchanges": True, "compile_pieces": 1},
    "distri-background": {"single_rank_exchanges": True, "background_compile": True},
}
WARMUP_STEPS = 1
# Inductor's own timers (torch._dynamo.utils.compilation_time_metrics), summed over the phases.
INDUCTOR_TIMERS = {"codegen": "fx_codegen_and_compile", "triton wait": "async_compile.wait"}


class StageLog(logging.Handler):
    """Collects the seconds of districompile's compile stages (``TORCH_LOGS=districompile``'s lines)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.stages: dict[str, float] = {}

    def emit(self, record):
        found = re.search(
            r"(planning|loading the per-rank programs|lowering the (\S+) phase|waiting for the worker|withdrawing the compile workers"
            r"|the phases compiled in the background take over).* took ([\d.]+) s", record.getMessage(),
        )
        if found:
            name = {
                "planning": "plan", "loading the per-rank programs": "plan", "waiting for the worker": "wait",
                "withdrawing the compile workers": "withdraw", "the phases compiled in the background take over": "take over",
            }
            name = name.get(found[1], f"lower {found[2]}")
            self.stages[name] = self.stages.get(name, 0.0) + float(found[3])


def worker(spec: dict) -> dict:
    import torch.distributed as dist

    import districompile
    from districompile import plan_cache, precompile, warm
    from districompile.unets import SDXL, TINY_SDXL, sdxl_unet

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    warm.init_process_group(device, spec["port"])
    unet, args, kwargs = sdxl_unet({"sdxl": SDXL, "tiny": TINY_SDXL}[spec["model"]], spec["size"], 2, warm.DTYPES[spec["dtype"]], device)
    stage_log = StageLog()
    logging.getLogger("districompile").addHandler(stage_log)
    logging.getLogger("districompile").setLevel(logging.INFO)
    result = {"load": 0.0}
    precompiled = spec["precompiled"] and spec["mode"] != "reduce-overhead"
    if spec["restart"]:
        start = time.perf_counter()
        result["loaded"] = warm.load(spec["artifacts"], unet if precompiled else None)
        result["load"] = time.perf_counter() - start
        if not spec["plans"]:  # the restart before the plan cache: its entries dropped, the programs planned again
            shutil.rmtree(plan_cache.directory(), ignore_errors=True)
    traced = 0.0
    if spec["mode"] == "reduce-overhead":
        compiled, steady = torch.compile(unet, mode="reduce-overhead"), 3  # compile, warm up, record: then replays
    else:
        options = {"warmup_steps": WARMUP_STEPS, "compile_pieces": spec["pieces"], **DISTRI_OPTIONS[spec["mode"]]}
        compiled, steady = torch.compile(unet, backend="distri", options=options), WARMUP_STEPS + 2  # steady: eager, then capture
        if precompiled:  # Dynamo traces before the first call (cold), or not at all (loaded)
            compiled = unet
            if not spec["restart"]:
                start = time.perf_counter()
                with torch.no_grad():
                    precompile.precompile(unet, args, kwargs, options)
                traced = time.perf_counter() - start

    def timed_calls(count: int, first_step: int = 0) -> list[float]:
        seconds = []
        for step in range(first_step, first_step + count):
            start = time.perf_counter()
            compiled(args[0], args[1] - step, *args[2:], **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        return seconds

    with torch.no_grad():
        result["calls"] = timed_calls(max(steady, spec["image_steps"]))
        result["calls"][0] += traced
        result["steady"] = steady
        result["stages"] = dict(stage_log.stages)
        if spec["mode"] == "distri-background":
            # The workers go on compiling while the first image runs eager; the next image takes their phases over.
            start = time.perf_counter()
            districompile.finish_compiles(unet)
            result["background_wait"] = time.perf_counter() - start
            districompile.reset(unet)
            result["inductor_calls"] = timed_calls(steady + 2)  # the last two replay the steady phase's CUDA graph
            result["take_over"] = stage_log.stages.get("take over", 0.0)
        # The trajectory goes on (the timestep falls): steady calls, replays of the steady phase.
        latest = result.get("inductor_calls", result["calls"])
        result["steady_ms"] = 1e3 * statistics.median(timed_calls(10, first_step=len(latest)))
    if not spec["restart"]:
        warm.save(spec["artifacts"], unet if precompiled else None)
    from torch._dynamo.utils import compilation_time_metrics, counters

    timer = {name: sum(compilation_time_metrics.get(key, [])) for name, key in INDUCTOR_TIMERS.items()}
    # Dynamo's tracing: through torch.compile, or torch's AOT compile (precompiled, cold).
    dynamo = sum(compilation_time_metrics.get("_compile.compile_inner", []) + compilation_time_metrics.get("fullgraph_capture", []))
    backend = sum(compilation_time_metrics.get("OutputGraph.call_user_compiler", []))
    result.update(
        dynamo=dynamo - backend, backend=backend, **timer,
        cache={k: v for k, v in {**counters["inductor"], **counters["aot_autograd"], **counters["districompile"]}.items() if "cache" in k},
    )
    dist.destroy_process_group()
    return result


def measure(spec: dict, timeout: float, log_dir: str) -> dict:
    name = f"{spec['mode']}-{spec['size']}-{kind(spec).replace(', ', '-')}"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-")}
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as expired:  # keep what it printed: the stages it got through
        with open(os.path.join(log_dir, f"{name}.log"), "w") as log_file:
            for output in (expired.stdout, expired.stderr):  # bytes, whatever text= said
                log_file.write(output.decode(errors="replace") if isinstance(output, bytes) else output or "")
        return {"error": f"over {timeout:.0f} s"}
    with open(os.path.join(log_dir, f"{name}.log"), "w") as log_file:
        log_file.write(done.stdout + done.stderr)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not results:
        return {"error": f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1][:120]}"}
    return json.loads(results[-1][len("RESULT "):])


def kind(spec: dict) -> str:
    process = "cold" if not spec["restart"] else "restart" if spec["plans"] else "restart-replanned"
    return f"{process}, precompiled" if spec["precompiled"] and spec["mode"] != "reduce-overhead" else process


def row(mode: str, size: int, kind: str, r: dict) -> list[str]:
    if "error" in r:
        return [mode, str(size), kind, r["error"]] + [""] * 12
    stages = r["stages"]
    lower = sum(v for k, v in stages.items() if k.startswith("lower ")) if stages else r["backend"]
    # In the order they ran; waits for the workers and their withdrawal are part of the phases'.
    phases = " + ".join(f"{k.removeprefix('lower ')} {v:.1f}" for k, v in stages.items() if k.startswith("lower "))
    within = ", ".join(f"{k} {stages[k]:.1f}" for k in ("wait", "withdraw") if k in stages)
    phases = (phases + (f"; {within}" if within else "")) or f"{r['backend']:.1f}"
    hits = r["cache"].get("fxgraph_cache_hit", 0)
    misses = r["cache"].get("fxgraph_cache_miss", 0)
    plans = r["cache"].get("plan_cache_hit", 0), r["cache"].get("plan_cache_miss", 0)
    return [
        mode, str(size), kind, f"{r['load']:.1f}", f"{r['dynamo']:.1f}", f"{stages.get('plan', 0.0):.1f}",
        f"{lower:.1f} ({phases})", f"{r['codegen']:.1f}", f"{r['triton wait']:.1f}", f"{r['calls'][0]:.1f}",
        f"{sum(r['calls'][:r['steady']]):.1f}", f"{sum(r['calls']):.1f}" if len(r["calls"]) > r["steady"] else "",
        inductor_from(r), f"{r['steady_ms']:.1f}", f"{hits}/{hits + misses}", f"{plans[0]}/{sum(plans)}" if sum(plans) else "",
    ]


def inductor_from(r: dict) -> str:
    """Seconds from the first call to the end of the first steady call of Inductor's phases; in
    the background mode, after the first image ran eager (its steady call's ms -> Inductor's)."""
    if "inductor_calls" not in r:
        return ""
    done = sum(r["calls"]) + r["background_wait"] + sum(r["inductor_calls"][: r["steady"]])
    return (f"{done:.1f} (wait {r['background_wait']:.1f}, take over {r['take_over']:.1f}; steady "
            f"{1e3 * r['calls'][-1]:.1f} -> {1e3 * r['inductor_calls'][-1]:.1f} ms)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="sdxl", choices=("sdxl", "tiny"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    parser.add_argument("--artifacts", help="keep each mode and size's cache artifacts in a folder here "
                        "(MODE-SIZE), e.g. for profile_phase.py --load-artifacts")
    parser.add_argument("--logs", default=os.environ.get("OUT", "."), help="each measurement's output goes here")
    parser.add_argument("--image-steps", type=int, default=0, help="time the first image: this many calls from the "
                        "first (the '1st image' column)")
    parser.add_argument("--pieces", type=int, help="compile_pieces for the distri modes that do not set it "
                        "(default: districompile's, by the program's size)")
    parser.add_argument("--cold-only", action="store_true", help="measure cold compiles only (no restart)")
    parser.add_argument("--precompiled", action="store_true", help="distri modes: precompile the model "
                        "(districompile.precompile: Dynamo's trace saved with the artifacts, a restart loads it)")
    parser.add_argument("--replanned", action="store_true", help="also restart without the plan cache's entries "
                        "(the programs planned again, as before the plan cache): 'restart-replanned'")
    opts = parser.parse_args()
    if opts.worker:
        print("RESULT " + json.dumps(worker(json.loads(opts.worker))), flush=True)
        return
    header = ["mode", "size", "process", "load s", "dynamo s", "plan s", "lower s (per phase)", "codegen s",
              "triton wait s", "1st call s", "1st steady s", "1st image s", "Inductor from s", "steady ms", "FX cache hits",
              "plan cache hits"]
    rows = []
    for size in opts.sizes:
        for mode in opts.modes:
            artifacts = os.path.join(opts.artifacts, f"{mode}-{size}") if opts.artifacts else tempfile.mkdtemp(prefix="artifacts-")
            runs = [(False, True)] + [(True, True)] * (not opts.cold_only) + [(True, False)] * opts.replanned
            for restart, plans in runs if mode != "reduce-overhead" else [run for run in runs if run[1]]:
                spec = dict(mode=mode, size=size, model=opts.model, dtype=opts.dtype, restart=restart, plans=plans,
                            artifacts=artifacts, image_steps=opts.image_steps, pieces=opts.pieces, precompiled=opts.precompiled, port=29600 + len(rows))
                result = measure(spec, opts.timeout, opts.logs)
                rows.append(row(mode, size, kind(spec), result))
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{opts.model}, batch 2, {opts.dtype}, {device}, torch {torch.__version__}; seconds")
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
