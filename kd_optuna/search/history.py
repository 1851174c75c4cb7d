"""What one process derives from one study's trials, read once each: the population, the keys
never to propose again, the relative search space, rho's and the shrinkage's statistics.

The cost model is the one of ``kd_optuna.search.sampler``'s docstring ("Cost"): finished
trials never change, so :class:`StudyHistory` keeps the index of the first unfinished trial
(the ``frontier``) and absorbs each trial once, when it has finished.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Iterable, Mapping, Sequence

from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from kd_optuna.errors import InvalidSpace
from kd_optuna.search import evolution
from kd_optuna.search.predictor import AdditivePredictor, spec_cells
from kd_optuna.search.proposers import Member
from kd_optuna.search.shrinkage import Shrinkage, features
from kd_optuna.space import GENES, DistillerSpec, SearchSpace

#: System attr where a worker announces the key of the child it is about to run.
PROPOSED_KEY_ATTR = "kd_optuna:proposed_key"
#: The states whose distributions the relative search space intersects.
_INTERSECTED = (TrialState.COMPLETE, TrialState.PRUNED)


def _spec_of(params: Mapping[str, Any]) -> DistillerSpec | None:
    if not all(gene in params for gene in GENES):
        return None
    try:
        return DistillerSpec.from_params(params)
    except InvalidSpace:
        return None


def _split(params: Mapping[str, Any]) -> tuple[DistillerSpec | None, dict[str, Any]]:
    """The spec of ``params`` (if it has valid genes) and its other params."""
    spec = _spec_of(params)
    if spec is None:
        return None, dict(params)
    return spec, {n: v for n, v in params.items() if n not in GENES}


def _key_over(distiller_key: str | None, extra: Mapping[str, Any], names: frozenset[str]) -> str:
    return evolution.genome_key(distiller_key, {n: v for n, v in extra.items() if n in names})


def _key_of(params: Mapping[str, Any]) -> str:
    spec, extra = _split(params)
    return evolution.genome_key(spec.key if spec else None, extra)


def announced_key(trial: FrozenTrial) -> str | None:
    """The key an unfinished trial will evaluate: announced, enqueued, or from its params."""
    key = trial.system_attrs.get(PROPOSED_KEY_ATTR)
    if isinstance(key, str):
        return key
    fixed = trial.system_attrs.get("fixed_params", {})
    if fixed:
        return _key_of(fixed)
    return _key_of(trial.params) if trial.params else None


def _same(a: BaseDistribution | None, b: BaseDistribution) -> bool:
    """``a == b`` as Optuna defines it, with a fast path for equal categorical choices."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, CategoricalDistribution) and a.choices == b.choices:  # type: ignore[attr-defined]
        return all(type(x) is type(y) for x, y in zip(a.choices, b.choices))  # type: ignore[attr-defined]
    return a == b


def _is_rejection(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.PRUNED and bool(trial.user_attrs.get("reject_reason"))


class StudyHistory:
    """What one process has derived from one study's trials (see the docstring of
    ``kd_optuna.search.sampler``, Cost).

    Every trial before ``frontier`` is finished and absorbed, as are those in ``absorbed``
    beyond it; :meth:`update` absorbs each other trial once it is finished and lists the
    unfinished ones (``unfinished``, their keys ``running_keys``). From the absorbed trials it
    holds the keys never to propose again (``finished_keys``; their distiller keys,
    ``finished_distillers``), the population (``top``: the
    ``population_size`` least (score, number, key) over distinct keys, score = sign * value;
    ``best_member`` and ``best_features`` per key), the relative search space (``space``: the
    intersection of the distributions of the COMPLETE and PRUNED trials), the newest gene
    distributions (``distributions``), rho's statistics (``predictor``) and the shrinkage's
    (``shrinkage``). ``version`` counts the absorbed trials; the caches derived from the rest
    (members, genome, weights) are kept until it changes.
    """

    def __init__(self, storage: Any, study_id: int, sign: float, population_size: int):
        self.storage = storage
        self.study_id = study_id
        self.sign = sign
        self.population_size = population_size
        self.frontier = 0
        self.absorbed: set[int] = set()
        self.version = 0
        self.finished_keys: set[str] = set()
        self.finished_distillers: set[str] = set()
        self._finished_genomes: list[tuple[str | None, dict[str, Any]]] = []
        self._finished_params: list[Mapping[str, Any]] = []
        self._keys_over: tuple[frozenset[str] | None, set[str]] = (None, set())
        self.running_keys: list[str] = []
        self.unfinished: list[FrozenTrial] = []
        self.best: dict[str, tuple[float, int]] = {}
        self.best_member: dict[str, Member] = {}
        self.best_features: dict[str, list[tuple[str, Any]]] = {}
        self._weights: tuple[Any, dict[str, dict[Any, float]]] = (None, {})
        self.top: list[tuple[float, int, str]] = []
        self.shrinkage = Shrinkage()
        self.predictor = AdditivePredictor()
        self.space: dict[str, BaseDistribution] | None = None
        self.distributions: dict[str, CategoricalDistribution] | None = None
        self._distributions_number = -1
        self.saw_params = False
        self._members: tuple[int, list[Member]] = (-1, [])
        self.genome: tuple[int, Any] = (-1, None)

    def update(self, trials: Sequence[FrozenTrial]) -> None:
        running, unfinished = [], []
        advancing = True
        for i in range(self.frontier, len(trials)):
            trial = trials[i]
            if trial.state.is_finished():
                if trial.number not in self.absorbed:
                    self._absorb(trial)
                    self.absorbed.add(trial.number)
                if advancing:
                    self.absorbed.discard(trial.number)
                    self.frontier = i + 1
            else:
                advancing = False
                unfinished.append(trial)
                key = announced_key(trial)
                if key is not None:
                    running.append(key)
        self.running_keys = running
        self.unfinished = unfinished

    def _absorb(self, trial: FrozenTrial) -> None:
        self.version += 1
        if trial.state in _INTERSECTED:
            self._intersect(trial.distributions)
        if not trial.params:
            return
        self.saw_params = True
        spec, extra = _split(trial.params)
        if spec is not None:
            self._remember_distributions(trial)
            self.finished_distillers.add(spec.key)
        key = evolution.genome_key(spec.key if spec else None, extra)
        self.finished_keys.add(key)
        self._finished_genomes.append((spec.key if spec else None, extra))
        self._finished_params.append(trial.params)
        names = self._keys_over[0]
        if names is not None:
            self._keys_over[1].add(_key_over(spec.key if spec else None, extra, names))
        cells = (spec_cells(spec) if spec else []) + evolution.cells(extra, trial.distributions)
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            self._add_complete(Member(trial.number, spec, self.sign * trial.value, extra), key, cells)
        elif _is_rejection(trial):
            self.predictor.add_rejection_cells(cells)
            self.shrinkage.add_rejection(features(spec) if spec else [])

    def finished_keys_over(self, names: Iterable[str]) -> set[str]:
        """The finished trials' keys over their distiller and the params ``names`` only (a
        genome's), which a child over that genome must not repeat: a param outside ``names``
        (a conditional one) does not make a trial's key another. Cached for one ``names``."""
        names = frozenset(names)
        if self._keys_over[0] != names:
            keys = {_key_over(spec, extra, names) for spec, extra in self._finished_genomes}
            self._keys_over = (names, keys)
        return self._keys_over[1]

    def taken_values(self, name: str, params: Mapping[str, Any]) -> set[tuple[type, Any]]:
        """The values (with their type: True is not 1) of ``name`` in the finished trials
        whose params agree with ``params``: the values that would make a trial with
        ``params`` so far repeat one of them. A scan of the finished trials."""
        return {
            (type(other[name]), other[name])
            for other in self._finished_params
            if name in other and all(n in other and other[n] == v for n, v in params.items())
        }

    def _intersect(self, distributions: Mapping[str, BaseDistribution]) -> None:
        if self.space is None:
            self.space = dict(distributions)
        elif not all(_same(distributions.get(n), d) for n, d in self.space.items()):
            self.space = {n: d for n, d in self.space.items() if _same(distributions.get(n), d)}

    def _remember_distributions(self, trial: FrozenTrial) -> None:
        dists = {g: trial.distributions.get(g) for g in GENES}
        if trial.number > self._distributions_number and all(
            isinstance(d, CategoricalDistribution) for d in dists.values()
        ):
            self.distributions = dists  # type: ignore[assignment]
            self._distributions_number = trial.number

    def _add_complete(self, member: Member, key: str, cells: list[tuple[str, Any]]) -> None:
        score = member.score
        if math.isnan(score):
            return
        self.predictor.add_cells(cells, score)
        spec_features = features(member.spec) if member.spec else []
        self.shrinkage.add_complete(spec_features)
        entry = (score, member.number)
        old = self.best.get(key)
        if old is not None and old <= entry:
            return
        self.best[key] = entry
        self.best_member[key] = member
        self.best_features[key] = spec_features
        if old is not None:
            at = bisect.bisect_left(self.top, (old[0], old[1], key))
            if at < len(self.top) and self.top[at] == (old[0], old[1], key):
                del self.top[at]
        bisect.insort(self.top, (score, member.number, key))
        del self.top[self.population_size :]

    def members(self) -> list[Member]:
        """The population, best first."""
        if self._members[0] != self.version:
            members = [self.best_member[k] for _, _, k in self.top]
            self._members = (self.version, members)
        return self._members[1]

    def weights(
        self,
        space: SearchSpace,
        shrink_after: int,
        reject_min: int,
        reject_rate: float,
    ) -> dict[str, dict[Any, float]]:
        """The shrinkage weights of the population now (see :class:`kd_optuna.search.shrinkage.Shrinkage` and
        ``EvolutionSampler.space_weights``); cached until the next trial is absorbed."""
        cache_key = (self.version, space, shrink_after, reject_min, reject_rate)
        if self._weights[0] == cache_key:
            return self._weights[1]
        elite = [self.best_features[key] for _, _, key in self.top]
        weights = self.shrinkage.weights(space, elite, shrink_after, reject_min, reject_rate)
        self._weights = (cache_key, weights)
        return weights
