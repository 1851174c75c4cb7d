"""benchmarks/optimize_memory.py --quick runs a real optimize and the stage rows, and reports peaks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_optimize_memory_benchmark_reports_worker_and_stage_peaks():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "optimize_memory.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| new |")]
    assert len(rows) == 1 and float(rows[0][5].replace(",", "")) > float(rows[0][6].replace(",", "")) / 2 > 0
    stages = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ") and "MiB" not in line]
    assert "import torch" in stages and any(s.startswith("proxy trial") for s in stages)
