"""Seed Table 1, reproduced: how well do the proxy metrics predict the student a user trains?

``correlate(task, final)`` takes candidate distillers (the first ``classics`` classic ones and
then random specs of the task's space that pass the rejection protocol, or the best distinct
trials of a study, whose stored metrics are their proxy), runs each one's proxy trial (the
task's proxy settings) where no stored metrics are given, then trains each for real with
``final(spec, seed)`` over ``final_seeds`` (by default in the CLI: the exported script's
training with the study's ``[train]`` recipe, last-epoch top-1 on the test split; see
:func:`exported_training`), and correlates. For a metric m (lower is better) the table gives
Spearman's rho and Kendall's tau of -m with the final accuracy, so 1 is a perfect
prediction, over all candidates and over the top ones: those whose final accuracy is within
``top_margin`` points of vanilla KD's (the list a search must order right). Combinations sum
the metrics after standardising each over the candidates (z-scores; the sharpness gap by its
size, as in the score).

The standard deviations over the candidates also give ``suggested_weights``: the fixed score
weights (ProxySettings.score_*) under which the three metrics count equally, in CE units.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy import stats

from kd_optuna.distill.classics import CLASSICS
from kd_optuna.errors import KdOptunaError, TrainingDiverged
from kd_optuna.space import GENES, DistillerSpec
from kd_optuna.proxy.task import Task

log = logging.getLogger(__name__)

METRICS = ("val_ce", "sharpness_gap", "cka_gap")
COMBINATIONS: dict[str, tuple[str, ...]] = {
    "CE Loss": ("val_ce",),
    "S-gap": ("sharpness_gap",),
    "CKA-gap": ("cka_gap",),
    "CE Loss+S-gap": ("val_ce", "sharpness_gap"),
    "CE Loss+CKA-gap": ("val_ce", "cka_gap"),
    "CE Loss+S-gap+CKA-gap": ("val_ce", "sharpness_gap", "cka_gap"),
}
#: Extra rows beside Table 1's columns: uncalibrated CE and the proxy's own accuracy.
EXTRAS: dict[str, tuple[str, float]] = {"raw CE": ("val_ce_raw", 1.0), "proxy acc": ("val_acc", -1.0)}
#: Seed Table 1 (ResNet-20 on CIFAR-100, 10 candidates), in COMBINATIONS order.
SEED_TABLE_1 = (0.755, 0.512, 0.682, 0.824, 0.885, 0.935)


@dataclass
class Candidate:
    """One distiller: its proxy metrics and its final test accuracy (mean and spread over seeds)."""

    name: str
    spec: DistillerSpec
    proxy: dict[str, float]
    final_acc: float
    final_acc_std: float
    proxy_seconds: float
    final_seconds: float


@dataclass
class CorrelationResult:
    task: str
    candidates: list[Candidate]
    spearman: dict[str, float]
    kendall: dict[str, float]
    suggested_weights: dict[str, float]
    proxy_steps: int
    final: str
    final_seeds: tuple[int, ...]
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)
    top_margin: float = 2.0
    top_spearman: dict[str, float] = field(default_factory=dict)
    top_kendall: dict[str, float] = field(default_factory=dict)
    top_names: list[str] = field(default_factory=list)
    diverged: dict[str, str] = field(default_factory=dict)


#: The fewest distillers a rank correlation says something about (of two it is always +-1).
MIN_CANDIDATES = 3

FinalTraining = Callable[[DistillerSpec, int], float]
"""(spec, seed) -> the final top-1 accuracy in [0, 1] of a student trained with that distiller."""


def exported_training(recipe: dict, threads: int | None = None, runs: Any = None) -> FinalTraining:
    """The exported script's training (``kd_optuna.export.training.train_with_distiller``) under
    ``recipe`` (``script.script_defaults(config)``), one seed: its last-epoch test top-1.

    ``runs`` (``compare.StudyRuns`` or ``compare.FileRuns``) keeps each finished training under
    its ``compare.Job("searched", seed, spec, recipe)`` digest: an interrupted or repeated
    correlate trains only what it lacks, and a run ``compare`` stored for the same distiller,
    seed and recipe is reused."""
    import tempfile

    from kd_optuna.run.compare import Job, trained_run

    said_stale = False

    def final(spec: DistillerSpec, seed: int) -> float:
        nonlocal said_stale
        digest = Job("searched", seed, spec.to_params(), recipe).digest()
        stored = runs.get(digest) if runs is not None else None
        if stored is not None and stored.diverged is not None:
            raise TrainingDiverged(stored.diverged)
        if stored is not None:
            return stored.top1 / 100
        if threads is not None:
            torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory(prefix="kd_optuna_correlate_") as out:
            run = trained_run("searched", spec.to_params(),
                              {**recipe, "seed": seed, "output_dir": out, "num_workers": 0}, spec.key)
        if runs is not None:
            runs.put(digest, run)
        if run.diverged is not None:
            raise TrainingDiverged(run.diverged)
        if run.stale_batch_norm is not None and not said_stale:
            said_stale = True
            log.warning("note: %s, seed %d: %s (--epochs); its final accuracy is what correlate ranks", spec.key,
                        seed, run.stale_batch_norm)
        return run.top1 / 100  # as a kept run gives it: (100 x) / 100 may differ from x in its last bit

    return final


def proxy_on_test(task: Task, steps: int) -> FinalTraining:
    """A longer proxy run scored on the test split: the first version's "final", kept for
    quick checks; it measures the proxy against itself, not what a user trains."""

    def final(spec: DistillerSpec, seed: int) -> float:
        settings = dataclasses.replace(task.proxy, steps=steps, seeds=(seed,), report_every=steps)
        return task.run(spec, settings, on_test=True).val_acc

    return final


def draw_candidates(task: Task, n: int, classics: int = 3, seed: int = 0) -> tuple[list[tuple[str, DistillerSpec]], dict[str, str]]:
    """Up to ``classics`` classic specs, then seeded random specs of the task's space, all
    passing the rejection protocol and with distinct canonical keys; also the rejected ones."""
    chosen: list[tuple[str, DistillerSpec]] = []
    rejected: dict[str, str] = {}
    keys: set[str] = set()

    def offer(name: str, spec: DistillerSpec) -> None:
        if spec.key in keys or spec.key in rejected or not task.space.contains(spec):
            return
        verdict = task.reject(spec)
        if verdict is None:
            chosen.append((name, spec))
            keys.add(spec.key)
        else:
            rejected[spec.key] = verdict.reason

    for name, (spec, _) in list(CLASSICS.items())[:classics]:
        if len(chosen) < n:
            offer(name, spec)
    rng = random.Random(seed)
    attempts = 0
    while len(chosen) < n and attempts < 100 * n:
        attempts += 1
        spec = DistillerSpec(**{g: rng.choice(task.space[g]) for g in GENES})
        offer(f"random{len(chosen) - min(classics, len(CLASSICS)) + 1}", spec)
    return chosen, rejected


def _zscores(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    return [0.0 if std == 0 else (v - mean) / std for v in values]


def _metric(candidate: Candidate, name: str) -> float:
    value = candidate.proxy[name]
    return abs(value) if name == "sharpness_gap" else value


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))


#: Decimals of a final accuracy (in [0, 1]) that ranking reads: below them is float rounding.
ACC_DIGITS = 9


def correlation_table(candidates: list[Candidate]) -> tuple[dict[str, float], dict[str, float]]:
    """Spearman and Kendall of each combination's -score with the final accuracies (NaN where
    either side is constant). Accuracies are ratios of counts: they are ranked rounded to
    ACC_DIGITS decimals, so that two equal ones that float arithmetic left a bit apart tie."""
    accs = [round(c.final_acc, ACC_DIGITS) for c in candidates]
    z = {m: _zscores([_metric(c, m) for c in candidates]) for m in METRICS}
    spearman, kendall = {}, {}
    rows = {name: [-sum(z[m][i] for m in members) for i in range(len(candidates))]
            for name, members in COMBINATIONS.items()}
    for name, (metric, sign) in EXTRAS.items():
        rows[name] = [-sign * c.proxy[metric] for c in candidates]
    for name, predicted in rows.items():
        if len(set(predicted)) < 2 or len(set(accs)) < 2:
            spearman[name] = kendall[name] = math.nan
            continue
        spearman[name] = float(stats.spearmanr(predicted, accs).statistic)
        kendall[name] = float(stats.kendalltau(predicted, accs).statistic)
    return spearman, kendall


def with_vanilla_kd(candidates: list) -> list:
    """``candidates`` [(name, spec, metrics)] with vanilla KD first when absent: the reference
    of the top list."""
    kd = CLASSICS["kd"][0]
    if any(spec.key == kd.key for _, spec, _ in candidates):
        return list(candidates)
    return [("kd", kd, None)] + list(candidates)


def _final_or_diverged(final: FinalTraining, spec: DistillerSpec, seed: int) -> float:
    """``final(spec, seed)``; a divergence names the seed."""
    try:
        return final(spec, seed)
    except TrainingDiverged as error:
        raise TrainingDiverged(f"seed {seed}: {error.reason}") from None


def correlate(
    task: Task,
    final: FinalTraining,
    n_candidates: int = 10,
    classics: int = 3,
    final_seeds: tuple[int, ...] = (0, 1),
    seed: int = 0,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    candidates: list[tuple[str, DistillerSpec, dict[str, float]]] | None = None,
    top_margin: float = 2.0,
    final_name: str = "exported training",
) -> CorrelationResult:
    """Run the Table 1 experiment on ``task`` (see the module docstring).

    ``candidates`` = [(name, spec, proxy metrics)] skips the drawing and the proxy runs (for
    a study's trials); vanilla KD is added first when absent, as the top list's reference.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    say = progress or (lambda line: None)
    rejected: dict[str, str] = {}
    if candidates is None:
        drawn, rejected = draw_candidates(task, n_candidates, classics, seed)
        candidates = [(name, spec, None) for name, spec in drawn]
    kd = CLASSICS["kd"][0]
    candidates = with_vanilla_kd(candidates)
    if len(candidates) < MIN_CANDIDATES:
        raise KdOptunaError(f"correlate needs at least {MIN_CANDIDATES} distinct distillers (vanilla KD included) "
                            f"and has {len(candidates)}; a rank correlation of two is always +-1")
    done, diverged = [], {}
    for name, spec, metrics in candidates:
        t0 = time.perf_counter()
        proxy = metrics if metrics is not None else task.run(spec).metrics()
        t1 = time.perf_counter()
        try:
            accs = [_final_or_diverged(final, spec, s) for s in final_seeds]
        except TrainingDiverged as error:
            if spec.key == kd.key:
                raise KdOptunaError(f"vanilla KD's final training ({final_name}) diverged ({error.reason}), and "
                                    "correlate measures the candidates against it; give a lower --lr") from None
            diverged[name] = f"`{spec.key}` ({error.reason})"
            say(f"{name:10s} {spec.key:44s} val_ce {proxy['val_ce']:.4f}: its final training diverged "
                f"({error.reason}), left out of the correlation")
            continue
        t2 = time.perf_counter()
        mean = sum(accs) / len(accs)
        done.append(Candidate(name, spec, dict(proxy), mean, _std(accs) if len(accs) > 1 else 0.0, t1 - t0, t2 - t1))
        say(f"{name:10s} {spec.key:44s} val_ce {proxy['val_ce']:.4f} proxy acc {proxy['val_acc']:.4f} "
            f"final acc {mean:.4f} ({t1 - t0:.1f} s + {t2 - t1:.1f} s)")
    if len(done) < MIN_CANDIDATES:
        raise KdOptunaError(f"the final training ({final_name}) of {len(diverged)} of the {len(candidates)} distillers "
                            f"diverged, which leaves {len(done)}, fewer than the {MIN_CANDIDATES} a rank correlation "
                            "needs; give a lower --lr, or more candidates")
    spearman, kendall = correlation_table(done)
    kd_final = next(c.final_acc for c in done if c.spec.key == kd.key)
    top = [c for c in done if c.final_acc >= kd_final - top_margin / 100]
    top_spearman, top_kendall = correlation_table(top) if len(top) >= 3 else ({}, {})
    ce_std = _std([_metric(c, "val_ce") for c in done])
    weights = {"score_ce": 1.0}
    for metric, key in (("sharpness_gap", "score_sharpness"), ("cka_gap", "score_cka")):
        other = _std([_metric(c, metric) for c in done])
        weights[key] = ce_std / other if other > 0 else 0.0
    return CorrelationResult(task.name, done, spearman, kendall, weights, task.proxy.steps, final_name,
                             tuple(final_seeds), time.perf_counter() - start, rejected, top_margin,
                             top_spearman, top_kendall, [c.name for c in top], diverged)


def _tied_note(result: CorrelationResult) -> list[str]:
    """Why every correlation is nan when the candidates' final accuracies are all equal."""
    finals = {c.final_acc for c in result.candidates}
    if len(finals) != 1:
        return []
    return [f"nan: every candidate's final accuracy is {finals.pop():.4f}, so there is no order to correlate with; "
            "train longer (--epochs), at another --lr, or on a task the student does not solve at once", ""]


def format_table(result: CorrelationResult) -> str:
    """Seed Table 1's layout (plus raw CE and proxy accuracy), over all and the top candidates."""
    columns = list(COMBINATIONS) + list(EXTRAS)

    def row(label: str, values: dict[str, float]) -> str:
        return f"| {label} | " + " | ".join(f"{values.get(c, math.nan):.3f}" for c in columns) + " |"

    seeds = len(result.final_seeds)
    lines = [
        f"Correlation of proxy metrics with final accuracy, {result.task}, {len(result.candidates)} candidates "
        f"(proxy {result.proxy_steps} steps; final: {result.final}, {seeds} seed{'s' if seeds != 1 else ''}, "
        f"last-epoch test top-1; {result.seconds / 60:.1f} min)",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
        row("Spearman", result.spearman),
        row("Kendall", result.kendall),
        row(f"Spearman, top {len(result.top_names)}", result.top_spearman),
        row(f"Kendall, top {len(result.top_names)}", result.top_kendall),
        "| seed Table 1 | " + " | ".join(f"{v:.3f}" for v in SEED_TABLE_1) + " | | |",
        "",
        *_tied_note(result),
        f"top: the {len(result.top_names)} candidates within {result.top_margin:g} points of vanilla KD's final accuracy",
        "suggested score weights (equal standardised weight): "
        + ", ".join(f"{k} = {v:.3g}" for k, v in result.suggested_weights.items()),
        "",
        "| candidate | spec | val_ce | S-gap | CKA-gap | proxy acc | final acc |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(result.candidates, key=lambda c: -c.final_acc):
        lines.append(
            f"| {c.name} | `{c.spec.key}` | {c.proxy['val_ce']:.4f} | {c.proxy['sharpness_gap']:+.4f} | "
            f"{c.proxy['cka_gap']:.4f} | {c.proxy['val_acc']:.4f} | {c.final_acc:.4f} +- {c.final_acc_std:.4f} |"
        )
    if result.diverged:
        lines += ["", "left out, their final training diverged (no accuracy to rank): "
                  + "; ".join(f"{name} {why}" for name, why in result.diverged.items())]
    return "\n".join(lines)
