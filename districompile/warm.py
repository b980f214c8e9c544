"""Pre-build the compile caches of a model, to ship them or to restart from them in seconds.

A process compiles each phase of each rank's program through Inductor, whose FX graph and
AOTAutograd caches keep the result; torch's portable cache artifacts
(``torch.compiler.save_cache_artifacts``) pack those entries, Triton kernels and districompile's
plan cache included, into bytes that another machine or a fresh container loads before its first
call. The model is precompiled (``precompile``): Dynamo's trace of it is saved too, so a restart
does not trace it again. Weights are graph inputs, not part of any cache key: a model of the same
architecture with random weights builds the caches of the trained one. The key does hold the
model's code and config, the input shapes, the options, the rank and world size, the torch
version and the GPU.

    python -m districompile.warm --model sdxl --size 2048 --batch 2 --dtype fp16 --out cache/
    torchrun --nproc-per-node 2 -m districompile.warm --model sdxl --size 2048 --batch 2 --out cache/

writes per rank (the ranks' programs differ) ``cache/rank{r}-of-{world}.bin`` (the caches) and
``cache/rank{r}-of-{world}.forward`` (the traced forward). At start-up, each rank calls
``districompile.warm.load("cache/", unet)`` after ``init_process_group`` and before its first
call, then calls ``unet(...)`` itself: no ``torch.compile``, which would trace it again.
``load("cache/")`` without the model loads the caches only (Dynamo then traces the model at its
first call). For a model of your own: ``precompile.precompile(model, args, kwargs, options)``,
calls until its first steady call, then ``save("cache/", model)`` on every rank.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import precompile
from .errors import DistriCompileError

log = logging.getLogger(__name__)


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def artifact_path(directory, suffix: str = ".bin") -> Path:
    """This rank's artifact file in ``directory``: ``.bin`` the caches, ``.forward`` the traced forward."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return Path(directory) / f"rank{rank}-of-{world}{suffix}"


def save(directory, model: torch.nn.Module | None = None) -> Path:
    """Write the cache entries this process compiled (or loaded) to this rank's file in
    ``directory``, and ``model``'s traced forward where it is precompiled (``precompile``)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError("districompile.warm: no cache entries to save: did this process compile its model?")
    path = artifact_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(saved[0])
    if model is not None:
        precompile.save(model, artifact_path(directory, ".forward"))
    return path


def load(directory, model: torch.nn.Module | None = None) -> bool:
    """Load this rank's cache entries from ``directory`` into the local caches, and onto ``model``
    its traced forward (its calls then skip Dynamo; an error where there is none). False (with a
    warning) when there are no cache entries, and the first call compiles from scratch."""
    path, forward = artifact_path(directory), artifact_path(directory, ".forward")
    if model is not None and not forward.exists():  # its calls would run uncompiled
        raise DistriCompileError(
            f"districompile.warm.load: no traced forward at {forward}: build it with python -m districompile.warm (or "
            "precompile.precompile and save(directory, model)), or load the caches alone, load(directory), and call "
            "torch.compile(model, backend='distri')"
        )
    if path.exists():
        torch.compiler.load_cache_artifacts(path.read_bytes())
    if model is not None:
        precompile.load(model, forward)
    if not path.exists():
        log.warning("districompile.warm: no cache artifacts at %s; the first call compiles from scratch", path)
    return path.exists()


def init_process_group(device: torch.device, port: int = 29581):
    """The process group torchrun describes, else a group of one on ``port``."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def main(argv=None):
    from . import unets

    parser = argparse.ArgumentParser(prog="python -m districompile.warm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sdxl", choices=("sdxl", "tiny-sdxl"))
    parser.add_argument("--size", type=int, default=1024, help="image height and width in pixels")
    parser.add_argument("--batch", type=int, default=2, help="2: a CFG pair")
    parser.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    parser.add_argument("--options", default="{}", help='the backend options as JSON, e.g. \'{"warmup_steps": 4}\'')
    parser.add_argument("--out", required=True, help="the directory to write this rank's artifacts to")
    opts = parser.parse_args(argv)
    dtype = DTYPES[opts.dtype]
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_process_group(device)
    config = {"sdxl": unets.SDXL, "tiny-sdxl": unets.TINY_SDXL}[opts.model]
    unet, args, kwargs = unets.sdxl_unet(config, opts.size, opts.batch, dtype, device)
    options = json.loads(opts.options)
    # Through the warm-up phase into the steady one: every phase compiled (and captured, on a GPU).
    calls = options.get("warmup_steps", 4) + 2
    start = time.perf_counter()
    with torch.no_grad():
        precompile.precompile(unet, args, kwargs, options)
        for step in range(calls):
            unet(args[0], args[1] - step, *args[2:], **kwargs)
    path = save(opts.out, unet)
    if dist.get_rank() == 0:
        print(f"districompile.warm: {calls} calls in {time.perf_counter() - start:.1f} s; wrote {path} "
              f"({path.stat().st_size / 2**20:.1f} MiB) and one file per rank", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
