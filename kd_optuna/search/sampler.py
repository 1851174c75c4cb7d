"""EvolutionSampler: KD-Zero's evolutionary search (Algorithm 1) as an Optuna sampler.

It evolves whatever the objective suggests: the eight distiller genes, any other categorical,
int or float (log, step) parameters, and conditional ones. Everything the search needs is
derived from the study's trials, so any number of worker processes on one storage cooperate
without talking to each other:

- **search space**: the relative search space is the intersection of the distributions of
  the finished (COMPLETE or PRUNED) trials, as Optuna's
  ``optuna.search_space.IntersectionSearchSpace(include_pruned=True)`` computes it, kept
  incrementally. A param outside it (a conditional one, or any param before a trial has
  finished) is sampled independently: from the child's plan where it has one, else inherited
  from the parent or the best population member that has it, mutated at ``mutation_prob``
  (always when the child repeats a trial, the space being exhausted: the conditional params
  are then all that can make it new), else at random.
- **genome**: the distiller genes when they are in the relative space, when some trial had
  them, or when ``space`` is given and no trial without them has finished, plus every other
  param of the relative space. While no
  finished trial has any param, the study may search distillers or not: the child is
  proposed (and its lineage written) only when the objective asks for a gene, over the
  choices of the genes it has offered by then.
- **population**: the best ``population_size`` distinct COMPLETE trials, distinct by the key
  ``DistillerSpec.from_params(trial.params).key`` followed by the trial's other params (see
  ``kd_optuna.search.evolution.genome_key``); scores are the trial values, negated for a maximised
  study, so lower is better throughout.
- **initial population** (line 1): until ``population_size`` distinct keys have been
  proposed (and while none has completed), a child is the next warm-start spec (the classic
  distillers, in order) whose distiller no trial has yet, whatever its other params (drawn
  at random), then a random genome. Rejected candidates count as proposed, so a high rejection rate does not
  keep the search random.
- **child** (lines 5-8): a tournament draws ``d = round(sample_ratio * P)`` members of the
  population (``P`` its current size), keeps its ``top_k`` best (``d > top_k`` is required of
  the settings, so the tournament selects), and a parent is picked among them; with
  ``crossover_prob`` uniform crossover with a second top-k parent, otherwise mutation of one
  or more genes and params (each with ``mutation_prob``; a number takes a Gaussian step of
  ``mutation_scale`` times its (log-)range). ``screen`` such children are drawn and rho keeps
  the most promising (``screen=1``: one, as in the paper).
- **guided selection** (lines 9-15): the ``proposer`` (a random genome by default, as in
  Algorithm 1, or a language model for the genes) offers a rival E; the additive predictor
  rho fitted on the completed and rejected trials keeps the one with the lower expected score
  (see ``kd_optuna.search.predictor``; its cells are the canonical gene options and the values or
  range bins of the other params). Ties and an untrained predictor keep the mutated child.
- **never again**: a key that is COMPLETE, PRUNED (rejected), FAILED, RUNNING or WAITING is
  never proposed; only COMPLETE trials are parents. A worker announces its child's key in the
  system attr ``kd_optuna:proposed_key``, then re-reads the storage and chooses again if
  another trial has that key (up to 8 rounds), so two workers (or threads) that chose the
  same key at the same moment do not both run it: of the two, at least one sees the other.
  A trial that lost a key during the initial population draws its next warm start at random
  (workers started together would otherwise walk the classics in lockstep and collide every
  round); one whose every round was lost runs its last key anyway and says so in
  ``lineage:sampler_note``.
- **shrinkage** (genes only): once ``shrink_after`` trials have been evaluated (completed or
  rejected: on digits three candidates in four are rejected, and rejections are what
  shrinkage learns from first), the option weights follow
  :meth:`EvolutionSampler.space_weights`, a pure function of the trial list (see there).

Lineage is written as user attrs of the trial, each under the prefix ``lineage:``
(``kd_optuna.search.lineage``, whose ``read_lineage(trial)`` reads them, and the un-prefixed names that
earlier versions wrote): ``lineage:proposer`` ("classic", "warm_start", "random", "mutation",
"crossover", "llm", ...), ``lineage:parent`` (trial number or None), ``lineage:crossover_parent``
(crossover only), ``lineage:mutated`` (genes and params), ``lineage:predictor`` (the rho of each
contestant and the winner, when there was a contest), ``lineage:space_state`` (the shrinkage in
force, once ``shrink_after`` trials were evaluated; before that every weight is 1) and
``lineage:sampler_note`` when a fallback was needed.

The only thing held in memory between calls beyond a cache of the storage is the plan of a
trial in progress (its child and parent, until ``after_trial``), which only the process that
runs that trial reads.

Cost: each process keeps a per-study cache of what it has derived
(``kd_optuna.search.history.StudyHistory``; the shrinkage's counts and weights are
``kd_optuna.search.shrinkage``). Finished trials never change, so each is read once: the cache
holds the index of the first unfinished trial (the ``frontier``) and the numbers of trials
finished beyond it, and each sample scans only from the frontier (the RUNNING/WAITING trials
plus those finished since the last call). Population, search space, option counts and rho's
statistics (the inverse of its ridge system included) are updated per absorbed trial
(O(P + cells^2)); weights are recomputed only when a trial was absorbed. What remains
proportional to the study size is listing the trials (Optuna's per-trial snapshot of the
list, see ``kd_optuna.optuna_private.cached_trials``, and one fresh ``study.get_trials`` for
the claim check), which any sampler reading the history pays.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
from typing import Any, Iterable, Mapping, Sequence

from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from kd_optuna.search import evolution
from kd_optuna import optuna_private
from kd_optuna.distill.classics import classic_specs
from kd_optuna.errors import KdOptunaError
from kd_optuna.search.history import PROPOSED_KEY_ATTR, StudyHistory, announced_key  # noqa: F401 - PROPOSED_KEY_ATTR: imported from here
from kd_optuna.search.lineage import attr_name
from kd_optuna.search.predictor import spec_cells
from kd_optuna.search.proposers import (
    Candidate,
    CrossoverProposer,
    Member,
    MutationProposer,
    ProposalContext,
    Proposer,
    RandomProposer,
    random_spec,
)
from kd_optuna.space import GENES, DistillerSpec, SearchSpace

_CLASSICS = frozenset(classic_specs())
_CLAIM_ROUNDS = 8
#: ``lineage:sampler_note`` of a trial proposed when every key of the space was seen: it repeats one.
REPEAT_NOTE = "every distiller in the space was seen; proposing a repeat"
_REPEAT_DRAWN_NOTE = "no unseen setting in {} random draws; proposing a repeat"
_MAX_PLANS = 4096
#: The largest ``seed``: numpy's 2**32 - 1 with room for the worker offsets of ``optimize``.
MAX_SEED = 2**31 - 1


class _DefaultProposer:
    """The type of :data:`DEFAULT_PROPOSER` (``None`` already means "no proposer")."""

    def __repr__(self) -> str:
        return "DEFAULT_PROPOSER"


#: Default of ``EvolutionSampler(proposer=...)``: each sampler builds its own ``RandomProposer()``
#: (a default instance in the signature would be one object shared by every sampler).
DEFAULT_PROPOSER = _DefaultProposer()


class SamplerConfigError(KdOptunaError, ValueError):
    """An EvolutionSampler argument out of range."""


@dataclasses.dataclass
class _Plan:
    """A trial in progress: the params chosen for it and where the rest may come from;
    ``lazy``, the genome to propose over once the objective asks for a gene (a new study);
    ``repeat``, the params are those of another trial (the space is exhausted), so only the
    params outside them (conditional ones) can make the trial new."""

    params: dict[str, Any]
    parent: Member | None
    population: Sequence[Member]
    lazy: Any = None
    repeat: bool = False


class _Seen:
    """The keys not to propose: finished ones plus those of unfinished trials; and the
    distillers of those keys (``finished_distillers``: of the finished ones)."""

    def __init__(self, finished: set[str], running: Iterable[str], finished_distillers: set[str]):
        self.finished = finished
        self.running = set(running)
        self.finished_distillers = finished_distillers
        self.running_distillers = {evolution.distiller_of(key) for key in self.running}

    def __contains__(self, key: object) -> bool:
        return key in self.finished or key in self.running

    def has_distiller(self, spec: DistillerSpec) -> bool:
        """Whether some trial has ``spec``'s distiller, whatever its other params."""
        return spec.key in self.finished_distillers or spec.key in self.running_distillers


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


def _fixed_params(study: Study, trial: FrozenTrial) -> dict[str, Any]:
    """The params ``trial`` takes whatever the sampler proposes: those an enqueued trial fixes
    and, where it does not, those a ``PartialFixedSampler`` around this sampler fixes."""
    return {**optuna_private.wrapper_fixed_params(study), **trial.system_attrs.get("fixed_params", {})}


def _with_fixed(space: SearchSpace, fixed: Mapping[str, Any]) -> SearchSpace:
    """``space`` narrowed to the genes ``fixed`` (:func:`_fixed_params`), so the child's key
    and lineage are those of the spec that runs."""
    genes = {g: [fixed[g]] for g in GENES if g in fixed}
    if not genes:
        return space
    try:
        narrowed = space.narrow(**genes)
    except KdOptunaError:
        return space
    return narrowed if all(set(narrowed[g]) <= set(space[g]) for g in genes) else space



@dataclasses.dataclass(frozen=True)
class _Genome:
    """What a child is made of: the gene options (``None``: no genes) and the other params;
    ``relative`` is the relative search space the child is returned over; ``assumed``: the
    study has no finished trial with params, so the genes are a guess, proposed only once
    the objective asks for one."""

    genes: SearchSpace | None
    extra: dict[str, BaseDistribution]
    relative: dict[str, BaseDistribution]
    assumed: bool = False


def _check_settings(
    population_size: int,
    sample_ratio: float,
    top_k: int,
    *,
    mutation_prob: float,
    crossover_prob: float,
    shrink_after: int,
    reject_min: int,
    reject_rate: float,
    max_tries: int,
    screen: int,
    mutation_scale: float,
    seed: int | None = None,
) -> None:
    """Raise SamplerConfigError for the first ``EvolutionSampler`` setting out of range: a count
    below 1, a probability outside [0, 1], ``sample_ratio`` 0, a tournament that keeps all it
    draws (``round(sample_ratio * population_size) <= top_k`` with more than one member),
    ``shrink_after`` below 0, ``mutation_scale`` not above 0, or a ``seed`` outside
    [0, MAX_SEED] (numpy's generators take [0, 2**32 - 1]; the sampler adds 1, and
    ``kd-optuna optimize`` the worker's index)."""
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise SamplerConfigError(f"seed must be from 0 to {MAX_SEED}, got {seed}")
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
    drawn = int(round(sample_ratio * population_size))
    if drawn <= top_k and population_size > 1:
        raise SamplerConfigError(
            f"the tournament draws round(sample_ratio * population_size) = {drawn} members "
            f"and keeps top_k = {top_k}: it must draw more than it keeps to select"
        )
    if shrink_after < 0:
        raise SamplerConfigError(f"shrink_after must be >= 0, got {shrink_after}")
    if not mutation_scale > 0:
        raise SamplerConfigError(f"mutation_scale must be above 0, got {mutation_scale}")


class EvolutionSampler(BaseSampler):
    """KD-Zero's evolutionary search over distiller genes and any other params; see the module
    docstring.

    Args:
        population_size: P, the number of best distinct completed trials that parents
            are drawn from; also the size of the initial population.
        sample_ratio: r, the fraction of the population drawn for each tournament; by
            default 0.5, or ``(k + 1) / P`` where that is more.
        top_k: k, how many of the drawn members (best first) may become parents; by default
            2 (1 for a population of 2). The draw ``round(r * P)`` must be larger than ``k``,
            or the tournament selects nothing: with the defaults the best of P = 20 members
            is a parent in one tournament in four, the worst eight never.
        mutation_prob: probability that each gene or param of a parent mutates (at least one
            does).
        crossover_prob: probability that a child is a uniform crossover of two parents.
        warm_start: the first specs to try, in order: ``True`` for the classic distillers,
            ``False`` for none (random initial population), or a sequence of specs.
        shrink_after: evaluated (completed or rejected) trials before search-space
            shrinkage starts.
        space: the gene options. ``None`` takes them from the study's trials (what the
            objective suggests), or the whole space for a study without KD trials.
        proposer: the rival of the mutated child in guided selection (Algorithm 1's E):
            by default (:data:`DEFAULT_PROPOSER`) a fresh ``RandomProposer()`` of this sampler's
            own, a random genome; or e.g. an ``LLMProposer``; ``None`` for pure
            mutation/crossover without a contest.
        seed: seed of the random number generator.
        reject_min, reject_rate: an option drops out once at least ``reject_min`` trials with
            it were rejected and they make at least ``reject_rate`` of the trials with it.
        max_tries: attempts to find an unseen child before a fallback.
        screen: distinct children drawn per proposal, of which rho keeps the one it expects
            to score lowest; 1 is Algorithm 1's single mutation. On digits three random
            candidates in four, and most one-gene mutations, are rejected: screening is what
            keeps the evolved children from being rejected as often.
        mutation_scale: standard deviation of a mutated number's Gaussian step, as a fraction
            of its range (of ``log`` range for a log distribution).
    """

    def __init__(
        self,
        population_size: int = 20,
        sample_ratio: float | None = None,
        top_k: int | None = None,
        mutation_prob: float = 0.15,
        crossover_prob: float = 0.25,
        warm_start: bool | Sequence[DistillerSpec] = True,
        shrink_after: int = 50,
        space: SearchSpace | None = None,
        proposer: Proposer | None | _DefaultProposer = DEFAULT_PROPOSER,
        seed: int | None = None,
        *,
        reject_min: int = 3,
        reject_rate: float = 0.8,
        max_tries: int = 64,
        screen: int = 8,
        mutation_scale: float = 0.1,
    ) -> None:
        if top_k is None:
            top_k = 2 if population_size >= 3 else 1
        if sample_ratio is None:
            sample_ratio = min(1.0, max(0.5, (top_k + 1) / max(1, population_size)))
        _check_settings(
            population_size, sample_ratio, top_k, mutation_prob=mutation_prob, crossover_prob=crossover_prob,
            shrink_after=shrink_after, reject_min=reject_min, reject_rate=reject_rate, max_tries=max_tries,
            screen=screen, mutation_scale=mutation_scale, seed=seed,
        )
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
        self.proposer = RandomProposer() if isinstance(proposer, _DefaultProposer) else proposer
        self.reject_min = int(reject_min)
        self.reject_rate = float(reject_rate)
        self.max_tries = int(max_tries)
        self.screen = int(screen)
        self.mutation_scale = float(mutation_scale)
        self._rng = optuna_private.lazy_random_state(seed)
        self._random = RandomSampler(seed=None if seed is None else seed + 1)
        self._mutation = MutationProposer()
        self._crossover = CrossoverProposer()
        self._fallback = RandomProposer()
        self._lock = threading.Lock()
        self._histories: dict[tuple[int, int], StudyHistory] = {}
        self._plans: dict[tuple[int, int], _Plan] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_lock"]
        state["_histories"] = {}
        state["_plans"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def reseed_rng(self) -> None:
        self._rng.rng.seed()
        self._random.reseed_rng()

    # -- what the study says -------------------------------------------------------------

    def _history(self, study: Study, fresh: bool = False) -> StudyHistory:
        """Bring this process's cache of ``study`` up to date and return it (hold the lock).

        Reads Optuna's per-trial snapshot of the trial list, or the storage if ``fresh``.
        A snapshot older than what the cache has absorbed is ignored: trials are never
        deleted, so a shorter list can only be an older one.
        """
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        storage = optuna_private.study_storage(study)
        cache_key = (id(storage), optuna_private.study_id(study))
        history = self._histories.get(cache_key)
        if fresh:
            trials = study.get_trials(deepcopy=False)
        else:
            trials = optuna_private.cached_trials(study)
        stale = history is None or history.storage is not storage
        if not stale and history.frontier:
            if len(trials) < history.frontier:
                return history
            stale = trials[history.frontier - 1].number != history.frontier - 1
        if stale or history.sign != sign:
            history = StudyHistory(storage, cache_key[1], sign, self.population_size)
            self._histories[cache_key] = history
        history.update(trials)
        return history

    def _gene_space(self, history: StudyHistory) -> SearchSpace | None:
        """The gene options of the genome, or ``None`` if the study has no distiller genes."""
        relative = _space_of(history.space) if history.space else None
        if relative is not None:
            if self.space is None:
                return relative
            narrowed = {g: [o for o in relative[g] if o in self.space[g]] for g in GENES}
            return relative.narrow(**narrowed) if all(narrowed.values()) else relative
        if history.saw_params and history.distributions is None:
            return None  # trials with params, none with the genes: not a distiller study
        if self.space is not None:
            return self.space
        if history.distributions is not None:
            return _space_of(history.distributions) or SearchSpace()
        return SearchSpace()

    def _space_for(self, history: StudyHistory) -> SearchSpace:
        return self._gene_space(history) or SearchSpace()

    def _genome(self, history: StudyHistory) -> _Genome:
        """The genome of the next child; recomputed only when a trial was absorbed."""
        if history.genome[0] != history.version:
            genes = self._gene_space(history)
            relative = dict(sorted((history.space or {}).items()))
            extra = {n: d for n, d in relative.items() if genes is None or n not in GENES}
            assumed = (
                self.space is None and history.distributions is None and not history.saw_params
            )
            history.genome = (history.version, _Genome(genes, extra, relative, assumed))
        return history.genome[1]

    def _weights(self, history: StudyHistory, space: SearchSpace) -> dict[str, dict[Any, float]]:
        return history.weights(space, self.shrink_after, self.reject_min, self.reject_rate)

    def space_weights(self, study: Study) -> dict[str, dict[Any, float]]:
        """The option weights in force for ``study``: gene -> option -> weight in [0, 1].

        A pure function of the trial list. Before ``shrink_after`` trials were evaluated every
        weight is 1. After, with ``n`` completed trials with genes, the population's ``P' <= P``
        members with genes and, per option ``o`` (the three transform slots pooled, each on
        canonical specs): ``c_o`` completed trials with ``o``, ``e_o`` population members with
        ``o``, ``j_o`` rejected trials with ``o``::

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
        """The intersection of the finished trials' distributions (see the module docstring)."""
        self._raise_error_if_multi_objective(study)
        with self._lock:
            genome = self._genome(self._history(study))
        fixed = _fixed_params(study, trial)
        names = set(genome.relative) | (set(GENES) if genome.genes is not None else set())
        if names and names <= set(fixed):
            return {}
        return dict(genome.relative)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        self._raise_error_if_multi_objective(study)
        with self._lock:
            genome = self._genome(self._history(study))
        fixed = _fixed_params(study, trial)
        names = set(genome.relative) | (set(GENES) if genome.genes is not None else set())
        if not names or names <= set(fixed):
            return {}
        if genome.assumed:
            self._store(study, trial, _Plan({}, None, (), lazy=genome))
            return {}
        params = self._plan(study, trial, genome).params
        return {n: params[n] for n in search_space if n in params}

    def _plan(self, study: Study, trial: FrozenTrial, genome: _Genome) -> _Plan:
        """Propose the trial's child over ``genome`` and remember it as the trial's plan."""
        fixed = _fixed_params(study, trial)
        genes = _with_fixed(genome.genes, fixed) if genome.genes is not None else None
        extra = {n: _pinned(d, n, fixed) for n, d in genome.extra.items()}
        child, population, repeat = self._propose(
            study, trial, dataclasses.replace(genome, genes=genes, extra=extra)
        )
        parent = next((m for m in population if m.number == child.parent), None)
        return self._store(study, trial, _Plan(child.params(), parent, population, repeat=repeat))

    def _store(self, study: Study, trial: FrozenTrial, plan: _Plan) -> _Plan:
        with self._lock:
            if len(self._plans) >= _MAX_PLANS:
                del self._plans[next(iter(self._plans))]
            self._plans[_plan_key(study, trial)] = plan
        return plan

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """The planned value, else one inherited from the parent (or the best member that
        has the param) and mutated at ``mutation_prob``, else a random one."""
        self._raise_error_if_multi_objective(study)
        with self._lock:
            plan = self._plans.get(_plan_key(study, trial))
        if plan is not None and plan.lazy is not None and param_name in GENES:
            offered = {**trial.distributions, param_name: param_distribution}
            plan = self._plan(study, trial, _offered_genes(plan.lazy, offered))
        with self._lock:
            if plan is not None:
                value = self._from_plan(study, trial, plan, param_name, param_distribution)
                if value is not _NOTHING:
                    return value
        value = self._random.sample_independent(study, trial, param_name, param_distribution)
        if plan is not None and param_name in plan.params:
            note = (
                f"{param_name} = {plan.params[param_name]!r} is not a value the objective "
                f"offers; drew {value!r}"
            )
            optuna_private.set_trial_user_attr(study, trial, attr_name("sampler_note"), note)
        return value

    def _from_plan(
        self, study: Study, trial: FrozenTrial, plan: _Plan, name: str, dist: BaseDistribution
    ) -> Any:
        """The planned value of ``name``; else a donor's, mutated at ``mutation_prob`` (hold
        the lock). When the planned params repeat another trial's, a value no finished trial
        with the params so far has: a mutation of the donor's, else a draw."""
        if name in plan.params:
            value = plan.params[name]
            return value if evolution.contains(dist, value) else _NOTHING
        donors = ([plan.parent] if plan.parent is not None else []) + list(plan.population)
        for member in donors:
            if name in member.extra and evolution.contains(dist, member.extra[name]):
                value = member.extra[name]
                if plan.repeat:
                    return self._new_value(study, trial, name, dist, value)
                if self._rng.rng.random_sample() < self.mutation_prob:
                    value = evolution.mutate_value(dist, value, self._rng.rng, self.mutation_scale)
                return value
        return _NOTHING

    def _new_value(
        self, study: Study, trial: FrozenTrial, name: str, dist: BaseDistribution, value: Any
    ) -> Any:
        """A value of ``name`` that no finished trial with ``trial``'s params so far has: one of
        ``max_tries`` mutations of ``value``, else of as many draws; ``_NOTHING`` if none."""
        taken = self._history(study).taken_values(name, trial.params)
        rng = self._rng.rng
        mutations = (
            evolution.mutate_value(dist, value, rng, self.mutation_scale) for _ in range(self.max_tries)
        )
        draws = (evolution.draw(dist, rng) for _ in range(self.max_tries))
        return next(
            (v for v in itertools.chain(mutations, draws) if (type(v), v) not in taken), _NOTHING
        )

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        with self._lock:
            self._plans.pop(_plan_key(study, trial), None)

    # -- one child -------------------------------------------------------------------------

    def _propose(
        self, study: Study, trial: FrozenTrial, genome: _Genome
    ) -> tuple[Candidate, Sequence[Member], bool]:
        """Choose, announce and record one child; yield to an earlier trial with its key.
        Also returns whether the child repeats another trial's key."""
        lost: list[str] = []
        for _ in range(_CLAIM_ROUNDS):
            child, attrs, population = self._announce(study, trial, genome, lost)
            repeat = attrs.get("sampler_note") in (REPEAT_NOTE, _REPEAT_DRAWN_NOTE.format(self.max_tries))
            if repeat or not self._claimed_elsewhere(study, trial, child.key):
                break
            lost.append(child.key)
        else:
            repeat = True
            lost.pop()
            shared = f"every key chosen in {_CLAIM_ROUNDS} rounds was claimed; {child.key} runs twice"
            attrs["sampler_note"] = "; ".join(filter(None, [shared, attrs.get("sampler_note")]))
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
            optuna_private.set_trial_user_attr(study, trial, attr_name(key), value)
        return child, population, repeat

    def _announce(
        self, study: Study, trial: FrozenTrial, genome: _Genome, lost: list[str]
    ) -> tuple[Candidate, dict[str, Any], Sequence[Member]]:
        attrs: dict[str, Any] = {}
        rivals: list[Candidate] = []
        with self._lock:
            history = self._history(study, fresh=bool(lost))
            space = genome.genes or SearchSpace()
            weights = self._weights(history, space) if genome.genes is not None else {}
            finished = history.finished_keys_over(genome.extra)
            seen = _Seen(finished, history.running_keys + lost, history.finished_distillers)
            context = self._context(history, genome, weights, seen, ())
            evolved = not self._initial_phase(history, lost)
            if evolved:
                child = self._evolve(history, genome, context)
            else:
                child = self._initial(context, seen, after_loss=bool(lost))
        # The rival may take seconds (a language model): other threads go on meanwhile.
        if evolved and self.proposer is not None:
            rivals = self.proposer.propose(context)
        with self._lock:
            child = self._select(history.predictor, genome, child, rivals, attrs)
            if child is None:
                child = self._last_resort(context, attrs)
            child = _fix(child, _fixed_params(study, trial), genome)
            if genome.genes is not None and history.shrinkage.n_evaluated >= self.shrink_after:
                attrs["space_state"] = _summary(weights, history.shrinkage.n_evaluated)
            optuna_private.set_trial_system_attr(study, trial, PROPOSED_KEY_ATTR, child.key)
        return child, attrs, history.members()

    def _claimed_elsewhere(self, study: Study, trial: FrozenTrial, key: str) -> bool:
        """Whether another trial finished, waits or runs with ``key`` (read afresh).

        Each worker announces its key and only then looks, so of two workers that chose one
        key at the same moment at least one sees the other and chooses again (both may: the
        key is then simply left for later). Threads of one process do the same, since the
        sampler's lock is not held while a proposer works.
        """
        with self._lock:
            history = self._history(study, fresh=True)
            finished = history.finished_keys_over(self._genome(history).extra)
            return key in finished or any(
                other.number != trial.number and announced_key(other) == key
                for other in history.unfinished
            )

    def _context(self, history, genome: _Genome, weights, seen, parents) -> ProposalContext:
        return ProposalContext(
            space=genome.genes or SearchSpace(),
            weights=weights,
            population=history.members(),
            parents=parents,
            seen=seen,
            rng=self._rng.rng,
            mutation_prob=self.mutation_prob,
            max_tries=self.max_tries,
            distributions=genome.extra,
            genes=genome.genes is not None,
            scale=self.mutation_scale,
        )

    def _initial_phase(self, history: StudyHistory, lost: list[str]) -> bool:
        """Line 1: until ``population_size`` distinct keys were proposed, or none completed.

        The initial population is the first P proposals, not the first P completions: with
        many candidates rejected (70% of random specs on digits) waiting for P completions
        would keep the search random for several times P trials.
        """
        proposed = len(history.finished_keys) + len(set(history.running_keys)) + len(lost)
        return not history.best or proposed < self.population_size

    def _initial(
        self, context: ProposalContext, seen: _Seen, after_loss: bool = False
    ) -> Candidate | None:
        """The first warm start whose distiller no trial has (whatever its other params: a
        study that also searches a learning rate tries each classic once), else a random
        candidate.

        ``after_loss``: this trial lost its key to another trial, which chose it at the same
        moment from the same list. Taking the next warm start in order would have every such
        worker choose the same key again, round after round (workers started together move
        in lockstep), so the warm start is drawn at random among those not yet seen.
        """
        if context.genes:
            unseen = []
            for spec in self.warm_start:
                if not context.space.contains(spec):
                    continue
                if not seen.has_distiller(spec):
                    unseen.append((spec, context.random_extra()))
                    if not after_loss:
                        break
            if unseen:
                pick = int(context.rng.randint(len(unseen))) if len(unseen) > 1 else 0
                spec, extra = unseen[pick]
                proposer = "classic" if spec in _CLASSICS else "warm_start"
                return Candidate(spec, proposer, extra=extra)
        found = self._fallback.propose(context)
        return found[0] if found else None

    def _tournament(self, population: Sequence[Member]) -> list[Member]:
        """Lines 5-7: ``round(sample_ratio * P)`` members drawn at random, their ``top_k`` best.

        ``population`` is best first, so the drawn indices sorted are the drawn members best
        first.
        """
        size = max(1, int(round(self.sample_ratio * len(population))))
        drawn = sorted(self._rng.rng.choice(len(population), size=size, replace=False))
        return [population[int(i)] for i in drawn[: self.top_k]]

    def _cells(self, candidate: Candidate, genome: _Genome) -> list[tuple[str, Any]]:
        cells = spec_cells(candidate.spec) if candidate.spec is not None else []
        return cells + evolution.cells(candidate.extra, genome.extra)

    def _evolve(self, history: StudyHistory, genome: _Genome, context: ProposalContext):
        """Lines 5-8: tournament, then crossover (at ``crossover_prob``) or mutation.

        ``screen`` distinct children are drawn and rho keeps the one it expects to score
        lowest (rejections counted); with ``screen=1``, Algorithm 1's single mutation.
        """
        context.parents = self._tournament(history.members())
        crossover = (
            len(context.parents) >= 2 and self._rng.rng.random_sample() < self.crossover_prob
        )
        numbers = {
            n: d
            for n, d in genome.extra.items()
            if not evolution.is_categorical(d) and evolution.can_change(d)
        }
        context.numbers = not numbers
        children: dict[str, Candidate] = {}
        for _ in range(self.screen):
            child = next(iter(self._crossover.propose(context)), None) if crossover else None
            child = child or next(iter(self._mutation.propose(context)), None)
            if child is None:
                break
            children.setdefault(child.key, child)
        context.numbers = True
        if not children:
            return None
        predictor = history.predictor
        best = next(iter(children.values()))
        if predictor.n >= 2:
            best = min(children.values(), key=lambda c: predictor.expected_cells(self._cells(c, genome)))
        return self._mutate_numbers(best, numbers, context) if numbers else best

    def _mutate_numbers(
        self, child: Candidate, numbers: Mapping[str, BaseDistribution], context: ProposalContext
    ) -> Candidate | None:
        """The screened child with each int and float mutated at ``mutation_prob`` (one at
        least if nothing else was), until its key is new (``max_tries``).

        Numbers mutate after rho's screening, not before: a small step rarely leaves its range
        bin, so rho would see no gain in it and screen out every child that only refines a
        number in favour of one that changes a categorical.
        """
        rng = context.rng
        names = sorted(numbers)
        order = {n: i for i, n in enumerate([*GENES, *sorted(context.distributions)])}
        for _ in range(self.max_tries):
            chosen = [n for n in names if rng.random_sample() < self.mutation_prob]
            if not chosen and not child.mutated:
                chosen = [names[int(rng.randint(len(names)))]]
            extra = dict(child.extra)
            for name in chosen:
                extra[name] = evolution.mutate_value(
                    numbers[name], extra[name], rng, self.mutation_scale
                )
            if context.is_new(child.spec, extra):
                mutated = tuple(sorted({*child.mutated, *chosen}, key=order.__getitem__))
                return dataclasses.replace(child, extra=extra, mutated=mutated)
        return None

    def _select(self, predictor, genome, child, rivals, attrs) -> Candidate | None:
        """Lines 11-15: keep the candidate rho expects to score lower, rejections counted."""
        if not rivals:
            return child
        if child is None or predictor.n < 2:
            return child or rivals[0]

        def expected(c: Candidate) -> float:
            return predictor.expected_cells(self._cells(c, genome))

        def reject(c: Candidate) -> float:
            return predictor.reject_probability_cells(self._cells(c, genome))

        rival = min(rivals, key=expected)
        rho_child, rho_rival = expected(child), expected(rival)
        winner = rival if rho_rival < rho_child else child
        attrs["predictor"] = {
            "winner": winner.proposer,
            "rho": {child.proposer: rho_child, rival.proposer: rho_rival},
            "reject": {child.proposer: reject(child), rival.proposer: reject(rival)},
        }
        return winner

    def _last_resort(self, context: ProposalContext, attrs) -> Candidate:
        found = self._fallback.propose(context)
        if found:
            attrs["sampler_note"] = "no new child from the population; drew a random genome"
            return found[0]
        if context.genes and not context.distributions:
            unseen = _first_unseen(context.space, context.seen)  # type: ignore[arg-type]
            if unseen is not None:
                attrs["sampler_note"] = "random draws found nothing new; took an unseen spec"
                return Candidate(unseen, "random")
        exhaustive = context.genes and not context.distributions
        attrs["sampler_note"] = REPEAT_NOTE if exhaustive else _REPEAT_DRAWN_NOTE.format(self.max_tries)
        spec = random_spec(context.weights, context.rng) if context.genes else None
        return Candidate(spec, "random", extra=context.random_extra())


_NOTHING = object()


def _plan_key(study: Study, trial: FrozenTrial) -> tuple[int, int]:
    return id(optuna_private.study_storage(study)), optuna_private.trial_id(trial)


def _offered_genes(genome: _Genome, offered: Mapping[str, BaseDistribution]) -> _Genome:
    """``genome`` with the genes the objective has offered so far (a single choice is never
    asked of the sampler) narrowed to their choices, where that leaves a valid space."""
    if genome.genes is None:
        return genome
    narrowed = {
        g: [c for c in d.choices if c in genome.genes[g]]
        for g, d in offered.items()
        if g in GENES and isinstance(d, CategoricalDistribution)
    }
    try:
        return dataclasses.replace(genome, genes=genome.genes.narrow(**narrowed))
    except KdOptunaError:
        return genome


def _pinned(dist: BaseDistribution, name: str, fixed: Mapping[str, Any]) -> BaseDistribution:
    """``dist`` held to the value ``fixed`` gives ``name``, so that the children are proposed
    and checked for newness with it; ``dist`` where ``name`` is not fixed."""
    if name not in fixed:
        return dist
    return evolution.pinned(dist, fixed[name]) or dist


def _fix(child: Candidate, fixed: Mapping[str, Any], genome: _Genome) -> Candidate:
    """``child`` with the other params ``fixed`` (:func:`_fixed_params`), as the trial will
    have them."""
    extra = {n: fixed[n] for n in genome.extra if n in fixed}
    if not extra:
        return child
    return dataclasses.replace(child, extra={**child.extra, **extra})


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
