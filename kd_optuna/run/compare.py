"""`kd-optuna compare`: every method x seed trained with the study's full recipe, paired by seed.

Each run is the exported script's training (:func:`kd_optuna.export.training.train_with_distiller`, the
study's ``[train]`` settings, one seed, the same splits, teacher and schedule for every method)
and yields the **last-epoch** test top-1 in percent. Runs are recorded in the study's storage
as they finish, as study user attrs ``kd_optuna:compare:<digest>`` whose value is a
:class:`Run` record; the digest covers everything that decides the run (method, seed, the
distiller's canonical key for ``searched``, the recipe), so an interrupted or repeated compare
trains only what is missing, and a changed ``--epochs`` trains anew.

Statistics, per method m over its seeds: mean and sample std of top-1. For ``searched``
against m over the seeds both have, the paired differences d_i = top1_searched,i - top1_m,i
give ``mean(d) +- t_{0.975, n-1} * std(d) / sqrt(n)``, the 95% interval of the mean gain.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kd_optuna.errors import KdOptunaError, TrainingDiverged

#: Prefix of the study user attrs that hold compare runs.
RUN_ATTR_PREFIX = "kd_optuna:compare:"
#: The study user attr naming the runs of the last compare and its recipe overrides
#: (:func:`remember_last`): what the study's story shows.
LAST_ATTR = "kd_optuna:compare_last"


@dataclass(frozen=True)
class Run:
    """One finished run: ``top1`` and ``val_top1`` in percent at the last epoch; for a run whose
    loss became non-finite, None and ``diverged`` saying when (a seeded run diverges again, so
    it is an outcome to record, not a run to retry). ``stale_batch_norm``: the training was too
    short for the student's BatchNorm statistics, which its top-1 reads (the sentence to say)."""

    method: str
    seed: int
    top1: float | None
    val_top1: float | None
    epochs: int
    distiller: str
    seconds: float
    diverged: str | None = None
    stale_batch_norm: str | None = None


#: Recipe settings added after compare runs were first stored, with the value every earlier run
#: had: left out of a run's digest at that value, so that a stored run keeps its digest.
_LATER_SETTINGS = {"image_size": None, "val_fraction": None}


@dataclass(frozen=True)
class Job:
    """One run to do: the method, seed, the spec params of ``searched`` and the recipe."""

    method: str
    seed: int
    spec_params: Mapping[str, Any]
    recipe: Mapping[str, Any]

    @property
    def distiller(self) -> str:
        from kd_optuna.space import DistillerSpec

        return DistillerSpec.from_params(self.spec_params).key if self.method == "searched" else self.method

    def digest(self) -> str:
        recipe = {k: v for k, v in self.recipe.items()
                  if k not in ("device", "num_workers", "output_dir") and (k, v) not in _LATER_SETTINGS.items()}
        decided_by = {"method": self.method, "seed": self.seed, "distiller": self.distiller, "recipe": recipe}
        return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:20]


def default_output_dir(study_name: str) -> Path:
    """``kd_optuna_runs/compare/NAME``, NAME the study name as one folder name: a character
    other than a letter, digit, ``.``, ``_`` or ``-`` becomes ``_`` (a name such as ``/abs`` or
    ``../up`` stays below ``kd_optuna_runs/compare``), and a name so changed ends with 8 hex
    digits of its SHA-256, so that two study names never share a folder."""
    folder = re.sub(r"[^\w.-]", "_", study_name).strip(".")
    if folder != study_name or not folder:
        folder = f"{folder or '_'}-{hashlib.sha256(study_name.encode()).hexdigest()[:8]}"
    return Path("kd_optuna_runs") / "compare" / folder


def parse_methods(text: str) -> list[str]:
    """``"searched,kd,dkd"`` -> the list; an unknown name raises, listing the methods."""
    from kd_optuna.export.training import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise KdOptunaError(f"unknown method {', '.join(unknown) or '(none)'}; choose from: {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def _as_run(value: Any) -> Run | None:
    """The Run a stored record holds, or None for one that is not (another version's)."""
    if not isinstance(value, Mapping):
        return None
    try:
        return Run(**value)
    except TypeError:
        return None


def recorded_runs(user_attrs: Mapping[str, Any]) -> dict[str, Run]:
    """digest -> Run of every compare run stored in a study's user attrs."""
    runs = {key[len(RUN_ATTR_PREFIX):]: _as_run(value) for key, value in user_attrs.items()
            if key.startswith(RUN_ATTR_PREFIX)}
    return {digest: run for digest, run in runs.items() if run is not None}


class StudyRuns:
    """The runs recorded in ``study``: its user attrs ``kd_optuna:compare:<digest>``."""

    def __init__(self, study: Any):
        self.study = study

    def get(self, digest: str) -> Run | None:
        return _as_run(self.study.user_attrs.get(RUN_ATTR_PREFIX + digest))

    def put(self, digest: str, run: Run) -> None:
        self.study.set_user_attr(RUN_ATTR_PREFIX + digest, asdict(run))


class FileRuns:
    """Runs recorded in the JSON file ``path`` ({digest: Run fields}), for runs without a study
    (``correlate CONFIG``): rewritten whole under a lock at each run, so commands run side by
    side add to it without losing one; an unreadable file counts as empty."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, digest: str) -> Run | None:
        return _as_run(self._read().get(digest))

    def put(self, digest: str, run: Run) -> None:
        from kd_optuna.files import atomic_write_text, file_lock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            data = self._read()
            data[digest] = asdict(run)
            atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True))


def trained_run(method: str, spec_params: Mapping[str, Any], settings: Mapping[str, Any], distiller: str) -> Run:
    """One training of ``train_with_distiller(spec_params, **settings, method=method)`` (settings:
    the recipe with its ``seed`` and ``output_dir``) as a Run, a diverged one included."""
    import time

    from kd_optuna.export.training import train_with_distiller

    seed, epochs = int(settings["seed"]), int(settings["epochs"])
    start = time.perf_counter()
    try:
        result = train_with_distiller(dict(spec_params), **settings, method=method, progress=False)
    except TrainingDiverged as error:
        return Run(method, seed, None, None, epochs, distiller, time.perf_counter() - start, diverged=error.reason)
    return Run(method, seed, 100 * result["final_top1"], 100 * (result["final_val_top1"] or 0.0), epochs, distiller,
               time.perf_counter() - start, stale_batch_norm=result["stale_batch_norm"])


def _run_job(job: Job, device: str, threads: int) -> Run:
    import torch

    torch.set_num_threads(threads)
    output_dir = os.path.join(job.recipe["output_dir"], f"{job.method}-seed{job.seed}")
    return trained_run(job.method, job.spec_params,
                       {**job.recipe, "seed": job.seed, "device": device, "output_dir": output_dir}, job.distiller)


def override_recipe(recipe: dict[str, Any], epochs: int | None, lr: float | None) -> dict[str, Any]:
    """Apply ``--epochs`` and ``--lr`` to ``recipe`` in place (milestones past the new epochs
    dropped); return what was given, ``{}`` for neither (what :func:`remember_last` records)."""
    overrides = {name: value for name, value in (("epochs", epochs), ("lr", lr)) if value is not None}
    if epochs is not None:
        recipe["milestones"] = [m for m in recipe["milestones"] if m < epochs]
    recipe.update(overrides)
    return overrides


def _devices(device: str, n_workers: int) -> list[str]:
    """Worker i's device: GPU i mod count when CUDA is used, else ``device`` for all."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.is_available():
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(n_workers)]
    return ["cpu" if device == "auto" else device] * n_workers


def run_compare(
    study: Any,
    jobs: Sequence[Job],
    *,
    n_workers: int = 1,
    device: str = "auto",
    threads: int | None = None,
    on_run: Callable[[Run, bool], None] | None = None,
) -> list[Run]:
    """Train the ``jobs`` not yet recorded in ``study``; return every job's Run, in job order.

    Runs go to ``n_workers`` spawned processes (``threads`` torch threads each: the cores
    split evenly by default); the parent stores each run in the study as it finishes and
    calls ``on_run(run, reused)``.
    """
    done = recorded_runs(study.user_attrs)
    digests = [job.digest() for job in jobs]
    results: dict[str, Run] = {}
    todo: dict[str, Job] = {}
    for job, digest in zip(jobs, digests):
        if digest in done:
            results[digest] = done[digest]
            if on_run is not None:
                on_run(done[digest], True)
        else:
            todo.setdefault(digest, job)
    if todo:
        workers = max(1, min(n_workers, len(todo)))
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        devices = _devices(device, workers)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(_run_job, job, devices[i % workers], threads): digest
                       for i, (digest, job) in enumerate(todo.items())}
            try:
                for future in concurrent.futures.as_completed(futures):
                    run = future.result()
                    digest = futures[future]
                    StudyRuns(study).put(digest, run)
                    results[digest] = run
                    if on_run is not None:
                        on_run(run, False)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    return [results[digest] for digest in digests]


def remember_last(study: Any, jobs: Sequence[Job], overrides: Mapping[str, Any]) -> None:
    """Record in ``study`` which runs the compare that just ended was made of, and the
    settings it gave over the study's ``[train]`` recipe (``{"epochs": 1}``; ``{}`` for none).
    The study keeps every run of every compare (and correlate's), under other recipes and
    other searched distillers too; the story shows this compare's table, not a mix of them."""
    study.set_user_attr(LAST_ATTR, {"digests": [job.digest() for job in jobs], "overrides": dict(overrides)})


def last_compare(user_attrs: Mapping[str, Any]) -> tuple[list[Run], dict[str, Any]] | None:
    """The runs of the last compare that :func:`remember_last` recorded, in its job order, and
    its overrides; None when the study has no such record (one compared before it existed)."""
    last = user_attrs.get(LAST_ATTR)
    if not isinstance(last, Mapping) or not isinstance(last.get("digests"), list):
        return None
    recorded = recorded_runs(user_attrs)
    overrides = last.get("overrides")
    return ([recorded[d] for d in last["digests"] if isinstance(d, str) and d in recorded],
            dict(overrides) if isinstance(overrides, Mapping) else {})


@dataclass(frozen=True)
class MethodSummary:
    """Top-1 mean and std over the ``n`` seeds that finished, and the seeds that ``diverged``."""

    method: str
    n: int
    mean: float
    std: float
    diverged: tuple[int, ...] = ()


@dataclass(frozen=True)
class PairedGain:
    """searched minus ``method`` over ``n`` shared seeds: mean, 95% interval, wins."""

    method: str
    n: int
    mean: float
    low: float
    high: float
    wins: int


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def summarise(runs: Sequence[Run]) -> tuple[list[MethodSummary], list[PairedGain]]:
    """Per-method mean/std of top-1, and searched's paired gain over each other method, over
    the seeds that finished (a diverged run is listed in its method's ``diverged``)."""
    from scipy import stats

    by_method: dict[str, dict[int, float]] = {}
    diverged: dict[str, list[int]] = {}
    for run in runs:
        by_method.setdefault(run.method, {})
        if run.top1 is None:
            diverged.setdefault(run.method, []).append(run.seed)
        else:
            by_method[run.method][run.seed] = run.top1
    summaries = [MethodSummary(m, len(v), *(_mean_std(list(v.values())) if v else (math.nan, math.nan)),
                               diverged=tuple(sorted(diverged.get(m, ())))) for m, v in by_method.items()]
    gains = []
    searched = by_method.get("searched", {})
    for method, values in by_method.items():
        if method == "searched":
            continue
        seeds = sorted(set(searched) & set(values))
        if not seeds:
            continue
        diffs = [searched[s] - values[s] for s in seeds]
        mean, std = _mean_std(diffs)
        half = float(stats.t.ppf(0.975, len(diffs) - 1)) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
        gains.append(PairedGain(method, len(diffs), mean, mean - half, mean + half, sum(d > 0 for d in diffs)))
    return summaries, gains


def format_table(summaries: Sequence[MethodSummary], gains: Sequence[PairedGain]) -> str:
    """A markdown table: method, seeds, mean +- std, and searched's paired gain over it (its 95%
    interval needs two or more shared seeds). Seeds whose training diverged are named in the
    top-1 cell and count in no mean."""
    gain_of = {g.method: g for g in gains}
    lines = ["| method | seeds | top-1 (last epoch, test) | searched - method, paired [95% interval] | searched wins |",
             "|---|---:|---:|---:|---:|"]
    for s in summaries:
        g = gain_of.get(s.method)
        gain = "" if g is None else (f"{g.mean:+.2f} [{g.low:+.2f}, {g.high:+.2f}]" if g.n > 1 else
                                     f"{g.mean:+.2f} (one seed: no interval)")
        wins = f"{g.wins}/{g.n}" if g else ""
        top1 = f"{s.mean:.2f} +- {s.std:.2f}" if s.n else ""
        if s.diverged:
            seeds = ", ".join(map(str, s.diverged))
            top1 = f"{top1}{'; ' if top1 else ''}diverged on seed{'s' if len(s.diverged) > 1 else ''} {seeds}"
        lines.append(f"| {s.method} | {s.n} | {top1} | {gain} | {wins} |")
    return "\n".join(lines)


def as_json(runs: Sequence[Run], summaries, gains) -> dict[str, Any]:
    return {
        "runs": [{"method": r.method, "seed": r.seed, "top1": r.top1, "val_top1": r.val_top1,
                  "epochs": r.epochs, "distiller": r.distiller, "diverged": r.diverged,
                  "stale_batch_norm": r.stale_batch_norm} for r in runs],
        "methods": {s.method: {"n": s.n, "mean": s.mean if s.n else None, "std": s.std if s.n else None,
                               "diverged_seeds": list(s.diverged)} for s in summaries},
        "searched_minus": {g.method: {"n": g.n, "mean": g.mean, "low": g.low, "high": g.high, "wins": g.wins}
                           for g in gains},
    }
