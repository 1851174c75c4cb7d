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
not count as the transform.

Rejected candidates (the loss-rejection protocol) are the common failure, so the same additive
form with shrinkage estimates the chance of rejection from all evaluated trials (completed and
rejected), and the candidates are compared on the expected score::

    q          = R / N                                      (rejected / evaluated)
    reject(s)  = clip(q + sum_g (R_go - N_go * q) / (N_go + m), 0, 1)
    expected(s) = (1 - reject(s)) * rho(s) + reject(s) * worst

with ``worst`` the highest completed score: a rejected trial teaches as little as the worst
one. Fitting is incremental: ``add``/``add_rejection`` are O(8), ``predict`` is O(8), and the
model after a set of trials does not depend on the order they were added in.
"""

from __future__ import annotations

import math
from typing import Any

from kd_optuna.errors import KdOptunaError
from kd_optuna.space import GENES, DistillerSpec


class PredictorConfigError(KdOptunaError, ValueError):
    """A predictor setting out of range."""


class AdditivePredictor:
    """rho(spec): additive per-gene-option mean score with shrinkage ``m`` to the global mean."""

    def __init__(self, shrinkage: float = 3.0) -> None:
        if not shrinkage > 0:
            raise PredictorConfigError(f"shrinkage must be above 0, got {shrinkage}")
        self.shrinkage = float(shrinkage)
        self.n = 0
        self._total = 0.0
        self._sums: dict[tuple[str, Any], float] = {}
        self._counts: dict[tuple[str, Any], int] = {}
        self.worst = -math.inf
        self._evaluated: dict[tuple[str, Any], int] = {}
        self._rejected: dict[tuple[str, Any], int] = {}
        self._n_evaluated = 0
        self._n_rejected = 0

    def add(self, spec: DistillerSpec, score: float) -> None:
        """Fit one completed trial; non-finite scores carry no information and are skipped."""
        if not math.isfinite(score):
            return
        canonical = spec.canonical()
        self.n += 1
        self._total += score
        self.worst = max(self.worst, score)
        for gene in GENES:
            cell = (gene, getattr(canonical, gene))
            self._sums[cell] = self._sums.get(cell, 0.0) + score
            self._counts[cell] = self._counts.get(cell, 0) + 1
        self._count_outcome(canonical, rejected=False)

    def add_rejection(self, spec: DistillerSpec) -> None:
        """Fit one rejected candidate (it has no score)."""
        self._count_outcome(spec.canonical(), rejected=True)

    def _count_outcome(self, canonical: DistillerSpec, rejected: bool) -> None:
        self._n_evaluated += 1
        self._n_rejected += rejected
        for gene in GENES:
            cell = (gene, getattr(canonical, gene))
            self._evaluated[cell] = self._evaluated.get(cell, 0) + 1
            if rejected:
                self._rejected[cell] = self._rejected.get(cell, 0) + 1

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

    def reject_probability(self, spec: DistillerSpec) -> float:
        """Estimated chance that ``spec`` is rejected; 0 before any rejection was seen."""
        if not self._n_rejected:
            return 0.0
        q = self._n_rejected / self._n_evaluated
        canonical = spec.canonical()
        p = q
        for gene in GENES:
            cell = (gene, getattr(canonical, gene))
            count = self._evaluated.get(cell, 0)
            if count:
                p += (self._rejected.get(cell, 0) - count * q) / (count + self.shrinkage)
        return min(1.0, max(0.0, p))

    def expected(self, spec: DistillerSpec) -> float:
        """``(1 - reject) * rho + reject * worst``: what the candidate is worth, all told."""
        rho = self.predict(spec)
        if not self.n:
            return rho
        p = self.reject_probability(spec)
        return (1.0 - p) * rho + p * max(self.worst, rho)
