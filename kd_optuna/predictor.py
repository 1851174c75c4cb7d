"""rho of Algorithm 1: a cheap score predictor fitted on the completed trials.

The model is additive over the eight genes, each gene-option effect shrunk to the global
mean by its number of observations::

    mu          = (1 / n) * sum_i y_i                       (all completed trials)
    effect(g,o) = (S_go - n_go * mu) / (n_go + m)           S_go = sum of y_i with gene g = o
    rho(spec)   = mu + sum_g effect(g, spec.g)

where ``y`` is the score with lower = better (the sampler negates the value of a maximised
study), ``n_go`` the number of trials having option ``o`` at gene ``g`` and ``m`` the
shrinkage strength: an option seen once moves rho by 1/(1+m) of its deviation, an option never
seen not at all. Options are compared on the spec's *canonical* form, so a no-op transform does
not count as the transform. Fitting is incremental: ``add`` is O(8), ``predict`` is O(8), and
the model after a set of trials does not depend on the order they were added in.
"""

from __future__ import annotations

import math
from typing import Any

from kd_optuna.space import GENES, DistillerSpec


class AdditivePredictor:
    """rho(spec): additive per-gene-option mean score with shrinkage ``m`` to the global mean."""

    def __init__(self, shrinkage: float = 3.0) -> None:
        if not shrinkage > 0:
            raise ValueError("shrinkage must be > 0")
        self.shrinkage = float(shrinkage)
        self.n = 0
        self._total = 0.0
        self._sums: dict[tuple[str, Any], float] = {}
        self._counts: dict[tuple[str, Any], int] = {}

    def add(self, spec: DistillerSpec, score: float) -> None:
        """Fit one completed trial; non-finite scores carry no information and are skipped."""
        if not math.isfinite(score):
            return
        canonical = spec.canonical()
        self.n += 1
        self._total += score
        for gene in GENES:
            cell = (gene, getattr(canonical, gene))
            self._sums[cell] = self._sums.get(cell, 0.0) + score
            self._counts[cell] = self._counts.get(cell, 0) + 1

    @property
    def mean(self) -> float:
        return self._total / self.n if self.n else 0.0

    def predict(self, spec: DistillerSpec) -> float:
        """Predicted score of ``spec`` (lower = better); the global mean when nothing is known."""
        mu = self.mean
        canonical = spec.canonical()
        rho = mu
        for gene in GENES:
            cell = (gene, getattr(canonical, gene))
            count = self._counts.get(cell, 0)
            if count:
                rho += (self._sums[cell] - count * mu) / (count + self.shrinkage)
        return rho
