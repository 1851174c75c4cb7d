"""EvolutionSampler: KD-Zero's evolutionary search (Algorithm 1) as an Optuna sampler.

Everything the search needs is derived from the study's trials, so any number of worker
processes on one storage cooperate without talking to each other:

- **population**: the best ``population_size`` distinct COMPLETE trials, distinct by the
  canonical key ``DistillerSpec.from_params(trial.params).key``; scores are the trial values,
  negated for a maximised study, so lower is better throughout.
- **initial population** (line 1): until ``population_size`` distinct keys have been
  proposed (and while none has completed), a child is the next warm-start spec (the classic
  distillers, in order) not yet seen in the study, then a random one. Rejected candidates
  count as proposed, so a high rejection rate does not keep the search random.
- **child** (lines 5-8): draw ``sample_ratio`` of the population, keep its ``top_k``, pick a
  parent among them; with ``crossover_prob`` uniform crossover with a second top-k parent,
  otherwise mutation of one or more genes (each with ``mutation_prob``). ``screen`` such
  children are drawn and rho keeps the most promising (``screen=1``: one, as in the paper).
- **guided selection** (lines 9-15): the ``proposer`` (a random spec by default, as in
  Algorithm 1, or a language model) offers a rival E; the additive predictor rho fitted on
  the completed and rejected trials keeps the one with the lower expected score (see
  ``kd_optuna.predictor``). Ties and an untrained predictor keep the mutated child.
- **never again**: a key that is COMPLETE, PRUNED (rejected), FAILED, RUNNING or WAITING is
  never proposed; only COMPLETE trials are parents. A worker announces its child's key in the
  system attr ``kd_optuna:proposed_key``, then re-reads the storage and chooses again if
  another trial has that key (up to 4 rounds), so two workers (or threads) that chose the
  same key at the same moment do not both run it: of the two, at least one sees the other.
- **shrinkage**: once ``shrink_after`` trials have been evaluated (completed or rejected:
  on digits three candidates in four are rejected, and rejections are what shrinkage
  learns from first), the option weights follow
  :meth:`EvolutionSampler.space_weights`, a pure function of the trial list (see there).

Lineage is written as user attrs of the trial: ``proposer`` ("classic", "warm_start",
"random", "mutation", "crossover", "llm", ...), ``parent`` (trial number or None),
``crossover_parent`` (crossover only), ``mutated`` (genes), ``predictor`` (the rho of each
contestant and the winner, when there was a contest), ``space_state`` (the shrinkage in force,
once ``shrink_after`` trials were evaluated; before that every weight is 1)
and ``sampler_note`` when a fallback was needed.

Cost: each process keeps a per-study cache of what it has derived. Finished trials never
change, so each is read once: the cache holds the index of the first unfinished trial (the
``frontier``) and the numbers of trials finished beyond it, and each sample scans only from
the frontier (the RUNNING/WAITING trials plus those finished since the last call). Population,
option counts and the predictor's sufficient statistics are updated per absorbed trial
(O(P + 64)); weights, and rho's ridge solution (one solve of at most ~200 unknowns, about
0.3 ms), are recomputed only when a trial was absorbed. What remains proportional to the study size is
listing the trials (Optuna's ``study._get_trials(deepcopy=False, use_cache=True)`` and one
fresh ``get_all_trials`` for the claim check), which any sampler reading the history pays.

The relative search space is the eight genes with the options of ``space``. Optuna requires
them to equal the choices the objective passes to ``suggest_categorical``, so an objective
that narrows the space needs the sampler built with the same ``space`` (as the study config
does). Params outside the genes are sampled by Optuna's RandomSampler.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
import math
import threading
from typing import Any, Iterable, Mapping, Sequence

from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kd_optuna.classics import classic_specs
from kd_optuna.errors import InvalidSpace, KdOptunaError
from kd_optuna.predictor import AdditivePredictor
from kd_optuna.proposers import (
    Candidate,
    CrossoverProposer,
    Member,
    MutationProposer,
    ProposalContext,
    Proposer,
    RandomProposer,
    random_spec,
)
from kd_optuna.space import GENES, TRANSFORM_GENES, DistillerSpec, SearchSpace

#: System attr where a worker announces the canonical key of the child it is about to run.
PROPOSED_KEY_ATTR = "kd_optuna:proposed_key"

#: A shrinkage group per gene: the three transform slots share their statistics.
_GROUP = {gene: ("transform" if gene in TRANSFORM_GENES else gene) for gene in GENES}

_FLOOR = 0.05
_CLASSICS = frozenset(classic_specs())
_CLAIM_ROUNDS = 4
_REPEAT_NOTE = "every distiller in the space was seen; proposing a repeat"


class SamplerConfigError(KdOptunaError, ValueError):
    """An EvolutionSampler argument out of range."""


def _features(spec: DistillerSpec) -> list[tuple[str, Any]]:
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


def _spec_of(params: Mapping[str, Any]) -> DistillerSpec | None:
    if not all(gene in params for gene in GENES):
        return None
    try:
        return DistillerSpec.from_params(params)
    except InvalidSpace:
        return None


def _announced_key(trial: FrozenTrial) -> str | None:
    """The key an unfinished trial will evaluate: its params, announced key, or enqueued."""
    spec = _spec_of(trial.params)
    if spec is not None:
        return spec.key
    key = trial.system_attrs.get(PROPOSED_KEY_ATTR)
    if isinstance(key, str):
        return key
    spec = _spec_of(trial.system_attrs.get("fixed_params", {}))
    return spec.key if spec else None


def _is_rejection(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.PRUNED and bool(trial.user_attrs.get("reject_reason"))


@dataclasses.dataclass
class _Counts:
    complete: int = 0
    rejected: int = 0


_NONE = _Counts()


class _History:
    """What one process has derived from one study's trials; see the module docstring."""

    def __init__(self, storage: Any, study_id: int, sign: float, population_size: int):
        self.storage = storage
        self.study_id = study_id
        self.sign = sign
        self.population_size = population_size
        self.frontier = 0
        self.absorbed: set[int] = set()
        self.version = 0
        self.finished_keys: set[str] = set()
        self.running_keys: list[str] = []
        self.unfinished: list[FrozenTrial] = []
        self.best: dict[str, tuple[float, int]] = {}
        self.best_spec: dict[str, DistillerSpec] = {}
        self.best_features: dict[str, list[tuple[str, Any]]] = {}
        self._weights: tuple[Any, dict[str, dict[Any, float]]] = (None, {})
        self.top: list[tuple[float, int, str]] = []
        self.n_complete = 0
        self.n_rejected = 0
        self.counts: dict[tuple[str, Any], _Counts] = {}
        self.predictor = AdditivePredictor()
        self.distributions: dict[str, CategoricalDistribution] | None = None
        self._distributions_number = -1
        self.saw_other_params = False
        self._members: tuple[int, list[Member]] = (-1, [])

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
                key = _announced_key(trial)
                if key is not None:
                    running.append(key)
        self.running_keys = running
        self.unfinished = unfinished

    def _absorb(self, trial: FrozenTrial) -> None:
        self.version += 1
        spec = _spec_of(trial.params)
        if spec is None:
            self.saw_other_params = self.saw_other_params or bool(trial.params)
            return
        self._remember_distributions(trial)
        key = spec.key
        self.finished_keys.add(key)
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            self._add_complete(trial.number, spec, key, self.sign * trial.value)
        elif _is_rejection(trial):
            self.n_rejected += 1
            self.predictor.add_rejection(spec)
            for feature in _features(spec):
                self.counts.setdefault(feature, _Counts()).rejected += 1

    def _remember_distributions(self, trial: FrozenTrial) -> None:
        dists = {g: trial.distributions.get(g) for g in GENES}
        if trial.number > self._distributions_number and all(
            isinstance(d, CategoricalDistribution) for d in dists.values()
        ):
            self.distributions = dists  # type: ignore[assignment]
            self._distributions_number = trial.number

    def _add_complete(self, number: int, spec: DistillerSpec, key: str, score: float) -> None:
        if math.isnan(score):
            return
        self.n_complete += 1
        self.predictor.add(spec, score)
        features = _features(spec)
        for feature in features:
            self.counts.setdefault(feature, _Counts()).complete += 1
        entry = (score, number)
        old = self.best.get(key)
        if old is not None and old <= entry:
            return
        self.best[key] = entry
        self.best_spec[key] = spec
        self.best_features[key] = features
        if old is not None:
            at = bisect.bisect_left(self.top, (old[0], old[1], key))
            if at < len(self.top) and self.top[at] == (old[0], old[1], key):
                del self.top[at]
        bisect.insort(self.top, (score, number, key))
        del self.top[self.population_size :]

    @property
    def n_evaluated(self) -> int:
        return self.n_complete + self.n_rejected

    def members(self) -> list[Member]:
        """The population, best first."""
        if self._members[0] != self.version:
            members = [Member(n, self.best_spec[k], s) for s, n, k in self.top]
            self._members = (self.version, members)
        return self._members[1]

    def weights(
        self,
        space: SearchSpace,
        shrink_after: int,
        reject_min: int,
        reject_rate: float,
    ) -> dict[str, dict[Any, float]]:
        """See ``EvolutionSampler.space_weights``; cached until the next trial is absorbed."""
        cache_key = (self.version, space, shrink_after, reject_min, reject_rate)
        if self._weights[0] == cache_key:
            return self._weights[1]
        if self.n_evaluated < shrink_after or not self.top:
            weights = {g: {o: 1.0 for o in space[g]} for g in GENES}
        else:
            weights = self._shrunk(space, reject_min, reject_rate)
        self._weights = (cache_key, weights)
        return weights

    def _shrunk(self, space, reject_min, reject_rate) -> dict[str, dict[Any, float]]:
        elite: dict[tuple[str, Any], int] = {}
        for _, _, key in self.top:
            for feature in self.best_features[key]:
                elite[feature] = elite.get(feature, 0) + 1
        share = len(self.top) / self.n_complete
        by_feature: dict[tuple[str, Any], float] = {}

        def weight(feature: tuple[str, Any]) -> float:
            if feature not in by_feature:
                counts = self.counts.get(feature, _NONE)
                ratio = (elite.get(feature, 0) + 1.0) / (counts.complete * share + 1.0)
                tried = counts.complete + counts.rejected
                dropped = counts.rejected >= reject_min and counts.rejected >= reject_rate * tried
                by_feature[feature] = 0.0 if dropped else max(_FLOOR, min(1.0, ratio))
            return by_feature[feature]

        weights = {}
        for gene in GENES:
            group = _GROUP[gene]
            weights[gene] = {o: weight((group, o)) for o in space[gene]}
            if not any(w > 0 for w in weights[gene].values()):
                weights[gene] = self._least_rejected(group, weights[gene])
        return weights

    def _least_rejected(self, group: str, options: Mapping[Any, float]) -> dict[Any, float]:
        def rate(option: Any) -> float:
            c = self.counts.get((group, option), _NONE)
            return c.rejected / max(1, c.complete + c.rejected)

        lowest = min(rate(o) for o in options)
        return {o: (_FLOOR if rate(o) == lowest else 0.0) for o in options}


class _Seen:
    """The keys not to propose: finished ones plus those of unfinished trials."""

    def __init__(self, finished: set[str], running: Iterable[str]):
        self.finished = finished
        self.running = set(running)

    def __contains__(self, key: object) -> bool:
        return key in self.finished or key in self.running


def _space_of(distributions: Mapping[str, BaseDistribution]) -> SearchSpace | None:
    """The SearchSpace the relative search space stands for; None if not all eight genes."""
    dists = [distributions.get(g) for g in GENES]
    if not all(isinstance(d, CategoricalDistribution) for d in dists):
        return None
    return _space_of_choices(tuple(d.choices for d in dists))  # type: ignore[union-attr]


@functools.lru_cache(maxsize=64)
def _space_of_choices(choices: tuple[tuple[Any, ...], ...]) -> SearchSpace | None:
    try:
        return SearchSpace(dict(zip(GENES, choices)))
    except KdOptunaError:
        return None


@functools.lru_cache(maxsize=64)
def _cached_distributions(space: SearchSpace) -> tuple[tuple[str, BaseDistribution], ...]:
    return tuple((g, CategoricalDistribution(list(space[g]))) for g in GENES)


def _distributions_of(space: SearchSpace) -> dict[str, BaseDistribution]:
    return dict(_cached_distributions(space))


def _with_fixed(space: SearchSpace, trial: FrozenTrial) -> SearchSpace:
    """``space`` narrowed to the genes an enqueued trial fixes, so lineage tells the truth."""
    fixed = trial.system_attrs.get("fixed_params", {})
    genes = {g: [fixed[g]] for g in GENES if g in fixed}
    if not genes:
        return space
    try:
        narrowed = space.narrow(**genes)
    except KdOptunaError:
        return space
    return narrowed if all(set(narrowed[g]) <= set(space[g]) for g in genes) else space


class EvolutionSampler(BaseSampler):
    """KD-Zero's evolutionary search over the distiller genes; see the module docstring.

    Args:
        population_size: P, the number of best distinct completed distillers that parents
            are drawn from; also the size of the initial population.
        sample_ratio: r, the fraction of the population drawn for each tournament.
        top_k: k, how many of the drawn members (best first) may become parents.
        mutation_prob: probability that each gene of a parent is redrawn (at least one is).
        crossover_prob: probability that a child is a uniform crossover of two parents.
        warm_start: the first specs to try, in order: ``True`` for the classic distillers,
            ``False`` for none (random initial population), or a sequence of specs.
        shrink_after: evaluated (completed or rejected) trials before search-space
            shrinkage starts.
        space: the gene options; must equal what the objective suggests. ``None`` takes them
            from the study's trials, or the whole space for a study without KD trials.
        proposer: the rival of the mutated child in guided selection (Algorithm 1's E):
            a random spec by default, or e.g. an ``LLMProposer``; ``None`` for pure
            mutation/crossover without a contest.
        seed: seed of the random number generator.
        reject_min, reject_rate: an option drops out once at least ``reject_min`` trials with
            it were rejected and they make at least ``reject_rate`` of the trials with it.
        max_tries: attempts to find an unseen child before a fallback.
        screen: distinct children drawn per proposal, of which rho keeps the one it expects
            to score lowest; 1 is Algorithm 1's single mutation. On digits three random
            candidates in four, and most one-gene mutations, are rejected: screening is what
            keeps the evolved children from being rejected as often.
    """

    def __init__(
        self,
        population_size: int = 20,
        sample_ratio: float = 0.25,
        top_k: int = 5,
        mutation_prob: float = 0.15,
        crossover_prob: float = 0.25,
        warm_start: bool | Sequence[DistillerSpec] = True,
        shrink_after: int = 50,
        space: SearchSpace | None = None,
        proposer: Proposer | None = RandomProposer(),
        seed: int | None = None,
        *,
        reject_min: int = 3,
        reject_rate: float = 0.8,
        max_tries: int = 64,
        screen: int = 8,
    ) -> None:
        if min(population_size, top_k, max_tries, reject_min, screen) < 1:
            raise SamplerConfigError(
                "population_size, top_k, max_tries, reject_min and screen must be at least 1"
            )
        for name, p in [
            ("sample_ratio", sample_ratio),
            ("mutation_prob", mutation_prob),
            ("crossover_prob", crossover_prob),
            ("reject_rate", reject_rate),
        ]:
            if not 0.0 <= p <= 1.0:
                raise SamplerConfigError(f"{name} must be between 0 and 1, got {p}")
        if sample_ratio == 0.0:
            raise SamplerConfigError("sample_ratio must be above 0")
        if shrink_after < 0:
            raise SamplerConfigError(f"shrink_after must be >= 0, got {shrink_after}")
        self.population_size = int(population_size)
        self.sample_ratio = float(sample_ratio)
        self.top_k = int(top_k)
        self.mutation_prob = float(mutation_prob)
        self.crossover_prob = float(crossover_prob)
        if warm_start is True:
            self.warm_start: tuple[DistillerSpec, ...] = tuple(classic_specs())
        else:
            self.warm_start = tuple(warm_start or ())
        self.shrink_after = int(shrink_after)
        self.space = space
        self.proposer = proposer
        self.reject_min = int(reject_min)
        self.reject_rate = float(reject_rate)
        self.max_tries = int(max_tries)
        self.screen = int(screen)
        self._rng = LazyRandomState(seed)
        self._random = RandomSampler(seed=None if seed is None else seed + 1)
        self._mutation = MutationProposer()
        self._crossover = CrossoverProposer()
        self._fallback = RandomProposer()
        self._lock = threading.Lock()
        self._histories: dict[tuple[int, int], _History] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        state["_histories"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def reseed_rng(self) -> None:
        self._rng.rng.seed()
        self._random.reseed_rng()

    # -- what the study says -------------------------------------------------------------

    def _history(self, study: Study, fresh: bool = False) -> _History:
        """Bring this process's cache of ``study`` up to date and return it (hold the lock).

        Reads Optuna's per-trial snapshot of the trial list, or the storage if ``fresh``.
        A snapshot older than what the cache has absorbed is ignored: trials are never
        deleted, so a shorter list can only be an older one.
        """
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        cache_key = (id(study._storage), study._study_id)
        history = self._histories.get(cache_key)
        if fresh:
            trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
        else:
            trials = study._get_trials(deepcopy=False, use_cache=True)
        stale = history is None or history.storage is not study._storage
        if not stale and history.frontier:
            if len(trials) < history.frontier:
                return history
            stale = trials[history.frontier - 1].number != history.frontier - 1
        if stale or history.sign != sign:
            history = _History(study._storage, study._study_id, sign, self.population_size)
            self._histories[cache_key] = history
        history.update(trials)
        return history

    def _space_for(self, history: _History) -> SearchSpace:
        if self.space is not None:
            return self.space
        if history.distributions is not None:
            space = _space_of(history.distributions)
            if space is not None:
                return space
        return SearchSpace()

    def _weights(self, history: _History, space: SearchSpace) -> dict[str, dict[Any, float]]:
        return history.weights(space, self.shrink_after, self.reject_min, self.reject_rate)

    def space_weights(self, study: Study) -> dict[str, dict[Any, float]]:
        """The option weights in force for ``study``: gene -> option -> weight in [0, 1].

        A pure function of the trial list. Before ``shrink_after`` trials were evaluated every
        weight is 1. After, with ``n`` completed trials, the population's ``P' <= P`` members
        and, per option ``o`` (the three transform slots pooled, each on canonical specs):
        ``c_o`` completed trials with ``o``, ``e_o`` population members with ``o``,
        ``j_o`` rejected trials with ``o``::

            weight(o) = clip((e_o + 1) / (c_o * P' / n + 1), 0.05, 1)
            weight(o) = 0  if j_o >= reject_min and j_o >= reject_rate * (c_o + j_o)

        so an option seldom among the best is drawn less, one that keeps being rejected not
        at all; if a gene would lose every option, its least-rejected ones stay at 0.05.
        Mutation and random specs draw options in proportion to these weights.
        """
        with self._lock:
            history = self._history(study)
            return self._weights(history, self._space_for(history))

    # -- BaseSampler -----------------------------------------------------------------------

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        self._raise_error_if_multi_objective(study)
        fixed = trial.system_attrs.get("fixed_params", {})
        if all(gene in fixed for gene in GENES):
            return {}
        if self.space is not None:
            return _distributions_of(self.space)
        with self._lock:
            history = self._history(study)
            if history.distributions is None and history.saw_other_params:
                return {}
            return _distributions_of(self._space_for(history))

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        self._raise_error_if_multi_objective(study)
        params: dict[str, Any] = {}
        space = _space_of(search_space)
        if space is not None:
            params.update(self._propose(study, trial, _with_fixed(space, trial)))
        for name, distribution in search_space.items():
            if name not in params:
                params[name] = self._random.sample_independent(study, trial, name, distribution)
        return params

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        self._raise_error_if_multi_objective(study)
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    # -- one child -------------------------------------------------------------------------

    def _propose(self, study: Study, trial: FrozenTrial, space: SearchSpace) -> dict[str, Any]:
        """Choose, announce and record one child; yield to an earlier trial with its key."""
        lost: list[str] = []
        for _ in range(_CLAIM_ROUNDS):
            child, attrs = self._announce(study, trial, space, lost)
            repeat = attrs.get("sampler_note") == _REPEAT_NOTE
            if repeat or not self._claimed_elsewhere(study, trial, child.spec.key):
                break
            lost.append(child.spec.key)
        if lost:
            yielded = f"yielded {len(lost)} key(s) to trials that claimed them"
            attrs["sampler_note"] = "; ".join(filter(None, [yielded, attrs.get("sampler_note")]))
        lineage = {
            "proposer": child.proposer,
            "parent": child.parent,
            "mutated": list(child.mutated),
        }
        if child.second_parent is not None:
            lineage["crossover_parent"] = child.second_parent
        for key, value in {**lineage, **attrs}.items():
            study._storage.set_trial_user_attr(trial._trial_id, key, value)
        return child.spec.to_params()

    def _announce(
        self, study: Study, trial: FrozenTrial, space: SearchSpace, lost: list[str]
    ) -> tuple[Candidate, dict[str, Any]]:
        attrs: dict[str, Any] = {}
        context = None
        with self._lock:
            history = self._history(study, fresh=bool(lost))
            weights = self._weights(history, space)
            seen = _Seen(history.finished_keys, history.running_keys + lost)
            if self._initial_phase(history, lost):
                child = self._initial(space, weights, seen)
            else:
                child, context = self._evolve(history, space, weights, seen)
        # The rival may take seconds (a language model): other threads go on meanwhile.
        rivals = self.proposer.propose(context) if context and self.proposer else []
        with self._lock:
            child = self._select(history.predictor, child, rivals, attrs)
            if child is None:
                child = self._last_resort(space, weights, seen, attrs)
            if history.n_evaluated >= self.shrink_after:
                attrs["space_state"] = _summary(weights, history.n_evaluated)
            study._storage.set_trial_system_attr(
                trial._trial_id, PROPOSED_KEY_ATTR, child.spec.key
            )
        return child, attrs

    def _claimed_elsewhere(self, study: Study, trial: FrozenTrial, key: str) -> bool:
        """Whether another trial finished, waits or runs with ``key`` (read afresh).

        Each worker announces its key and only then looks, so of two workers that chose one
        key at the same moment at least one sees the other and chooses again (both may: the
        key is then simply left for later). Threads of one process do the same, since the
        sampler's lock is not held while a proposer works.
        """
        with self._lock:
            history = self._history(study, fresh=True)
            return key in history.finished_keys or any(
                other.number != trial.number and _announced_key(other) == key
                for other in history.unfinished
            )

    def _context(self, history, space, weights, seen, parents) -> ProposalContext:
        return ProposalContext(
            space=space,
            weights=weights,
            population=history.members(),
            parents=parents,
            seen=seen,
            rng=self._rng.rng,
            mutation_prob=self.mutation_prob,
            max_tries=self.max_tries,
        )

    def _initial_phase(self, history: _History, lost: list[str]) -> bool:
        """Line 1: until ``population_size`` distinct keys were proposed, or none completed.

        The initial population is the first P proposals, not the first P completions: with
        many candidates rejected (70% of random specs on digits) waiting for P completions
        would keep the search random for several times P trials.
        """
        proposed = len(history.finished_keys) + len(set(history.running_keys)) + len(lost)
        return not history.best or proposed < self.population_size

    def _initial(self, space, weights, seen) -> Candidate | None:
        for spec in self.warm_start:
            if space.contains(spec) and spec.key not in seen:
                return Candidate(spec, "classic" if spec in _CLASSICS else "warm_start")
        context = self._context_without_population(space, weights, seen)
        found = self._fallback.propose(context)
        return found[0] if found else None

    def _context_without_population(self, space, weights, seen) -> ProposalContext:
        return ProposalContext(
            space=space,
            weights=weights,
            population=(),
            parents=(),
            seen=seen,
            rng=self._rng.rng,
            mutation_prob=self.mutation_prob,
            max_tries=self.max_tries,
        )

    def _tournament(self, population: Sequence[Member]) -> list[Member]:
        """Lines 5-7: a random ``sample_ratio`` of the population, its ``top_k`` best."""
        size = max(1, int(round(self.sample_ratio * len(population))))
        drawn = sorted(self._rng.rng.choice(len(population), size=size, replace=False))
        return [population[int(i)] for i in drawn[: self.top_k]]

    def _evolve(self, history, space, weights, seen) -> tuple[Candidate | None, ProposalContext]:
        """Lines 5-8: tournament, then crossover (at ``crossover_prob``) or mutation.

        ``screen`` distinct children are drawn and rho keeps the one it expects to score
        lowest (rejections counted); with ``screen=1``, Algorithm 1's single mutation.
        """
        parents = self._tournament(history.members())
        context = self._context(history, space, weights, seen, parents)
        crossover = len(parents) >= 2 and self._rng.rng.random_sample() < self.crossover_prob
        children: dict[str, Candidate] = {}
        for _ in range(self.screen):
            child = next(iter(self._crossover.propose(context)), None) if crossover else None
            child = child or next(iter(self._mutation.propose(context)), None)
            if child is None:
                break
            children.setdefault(child.spec.key, child)
        if not children:
            return None, context
        predictor = history.predictor
        if predictor.n < 2:
            return next(iter(children.values())), context
        return min(children.values(), key=lambda c: predictor.expected(c.spec)), context

    def _select(self, predictor, child, rivals, attrs) -> Candidate | None:
        """Lines 11-15: keep the candidate rho expects to score lower, rejections counted."""
        if not rivals:
            return child
        if child is None or predictor.n < 2:
            return child or rivals[0]
        rival = min(rivals, key=lambda c: predictor.expected(c.spec))
        rho_child, rho_rival = predictor.expected(child.spec), predictor.expected(rival.spec)
        winner = rival if rho_rival < rho_child else child
        attrs["predictor"] = {
            "winner": winner.proposer,
            "rho": {child.proposer: rho_child, rival.proposer: rho_rival},
            "reject": {
                child.proposer: predictor.reject_probability(child.spec),
                rival.proposer: predictor.reject_probability(rival.spec),
            },
        }
        return winner

    def _last_resort(self, space, weights, seen, attrs) -> Candidate:
        context = self._context_without_population(space, weights, seen)
        found = self._fallback.propose(context)
        if found:
            attrs["sampler_note"] = "no new child from the population; drew a random spec"
            return found[0]
        unseen = _first_unseen(space, seen)
        if unseen is not None:
            attrs["sampler_note"] = "random draws found nothing new; took an unseen spec"
            return Candidate(unseen, "random")
        attrs["sampler_note"] = _REPEAT_NOTE
        return Candidate(random_spec(weights, self._rng.rng), "random")


def _first_unseen(space: SearchSpace, seen: _Seen, limit: int = 100_000) -> DistillerSpec | None:
    """The first spec of the space, in option order, whose key is unseen (bounded scan)."""
    for i, values in enumerate(itertools.product(*(space[g] for g in GENES))):
        if i >= limit:
            return None
        spec = DistillerSpec(*values)
        if spec.key not in seen:
            return spec
    return None


def _summary(weights: Mapping[str, Mapping[Any, float]], basis: int) -> dict[str, Any]:
    """A short account of the weights: trials they derive from, dropped and damped options."""
    dropped = {g: [o for o, w in ws.items() if w == 0] for g, ws in weights.items()}
    damped = {g: sum(1 for w in ws.values() if 0 < w < 1) for g, ws in weights.items()}
    return {
        "basis": basis,
        "dropped": {g: v for g, v in dropped.items() if v},
        "damped": {g: n for g, n in damped.items() if n},
    }
