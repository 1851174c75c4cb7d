"""The Optuna objective: one trial = suggest a distiller, reject it or train and score it.

``Objective(task)(trial) -> float``, lower is better (the combined score of kd_optuna.proxy.metrics).
User attrs written on every trial (fixed names, read by the sampler and the dashboard):

    spec, formula                     canonical key and readable formula
    rejection_seconds                 time of the rejection protocol
    reject_reason, reject_detail      when rejected, or non-finite in training or scoring
                                      (trial pruned)
    val_ce, val_ce_raw, val_acc,      the proxy metrics (kd_optuna.proxy.training.ProxyResult),
    sharpness_gap, cka_gap            averaged over the proxy seeds the trial ran
    proxy_seeds, seed_scores          those seeds: ``seeds``, then the ``confirm_seeds`` that
                                      confirmation ran (kd_optuna.proxy.confirmation), and
                                      the score of each
    proxy_seconds                     training + scoring seconds
    training_seconds, scoring_seconds
    step_mode                         how a CUDA-graphed trial's steps ran (``[proxy] cuda_graph``)
    pruned_at_step                    when an Optuna pruner stopped the trial
    fail_reason                       a CUDA out-of-memory: the trial fails (value NaN) and
                                      the worker goes on with the next one

The validation CE (calibrated) is reported every ``report_every`` steps as an intermediate
value, steps counted across the proxy ``seeds``, so Optuna's pruners work on it. A trial that
may beat the study's best then runs its confirmation seeds, unreported, and returns the mean
over every seed it ran (:mod:`kd_optuna.proxy.confirmation`).

A trial scored at chance (calibrated CE within CHANCE_TOLERANCE of ln K, K classes: every
student that predicts no better than a uniform guess gets that value) while no completed trial
of the study has scored better is said once per worker, with the proxy's steps and what to
change: such trials all score the same and the search cannot tell their distillers apart.
Once some trial has beaten chance, a trial at chance is a distiller that stopped its student
learning, which the search handles by its score, and nothing is said.

A proxy student whose training loss stayed finite but whose validation CE is not (its
eval-mode logits overflowed: a proxy lr too high for its student) is rejected as ``non_finite``
like a loss that overflowed in training, and said once per worker with the proxy's lr; before,
the trial returned NaN and Optuna failed it with "the objective returned NaN".

The other end is said too, once per worker: a trial whose student classified every validation
image correctly. Its calibrated CE shrinks towards 0 as the fitted temperature does (to 1e-13
and below at T = 1e-3), so every such trial scores about 0, ordered by its smallest logit margin
alone, and the search cannot tell their distillers apart: the task is too easy for its
validation split.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import optuna
import torch

from kd_optuna.errors import InvalidDistiller, first_line
from kd_optuna.space import suggest_distiller
from kd_optuna.proxy import confirmation
from kd_optuna.proxy.confirmation import SEED_SCORES_ATTR
from kd_optuna.proxy.task import Task
from kd_optuna.proxy.training import ProxyResult

log = logging.getLogger(__name__)

#: A calibrated CE within this of ln K is chance level (K classes).
CHANCE_TOLERANCE = 1e-3


def at_chance(val_ce: float, num_classes: int) -> bool:
    """Whether a calibrated validation CE is chance level: ln K is what the calibration gives a
    student whose logits say nothing of the labels (a temperature of 1e3 flattens them)."""
    return num_classes > 1 and val_ce >= math.log(num_classes) - CHANCE_TOLERANCE


class Objective:
    """Callable objective over ``task``; ``threads`` sets torch's CPU threads for each call."""

    def __init__(self, task: Task, threads: int | None = None):
        self.task = task
        self.threads = threads
        self._said_chance = False
        self._said_separated = False
        self._said_non_finite = False
        self._chance_beaten = False

    def __call__(self, trial: optuna.trial.BaseTrial) -> float:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            return self._run(trial)
        except torch.cuda.OutOfMemoryError as error:
            torch.cuda.empty_cache()
            trial.set_user_attr("fail_reason", f"CUDA out of memory: {first_line(error, limit=200)}")
            return math.nan

    def _run(self, trial: optuna.trial.BaseTrial) -> float:
        spec = suggest_distiller(trial, self.task.space)
        trial.set_user_attr("spec", spec.key)
        trial.set_user_attr("formula", spec.formula())
        start = time.perf_counter()
        rejection = self.task.reject(spec)
        trial.set_user_attr("rejection_seconds", time.perf_counter() - start)
        if rejection is not None:
            trial.set_user_attr("reject_reason", rejection.reason)
            trial.set_user_attr("reject_detail", rejection.detail)
            raise optuna.TrialPruned(f"rejected ({rejection.reason}): {rejection.detail}")

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_step", step)
                raise optuna.TrialPruned(f"pruned at step {step} with val_ce {value:.4f}")

        try:
            result = self.task.run(spec, report=report)
            result = self._confirm(trial, spec, result)
        except InvalidDistiller as error:
            trial.set_user_attr("reject_reason", "non_finite")
            trial.set_user_attr("reject_detail", error.reason)
            raise optuna.TrialPruned(f"rejected (non_finite): {error.reason}") from None
        if not math.isfinite(result.score):
            self._reject_non_finite_score(trial, result)
        weights = self.task.proxy.score_weights
        trial.set_user_attr("proxy_seeds", list(result.seeds))
        trial.set_user_attr(SEED_SCORES_ATTR, result.seed_scores(weights))
        for name, value in result.metrics().items():
            trial.set_user_attr(name, value)
        trial.set_user_attr("training_seconds", result.train_seconds)
        trial.set_user_attr("scoring_seconds", result.score_seconds)
        trial.set_user_attr("proxy_seconds", result.train_seconds + result.score_seconds)
        if result.step_mode != "eager":
            trial.set_user_attr("step_mode", result.step_mode)
        self._say_chance(trial, result)
        self._say_separated(trial, result)
        return result.score

    def _confirm(self, trial: optuna.trial.BaseTrial, spec, result: ProxyResult) -> ProxyResult:
        """``result`` joined with the runs of ``confirm_seeds`` the race asks for
        (:mod:`kd_optuna.proxy.confirmation`); unchanged for a trial outside a minimised
        single-objective study. Confirmation runs report nothing to the pruner."""
        proxy = self.task.proxy.for_pool(self.task.data.pool.shape[0])
        study = getattr(trial, "study", None)
        if not proxy.confirm_seeds or study is None or study.directions != [optuna.study.StudyDirection.MINIMIZE]:
            return result
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        best, sigma = confirmation.best_value(done), confirmation.pooled_spread(done)
        weights = proxy.score_weights
        for seed in [s for s in proxy.confirm_seeds if s not in proxy.seeds]:
            if not confirmation.go_on(result.seed_scores(weights), best, sigma, proxy.confirm_z):
                break
            more = self.task.run(spec, dataclasses.replace(proxy, seeds=(seed,), confirm_seeds=()))
            result = result.joined(more, weights, proxy.steps)
        return result

    def _reject_non_finite_score(self, trial: optuna.trial.BaseTrial, result: ProxyResult) -> None:
        detail = (f"validation CE {result.val_ce} after a finite training loss: the proxy student's eval-mode "
                  "logits overflowed")
        trial.set_user_attr("reject_reason", "non_finite")
        trial.set_user_attr("reject_detail", detail)
        if not self._said_non_finite:
            self._said_non_finite = True
            proxy = self.task.proxy
            log.warning(
                "trial %d: %s, and it was rejected; if many trials say so, the proxy trains too fast for this "
                "student: lower [proxy] lr (now %g, %d steps of batch %d) (said once per worker)",
                trial.number, detail, proxy.lr, proxy.steps, proxy.batch_size,
            )
        raise optuna.TrialPruned(f"rejected (non_finite): {detail}")

    def _say_chance(self, trial: optuna.trial.BaseTrial, result) -> None:
        classes = self.task.data.num_classes
        if self._said_chance or not at_chance(result.val_ce, classes) or self._beaten_in(trial, classes):
            return
        self._said_chance = True
        proxy = self.task.proxy
        log.warning(
            "trial %d scored at chance: calibrated val CE %.4f, at or above ln %d = %.4f (validation accuracy "
            "%.2f); its proxy student, %d steps of batch %d, predicts the validation labels no better than a "
            "uniform guess, and every such trial scores about the same. Train the proxy longer ([proxy] epochs or "
            "steps) or check the teacher and the data (said once per worker)",
            trial.number, result.val_ce, classes, math.log(classes), result.val_acc, proxy.steps, proxy.batch_size,
        )

    def _say_separated(self, trial: optuna.trial.BaseTrial, result) -> None:
        if self._said_separated or result.val_acc < 1.0 or self.task.proxy.score_ce == 0:
            return
        self._said_separated = True
        log.warning(
            "trial %d classified all %d validation images correctly (calibrated val CE %.2g): such a student's "
            "calibrated CE shrinks to about 0, so every trial that does so scores about 0 and the search cannot tell "
            "their distillers apart. Search on a task its student does not solve: more or harder images "
            "(said once per worker)",
            trial.number, self.task.data.val_y.shape[0], result.val_ce,
        )

    def _beaten_in(self, trial: optuna.trial.BaseTrial, classes: int) -> bool:
        """Whether a completed trial of ``trial``'s study scored its val CE below chance
        (remembered once true: it stays true)."""
        if not self._chance_beaten:
            study = getattr(trial, "study", None)
            done = [] if study is None else study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            self._chance_beaten = any(
                isinstance(ce := t.user_attrs.get("val_ce"), float) and not at_chance(ce, classes) for t in done
            )
        return self._chance_beaten
