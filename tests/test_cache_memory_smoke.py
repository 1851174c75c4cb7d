"""benchmarks/cache_memory.py runs and reports a cache over its budget as held on disk."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cache_memory_benchmark_reports_memory_and_disk_rows():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cache_memory.py"), "--images", "40", "--sizes", "64",
         "--budgets", "2048", "0.01"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| budget")]
    assert [r[7].strip() for r in rows] == ["memory", "disk"]
    assert all(float(r[9]) > 0 for r in rows)
