"""Search-space shrinkage: per gene option, how often it completed and was rejected, and the
sampling weight that gives it (the formula in :class:`Shrinkage`).

An option is read on the canonical form of a spec, as a (group, option) *feature*: the three
transform slots pool into one group ``transform``, a no-op transform does not count, and
``("transform", "no")`` is had when fewer than three transforms act.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from kd_optuna.space import GENES, TRANSFORM_GENES, DistillerSpec, SearchSpace

#: A shrinkage group per gene: the three transform slots share their statistics.
GROUP = {gene: ("transform" if gene in TRANSFORM_GENES else gene) for gene in GENES}
#: The least weight an option keeps unless rejections drop it.
FLOOR = 0.05


def features(spec: DistillerSpec) -> list[tuple[str, Any]]:
    """The (group, option) pairs a spec has, read on its canonical form.

    A transform counts once however many slots hold it, a no-op transform not at all; the
    transform option ``no`` is had when fewer than three transforms act.
    """
    canonical = spec.canonical()
    acting = canonical.effective_transforms()
    pairs = [(g, getattr(canonical, g)) for g in GENES if g not in TRANSFORM_GENES]
    pairs += [("transform", name) for name in dict.fromkeys(acting)]
    if len(acting) < 3:
        pairs.append(("transform", "no"))
    return pairs


@dataclasses.dataclass
class OptionCounts:
    complete: int = 0
    rejected: int = 0


_NO_COUNTS = OptionCounts()


class Shrinkage:
    """The statistics search-space shrinkage reads, and the option weights they give.

    Holds ``n_evaluated`` (completed trials with a score plus rejected trials), ``n_with_genes``
    (n, the completed trials with genes) and ``counts``: per feature o, a (group, option) pair of
    the canonical specs (:func:`features`: the three transform slots pooled), c_o completed and
    j_o rejected trials with it. Given the features of the population's P' members with genes,
    e_o of them with o, :meth:`weights` is 1 for every option until ``shrink_after`` trials were
    evaluated (or while n = 0), then::

        weight(o) = clip((e_o + 1) / (c_o * P' / n + 1), 0.05, 1)
        weight(o) = 0  if j_o >= reject_min and j_o >= reject_rate * (c_o + j_o)

    and where a gene would lose every option, those of lowest j_o / (c_o + j_o) weigh 0.05, the
    others 0.
    """

    def __init__(self) -> None:
        self.n_evaluated = 0
        self.n_with_genes = 0
        self.counts: dict[tuple[str, Any], OptionCounts] = {}

    def add_complete(self, features: Sequence[tuple[str, Any]]) -> None:
        """Count a completed trial with a score, of these features ([]: a trial without genes)."""
        self.n_evaluated += 1
        if features:
            self.n_with_genes += 1
        for feature in features:
            self.counts.setdefault(feature, OptionCounts()).complete += 1

    def add_rejection(self, features: Sequence[tuple[str, Any]]) -> None:
        """Count a rejected trial, of these features ([]: a trial without genes)."""
        self.n_evaluated += 1
        for feature in features:
            self.counts.setdefault(feature, OptionCounts()).rejected += 1

    def weights(
        self,
        space: SearchSpace,
        elite: Sequence[Sequence[tuple[str, Any]]],
        shrink_after: int,
        reject_min: int,
        reject_rate: float,
    ) -> dict[str, dict[Any, float]]:
        """gene -> option of ``space`` -> weight, ``elite`` being the features of each population
        member ([] for one without genes)."""
        if self.n_evaluated < shrink_after or not self.n_with_genes:
            return {g: {o: 1.0 for o in space[g]} for g in GENES}
        return self._shrunk(space, elite, reject_min, reject_rate)

    def _shrunk(self, space, elite_features, reject_min, reject_rate) -> dict[str, dict[Any, float]]:
        elite: dict[tuple[str, Any], int] = {}
        n_elite = 0
        for features in elite_features:
            n_elite += bool(features)
            for feature in features:
                elite[feature] = elite.get(feature, 0) + 1
        share = n_elite / self.n_with_genes
        by_feature: dict[tuple[str, Any], float] = {}

        def weight(feature: tuple[str, Any]) -> float:
            if feature not in by_feature:
                counts = self.counts.get(feature, _NO_COUNTS)
                ratio = (elite.get(feature, 0) + 1.0) / (counts.complete * share + 1.0)
                tried = counts.complete + counts.rejected
                dropped = counts.rejected >= reject_min and counts.rejected >= reject_rate * tried
                by_feature[feature] = 0.0 if dropped else max(FLOOR, min(1.0, ratio))
            return by_feature[feature]

        weights = {}
        for gene in GENES:
            group = GROUP[gene]
            weights[gene] = {o: weight((group, o)) for o in space[gene]}
            if not any(w > 0 for w in weights[gene].values()):
                weights[gene] = self._least_rejected(group, weights[gene])
        return weights

    def _least_rejected(self, group: str, options: Mapping[Any, float]) -> dict[Any, float]:
        def rate(option: Any) -> float:
            c = self.counts.get((group, option), _NO_COUNTS)
            return c.rejected / max(1, c.complete + c.rejected)

        lowest = min(rate(o) for o in options)
        return {o: (FLOOR if rate(o) == lowest else 0.0) for o in options}
