"""Run a function on N local CPU ranks (gloo) and collect each rank's result in the parent."""

import contextlib
import datetime
import os
import socket
import tempfile
import time
import traceback
from multiprocessing.connection import wait

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(fn, world_size, *args, timeout=120.0):
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return results in rank order.

    ``fn`` must be a module-level function and its result picklable. If a rank raises, this
    raises ``RuntimeError`` carrying that rank's traceback; the other ranks are killed rather
    than left blocked in a collective.
    """
    port = _free_port()
    ctx = _context()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, rank, world_size, port, out_dir, timeout, args),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        try:
            _wait_all_or_first_failure(procs, timeout)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                proc.join()
        return _collect(procs, out_dir, timeout)


def world_fixtures(fn, timeout: float):
    """Fixtures ``world2`` and ``world3`` (``fn`` spawned once per world, for all of a module's tests)
    and ``ranks`` (``(world, per-rank results)`` over both). In a test module:
    ``world2, world3, ranks = world_fixtures(_run, timeout=...)``."""

    @pytest.fixture(scope="module", name="world2")
    def world2():
        return run_ranks(fn, 2, timeout=timeout)

    @pytest.fixture(scope="module", name="world3")
    def world3():
        return run_ranks(fn, 3, timeout=timeout)

    @pytest.fixture(params=[2, 3], ids=lambda world: f"world{world}", name="ranks")
    def ranks(request):
        return request.param, request.getfixturevalue(f"world{request.param}")

    return world2, world3, ranks


# What the fork server imports once for every rank (``_context``): site packages only, which resolve
# alike from any directory (the server ignores the parent's sys.path; districompile and the test
# modules are imported by each rank, from the parent's path). A module missing here is skipped.
RANK_IMPORTS = [
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "torch._inductor.compile_fx",  # Inductor's caches read their directory when used, not on import
    "diffusers.models.unets",
    "diffusers.models.autoencoders",
    "diffusers.models.controlnets",
    "diffusers.models.transformers",
]


def _context():
    """Ranks are forked from a fork server: a fresh process (no CUDA, no thread pool yet) that
    imported ``RANK_IMPORTS`` once. Each rank is then prepared like a spawned one (the parent's
    ``sys.path``; its function unpickled by reference, importing its test module) but starts with
    torch, Dynamo, Inductor and diffusers' models loaded: some 8 seconds a rank less, over some
    seventy ranks in the suite."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(RANK_IMPORTS)
    return ctx


def _rank_main(fn, rank, world_size, port, out_dir, timeout, args):
    # Results go through files, not a queue: torch would pass tensors through shared memory
    # that dies with this process, and a full pipe can deadlock against join().
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world_size,
            init_method=f"tcp://127.0.0.1:{port}",
            timeout=datetime.timedelta(seconds=timeout),
        )
        torch.save(fn(rank, world_size, *args), _result_path(out_dir, rank))
    except BaseException:
        # Only the first rank to fail reports: the others then fail on connections it drops. It
        # reports before its process group goes down, so it is the first to get here.
        with contextlib.suppress(FileExistsError), open(_failure_path(out_dir), "x") as f:
            f.write(f"rank {rank} failed:\n{traceback.format_exc()}")
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _wait_all_or_first_failure(procs, timeout):
    deadline = time.monotonic() + timeout
    running = {proc.sentinel: proc for proc in procs}
    while running:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        for sentinel in wait(list(running), timeout=remaining):
            proc = running.pop(sentinel)
            proc.join()  # a ready sentinel can come before the exit code is reaped (None)
            if proc.exitcode != 0:
                return


def _collect(procs, out_dir, timeout):
    if os.path.exists(_failure_path(out_dir)):
        with open(_failure_path(out_dir)) as f:
            raise RuntimeError(f.read())
    missing = [rank for rank in range(len(procs)) if not os.path.exists(_result_path(out_dir, rank))]
    if missing:
        # A rank that crashed or hung left no report; its exit code tells which (-9: killed here).
        exit_codes = [proc.exitcode for proc in procs]
        raise RuntimeError(
            f"ranks {missing} produced no result; exit codes by rank {exit_codes}; timeout {timeout}s"
        )
    return [torch.load(_result_path(out_dir, rank), weights_only=False) for rank in range(len(procs))]


def _result_path(out_dir, rank):
    return os.path.join(out_dir, f"rank{rank}.pt")


def _failure_path(out_dir):
    return os.path.join(out_dir, "failure.txt")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
