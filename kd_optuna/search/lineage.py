"""Where a trial came from: the user attrs the EvolutionSampler writes, under one prefix.

Each proposed trial gets user attrs named ``lineage:<name>`` (:data:`PREFIX`), for the names
in :data:`NAMES`:

- ``proposer``: "classic", "warm_start", "random", "mutation", "crossover", "llm", ...
- ``parent``: the parent's trial number, or None; ``crossover_parent``: the second parent
  (crossover only); ``mutated``: the genes and params that changed
- ``predictor``: rho of each contestant and the winner, when there was a contest
- ``space_state``: the shrinkage in force, once ``shrink_after`` trials were evaluated
- ``sampler_note``: when a fallback was needed

Read them with :func:`read_lineage`, never by name: it also reads the un-prefixed names
(``proposer``, ``parent``, ...) that kd-optuna wrote before the prefix, so older studies
keep their story. Write them with :func:`attr_name`.
"""

from __future__ import annotations

from typing import Any, Mapping

#: Prefix of every lineage user attr.
PREFIX = "lineage:"

#: The lineage attrs, unprefixed.
NAMES = ("proposer", "parent", "crossover_parent", "mutated", "predictor", "space_state", "sampler_note")


def attr_name(name: str) -> str:
    """The user attr under which lineage ``name`` is stored, e.g. ``lineage:proposer``."""
    if name not in NAMES:
        raise KeyError(f"{name!r} is not a lineage attr; use one of {', '.join(NAMES)}")
    return PREFIX + name


def read_lineage(trial: Any) -> dict[str, Any]:
    """The lineage of ``trial`` (a trial, or its ``user_attrs``): name -> value, unprefixed,
    for the names it has. A prefixed attr wins over the un-prefixed name an earlier version
    wrote."""
    attrs: Mapping[str, Any] = trial if isinstance(trial, Mapping) else trial.user_attrs
    found = {}
    for name in NAMES:
        if PREFIX + name in attrs:
            found[name] = attrs[PREFIX + name]
        elif name in attrs:
            found[name] = attrs[name]
    return found
