"""What a worker process costs before its first trial, a small optimize as a whole, and the commands that
read a study, against another revision.

    python benchmarks/worker_start.py --old-rev HEAD~3 [--repeats 5] [--trials 4] [--workers 2]

Rows, each a median of ``--repeats`` fresh processes, the two trees alternating (the old one is
``git archive REV`` put first on PYTHONPATH, the new one this checkout):

- "worker start": a new Python process does what a spawned worker does before its first trial
  (imports ``kd_optuna.run.trial_loop`` and ``kd_optuna.proxy.objective``, loads the writer of
  trial notes, loads the digits splits) and exits; its wall and CPU seconds.
- "optimize": ``kd-optuna create-study`` of a small digits study (4 proxy steps a trial, a random
  teacher checkpoint, so no teacher is trained) in a fresh folder, then ``kd-optuna optimize
  --n-trials T --n-workers W --threads 1 --no-progress``: the wall and CPU seconds of the
  optimize (its workers included).
- "space", "trials": ``kd-optuna space`` and ``kd-optuna trials`` on that study afterwards.

Prints the medians of each tree and the ratio new / old of the medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKER_START = r"""
import kd_optuna.run.trial_loop, kd_optuna.proxy.objective
try:
    from kd_optuna.run.dashboard_writers import writer
    writer("save_note")
except ImportError:  # a tree before kd_optuna.run.dashboard_writers
    from optuna_dashboard import save_note
from kd_optuna.data import load_dataset
load_dataset("digits")
"""

CONFIG = """[study]
name = "start"

[data]
dataset = "digits"

[teacher]
model = "digits_teacher"
checkpoint = "{checkpoint}"

[student]
model = "digits_student"

[proxy]
labels_per_class = 2
steps = 4
batch_size = 32
label_batch_size = 10
val_size = 60
report_every = 4
sharpness_size = 32
reject_steps = 1
reject_batch_size = 16
confirm_seeds = []

[search]
population_size = 4
"""


def timed(command: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall s, CPU s of the process and its children) of one run of ``command``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed ({done.returncode}): {done.stderr.strip()[-600:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def study_commands(env: dict, work: Path, checkpoint: Path, trials: int, workers: int) -> dict[str, tuple[float, float]]:
    """(wall s, CPU s) of optimize, space and trials on a new study in ``work``."""
    work.mkdir(parents=True)
    (work / "study.toml").write_text(CONFIG.format(checkpoint=checkpoint))
    cli = [sys.executable, "-m", "kd_optuna.run.cli"]
    url = f"sqlite:///{work / 'kd.db'}"
    timed([*cli, "create-study", "study.toml", "--storage", url], env, work)
    return {
        "optimize": timed([*cli, "optimize", "--storage", url, "--n-trials", str(trials), "--n-workers", str(workers),
                           "--threads", "1", "--no-progress"], env, work),
        "space": timed([*cli, "space", "--storage", url], env, work),
        "trials": timed([*cli, "trials", "--storage", url], env, work),
    }


def main(argv: list[str] | None = None) -> dict:
    from optimize_memory import old_tree, teacher_checkpoint  # benchmarks/, this script's folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-rev", required=True, help="the git revision to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"old": old_tree(args.old_rev, Path(tempfile.mkdtemp(dir=tmp))), "new": REPO}
        envs = {name: dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1") for name, tree in trees.items()}
        checkpoint = teacher_checkpoint(tmp / "teacher.pt", "digits_teacher", num_classes=10)
        runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for repeat in range(args.repeats + 1):  # the first round warms the page cache and is not counted
            for name in ("old", "new"):
                start = timed([sys.executable, "-c", WORKER_START], envs[name], tmp)
                commands = study_commands(envs[name], tmp / f"{name}{repeat}", checkpoint, args.trials, args.workers)
                if repeat:
                    for row, seconds in {"worker start": start, **commands}.items():
                        runs.setdefault((row, name), []).append(seconds)
    print(f"old: {args.old_rev}; new: this checkout; medians of {args.repeats}; optimize: {args.trials} trials, "
          f"{args.workers} workers\n")
    print("| row | old wall s | new wall s | new/old wall | old CPU s | new CPU s | new/old CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    result = {}
    for row in ("worker start", "optimize", "space", "trials"):
        old = [statistics.median(v) for v in zip(*runs[(row, "old")])]
        new = [statistics.median(v) for v in zip(*runs[(row, "new")])]
        result[row] = {"old": old, "new": new}
        print(f"| {row} | {old[0]:.2f} | {new[0]:.2f} | {new[0] / old[0]:.2f} | {old[1]:.2f} | {new[1]:.2f} "
              f"| {new[1] / old[1]:.2f} |")
    return result


if __name__ == "__main__":
    main()
