"""The speed/memory benchmark script runs end to end (quick sizes) and prints measured ratios with targets."""

import os
import subprocess
import sys
from pathlib import Path


def test_benchmark_script_quick_run_prints_every_check():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "bench.benchmarks", "--quick"], cwd=root, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for needle in ("sgemm", "calibration", "assign", "build peak RSS", "build on"):
        assert needle in text, f"{needle!r} missing from:\n{text}"
    assert "PASS" in text or "FAIL" in text
