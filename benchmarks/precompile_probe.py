"""Can torch's caching precompile skip Dynamo on a restart of a diffusers UNet?

A restart from districompile's caches still pays Dynamo's tracing (16-25 s for SDXL on an H100
host, docs/PERFORMANCE.md), as reduce-overhead's does. Torch's experimental caching precompile
(``TORCH_CACHING_PRECOMPILE=1``) saves Dynamo's work with the portable cache artifacts. This
probe asks whether it works for the UNet at all, with Inductor as the backend (districompile
would need its own backend artifact on top): a cold process compiles the tiny SDXL-architecture
UNet and saves the artifacts, a fresh one loads them and compiles again, and says whether Dynamo
traced.

    python benchmarks/precompile_probe.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import torch


def run(phase: str, artifacts: str):
    from torch._dynamo.utils import counters

    from districompile import unets

    unet, args, kwargs = unets.sdxl_unet(unets.TINY_SDXL, 64, 2, torch.float32, "cpu")
    if phase == "restart":
        with open(artifacts, "rb") as saved:
            torch.compiler.load_cache_artifacts(saved.read())
    start = time.perf_counter()
    with torch.no_grad():
        torch.compile(unet)(*args, **kwargs)
    print(f"{phase}: first call {time.perf_counter() - start:.1f} s, Dynamo traced {counters['frames']['ok']} frame(s)", flush=True)
    if phase == "cold":
        with open(artifacts, "wb") as saved:
            saved.write(torch.compiler.save_cache_artifacts()[0])


def main():
    if len(sys.argv) == 3:
        run(*sys.argv[1:])
        return
    artifacts = os.path.join(tempfile.mkdtemp(), "artifacts.bin")
    for phase in ("cold", "restart"):
        env = {**os.environ, "TORCH_CACHING_PRECOMPILE": "1", "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-")}
        done = subprocess.run([sys.executable, __file__, phase, artifacts], env=env, capture_output=True, text=True)
        failure = [line for line in done.stderr.splitlines() if not line.startswith(("W", "E")) and "Error" in line][-1:]
        print(done.stdout.strip() or f"{phase}: failed (exit {done.returncode}): {failure[0] if failure else done.stderr[-300:]}")
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
