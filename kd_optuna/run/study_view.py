"""What a study's trials say, read defensively from their user attrs: a trial's score, canonical
key, formula, mutated genes and outcome; the best distinct distillers; the classics' scores;
the shrinkage in force. A trial without lineage or metrics reads as what it has.

Used by the figures (``kd_optuna.run.figures``), the study's story and note
(``kd_optuna.run.story``) and the report.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from kd_optuna.search.lineage import read_lineage
from kd_optuna.space import GENES

#: How many distinct best distillers the story shows.
TOP = 5


def as_number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def fmt(value: Any, digits: int = 4) -> str:
    number = as_number(value)
    if number is None:
        return "" if value is None else str(value)
    if math.isnan(number):
        return "nan"
    return f"{number:.{digits}g}"


def is_scored(trial) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE and as_number(trial.value) is not None and math.isfinite(trial.value)


def key_of(trial) -> str | None:
    key = trial.user_attrs.get("spec")
    if isinstance(key, str):
        return key
    try:
        from kd_optuna.space import DistillerSpec

        return DistillerSpec.from_params(trial.params).key
    except Exception:  # a trial without the genes
        return None


def formula_of(trial) -> str:
    formula = trial.user_attrs.get("formula")
    if isinstance(formula, str):
        return formula
    try:
        from kd_optuna.space import DistillerSpec

        return DistillerSpec.from_params(trial.params).formula()
    except Exception:  # a study of other params: show them
        return ", ".join(f"{name}={value}" for name, value in trial.params.items())


def mutated_of(trial) -> list[str]:
    value = read_lineage(trial).get("mutated")
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return []


def outcome_of(trial) -> str:
    """completed, the reject reason, pruned, failed, running or waiting."""
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        return "completed"
    if trial.state == TrialState.PRUNED:
        reason = trial.user_attrs.get("reject_reason")
        return f"rejected: {reason}" if isinstance(reason, str) and reason else "pruned"
    if trial.state == TrialState.FAIL:
        return "failed"
    return trial.state.name.lower()


def best_distinct(trials: Sequence[Any], n: int = TOP) -> list[Any]:
    """The ``n`` best scored trials with distinct canonical keys, best first."""
    chosen, keys = [], set()
    for trial in sorted((t for t in trials if is_scored(t)), key=lambda t: (t.value, t.number)):
        key = key_of(trial)
        if key is not None and key in keys:
            continue
        keys.add(key)
        chosen.append(trial)
        if len(chosen) == n:
            break
    return chosen


def classic_scores(trials: Sequence[Any]) -> list[dict[str, Any]]:
    """Per classic distiller: its trial (the first whose spec is the classic's key), state, score."""
    from kd_optuna.distill.classics import CLASSICS

    by_key: dict[str, Any] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        key = key_of(trial)
        if key is None:
            continue
        held = by_key.get(key)
        if held is None or (not is_scored(held) and is_scored(trial)):
            by_key[key] = trial
    rows = []
    for name, (spec, _description) in CLASSICS.items():
        trial = by_key.get(spec.key)
        rows.append({
            "name": name,
            "formula": spec.formula(),
            "trial": None if trial is None else trial.number,
            "outcome": "not tried" if trial is None else outcome_of(trial),
            "score": trial.value if trial is not None and is_scored(trial) else None,
        })
    return rows


def latest_space_state(trials: Sequence[Any]) -> Mapping[str, Any] | None:
    """The ``space_state`` lineage attr of the highest-numbered trial that has one."""
    for trial in sorted(trials, key=lambda t: t.number, reverse=True):
        state = read_lineage(trial).get("space_state")
        if isinstance(state, Mapping):
            return state
    return None


def gene_weights(study, config, trials: Sequence[Any]) -> tuple[dict[str, dict[Any, float]], str]:
    """(gene -> option -> weight in force, where the weights come from).

    The sampler's ``space_weights`` (a pure function of the trial list, as ``kd-optuna space``
    shows them); where that cannot be computed, every option of the config's space at 1 except
    those the latest ``space_state`` dropped, at 0.
    """
    options = {gene: list(config.space.options[gene]) for gene in GENES} if config is not None else {}
    state = latest_space_state(trials)
    basis = f" (after {state.get('basis')} evaluated trials)" if state and "basis" in state else ""
    if config is not None:
        try:
            weights = config.make_sampler(with_llm=False).space_weights(study)
            return {g: dict(weights.get(g, {})) for g in GENES}, "shrinkage weights in force" + basis
        except Exception:  # the sampler's API moved: fall back on the recorded state
            pass
    dropped = state.get("dropped", {}) if state else {}
    weights = {}
    for gene in GENES:
        gone = dropped.get(gene, []) if isinstance(dropped, Mapping) else []
        if gene not in options:
            options[gene] = sorted({t.params[gene] for t in trials if gene in t.params}, key=str)
        weights[gene] = {o: (0.0 if o in gone or str(o) in map(str, gone) else 1.0) for o in options[gene]}
    return weights, ("dropped options of the latest space_state at 0" if state else "no shrinkage yet") + basis
