"""The benchmark scripts run on the CPU with a tiny UNet and report what they claim to.

Behaviour only: the columns exist and the numbers that are not timings (errors, PSNR, bytes)
hold; timings are not checked.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(args, tmp_path, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(args, cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = tmp_path.glob("*.json")
    return done.stdout, json.loads(result.read_text())


def test_unet_bench_on_cpu(tmp_path):
    # --jobs 3: the five measurements run in worker processes, three and then two at once.
    stdout, result = run(
        [sys.executable, "unet_bench.py", "--model", "tiny", "--sizes", "128", "--dtype", "fp32", "--lowering", "eager",
         "--modes", "eager", "distri1", "distri1-steady", "projected", "--worlds", "2", "4",
         "--iters", "1", "--warmup", "0", "--jobs", "3", "--out", str(tmp_path)],
        tmp_path,
    )
    (row,) = result["rows"]  # the workers' measurements of one size and batch, merged
    assert row["distri N=1 rel err"] < 1e-5
    assert row["distri N=1 steady, exchanges kept rel err"] < 1e-5  # one rank: corrected statistics are exact
    assert 0 < row["N=2 stale MiB/rank"] < row["N=2 MiB/call"]
    assert row["N=4 MiB/call"] > row["N=2 MiB/call"]  # more seams, more K/V from others
    assert "halo:" in row["N=2 exchanges"] and "stats_allgather:" in row["N=2 exchanges"]
    for key in ("eager ms", "distri N=1 ms", "projected N=2, per rank ms", "projected N=4, per rank ms"):
        assert row[key] > 0
    assert stdout.count("[128/b1/") > 5  # each worker's output, labelled
    assert "| size | batch | eager ms |" in stdout.splitlines()[-3]  # the table, printed last


def test_unet_bench_in_one_process(tmp_path):
    stdout, result = run(
        [sys.executable, "unet_bench.py", "--model", "tiny", "--sizes", "64", "--batch", "1", "2", "--dtype", "fp32",
         "--modes", "eager", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)],
        tmp_path,
    )
    assert [(row["size"], row["batch"]) for row in result["rows"]] == [(64, 1), (64, 2)]
    assert all(row["eager ms"] > 0 for row in result["rows"])
    assert "| size | batch | eager ms |" in stdout


def test_multi_gpu_script_on_two_cpu_ranks(tmp_path):
    stdout, rows = run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "multi_gpu.py", "--model", "tiny",
         "--sizes", "128", "--steps", "5", "--warmup-steps", "2", "--dtype", "fp32", "--lowering", "eager",
         "--baseline", "eager", "--out", str(tmp_path)],
        tmp_path,
    )
    (row,) = rows
    assert row["ranks"] == 2 and row["steps"] == 5
    assert row["full_sync rel err"] < 1e-4
    # Split on at 2 ranks: each half of the CFG batch runs whole on one rank, so nothing is stale.
    assert row["distri split on PSNR dB"] > 80
    # Split off: both ranks share each image, displaced after 2 steps: close, not exact.
    assert 20 < row["distri split off PSNR dB"] < row["distri split on PSNR dB"]
    for key in ("1 device UNet loop s", "distri split on UNet loop s", "distri split off pipeline s"):
        assert row[key] > 0
    assert "| size | ranks | steps |" in stdout


def test_vae_bench_on_cpu(tmp_path):
    stdout, result = run(
        [sys.executable, "vae_bench.py", "--model", "tiny", "--sizes", "64", "--dtype", "fp32", "--modes", "plain", "tiled",
         "projected", "--worlds", "2", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)],
        tmp_path,
    )
    (row,) = result["rows"]
    assert row["size"] == 64
    for key in ("plain ms", "tiled ms", "projected N=2, per rank ms"):
        assert row[key] > 0
    # The decoder's plan: halos and GroupNorm statistics, the decoded image gathered.
    assert row["N=2 MiB/call"] > 0
    assert all(f"{kind}:" in row["N=2 exchanges"] for kind in ("halo", "stats_allgather", "output_gather"))
    assert "| size | plain ms | tiled ms |" in stdout.splitlines()[-3]  # the table, printed last


def test_vae_bench_reports_out_of_memory_in_the_row(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import vae_bench

    def compile_out_of_memory():  # Inductor wraps what it catches
        raise RuntimeError("compiling failed") from torch.OutOfMemoryError("CUDA out of memory")

    row = {}
    timing = {"device": torch.device("cpu"), "warmup": 0, "iters": 1}
    vae_bench.measure(row, "compiled", compile_out_of_memory, timing)
    assert row == {"compiled ms": "OOM"}

    def other_error():
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        vae_bench.measure(row, "plain", other_error, timing)
