"""Load at CI scale: 8 worker processes x 40 trials on one study through the real sampler.

The same run and checks as ``benchmarks/load.py`` (which does 8 x 500): every trial recorded
exactly once, trial numbers 0..n-1, nothing left RUNNING, the target met exactly, and few
trials proposing a canonical key an earlier trial already had.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import TrivialObjective

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from load import run_load  # noqa: E402

WORKERS, TRIALS = 8, 40
#: The sampler skips keys already RUNNING, WAITING or finished, and workers ask under the host
#: lock: a duplicate could only come from a proposal made outside it. 5% is "small".
MAX_DUPLICATES = TRIALS // 20


def _assert_exactly_once(figures, target):
    assert figures.numbers_once, "a trial number or trial id is recorded twice"
    assert figures.numbers_contiguous, "trial numbers are not 0..n-1"
    assert figures.running == 0 and figures.failed == 0
    assert figures.finished == target and figures.rows == target
    assert figures.duplicates <= MAX_DUPLICATES


@pytest.mark.slow
def test_eight_workers_record_every_trial_once_on_sqlite(tmp_path):
    figures = run_load(f"sqlite:///{tmp_path / 'load.db'}", WORKERS, TRIALS, factory=TrivialObjective())
    _assert_exactly_once(figures, TRIALS)


@pytest.mark.slow
@pytest.mark.postgres
def test_eight_workers_record_every_trial_once_on_postgres(pg_url):
    figures = run_load(pg_url, WORKERS, TRIALS, factory=TrivialObjective())
    _assert_exactly_once(figures, TRIALS)
