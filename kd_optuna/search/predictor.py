"""rho of Algorithm 1: a cheap score predictor fitted on the completed trials.

The model is additive over cells: one weight per gene option (the eight genes of the canonical
spec) and, for a genome with other params, one per value or per range bin of each of them
(:func:`kd_optuna.search.evolution.cells`), fitted jointly by ridge regression with an unpenalised
intercept::

    x(spec)       one-hot row over the cells seen so far (one per gene and per other param)
    (b, w)        = argmin  sum_i (y_i - b - x_i . w)^2  +  m * |w|^2
    rho(spec)     = b + x(spec) . w                      (an unseen option weighs 0)

where ``y`` is the score with lower = better (the sampler negates the value of a maximised
study) and ``m`` the shrinkage strength: an option seen once moves rho by about 1/(1+m) of its
trial's deviation from the rest, an option never seen not at all. Fitting the weights jointly,
not as one marginal mean per option, matters: options that only ever appeared together (the
three transforms and the calibration of one good random trial) share that trial's deviation
instead of each claiming all of it, so rho does not predict a score far below every one
observed. Options are compared on the spec's *canonical* form, so a no-op transform does not
count as the transform.

Rejected candidates (the loss-rejection protocol) are the common failure, so the same ridge
fit over all evaluated trials (completed and rejected), with target 1 for a rejection and 0
otherwise, estimates the chance of rejection, and candidates are compared on the expected
score::

    reject(s)   = clip(b' + x(s) . w', 0, 1)
    expected(s) = (1 - reject(s)) * rho(s) + reject(s) * worst

with ``worst`` the highest completed score: a rejected trial teaches as little as the worst
one. ``add``/``add_rejection`` update the sufficient statistics (X'X, X'y) in O(64) and the
inverse of the penalised system in O(p^2) (Sherman-Morrison, :class:`RidgeFit`), p being the
number of distinct options seen (below 200 on the full space); a prediction is then O(9), and
the fit does not depend on the order trials were added in (up to float rounding).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kd_optuna.errors import KdOptunaError
from kd_optuna.space import GENES, DistillerSpec


class PredictorConfigError(KdOptunaError, ValueError):
    """A predictor setting out of range."""


Cell = tuple[str, Any]


def spec_cells(spec: DistillerSpec) -> list[Cell]:
    """The eight (gene, option) cells of the canonical form of ``spec``."""
    canonical = spec.canonical()
    return [(gene, getattr(canonical, gene)) for gene in GENES]


class RidgeFit:
    """``y ~ b + x . w`` over one-hot gene options, ``m * |w|^2`` penalty, ``b`` free.

    Keeps the sufficient statistics ``G = [1 x]' [1 x]`` and ``c = [1 x]' y`` (column 0 the
    intercept) and, once a prediction has asked for it, the inverse ``A = (G + D)^-1`` with
    ``D = diag(0, m, ..., m)``. The first prediction inverts once; every later trial updates
    ``A`` in place by Sherman-Morrison, for the row ``z = [1 x]``::

        u  = A z                     (the sum of A's columns at z's ones)
        A <- A - u u' / (1 + z' u)

    after growing ``A`` by ``1/m`` on the diagonal for each option seen for the first time
    (its column of ``G`` was zero, so ``G + D`` was block diagonal there). The solution is
    ``(b, w) = A c``. All of it is elementwise numpy, no BLAS call: a (p+1)-square LAPACK
    solve per proposal cost 0.2 ms alone but 9-11 ms on a loaded 2-core machine, where
    OpenBLAS's threads wait for a core (BENCHMARKS.md, issue 15's proposal cost).
    """

    def __init__(self, shrinkage: float) -> None:
        self.shrinkage = shrinkage
        self.n = 0
        self._column: dict[Cell, int] = {}
        self._gram = np.zeros((1, 1))
        self._moment = np.zeros(1)
        self._inverse: np.ndarray | None = None
        self._solution: np.ndarray | None = None

    def add(self, cells: list[Cell], y: float) -> None:
        columns = [0] + [self._column_of(cell) for cell in cells]
        self._gram[np.ix_(columns, columns)] += 1.0
        self._moment[columns] += y
        self.n += 1
        self._solution = None
        if self._inverse is not None:
            self._downdate(columns)

    def predict(self, cells: list[Cell]) -> float:
        if not self.n:
            return 0.0
        if self._solution is None:
            if self._inverse is None:
                penalty = np.full(len(self._moment), self.shrinkage)
                penalty[0] = 0.0
                self._inverse = np.linalg.inv(self._gram + np.diag(penalty))
            self._solution = (self._inverse * self._moment).sum(axis=1)
        columns = [self._column[cell] for cell in cells if cell in self._column]
        return float(self._solution[0] + self._solution[columns].sum())

    def _downdate(self, columns: list[int]) -> None:
        inverse = self._inverse
        grown = len(self._moment) - len(inverse)
        if grown:
            inverse = np.pad(inverse, ((0, grown), (0, grown)))
            new = np.arange(len(inverse) - grown, len(inverse))
            inverse[new, new] = 1.0 / self.shrinkage
        u = inverse[:, columns].sum(axis=1)
        inverse -= np.multiply.outer(u, u) / (1.0 + u[columns].sum())
        self._inverse = inverse

    def _column_of(self, cell: Cell) -> int:
        column = self._column.get(cell)
        if column is None:
            column = self._column[cell] = len(self._moment)
            self._gram = np.pad(self._gram, ((0, 1), (0, 1)))
            self._moment = np.pad(self._moment, (0, 1))
        return column


class AdditivePredictor:
    """rho(spec): ridge-fitted additive per-gene-option score; see the module docstring."""

    def __init__(self, shrinkage: float = 3.0) -> None:
        if not shrinkage > 0:
            raise PredictorConfigError(f"shrinkage must be above 0, got {shrinkage}")
        self.shrinkage = float(shrinkage)
        self.n = 0
        self._total = 0.0
        self.worst = -math.inf
        self._scores = RidgeFit(self.shrinkage)
        self._rejections = RidgeFit(self.shrinkage)
        self._n_rejected = 0

    def add(self, spec: DistillerSpec, score: float) -> None:
        """Fit one completed trial; non-finite scores carry no information and are skipped."""
        self.add_cells(spec_cells(spec), score)

    def add_cells(self, cells: list[Cell], score: float) -> None:
        """:meth:`add` for a genome given as its cells."""
        if not math.isfinite(score):
            return
        self.n += 1
        self._total += score
        self.worst = max(self.worst, score)
        self._scores.add(cells, score)
        self._rejections.add(cells, 0.0)

    def add_rejection(self, spec: DistillerSpec) -> None:
        """Fit one rejected candidate (it has no score)."""
        self.add_rejection_cells(spec_cells(spec))

    def add_rejection_cells(self, cells: list[Cell]) -> None:
        self._n_rejected += 1
        self._rejections.add(cells, 1.0)

    @property
    def mean(self) -> float:
        return self._total / self.n if self.n else 0.0

    def predict(self, spec: DistillerSpec) -> float:
        """Predicted score of ``spec`` (lower = better); 0 when nothing is known."""
        return self.predict_cells(spec_cells(spec))

    def predict_cells(self, cells: list[Cell]) -> float:
        return self._scores.predict(cells)

    def reject_probability(self, spec: DistillerSpec) -> float:
        """Estimated chance that ``spec`` is rejected; 0 before any rejection was seen."""
        return self.reject_probability_cells(spec_cells(spec))

    def reject_probability_cells(self, cells: list[Cell]) -> float:
        if not self._n_rejected:
            return 0.0
        return min(1.0, max(0.0, self._rejections.predict(cells)))

    def expected(self, spec: DistillerSpec) -> float:
        """``(1 - reject) * rho + reject * worst``: what the candidate is worth, all told."""
        return self.expected_cells(spec_cells(spec))

    def expected_cells(self, cells: list[Cell]) -> float:
        rho = self.predict_cells(cells)
        if not self.n:
            return rho
        p = self.reject_probability_cells(cells)
        return (1.0 - p) * rho + p * max(self.worst, rho)
