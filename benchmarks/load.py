"""Load: N workers x M short trials on one study, SQLite and PostgreSQL; exactly-once and duplicates.

    python benchmarks/load.py                              # 8 workers x 500 trials, both backends
    python benchmarks/load.py --workers 8 --trials 40 --backends sqlite
    python benchmarks/load.py --mode optuna                # plain optuna processes, no host lock

The objective is trivial (no training): it calls ``suggest_distiller`` on the study's real
``EvolutionSampler`` (built from the digits config, as ``kd-optuna create-study digits`` stores
it), records the canonical key as the ``spec`` user attr and scores it by a hash of the key.

Two ways of running the workers:

* ``--mode workers`` (default): ``kd_optuna.run.workers.optimize``, exactly what
  ``kd-optuna optimize --n-workers N --n-trials M`` runs: N spawned worker processes, each with
  its own storage connection, heartbeat and seeded sampler, asking under the per-host lock.
  ``--trials`` is the study's target, so the study must end with exactly that many trials.
* ``--mode optuna``: N spawned processes each calling plain ``study.optimize(n_trials=M // N)``
  with the study's sampler and no host lock: the samplers of racing workers then read the
  study at the same moments, which is where duplicate proposals come from.

Checks on the storage afterwards (``check_study``): trial numbers are 0..n-1 with each number and
each trial id once in the ``trials`` table, no trial left RUNNING, the finished count equals the
target, and the number of trials whose canonical key an earlier trial already had
("duplicates"). The load average (1 min) is printed before and after each run: the machine this
was measured on was shared with other jobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import time
import zlib
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from sqlalchemy import text  # noqa: E402

from kd_optuna.run.config import CONFIG_ATTR, load_config  # noqa: E402
from kd_optuna.optuna_private import study_id  # noqa: E402
from kd_optuna.run.storage import open_storage, study_config  # noqa: E402

STUDY = "load"


@dataclasses.dataclass(frozen=True)
class KeyHashObjective:
    """Objective factory (``kd_optuna.run.workers.ObjectiveFactory``): a real distiller suggested,
    its canonical key recorded, value = crc32(key) mod 10007 / 10007 in [0, 1)."""

    def __call__(self, config, worker=None):
        from kd_optuna.space import suggest_distiller

        def objective(trial):
            spec = suggest_distiller(trial, config.space)
            trial.set_user_attr("spec", spec.key)
            trial.set_user_attr("formula", spec.formula())
            return (zlib.crc32(spec.key.encode()) % 10007) / 10007

        return objective


@dataclasses.dataclass
class LoadFigures:
    """What one load run leaves in its study."""

    backend: str
    mode: str
    workers: int
    target: int
    rows: int
    finished: int
    failed: int
    running: int
    numbers_contiguous: bool
    numbers_once: bool
    duplicates: int
    wall_s: float = float("nan")
    load_before: float = float("nan")
    load_after: float = float("nan")

    @property
    def exactly_once(self) -> bool:
        return self.numbers_once and self.numbers_contiguous and self.finished == self.target and self.running == 0


def create_study(url: str, name: str = STUDY) -> optuna.Study:
    """A study holding the digits config, as ``kd-optuna create-study digits`` stores it."""
    storage = open_storage(url, heartbeat_interval=None)
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize")
    study.set_user_attr(CONFIG_ATTR, load_config("digits").to_json())
    return study


def check_study(url: str, name: str, target: int, backend: str = "", mode: str = "", workers: int = 0) -> LoadFigures:
    """Read the study's rows straight from the ``trials`` table and count what the docstring says."""
    storage = open_storage(url, heartbeat_interval=None)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        with storage.engine.connect() as connection:
            rows = connection.execute(
                text("SELECT number, trial_id FROM trials WHERE study_id = :sid"), {"sid": study_id(study)}
            ).all()
        numbers = [r[0] for r in rows]
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        seen: set[str] = set()
        duplicates = 0
        for trial in trials:
            key = trial.user_attrs.get("spec")
            if key is None or trial.state == TrialState.FAIL:
                continue
            duplicates += key in seen
            seen.add(key)
        states = [t.state for t in trials]
        return LoadFigures(
            backend=backend, mode=mode, workers=workers, target=target, rows=len(rows),
            finished=sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states),
            failed=states.count(TrialState.FAIL), running=states.count(TrialState.RUNNING),
            numbers_contiguous=sorted(numbers) == list(range(len(numbers))),
            numbers_once=len(set(numbers)) == len(numbers) and len({r[1] for r in rows}) == len(rows),
            duplicates=duplicates,
        )
    finally:
        storage.engine.dispose()


def _plain_optuna_worker(url: str, name: str, index: int, n_trials: int, factory) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url)
    study = optuna.load_study(study_name=name, storage=storage)
    config = study_config(study)
    seed = config.search.get("seed")
    study.sampler = config.make_sampler(None if seed is None else seed + index)
    study.optimize(factory(config, None), n_trials=n_trials)
    storage.engine.dispose()


def run_load(url: str, n_workers: int, n_trials: int, mode: str = "workers", factory=None,
             name: str = STUDY, backend: str = "") -> LoadFigures:
    """Create the study at ``url``, run the workers, check the study; ``n_trials`` is the target
    (``--mode optuna``: rounded down to a multiple of ``n_workers``)."""
    from kd_optuna.run.workers import optimize

    factory = factory or KeyHashObjective()
    create_study(url, name)
    before, start = os.getloadavg()[0], time.perf_counter()
    if mode == "workers":
        optimize(url, name, n_trials, n_workers=n_workers, objective_factory=factory, progress=False)
        target = n_trials
    elif mode == "optuna":
        per_worker = n_trials // n_workers
        target = per_worker * n_workers
        ctx = multiprocessing.get_context("spawn")
        processes = [ctx.Process(target=_plain_optuna_worker, args=(url, name, i, per_worker, factory))
                     for i in range(n_workers)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        if any(p.exitcode != 0 for p in processes):
            raise RuntimeError(f"plain optuna workers exited with {[p.exitcode for p in processes]}")
    else:
        raise ValueError(f"mode {mode!r}: give workers or optuna")
    wall, after = time.perf_counter() - start, os.getloadavg()[0]
    figures = check_study(url, name, target, backend, mode, n_workers)
    figures.wall_s, figures.load_before, figures.load_after = wall, before, after
    return figures


def main(argv: list[str] | None = None) -> list[LoadFigures]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--mode", default="workers", help="workers, optuna, or both: workers,optuna")
    args = parser.parse_args(argv)
    import tempfile

    from scaling import postgres_databases

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"load; {date}; {os.cpu_count()} CPUs; {args.workers} workers x {args.trials} trials; digits study")
    print("| backend | mode | workers | target | rows | finished | failed | running | numbers 0..n-1 once "
          "| duplicate keys | wall s | trials/s | load before | load after |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    results = []
    with tempfile.TemporaryDirectory(prefix="kd_optuna_load_") as tmp:
        for backend in args.backends.split(","):
            urls = postgres_databases() if backend == "postgresql" else None
            if backend == "postgresql" and urls is None:
                continue
            try:
                for mode in args.mode.split(","):
                    url = next(urls) if urls is not None else f"sqlite:///{Path(tmp) / f'{mode}.db'}"
                    f = run_load(url, args.workers, args.trials, mode, backend=backend)
                    results.append(f)
                    print(f"| {backend} | {mode} | {f.workers} | {f.target} | {f.rows} | {f.finished} | {f.failed} "
                          f"| {f.running} | {'yes' if f.numbers_contiguous and f.numbers_once else 'NO'} "
                          f"| {f.duplicates} | {f.wall_s:.0f} | {f.finished / f.wall_s:.1f} "
                          f"| {f.load_before:.2f} | {f.load_after:.2f} |", flush=True)
            finally:
                if urls is not None:
                    urls.close()
    if not all(f.exactly_once for f in results):
        print("FAILED: a study does not hold every trial exactly once", file=sys.stderr)
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
