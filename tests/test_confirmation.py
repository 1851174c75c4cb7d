"""Confirmation: a trial that may beat the study's best runs its confirmation seeds, the rest
keep their first seed's score, and the study's best is a mean over every seed."""

from __future__ import annotations

import dataclasses
import json
import math

import optuna
import pytest

from conftest import tiny_digits_task
from kd_optuna.distill.classics import CLASSICS
from kd_optuna.proxy import confirmation
from kd_optuna.proxy.objective import Objective
from kd_optuna.proxy.settings import InvalidProxySettings, ProxySettings
from kd_optuna.run.config import ConfigError, StudyConfig
from kd_optuna.space import DistillerSpec

CONFIRMING = ProxySettings(labels_per_class=2, steps=4, batch_size=16, report_every=2, sharpness_size=32,
                           reject_batch_size=16, confirm_seeds=(1, 2))
KD = CLASSICS["kd"][0]


@pytest.fixture(scope="module")
def task():
    return tiny_digits_task(CONFIRMING, seed=2)


def frozen(value: float | None, seed_scores: list[float] | None = None, state=optuna.trial.TrialState.COMPLETE):
    attrs = {} if seed_scores is None else {confirmation.SEED_SCORES_ATTR: seed_scores}
    return optuna.trial.create_trial(state=state, value=value, user_attrs=attrs)


def single_seed_score(task, seed: int) -> float:
    return task.run(KD, dataclasses.replace(CONFIRMING, seeds=(seed,), confirm_seeds=())).score


def test_pooled_spread_is_the_within_trial_deviation_over_trials_with_two_seeds():
    trials = [frozen(0.5, [1.0, 3.0]), frozen(0.2, [2.0, 2.0, 5.0]), frozen(0.1, [9.0]), frozen(0.3)]
    # (1-2)^2 + (3-2)^2 + (2-3)^2 + (2-3)^2 + (5-3)^2 = 8 over (2-1) + (3-1) = 3 degrees of freedom
    assert confirmation.pooled_spread(trials) == pytest.approx(math.sqrt(8 / 3))
    assert confirmation.pooled_spread([frozen(0.1, [9.0]), frozen(0.2)]) == 0.0
    assert confirmation.pooled_spread([frozen(0.1, [1.0, float("nan")])]) == 0.0


def test_best_value_is_the_lowest_finite_value():
    assert confirmation.best_value([frozen(0.4), frozen(0.2), frozen(float("inf"))]) == 0.2
    assert confirmation.best_value([]) == math.inf


@pytest.mark.parametrize(
    "scores, best, sigma, z, expected",
    [
        ([0.30], math.inf, 0.0, 1.0, True),  # no best yet: confirm
        ([0.30], 0.31, 0.0, 1.0, True),  # beats the best
        ([0.32], 0.31, 0.0, 1.0, False),  # no spread known: only a trial that beats the best goes on
        ([0.32], 0.31, 0.02, 1.0, True),  # 0.32 - 0.02 < 0.31: may still beat it
        ([0.32, 0.34], 0.31, 0.02, 1.0, False),  # 0.33 - 0.02 / sqrt(2) >= 0.31
        ([0.32, 0.34], 0.31, 0.02, 2.0, True),  # 0.33 - 0.04 / sqrt(2) < 0.31
        ([0.31], 0.31, 0.0, 1.0, False),  # a tie does not beat the best
    ],
)
def test_a_trial_goes_on_while_its_lower_bound_is_below_the_best(scores, best, sigma, z, expected):
    assert confirmation.go_on(scores, best, sigma, z) is expected


def test_the_first_trial_runs_every_seed_and_its_value_is_their_mean(task):
    study = optuna.create_study()
    study.enqueue_trial(KD.to_params())
    study.optimize(Objective(task, threads=1), n_trials=1)
    trial = study.trials[0]
    assert trial.user_attrs["proxy_seeds"] == [0, 1, 2]
    each = [single_seed_score(task, seed) for seed in (0, 1, 2)]
    assert trial.user_attrs["seed_scores"] == pytest.approx(each)
    assert trial.value == pytest.approx(sum(each) / 3)
    assert sorted(trial.intermediate_values) == [2, 4], "confirmation runs must not report to the pruner"


def test_a_trial_that_cannot_beat_the_best_keeps_its_first_seed(task):
    study = optuna.create_study()
    study.add_trial(frozen(-1.0, [-1.0, -1.0]))
    study.enqueue_trial(KD.to_params())
    study.optimize(Objective(task, threads=1), n_trials=1)
    trial = study.trials[1]
    assert trial.user_attrs["proxy_seeds"] == [0]
    assert trial.value == pytest.approx(single_seed_score(task, 0))


def test_a_trial_within_the_spread_of_the_best_is_confirmed_and_stops_once_it_cannot_win(task):
    first = single_seed_score(task, 0)
    study = optuna.create_study()
    # best just below the trial's first seed, a wide spread: the trial may still beat it, so it runs
    # seed 1; a trial whose mean is then at least best + spread / sqrt(2) stops there
    study.add_trial(frozen(first - 1e-6, [first - 1.0, first + 1.0]))
    study.enqueue_trial(KD.to_params())
    study.optimize(Objective(task, threads=1), n_trials=1)
    seeds = study.trials[1].user_attrs["proxy_seeds"]
    assert seeds[:2] == [0, 1]
    scores = study.trials[1].user_attrs["seed_scores"]
    assert study.trials[1].value == pytest.approx(sum(scores) / len(scores))


def test_no_confirmation_outside_a_minimised_study_or_when_turned_off(task):
    maximised = optuna.create_study(direction="maximize")
    maximised.enqueue_trial(KD.to_params())
    maximised.optimize(Objective(task, threads=1), n_trials=1)
    assert maximised.trials[0].user_attrs["proxy_seeds"] == [0]
    fixed = optuna.trial.FixedTrial(KD.to_params())
    assert Objective(task, threads=1)(fixed) == pytest.approx(single_seed_score(task, 0))
    off = tiny_digits_task(dataclasses.replace(CONFIRMING, confirm_seeds=()), seed=2)
    study = optuna.create_study()
    study.enqueue_trial(KD.to_params())
    study.optimize(Objective(off, threads=1), n_trials=1)
    assert study.trials[0].user_attrs["proxy_seeds"] == [0]


def test_the_study_best_ran_every_confirmation_seed(task):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for name in ("kd", "fitnets", "kd"):
        study.enqueue_trial(CLASSICS[name][0].to_params())
    study.optimize(Objective(task, threads=1), n_trials=6)
    assert study.best_trial.user_attrs["proxy_seeds"] == [0, 1, 2]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"confirm_seeds": (1, "2")}, "confirm_seeds must be a list of integers"),
        ({"confirm_z": -1.0}, "confirm_z must be a number >= 0"),
    ],
)
def test_bad_confirmation_settings_say_what_to_change(changes, message):
    with pytest.raises(InvalidProxySettings, match=message):
        ProxySettings(**changes)


def recipe_config(proxy: dict) -> StudyConfig:
    return StudyConfig.from_dict({
        "data": {"dataset": "digits"}, "teacher": {"model": "digits_teacher"},
        "student": {"model": "digits_student"}, "proxy": proxy,
    })


def test_a_recipe_proxy_confirms_on_the_three_seeds_after_its_own():
    assert recipe_config({}).proxy.confirm_seeds == (1, 2, 3)
    assert recipe_config({"seeds": [0, 4]}).proxy.confirm_seeds == (5, 6, 7)
    assert recipe_config({"confirm_seeds": []}).proxy.confirm_seeds == ()
    with pytest.raises(ConfigError, match="confirm_z must be a number >= 0"):
        recipe_config({"confirm_z": -0.5})


def test_a_confirmation_seed_among_the_trial_seeds_runs_once(task):
    overlapping = tiny_digits_task(dataclasses.replace(CONFIRMING, seeds=(0, 1), confirm_seeds=(1, 2)), seed=2)
    study = optuna.create_study()
    study.enqueue_trial(KD.to_params())
    study.optimize(Objective(overlapping, threads=1), n_trials=1)
    assert study.trials[0].user_attrs["proxy_seeds"] == [0, 1, 2]


def test_a_study_stored_before_confirmation_keeps_its_proxy():
    stored = json.loads(recipe_config({}).to_json())
    assert stored["proxy"]["confirm_seeds"] == [1, 2, 3]
    del stored["proxy"]["confirm_seeds"], stored["proxy"]["confirm_z"]
    assert StudyConfig.from_json(json.dumps(stored)).proxy.confirm_seeds == ()


def test_a_result_joined_with_more_seeds_is_the_result_of_all_of_them(task):
    spec = DistillerSpec.from_params(KD.to_params())
    both = task.run(spec, dataclasses.replace(CONFIRMING, seeds=(0, 1), confirm_seeds=()))
    first = task.run(spec, dataclasses.replace(CONFIRMING, seeds=(0,), confirm_seeds=()))
    second = task.run(spec, dataclasses.replace(CONFIRMING, seeds=(1,), confirm_seeds=()))
    joined = first.joined(second, CONFIRMING.score_weights, CONFIRMING.steps)
    assert joined.seeds == (0, 1)
    assert joined.metrics() == pytest.approx(both.metrics())
    assert joined.score == pytest.approx(both.score)
    assert [step for step, _ in joined.curve] == [step for step, _ in both.curve]
