"""Trials per minute with 1, 2 and 4 worker processes on the digits study, SQLite and PostgreSQL.

    python benchmarks/scaling.py                    # ~5 min on a quiet 2-core machine
    python benchmarks/scaling.py --quick            # smoke run: tiny proxy, 1 and 2 workers
    python benchmarks/scaling.py --backends sqlite --workers 1,2 --trials 40 --steps 50 --reference

Each run creates a fresh study from ``studies/digits.toml`` (``kd-optuna create-study``) and
searches it with ``kd_optuna.run.workers.optimize``, exactly as ``kd-optuna optimize --n-workers N``
does, with the workers' own thread split: worker i of N sets torch to ``max(1, cores // N)``
threads (``WorkerContext.torch_device``). The storage is a SQLite file in a temporary folder
(the project's settings: WAL, synchronous=NORMAL, busy timeout) or a database on a private
PostgreSQL server on 127.0.0.1, started with the tests' helper ``tests/pg.py`` (initdb + pg_ctl)
and removed afterwards.

Trials per minute = 60 x finished trials / (last trial's end - first trial's start), so process
start-up and task building (the same for every N) are left out; the wall time with them is
shown too. The speed-up is against one worker on the same backend. ``--reference`` adds a run
of one worker held to 1 torch thread (through the Objective's ``threads``), to tell the gain of
more processes from the cost or gain of 2 threads in one process.

On a machine shared with other jobs the figures are noisy: the load average (1 min) before and
after each run is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(REPO / "tests"))

from search_cost import SearchRun, machine, run_search  # noqa: E402


def postgres_databases() -> Iterator[str] | None:
    """A generator of fresh database URLs on a private server (None when one cannot start)."""
    import pg

    reason = pg.missing_reason()
    if reason is not None:
        print(f"PostgreSQL skipped: {reason}", file=sys.stderr)
        return None

    def databases() -> Iterator[str]:
        server = pg.start()
        try:
            while True:
                yield server.new_database("scaling_")
        finally:
            server.stop()

    return databases()


def rate(run: SearchRun) -> float:
    return 60 * run.finished / run.search_wall if run.search_wall > 0 else float("nan")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny proxy, 6 trials, 1 and 2 workers")
    parser.add_argument("--workers", default=None, help="worker counts (default 1,2,4; quick 1,2)")
    parser.add_argument("--trials", type=int, default=None, help="trials per run (default 24; quick 6)")
    parser.add_argument("--steps", type=int, default=None, help="proxy steps per trial (default: the study's)")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--reference", action="store_true", help="add one worker held to 1 torch thread")
    args = parser.parse_args(argv)
    os.chdir(REPO)
    workers = [int(w) for w in (args.workers or ("1,2" if args.quick else "1,2,4")).split(",")]
    trials = args.trials or (6 if args.quick else 24)
    # one proxy run per trial: confirmation runs more seeds for the trials that may beat the best so far,
    # which depends on how the workers interleave, and would change the work between worker counts
    proxy = {"steps": 10, "report_every": 10, "val_size": 120, "sharpness_size": 64} if args.quick else {}
    proxy["confirm_seeds"] = []
    if args.steps:
        proxy.update(steps=args.steps, report_every=min(50, args.steps))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"scaling; {date}; {machine()}")
    print(f"digits study, population 12, {trials} trials per run, proxy overrides: {proxy or 'none'}\n")
    print("| backend | workers | torch threads per worker | trials/min | speed-up vs 1 worker "
          "| vs 1 worker held to 1 thread | search s | wall s | finished | load before | load after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for backend in args.backends.split(","):
        urls = postgres_databases() if backend == "postgresql" else None
        if backend == "postgresql" and urls is None:
            continue
        try:
            runs: list[tuple[int, int | None]] = [(n, None) for n in workers]
            if args.reference:
                runs.insert(1, (1, 1))
            base = held = None
            for n, threads in runs:
                url = next(urls) if urls is not None else None
                before = os.getloadavg()[0]
                run = run_search(trials, 12, n, proxy, url=url, backend=backend, threads=threads)
                after = os.getloadavg()[0]
                per_worker = threads or max(1, cores // n)
                if n == 1 and threads is None:
                    base = rate(run)
                if n == 1 and threads == 1:
                    held = rate(run)
                speedup = rate(run) / base if base else float("nan")
                versus_held = f"{rate(run) / held:.2f}x" if held else "-"
                print(f"| {backend} | {n} | {per_worker}{' (held)' if threads else ''} | {rate(run):.1f} | {speedup:.2f}x "
                      f"| {versus_held} | {run.search_wall:.1f} | {run.wall:.1f} | {run.finished} | {before:.2f} "
                      f"| {after:.2f} |", flush=True)
                results.append({"backend": backend, "workers": n, "threads": per_worker, "held": bool(threads),
                                "trials_per_min": rate(run), "speedup": speedup, "search_wall": run.search_wall,
                                "wall": run.wall, "finished": run.finished, "load_before": before,
                                "load_after": after})
        finally:
            if urls is not None:
                urls.close()
    return results


if __name__ == "__main__":
    main()
