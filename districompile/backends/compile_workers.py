"""Compile a shape's phases side by side: while this process lowers the first phase (or the
first piece of it, ``passes/pieces.py``) through Inductor, a worker process compiles each other
phase or piece (each a ``lowering.CompileUnit``) and leaves it in Inductor's caches on disk (the
FX graph and AOTAutograd caches), from which this process then loads it.

Inductor's code generation holds the GIL, so phases compiled in threads would take turns; a
process of its own compiles in parallel. The worker is only a cache warmer: what runs is always
what this process compiled or loaded, and a worker that fails (or whose entry this process does
not find) costs time, never correctness. The worker sees the program as a pickled copy, without
node metadata, and Inductor's cache key covers what the metadata changes (pattern matching reads
it), so every phase is compiled as such a copy (``portable``), here and in the worker alike, cold
or restarted from shipped caches.

The worker builds its example inputs from their metadata (``InputSpec``): parameters are
allocated, uninitialised, on their device while it compiles (an SDXL in fp16: 5 GB for a whole
phase, its share for a piece). The workers share the machine's cores for Triton's kernel
compiles (Inductor's ``compile_threads``, which its cache keys leave out).

With ``background_compile`` every unit, the first included, is a worker's, while this process
runs the eager lowering; the phases are loaded once the workers are done (``runtime``).

No worker is started for programs loaded from the plan cache (a restart: their phases were
cached with them). A worker that turns out not to be needed (this process found its first phase
in the cache, so the others are there too) is *withdrawn*, never killed: a marker file tells it to exit
before it compiles, and one that has begun is let finish. A worker killed while it read or wrote
the cache left this process bypassing AOTAutograd's cache (once in four runs of
tests/test_compile_cache.py); one waited for added its whole start-up, about 25 s of an SDXL
restart's 67 s on an H100.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

from ..config import DistriConfig

log = logging.getLogger(__name__)

# Auto mode (``compile_workers=None``): workers where a unit has at least this many nodes. Starting
# one costs a process and its imports (seconds); a phase costs Inductor about 17 ms per node
# (SDXL's 9,850-node steady program: 203 s on an H100).
AUTO_MIN_NODES = 1000


def portable(program: fx.GraphModule) -> fx.GraphModule:
    """The program as a worker receives it: a pickled and unpickled copy (code, no node metadata)."""
    return pickle.loads(pickle.dumps(program))


@dataclass(frozen=True)
class InputSpec:
    """What Inductor and its cache key see of an example input: shape, strides, dtype, device, and
    whether it is a parameter; a non-tensor input is kept as its value."""

    shape: tuple | None = None
    stride: tuple | None = None
    dtype: torch.dtype | None = None
    device: str | None = None
    parameter: bool = False
    requires_grad: bool = False
    value: object = None

    @classmethod
    def of(cls, x) -> InputSpec:
        if not isinstance(x, torch.Tensor):
            return cls(value=x)
        return cls(
            tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), isinstance(x, torch.nn.Parameter), x.requires_grad
        )

    def example(self):
        if self.shape is None:
            return self.value
        x = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        return torch.nn.Parameter(x, requires_grad=self.requires_grad) if self.parameter else x.requires_grad_(self.requires_grad)


def wanted(units: list, config: DistriConfig) -> bool:
    """Whether to compile these units side by side (the config's ``compile_workers``)."""
    if config.lowering != "inductor" or len(units) < 2 or config.compile_workers is False:
        return False
    if not fx_cache_on("the phases compile one after another"):
        return False
    return config.compile_workers or max(len(unit.program.graph.nodes) for unit in units) >= AUTO_MIN_NODES


def fx_cache_on(otherwise: str) -> bool:
    """Whether Inductor's FX graph cache is on: a worker hands its phase over through it. If not,
    log what happens ``otherwise``."""
    from torch._inductor import config as inductor_config

    if not inductor_config.fx_graph_cache or inductor_config.force_disable_caches:
        log.info("districompile: Inductor's FX graph cache is off: %s", otherwise)
        return False
    return True


class CompileWorker:
    """A process compiling one unit (a phase or a piece of one) into Inductor's caches."""

    def __init__(self, unit: str, program: fx.GraphModule, specs: list[InputSpec], compile_threads: int):
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        self.unit = unit
        job = {
            "program": program,
            "inputs": specs,
            "inductor_config": inductor_config.save_config(),
            "functorch_config": functorch_config.save_config(),
            "threads": torch.get_num_threads(),  # CPU kernels are generated for this process's thread count
            "compile_threads": compile_threads,
        }
        fd, self.job_path = tempfile.mkstemp(prefix=f"districompile-{unit.replace(' ', '-')}-", suffix=".pkl")
        with os.fdopen(fd, "wb") as job_file:
            pickle.dump(job, job_file)
        self.withdrawn_path = withdrawn_marker(self.job_path)
        self.log_file = tempfile.TemporaryFile(mode="w+")
        package_root = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": cache_dir(),  # the cache this process reads, wherever it was set
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, self.job_path], env=env, stdout=self.log_file, stderr=subprocess.STDOUT
        )

    def done(self, block: bool = False) -> bool:
        """Whether the worker had exited (its phase is in the cache, unless it failed: ``wait`` says);
        ``block``: then wait for it to exit."""
        exited = self.process.poll() is not None
        if block:
            self.process.wait()
        return exited

    def wait(self) -> bool:
        """Wait for the worker; False (with a warning naming the cause) when it failed."""
        code = self.process.wait()
        output = self._clean_up()
        if code != 0:
            tail = "\n".join(output.strip().splitlines()[-15:])
            log.warning(
                "districompile: the worker compiling %s failed (exit code %d); this process compiles it "
                "instead. Its output ends:\n%s", self.unit, code, tail,
            )
            return False
        return True

    def withdraw(self):
        """Tell the worker it is not needed and wait for it: it exits before compiling, or, where it
        has begun, once its compile is done (a phase already cached: a load)."""
        Path(self.withdrawn_path).touch()
        self.wait()

    def cancel(self):
        """Stop the worker, unless already waited for: the compile it was meant to spare failed, or
        nothing will load its phase (the process is exiting)."""
        if self.log_file.closed:
            return
        self.process.kill()
        self.process.wait()
        self._clean_up()

    def _clean_up(self) -> str:
        """Remove the job file (and any withdrawal marker); the worker's output."""
        os.unlink(self.job_path)
        Path(self.withdrawn_path).unlink(missing_ok=True)
        self.log_file.seek(0)
        output = self.log_file.read()
        self.log_file.close()
        return output


def start_workers(units: list, inputs: list, first: bool = False) -> dict[str, CompileWorker]:
    """A worker for each unit after the first (``first``: from the first) that differs from every
    earlier one (at world 1 the warm-up and steady programs are the same, and the first compile
    fills the cache). ``inputs``: the phases' (all of a shape's phases take the same)."""
    jobs, seen = [], set()
    for index, unit in enumerate(units):
        specs = unit.specs(inputs)
        identity = (unit.program.code, repr(specs))
        if (index > 0 or first) and identity not in seen:
            jobs.append((unit, specs))
        seen.add(identity)
    compile_threads = max(1, (os.cpu_count() or 1) // (len(jobs) + 1))
    return {unit.name: CompileWorker(unit.name, unit.program, specs, compile_threads) for unit, specs in jobs}


def cancel_all(workers: list[CompileWorker]):
    for worker in workers:
        worker.cancel()


def withdrawn_marker(job_path: str) -> str:
    return job_path + ".withdrawn"


def fx_cache_hits() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"]


def main(job_path: str):
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    # Run with -m, this process imported the districompile package: the ops the program calls exist.
    from .lowering import compile_program

    withdrawn = withdrawn_marker(job_path)
    if os.path.exists(withdrawn):  # checked after the imports (most of the start-up) and before the compile
        return
    with open(job_path, "rb") as job_file:
        job = pickle.load(job_file)
    inductor_config.load_config(job["inductor_config"])
    functorch_config.load_config(job["functorch_config"])
    torch.set_num_threads(job["threads"])
    inductor_config.compile_threads = job["compile_threads"]
    inputs = [spec.example() for spec in job["inputs"]]
    if os.path.exists(withdrawn):
        return
    with torch.no_grad():
        compile_program(job["program"], inputs, DistriConfig(lowering="inductor"))


if __name__ == "__main__":
    main(sys.argv[1])
