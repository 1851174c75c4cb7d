"""Rejection rate of random specs of the full search space on the digits task, by reason.

    python benchmarks/rejection_rate.py --n 400 [--checkpoint teacher.pt] [--threads 1]

Draws ``--n`` specs uniformly from every gene (seeded), runs the loss-rejection protocol of
kd_optuna.proxy.rejection on each, and prints the count per reason, the mean time of one check and
that time as a fraction of one proxy trial (vanilla KD, the study's proxy settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import collections
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd_optuna.distill.classics import CLASSICS  # noqa: E402
from kd_optuna.proxy.rejection import REASONS  # noqa: E402
from kd_optuna.space import FULL_OPTIONS, GENES, DistillerSpec  # noqa: E402

from kd_optuna.run.config import load_config  # noqa: E402
from kd_optuna.proxy.task import Task  # noqa: E402


def digits_task(checkpoint: str | None) -> Task:
    """The shipped digits study's task; ``checkpoint`` replaces its (trained, cached) teacher."""
    config = load_config("digits")
    if checkpoint is not None:
        config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, checkpoint=checkpoint))
    return Task.from_config(config)


def random_specs(n: int, seed: int) -> list[DistillerSpec]:
    rng = random.Random(seed)
    return [DistillerSpec(**{g: rng.choice(FULL_OPTIONS[g]) for g in GENES}) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="digits teacher checkpoint (default: train/cached)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = digits_task(args.checkpoint)
    task.rejection_batch  # built once per study: not part of a check's cost

    counts: collections.Counter[str] = collections.Counter()
    examples: dict[str, str] = {}
    seconds = []
    for spec in random_specs(args.n, args.seed):
        start = time.perf_counter()
        verdict = task.reject(spec)
        seconds.append(time.perf_counter() - start)
        reason = "accepted" if verdict is None else verdict.reason
        counts[reason] += 1
        examples.setdefault(reason, f"{spec.key}: {verdict.detail if verdict else ''}")

    start = time.perf_counter()
    result = task.run(CLASSICS["kd"][0])
    trial_seconds = time.perf_counter() - start
    mean_check = sum(seconds) / len(seconds)
    print(f"{args.n} random specs of the full space, digits task, {args.threads} thread(s)\n")
    print("| verdict | count | share | example |")
    print("|---|---:|---:|---|")
    for reason in ("accepted",) + REASONS:
        share = counts[reason] / args.n
        print(f"| {reason} | {counts[reason]} | {share:.1%} | `{examples.get(reason, '')[:110]}` |")
    print(f"\nrejection check: mean {mean_check * 1000:.1f} ms, max {max(seconds) * 1000:.1f} ms; "
          f"proxy trial (vanilla KD, {task.proxy.steps} steps x {len(task.proxy.seeds)} seed(s)): "
          f"{trial_seconds:.2f} s, val_acc {result.val_acc:.4f}; "
          f"check / trial = {mean_check / trial_seconds:.2%}")


if __name__ == "__main__":
    main()
