"""The examples the README points a newcomer to run on CPU ranks and say what they claim.

Behaviour only, at small sizes: the demo's error against one device, and the generated image
and report of ``generate.py``. Timings are not checked.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(args, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, *args], cwd=ROOT / "examples", env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_demo_matches_one_device():
    stdout = run_example(["demo.py", "--height", "32", "--width", "32", "--iters", "1"])
    assert "per kind: halo x" in stdout  # the exchange report
    (error,) = re.findall(r"max relative error vs eager: (\S+)", stdout)
    assert float(error) < 1e-5  # full_sync by default: exact


def test_generate_saves_image_and_report(tmp_path):
    image = tmp_path / "out.png"
    run_example(["generate.py", "--steps", "3", "--height", "128", "--width", "128", "--out", str(image), "--compare"])
    report = json.loads(image.with_suffix(".json").read_text())
    assert image.stat().st_size > 0
    assert report["world_size"] == 2 and len(report["step_seconds"]) == 3
    # 3 steps, all inside the 4 warm-up steps: every exchange synchronous, so the image is exact.
    assert report["compare"]["psnr_db"] > 80
