"""A trial's score: one fixed weighted sum of its metrics (:mod:`kd_optuna.proxy.metrics`),
lower is better. Plain arithmetic, without torch, so that reading a study's config does not
import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ScoreWeights:
    """Weights of the combined score ``ce * val_ce + sharpness * |sharpness_gap| + cka * cka_gap``."""

    ce: float = 1.0
    sharpness: float = 0.0
    cka: float = 0.0


def combined_score(metrics: Mapping[str, float], weights: ScoreWeights) -> float:
    """The trial value, lower is better: a fixed weighted sum of the trial's own metrics.

    ``metrics`` needs ``val_ce``, ``sharpness_gap``, ``cka_gap``. The sharpness gap enters by
    its size (a student flatter or sharper than its teacher both count). Nothing here depends
    on other trials, so one seed's score is the same whatever finished before it; how many
    seeds a trial runs does depend on the study's best (:mod:`kd_optuna.proxy.confirmation`).
    """
    return (
        weights.ce * float(metrics["val_ce"])
        + weights.sharpness * abs(float(metrics["sharpness_gap"]))
        + weights.cka * float(metrics["cka_gap"])
    )
