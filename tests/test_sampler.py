"""EvolutionSampler on the distiller space: population, lineage, dedup, shrinkage, seeds."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
import zlib

import optuna
import pytest
from optuna.trial import TrialState

from kd_optuna import optuna_private
from kd_optuna.distill.classics import classic_specs
from kd_optuna.errors import KdOptunaError
from kd_optuna.search.lineage import NAMES, PREFIX, read_lineage
from kd_optuna.search.proposers import RandomProposer
from kd_optuna.search.sampler import PROPOSED_KEY_ATTR, EvolutionSampler, SamplerConfigError
from kd_optuna.space import GENES, DistillerSpec, SearchSpace, suggest_distiller

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def score_of(spec: DistillerSpec) -> float:
    """A deterministic score with structure to find: feat + l2 + T1 is good."""
    jitter = zlib.crc32(spec.key.encode()) % 1000 / 10_000
    return (
        (spec.knowledge != "feat") * 1.0
        + (spec.distance != "l2") * 0.5
        + (spec.temperature != 1) * 0.25
        + jitter
    )


def objective(trial: optuna.Trial) -> float:
    return score_of(suggest_distiller(trial))


def key_of(trial) -> str:
    return DistillerSpec.from_params(trial.params).key


def run(sampler, n_trials, func=objective, direction="minimize"):
    study = optuna.create_study(sampler=sampler, direction=direction)
    study.optimize(func, n_trials=n_trials)
    return study


def test_initial_population_starts_with_the_classics_in_order():
    study = run(EvolutionSampler(seed=1), len(classic_specs()) + 3)
    keys = [key_of(t) for t in study.trials]
    assert keys[: len(classic_specs())] == [spec.key for spec in classic_specs()]
    n = len(classic_specs())
    assert all(read_lineage(t)["proposer"] == "classic" for t in study.trials[:n])
    assert all(read_lineage(t)["proposer"] == "random" for t in study.trials[n:])
    assert all(read_lineage(t)["parent"] is None for t in study.trials)


def test_the_classics_run_once_each_when_the_objective_also_suggests_a_learning_rate():
    def func(trial):
        spec = suggest_distiller(trial)
        return score_of(spec) + abs(math.log10(trial.suggest_float("lr", 1e-4, 1e-1, log=True)) + 2)

    n = len(classic_specs())
    study = run(EvolutionSampler(seed=0), n + 3, func=func)
    assert [key_of(t) for t in study.trials[:n]] == [spec.key for spec in classic_specs()]
    assert [read_lineage(t)["proposer"] for t in study.trials[n:]] == ["random"] * 3


def test_a_narrowed_space_skips_classics_outside_it():
    space = SearchSpace().narrow(knowledge=["logit"])
    sampler = EvolutionSampler(space=space, seed=0)
    study = run(sampler, 5, func=lambda t: score_of(suggest_distiller(t, space)))
    logit_classics = [s.key for s in classic_specs() if s.knowledge == "logit"]
    assert [key_of(t) for t in study.trials[: len(logit_classics)]] == logit_classics
    assert all(t.params["knowledge"] == "logit" for t in study.trials)


def test_no_canonical_key_is_evaluated_twice_and_children_follow_the_lineage():
    sampler = EvolutionSampler(population_size=10, seed=3, warm_start=False)
    study = run(sampler, 120)
    keys = [key_of(t) for t in study.trials]
    assert len(set(keys)) == len(keys)
    evolved = [t for t in study.trials if read_lineage(t)["proposer"] == "mutation"]
    assert len(evolved) > 60
    by_number = {t.number: t for t in study.trials}
    for trial in evolved:
        parent = by_number[read_lineage(trial)["parent"]]
        changed = [g for g in GENES if trial.params[g] != parent.params[g]]
        assert changed and changed == read_lineage(trial)["mutated"]


def _best_distinct(trials, size, sign=1.0):
    best: dict[str, tuple[float, int]] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            entry = (sign * t.value, t.number)
            key = key_of(t)
            best[key] = min(best.get(key, entry), entry)
    return {number for _, number in sorted(best.values())[:size]}


@pytest.mark.parametrize("direction, sign", [("minimize", 1.0), ("maximize", -1.0)])
def test_parents_come_from_the_best_distinct_completed_trials(direction, sign):
    sampler = EvolutionSampler(population_size=8, seed=5, warm_start=False, crossover_prob=0.5)
    study = run(sampler, 80, direction=direction)
    for trial in study.trials:
        parents = [read_lineage(trial)["parent"], read_lineage(trial).get("crossover_parent")]
        population = _best_distinct(study.trials[: trial.number], 8, sign)
        for parent in filter(lambda p: p is not None, parents):
            assert parent in population


def test_search_improves_on_its_initial_population():
    study = run(EvolutionSampler(population_size=10, seed=0, warm_start=False), 100)
    first = min(t.value for t in study.trials[:20])
    assert study.best_value < first
    assert study.best_trial.params["knowledge"] == "feat"
    assert study.best_trial.params["distance"] == "l2"


def test_crossover_children_take_each_gene_from_a_parent_unless_mutated():
    sampler = EvolutionSampler(population_size=6, seed=2, crossover_prob=1.0, warm_start=False)
    study = run(sampler, 50)
    by_number = {t.number: t for t in study.trials}
    crossed = [t for t in study.trials if read_lineage(t)["proposer"] == "crossover"]
    assert len(crossed) > 20
    for trial in crossed:
        a = by_number[read_lineage(trial)["parent"]].params
        b = by_number[read_lineage(trial)["crossover_parent"]].params
        for gene in GENES:
            if gene not in read_lineage(trial)["mutated"]:
                assert trial.params[gene] in (a[gene], b[gene])


#: 2 x 2 x 2 x 2 = 16 distinct distillers (no transforms, so no two params share a key).
TINY = SearchSpace().narrow(
    knowledge=["logit", "emb"],
    transform1=["no"],
    transform2=["no"],
    transform3=["no"],
    distance=["l2", "kl"],
    calibration=["no", "entropy"],
    temperature=[1, 4],
    magnitude=[1],
)


def test_rejected_and_failed_keys_are_never_proposed_again_nor_parents():
    space = TINY.narrow(distance=["l2", "kl", "cos", "pear"])
    sampler = EvolutionSampler(population_size=4, seed=0, space=space, warm_start=False)
    study = optuna.create_study(sampler=sampler)

    def func(trial):
        spec = suggest_distiller(trial, space)
        if spec.distance == "cos":
            trial.set_user_attr("reject_reason", "non-finite loss")
            raise optuna.TrialPruned()
        if spec.distance == "pear":
            raise RuntimeError("worker crashed")
        return score_of(spec)

    distinct = {DistillerSpec(*v).key for v in _product(space)}
    study.optimize(func, n_trials=len(distinct), catch=(RuntimeError,))
    keys = [key_of(t) for t in study.trials]
    assert sorted(keys) == sorted(distinct)
    complete = {t.number for t in study.trials if t.state == TrialState.COMPLETE}
    parents = {read_lineage(t)["parent"] for t in study.trials} - {None}
    assert parents and parents <= complete


def _product(space):
    import itertools

    return itertools.product(*(space[g] for g in GENES))


def test_running_and_waiting_keys_are_not_proposed():
    space = SearchSpace().narrow(
        knowledge=["logit"], transform1=["no"], transform2=["no"], transform3=["no"],
        distance=["kl"], calibration=["no"], temperature=[1, 4, 8], magnitude=[1, 10],
    )
    specs = [DistillerSpec(*v) for v in _product(space)]
    study = optuna.create_study(sampler=EvolutionSampler(space=space, seed=0))
    dists = {g: optuna.distributions.CategoricalDistribution(list(space[g])) for g in GENES}
    study.add_trial(optuna.create_trial(params=specs[0].to_params(), distributions=dists, value=1))
    study.enqueue_trial(specs[1].to_params())
    storage = optuna_private.study_storage(study)
    announced = storage.create_new_trial(optuna_private.study_id(study))
    storage.set_trial_system_attr(announced, PROPOSED_KEY_ATTR, specs[2].key)
    half_suggested = study.ask()
    for gene in GENES:
        half_suggested._suggest(gene, dists[gene])
    params_keys = {specs[0].key, specs[1].key, specs[2].key, key_of(half_suggested)}
    for _ in range(2):
        trial = study.ask()
        spec = suggest_distiller(trial, space)
        assert spec.key not in params_keys
        params_keys.add(spec.key)


def test_an_exhausted_space_proposes_a_repeat_and_says_so():
    space = TINY.narrow(knowledge=["logit"], distance=["l2"], calibration=["no"])
    distinct = {DistillerSpec(*v).key for v in _product(space)}
    study = run(EvolutionSampler(space=space, seed=0), len(distinct) + 1,
                func=lambda t: score_of(suggest_distiller(t, space)))
    assert {key_of(t) for t in study.trials} == distinct
    assert "repeat" in read_lineage(study.trials[-1])["sampler_note"]


def test_an_exhausted_space_of_other_params_says_it_drew_no_unseen_setting():
    study = run(EvolutionSampler(seed=0), 4, func=lambda t: t.suggest_categorical("c", ["a", "b", "c"]) == "a")
    assert read_lineage(study.trials[-1])["sampler_note"] == (
        "no unseen setting in 64 random draws; proposing a repeat"
    )


def test_space_weights_drop_rejected_options_and_damp_the_unpromising():
    space = SearchSpace().narrow(
        transform1=["no"], transform2=["no"], transform3=["no"], calibration=["no"]
    )
    sampler = EvolutionSampler(population_size=5, shrink_after=40, seed=0, space=space, screen=1)
    study = optuna.create_study(sampler=sampler)
    assert all(w == 1.0 for ws in sampler.space_weights(study).values() for w in ws.values())

    def func(trial):
        spec = suggest_distiller(trial, space)
        if spec.distance == "hard":
            trial.set_user_attr("reject_reason", "no gradient")
            raise optuna.TrialPruned()
        return score_of(spec)

    study.optimize(func, n_trials=90)
    weights = sampler.space_weights(study)
    assert weights["distance"]["hard"] == 0.0
    assert weights["knowledge"]["feat"] == 1.0
    assert weights["knowledge"]["logit"] < 1.0 and weights["knowledge"]["emb"] < 1.0
    after = [t for t in study.trials if read_lineage(t).get("space_state")]
    assert after and read_lineage(after[-1])["space_state"]["dropped"] == {"distance": ["hard"]}
    late = study.trials[-30:]
    assert all(t.params["distance"] != "hard" for t in late)

    twin = optuna.create_study()
    twin.add_trials(study.trials)
    other = EvolutionSampler(population_size=5, shrink_after=40, seed=99, space=space, screen=1)
    assert other.space_weights(twin) == weights


def test_a_gene_keeps_one_option_when_every_option_is_rejected():
    space = TINY.narrow(distance=["l2", "kl"])
    sampler = EvolutionSampler(population_size=2, shrink_after=1, seed=0, space=space)
    study = optuna.create_study(sampler=sampler)
    dists = {g: optuna.distributions.CategoricalDistribution(list(space[g])) for g in GENES}
    specs = [DistillerSpec(*v) for v in _product(space)]
    kept = next(s for s in specs if s.distance == "l2")
    for spec in specs:
        state = TrialState.COMPLETE if spec == kept else TrialState.PRUNED
        study.add_trial(optuna.create_trial(
            params=spec.to_params(), distributions=dists, state=state,
            value=1.0 if state == TrialState.COMPLETE else None,
            user_attrs={} if state == TrialState.COMPLETE else {"reject_reason": "nan"},
        ))
    weights = sampler.space_weights(study)["distance"]
    assert weights == {"l2": 0.05, "kl": 0.0}


def test_distiller_genes_and_a_learning_rate_evolve_together():
    def func(trial):
        spec = suggest_distiller(trial)
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        width = trial.suggest_int("width", 8, 64, step=8)
        return score_of(spec) + (math.log10(lr) + 2) ** 2 + abs(width - 32) / 100

    sampler = EvolutionSampler(seed=0, population_size=10, warm_start=False)
    study = run(sampler, 150, func=func)
    assert all(1e-4 <= t.params["lr"] <= 1e-1 and t.params["width"] in range(8, 65, 8)
               for t in study.trials)
    by_number = {t.number: t for t in study.trials}
    mutants = [t for t in study.trials if read_lineage(t)["proposer"] == "mutation"]
    assert len(mutants) > 60
    for trial in mutants:
        parent = by_number[read_lineage(trial)["parent"]].params
        changed = [n for n in [*GENES, "lr", "width"] if trial.params[n] != parent[n]]
        assert changed == read_lineage(trial)["mutated"]
    assert {"lr", "width"} & {n for t in mutants for n in read_lineage(t)["mutated"]} == {"lr", "width"}
    assert any(set(read_lineage(t)["mutated"]) & set(GENES) for t in mutants)
    def off(trials):
        return statistics.median(abs(math.log10(t.params["lr"]) + 2) for t in trials)

    initial = [t for t in study.trials if read_lineage(t)["proposer"] == "random"][:10]
    assert len(initial) == 10 and off(study.trials[-50:]) < 0.5 * off(initial)
    assert study.best_trial.params["knowledge"] == "feat"


def test_the_tournament_makes_the_best_member_a_parent_more_often_than_the_worst():
    sampler = EvolutionSampler(population_size=10, seed=0, warm_start=False, crossover_prob=0.0)
    trials = run(sampler, 200).trials
    ranks = []
    for trial in trials:
        parent = read_lineage(trial)["parent"]
        if parent is None:
            continue
        population = sorted(_best_distinct(trials[: trial.number], 10),
                            key=lambda n: (trials[n].value, n))
        if len(population) == 10:
            ranks.append(population.index(parent))
    assert len(ranks) > 150
    assert ranks.count(0) > 3 * max(1, ranks.count(9))
    assert sum(r < 5 for r in ranks) > 0.75 * len(ranks)


def test_a_tournament_that_cannot_select_is_refused_naming_both_values():
    with pytest.raises(SamplerConfigError) as info:
        EvolutionSampler(population_size=12, sample_ratio=0.25, top_k=5)
    message = str(info.value)
    assert "\n" not in message and "= 3" in message and "top_k = 5" in message
    for drawn_equals_kept in [{"population_size": 20, "sample_ratio": 0.25, "top_k": 5},
                              {"population_size": 4, "sample_ratio": 0.5, "top_k": 2}]:
        with pytest.raises(SamplerConfigError):
            EvolutionSampler(**drawn_equals_kept)
    for size in (2, 3, 4, 7, 12, 20, 100):
        sampler = EvolutionSampler(population_size=size)
        assert sampler.top_k < round(sampler.sample_ratio * size)


def test_lineage_is_stored_under_the_lineage_prefix_only():
    study = run(EvolutionSampler(seed=0, population_size=4), 16)
    for trial in study.trials:
        assert not set(trial.user_attrs) & set(NAMES)
        stored = {k for k in trial.user_attrs if k.startswith(PREFIX)}
        assert stored and stored == {PREFIX + name for name in read_lineage(trial)}
    assert {"classic", "mutation"} <= {read_lineage(t)["proposer"] for t in study.trials}


def test_invalid_arguments_raise_a_kd_optuna_error():
    for kwargs in [{"population_size": 0}, {"sample_ratio": 1.5}, {"crossover_prob": -1}]:
        with pytest.raises(KdOptunaError):
            EvolutionSampler(**kwargs)


def _params(seed, n=40):
    study = run(EvolutionSampler(seed=seed, population_size=8, proposer=RandomProposer()), n)
    return [t.params for t in study.trials]


def test_same_seed_same_params_and_different_seed_different_params():
    assert _params(7) == _params(7)
    assert _params(7) != _params(8)


def test_same_seed_in_another_process_gives_the_same_params():
    script = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, "tests")
        from test_sampler import _params
        print(json.dumps(_params(7)))
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(_params(7)))


def test_the_default_proposer_is_a_fresh_random_proposer_per_sampler_and_none_means_no_contest():
    a, b = EvolutionSampler(), EvolutionSampler()
    assert isinstance(a.proposer, RandomProposer) and a.proposer is not b.proposer
    assert EvolutionSampler(proposer=None).proposer is None
    assert _params(7) == [t.params for t in run(EvolutionSampler(seed=7, population_size=8), 40).trials]


def test_reseed_rng_makes_two_copies_of_a_seeded_sampler_differ():
    a, b = EvolutionSampler(seed=4, warm_start=False), EvolutionSampler(seed=4, warm_start=False)
    b.reseed_rng()
    keys = [[key_of(t) for t in run(s, 5).trials] for s in (a, b)]
    assert keys[0] != keys[1]


def test_threads_share_one_sampler_without_repeating_keys():
    study = optuna.create_study(sampler=EvolutionSampler(seed=0, population_size=6))
    study.optimize(objective, n_trials=40, n_jobs=2)
    keys = [key_of(t) for t in study.trials]
    assert len(keys) == 40 and len(set(keys)) == 40


def test_the_sampler_derives_its_space_from_the_study_when_not_given():
    space = TINY
    study = optuna.create_study()
    dists = {g: optuna.distributions.CategoricalDistribution(list(space[g])) for g in GENES}
    spec = DistillerSpec(*next(_product(space)))
    study.add_trial(optuna.create_trial(params=spec.to_params(), distributions=dists, value=1))
    study.sampler = EvolutionSampler(seed=0)
    study.optimize(lambda t: score_of(suggest_distiller(t, space)), n_trials=10)
    assert all(space.contains(DistillerSpec.from_params(t.params)) for t in study.trials)


def _claims(sampler, lost_rounds: int) -> list[str]:
    """Make ``sampler`` lose its first ``lost_rounds`` keys to other trials; record each key."""
    chosen: list[str] = []

    def claimed_elsewhere(study, trial, key):
        chosen.append(key)
        return len(chosen) <= lost_rounds

    sampler._claimed_elsewhere = claimed_elsewhere
    return chosen


def test_workers_that_lost_one_classic_together_do_not_all_choose_the_next():
    """Workers started together choose the first classic together and all lose it; if each
    then took the next classic in order they would collide again, round after round."""
    second = set()
    for seed in range(10):
        sampler = EvolutionSampler(seed=seed, population_size=6)
        chosen = _claims(sampler, lost_rounds=1)
        optuna.create_study(sampler=sampler).optimize(objective, n_trials=1)
        assert chosen[0] == classic_specs()[0].key
        second.add(chosen[1])
    assert len(second) > 1


def test_a_key_claimed_in_every_round_runs_and_the_trial_says_so():
    sampler = EvolutionSampler(seed=0, population_size=6)
    chosen = _claims(sampler, lost_rounds=100)
    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert key_of(trial) == chosen[-1]
    note = read_lineage(trial)["sampler_note"]
    assert f"{chosen[-1]} runs twice" in note and f"yielded {len(chosen) - 1} key(s)" in note


WORKER = textwrap.dedent(
    """
    import sys, zlib, optuna
    from kd_optuna.search.sampler import EvolutionSampler
    from kd_optuna.space import suggest_distiller
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial):
        spec = suggest_distiller(trial)
        return (spec.knowledge != "feat") + zlib.crc32(spec.key.encode()) % 1000 / 1000

    study = optuna.load_study(study_name="s", storage=sys.argv[1],
                              sampler=EvolutionSampler(population_size=6))
    study.optimize(objective, n_trials=int(sys.argv[2]))
    """
)


def _run_workers(storage: str, n_workers: int, n_trials: int) -> list:
    optuna.create_study(study_name="s", storage=storage)
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, storage, str(n_trials)], cwd=REPO)
        for _ in range(n_workers)
    ]
    assert all(w.wait(timeout=600) == 0 for w in workers)
    trials = optuna.load_study(study_name="s", storage=storage).trials
    total = n_workers * n_trials
    assert len(trials) == total and all(t.state == TrialState.COMPLETE for t in trials)
    keys = [key_of(t) for t in trials]
    print(f"duplicate keys among {total} trials of {n_workers} workers: {len(keys) - len(set(keys))}")
    assert len(set(keys)) == total
    assert {"classic", "mutation"} <= {read_lineage(t)["proposer"] for t in trials}
    numbers = {t.number for t in trials}
    assert all(read_lineage(t)["parent"] in numbers | {None} for t in trials)
    return trials


@pytest.mark.slow
def test_worker_processes_share_one_sqlite_study(tmp_path):
    _run_workers(f"sqlite:///{tmp_path / 'study.db'}", n_workers=3, n_trials=15)


@pytest.mark.slow
@pytest.mark.postgres
def test_four_worker_processes_share_one_postgres_study(pg_url):
    from kd_optuna.run.storage import resolve_url

    _run_workers(resolve_url(pg_url), n_workers=4, n_trials=10)


def test_genes_fixed_by_an_enqueued_trial_shape_the_child_and_its_lineage():
    sampler = EvolutionSampler(seed=0, population_size=4, warm_start=False)
    study = run(sampler, 8)
    study.enqueue_trial({"knowledge": "emb", "distance": "cos"})
    study.optimize(objective, n_trials=1)
    trial = study.trials[-1]
    assert trial.params["knowledge"] == "emb" and trial.params["distance"] == "cos"
    assert trial.system_attrs[PROPOSED_KEY_ATTR] == key_of(trial)
    assert read_lineage(trial)["proposer"] in {"mutation", "crossover", "random"}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_genes_and_params_fixed_by_a_partial_fixed_sampler_shape_the_child():
    def func(trial):
        spec = suggest_distiller(trial, TINY)
        return score_of(spec) + trial.suggest_categorical("c", [0, 1, 2]) + trial.suggest_int("n", 0, 3)

    fixed = {"distance": "l2", "n": 2}
    sampler = optuna.samplers.PartialFixedSampler(fixed, EvolutionSampler(seed=0, population_size=6))
    study = run(sampler, 12, func=func)  # 2 knowledge x 2 calibration x 3 c (T cancels with l2)
    assert all(t.params["distance"] == "l2" and t.params["n"] == 2 for t in study.trials)
    settings = [(key_of(t), t.params["c"]) for t in study.trials]
    assert len(set(settings)) == len(settings)
    assert all(
        t.system_attrs[PROPOSED_KEY_ATTR] == f"{key_of(t)}; c={t.params['c']!r}, n=2"
        for t in study.trials[1:]
    )


def test_a_warm_start_list_runs_first_and_is_named_in_the_lineage():
    own = DistillerSpec("emb", "relu", "no", "no", "l1", "no", 1, 5)
    kd = classic_specs()[0]
    study = run(EvolutionSampler(seed=0, warm_start=[own, kd]), 3)
    assert [key_of(t) for t in study.trials[:2]] == [own.key, kd.key]
    assert [read_lineage(t)["proposer"] for t in study.trials] == ["warm_start", "classic", "random"]


def test_evolution_starts_after_population_size_proposals_even_if_most_were_rejected():
    def func(trial):
        spec = suggest_distiller(trial)
        if spec.knowledge != "feat":
            trial.set_user_attr("reject_reason", "shape")
            raise optuna.TrialPruned()
        return score_of(spec)

    study = run(EvolutionSampler(population_size=6, warm_start=False, seed=0), 20, func=func)
    proposers = [read_lineage(t)["proposer"] for t in study.trials]
    assert proposers[:6] == ["random"] * 6
    first_child = next(i for i, p in enumerate(proposers) if p in ("mutation", "crossover"))
    completed_before = [t for t in study.trials[:first_child] if t.state == TrialState.COMPLETE]
    assert 1 <= len(completed_before) < 6
    children = [t for t in study.trials[first_child:] if read_lineage(t)["parent"] is not None]
    assert all(t.params["knowledge"] == "feat" or "knowledge" in read_lineage(t)["mutated"]
               for t in children)


def test_screening_children_with_rho_avoids_options_that_get_rejected():
    def func(trial):
        spec = suggest_distiller(trial)
        if spec.distance not in ("l1", "l2") or spec.calibration != "no" or spec.temperature != 1:
            trial.set_user_attr("reject_reason", "exploding")
            raise optuna.TrialPruned()
        return score_of(spec)

    valid = [DistillerSpec("feat", "no", "no", "no", "l2", "no", 1, 10),
             DistillerSpec("logit", "no", "no", "no", "l1", "no", 1, 1)]

    def rejected_children(screen):
        sampler = EvolutionSampler(population_size=5, warm_start=valid, seed=0, screen=screen)
        study = run(sampler, 60, func=func)
        children = [t for t in study.trials if read_lineage(t)["parent"] is not None]
        return sum(t.state == TrialState.PRUNED for t in children) / len(children)

    screened, single = rejected_children(8), rejected_children(1)
    assert screened < 0.75 * single


# -- any Optuna search space ------------------------------------------------------------


def conditional_objective(trial: optuna.Trial) -> float:
    kind = trial.suggest_categorical("kind", ["a", "b", "c"])
    x = trial.suggest_float("x", 1e-3, 1.0, log=True)
    n = trial.suggest_int("n", 0, 20, step=2)
    value = (math.log10(x) + 1) ** 2 + abs(n - 12) / 10
    if kind == "a":
        value += (trial.suggest_float("ya", -1.0, 1.0) - 0.5) ** 2
    elif kind == "b":
        value += 0.3 + trial.suggest_int("yb", 1, 64, log=True) / 64
    else:
        value += 3.0
    if trial.number % 7 == 3:
        raise optuna.TrialPruned()
    return value


def test_the_relative_search_space_is_optuna_s_intersection_of_finished_trials():
    sampler = EvolutionSampler(seed=0, population_size=6)
    study = optuna.create_study(sampler=sampler)
    study.optimize(conditional_objective, n_trials=40)
    expected = optuna.search_space.IntersectionSearchSpace(include_pruned=True).calculate(study)
    trial = optuna_private.study_storage(study).get_trial(optuna_private.trial_id(study.ask()))
    assert sampler.infer_relative_search_space(study, trial) == expected
    assert set(expected) == {"kind", "x", "n"}


def test_conditional_params_are_inherited_from_the_parent_and_the_search_improves():
    sampler = EvolutionSampler(seed=1, population_size=8)
    study = run(sampler, 150, func=conditional_objective)
    trials = study.trials
    for trial in trials:
        dists = trial.distributions
        assert all(evolution_contains(dists[name], value) for name, value in trial.params.items())
    by_number = {t.number: t for t in trials}
    inherited = total = 0
    for trial in trials:
        if read_lineage(trial).get("proposer") != "mutation":
            continue
        parent = by_number[read_lineage(trial)["parent"]].params
        for name in {"ya", "yb"} & set(trial.params) & set(parent):
            total += 1
            inherited += trial.params[name] == parent[name]
    assert total > 10 and inherited > 0.6 * total
    complete = [t.value for t in trials if t.value is not None]
    assert min(complete[-40:]) < min(complete[:20])
    assert statistics.median(complete[-40:]) < statistics.median(complete[:20])


def test_conditional_params_make_trials_new_once_the_other_params_are_exhausted():
    """Two settings of ``kind`` are exhausted after two trials; from then on only the params
    each kind asks for can make a trial new, so they must not be the population's copies."""

    def func(trial):
        if trial.suggest_categorical("kind", ["a", "b"]) == "a":
            return trial.suggest_float("ya", 0.0, 1.0)
        return 0.5 + trial.suggest_int("yb", 0, 5)

    study = run(EvolutionSampler(seed=0), 30, func=func)
    ya = [t.params["ya"] for t in study.trials if "ya" in t.params]
    yb = [t.params["yb"] for t in study.trials if "yb" in t.params]
    assert len(ya) > 5 and len(set(ya)) == len(ya)
    assert len(set(yb[:6])) == min(6, len(yb))
    assert min(ya[-5:]) < 0.5 * ya[0]


def evolution_contains(dist, value):
    from kd_optuna.search.evolution import contains

    return contains(dist, value)


def test_a_categorical_study_without_genes_never_repeats_a_setting():
    def func(trial):
        return sum(trial.suggest_categorical(f"g{i}", [0, 1, 2]) for i in range(3))

    study = run(EvolutionSampler(seed=0, population_size=6), 27, func=func)
    settings = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(settings)) == 27
    assert "proposer" not in read_lineage(study.trials[0])  # a study without genes: no distiller
    assert all(read_lineage(t)["proposer"] in ("random", "mutation", "crossover")
               for t in study.trials[1:])


def test_a_sampler_given_a_space_on_an_objective_without_genes_never_repeats_a_setting():
    def func(trial):
        return sum(trial.suggest_categorical(f"g{i}", [0, 1, 2]) for i in range(3))

    study = run(EvolutionSampler(seed=0, population_size=6, space=SearchSpace()), 27, func=func)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 27
    assert all(read_lineage(t)["proposer"] != "classic" for t in study.trials[1:])


def test_an_objective_narrowing_a_gene_runs_with_the_default_space():
    def func(trial):
        spec = suggest_distiller(trial, SearchSpace().narrow(knowledge=["emb"], distance=["l2", "cos"]))
        return score_of(spec)

    study = run(EvolutionSampler(seed=0, population_size=6), 30, func=func)
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert all(t.params["knowledge"] == "emb" and t.params["distance"] in ("l2", "cos")
               for t in study.trials)
    first = [c for c in classic_specs() if c.knowledge == "emb"][0]
    assert read_lineage(study.trials[0])["proposer"] == "classic" and key_of(study.trials[0]) == first.key
    assert {"mutation", "crossover"} & {read_lineage(t)["proposer"] for t in study.trials}
    keys = [key_of(t) for t in study.trials]
    assert len(set(keys)) == len(keys)
