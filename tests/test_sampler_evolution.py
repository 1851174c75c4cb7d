"""The sampler's operators on any Optuna distribution (kd_optuna.search.evolution)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from kd_optuna.search import evolution

DISTRIBUTIONS = [
    CategoricalDistribution(["a", "b", None, 3, 2.5, True]),
    FloatDistribution(-2.0, 3.0),
    FloatDistribution(1e-5, 1e-1, log=True),
    FloatDistribution(0.0, 1.0, step=0.25),
    IntDistribution(0, 100),
    IntDistribution(1, 1024, log=True),
    IntDistribution(-9, 9, step=3),
    IntDistribution(3, 4),
]


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=repr)
def test_draws_and_mutants_are_values_of_the_distribution_and_mutants_change(dist):
    rng = np.random.RandomState(0)
    values = [evolution.draw(dist, rng) for _ in range(300)]
    assert all(evolution.contains(dist, v) for v in values)
    for value in values[:100]:
        child = evolution.mutate_value(dist, value, rng, scale=0.1)
        assert evolution.contains(dist, child)
        assert not (child == value and type(child) is type(value))


def test_a_log_float_steps_on_the_log_scale_and_a_step_is_scale_times_the_range():
    rng = np.random.RandomState(1)
    dist = FloatDistribution(1e-5, 1e-1, log=True)
    steps = [math.log(evolution.mutate_value(dist, 1e-3, rng, 0.1) / 1e-3) for _ in range(4000)]
    width = math.log(1e-1) - math.log(1e-5)
    assert abs(np.std(steps) - 0.1 * width) < 0.01 * width
    assert abs(np.mean(steps)) < 0.01 * width


def test_an_int_on_a_coarse_grid_moves_one_step_when_the_gaussian_rounds_back():
    rng = np.random.RandomState(2)
    dist = IntDistribution(0, 1000, step=100)
    children = {evolution.mutate_value(dist, 500, rng, 0.01) for _ in range(200)}
    assert children == {400, 600}
    assert {evolution.mutate_value(dist, 1000, rng, 0.01) for _ in range(50)} == {900}


def test_a_single_value_distribution_stays_and_unknown_values_are_redrawn():
    rng = np.random.RandomState(3)
    assert evolution.mutate_value(IntDistribution(5, 5), 5, rng, 0.1) == 5
    assert not evolution.can_change(FloatDistribution(1.0, 1.0))
    space = {"x": FloatDistribution(0.0, 1.0), "c": CategoricalDistribution(["p", "q"])}
    inherited = evolution.inherit({"x": 7.0, "c": "q"}, space, rng)
    assert 0.0 <= inherited["x"] <= 1.0 and inherited["c"] == "q"


def test_keys_and_cells_tell_settings_apart():
    assert evolution.genome_key("logit|kl", {}) == "logit|kl"
    assert evolution.genome_key("logit|kl", {"lr": 0.1}) != evolution.genome_key("logit|kl", {"lr": 0.2})
    assert evolution.genome_key(None, {"a": 1}) != evolution.genome_key(None, {"a": True})
    space = {"lr": FloatDistribution(1e-4, 1.0, log=True), "n": IntDistribution(0, 3),
             "c": CategoricalDistribution([1, True])}
    assert evolution.cells({"lr": 1e-4, "n": 2, "c": True}, space) == [
        ("c", ("bool", True)), ("lr", ("bin", 0)), ("n", ("int", 2))]
    assert evolution.cells({"lr": 1.0}, space) == [("lr", ("bin", 7))]


def test_a_crossover_blends_numbers_inside_their_bounds_and_picks_a_categorical_parent():
    rng = np.random.RandomState(4)
    dist = FloatDistribution(1e-4, 1.0, log=True)
    children = [evolution.cross_value(dist, 1e-3, 1e-1, rng) for _ in range(2000)]
    logs = np.log10(children)
    assert all(evolution.contains(dist, c) for c in children)
    assert logs.min() < -3 and logs.max() > -1 and abs(np.median(logs) + 2) < 0.1
    ints = {evolution.cross_value(IntDistribution(0, 10, step=2), 2, 6, rng) for _ in range(500)}
    assert ints == {0, 2, 4, 6, 8}
    picks = {evolution.cross_value(CategoricalDistribution(["a", "b", "c"]), "a", "c", rng) for _ in range(50)}
    assert picks == {"a", "c"}
