"""Confirmation: a trial that may beat the study's best runs more proxy seeds first.

A proxy score is one short training, and its seed is part of it: on digits_hard the
seed-to-seed standard deviation of one distiller's score is 0.016-0.041 (8 distillers x 5
seeds, BENCHMARKS "Confirmation"), as wide as the spread of the eight distillers' means
(0.318-0.384). The lowest of a hundred single-seed scores is then the luckiest draw more than
the best distiller: the pick regresses towards its mean after real training, and a bad
distiller can win the study on a lucky seed.

So a trial is raced against the incumbent, as irace and SMAC's intensification race
configurations. After the trial's ``seeds`` it runs each of ``confirm_seeds`` in turn while it
can still beat the incumbent::

    go on while   mean(y_1..y_k) - z * sigma / sqrt(k)  <  best

``y_i`` the trial's per-seed scores so far (lower is better), ``best`` the lowest value among
the study's completed trials (none yet: ``+inf``, so the first trial is confirmed), ``z`` is
``confirm_z``, and ``sigma`` the pooled within-trial standard deviation of the per-seed scores
of the study's completed trials that ran two seeds or more::

    sigma^2 = sum_t sum_i (y_ti - mean_t)^2 / sum_t (k_t - 1)

``0`` while no trial has two seeds: a trial is then confirmed when its mean beats the best.
The trial's value is its mean over every seed it ran. A trial stops early only once its mean is
at least ``best``, so whichever trial ends as the study's best ran every confirmation seed;
trials far from the best run ``seeds`` alone, and the cost follows the proxy's noise. A trial's
first seed was selected for being low, so ``sigma`` leans high: the race confirms more, not
less.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from optuna.trial import FrozenTrial

#: The user attr holding a trial's per-seed scores (a list of floats, in the order they ran).
SEED_SCORES_ATTR = "seed_scores"


def pooled_std(groups: Iterable[Sequence[float]]) -> float:
    """``sqrt(sum_g sum_i (y_gi - mean_g)^2 / sum_g (k_g - 1))`` over the groups with two values
    or more (0 when none has two)."""
    squares, freedom = 0.0, 0
    for values in groups:
        if len(values) < 2:
            continue
        mean = sum(values) / len(values)
        squares += sum((y - mean) ** 2 for y in values)
        freedom += len(values) - 1
    return math.sqrt(squares / freedom) if freedom else 0.0


def pooled_spread(trials: Iterable[FrozenTrial]) -> float:
    """``sigma`` above: :func:`pooled_std` of the trials' finite ``seed_scores``."""
    groups = (trial.user_attrs.get(SEED_SCORES_ATTR) for trial in trials)
    return pooled_std(
        scores for scores in groups
        if isinstance(scores, list) and all(isinstance(y, (int, float)) and math.isfinite(y) for y in scores)
    )


def best_value(trials: Iterable[FrozenTrial]) -> float:
    """The lowest finite value of ``trials`` (``+inf`` if none)."""
    values = [t.value for t in trials if t.value is not None and math.isfinite(t.value)]
    return min(values, default=math.inf)


def go_on(scores: Sequence[float], best: float, sigma: float, z: float) -> bool:
    """Whether a trial with per-seed ``scores`` so far may still beat ``best`` (see above)."""
    k = len(scores)
    return sum(scores) / k - z * sigma / math.sqrt(k) < best
