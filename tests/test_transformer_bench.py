"""The transformer benchmark and the UNet benchmark's CFG projection run on the CPU (tiny models,
eager lowering) and report what they claim to: behaviour only, timings are not checked."""

import sys

from test_benchmarks import run


def test_transformer_bench_on_cpu(tmp_path):
    stdout, result = run(
        [sys.executable, "transformer_bench.py", "--model", "tiny", "--sizes", "128", "--dtype", "fp32", "--lowering", "eager",
         "--modes", "eager", "distri1", "projected", "--worlds", "2", "4", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)],
        tmp_path,
    )
    assert (result["world"], result["dtype"]) == (1, "fp32")
    (row,) = result["rows"]
    assert (row["size"], row["batch"]) == (128, 1)
    assert row["distri N=1 rel err"] < 1e-5  # one rank, token grids given: the whole model, exact
    # Two double and two single blocks, K and V each: the image rows of the joint attention's K/V
    # are all that is gathered (RoPE, modulation, the text stream are local), then the output.
    assert row["N=2 exchanges"] == row["N=4 exchanges"] == "kv_gather:8 output_gather:1"
    assert row["N=4 MiB/call"] > row["N=2 MiB/call"]  # each rank gathers more of the others' rows
    assert 0 < row["N=2 stale MiB/rank"] < row["N=2 MiB/call"]
    for key in ("eager ms", "distri N=1 ms", "projected N=2, per rank ms", "projected N=4, per rank ms"):
        assert row[key] > 0
    assert "| size | batch | eager ms |" in stdout.splitlines()[-3]  # the table, printed last


def test_unet_bench_projects_the_cfg_split_on_cpu(tmp_path):
    stdout, result = run(
        [sys.executable, "unet_bench.py", "--model", "tiny", "--sizes", "64", "--dtype", "fp32", "--lowering", "eager",
         "--modes", "projected-cfg", "--iters", "1", "--warmup", "0", "--out", str(tmp_path)],
        tmp_path,
    )
    (row,) = result["rows"]
    name = "projected-cfg N=2, per rank, no pair gather"
    # A rank's half of the doubled batch is the row's batch of 1: the split program computes eager's output.
    assert row["batch"] == 1 and row[f"{name} rel err"] < 1e-5
    assert row[f"{name} ms"] > 0
    assert f"| size | batch | {name} rel err | {name} ms |" in stdout.splitlines()[-3]
