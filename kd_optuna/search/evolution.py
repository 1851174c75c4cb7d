"""Evolution operators on any Optuna search space: draw, mutate, cross over, key, cells.

A genome is ``name -> value`` (Optuna's external values) over a space ``name -> distribution``.
The eight distiller genes are handled by :mod:`kd_optuna.search.proposers` (option weights, canonical
keys); this module handles every other parameter, whatever its distribution.

Numbers move in Optuna's internal representation, on the log scale when ``log=True``: with
``u = log x`` (log) or ``u = x``, bounds ``[u_lo, u_hi]`` and ``w = u_hi - u_lo``::

    mutate(x) = snap(exp?(clip(reflect(u + scale * w * z)))),   z ~ N(0, 1)

where ``reflect`` mirrors a step past a bound back inside, ``clip`` keeps it in ``[u_lo, u_hi]``,
``snap`` rounds to the grid ``low + step * i`` of a stepped float or an int (and back
inside ``[low, high]``). A mutated number always changes: if the step rounds it back to
``x``, it moves one grid point towards ``z``'s sign (the other way at a bound). A categorical
mutates to another choice, uniformly.

:func:`cells` turns a genome into the one-hot cells of the additive predictor (rho): a
categorical or a number with at most ``16`` grid values is one cell per value, any other
number one cell per eighth of ``[u_lo, u_hi]``.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping

import numpy as np
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

_BINS = 8
_FEW_VALUES = 16

Distributions = Mapping[str, BaseDistribution]


def _bounds(dist: FloatDistribution | IntDistribution) -> tuple[float, float]:
    if dist.log:
        return math.log(dist.low), math.log(dist.high)
    return float(dist.low), float(dist.high)


def _grid(dist: FloatDistribution | IntDistribution) -> float | None:
    if isinstance(dist, IntDistribution):
        return float(dist.step)
    return dist.step


def _n_values(dist: BaseDistribution) -> float:
    """How many values ``dist`` holds (``inf`` for a continuous float)."""
    if isinstance(dist, CategoricalDistribution):
        return len(dist.choices)
    step = _grid(dist)  # type: ignore[arg-type]
    if step is None:
        return math.inf if dist.high > dist.low else 1  # type: ignore[attr-defined]
    return math.floor((dist.high - dist.low) / step + 1e-9) + 1  # type: ignore[attr-defined]


def is_categorical(dist: BaseDistribution) -> bool:
    return isinstance(dist, CategoricalDistribution)


def can_change(dist: BaseDistribution) -> bool:
    """Whether ``dist`` holds more than one value."""
    return _n_values(dist) > 1


def _snap(dist: FloatDistribution | IntDistribution, x: float) -> float | int:
    step = _grid(dist)
    if step is not None:
        i = round((x - dist.low) / step)
        i = min(max(i, 0), _n_values(dist) - 1)
        x = dist.low + i * step
    x = min(max(x, dist.low), dist.high)
    return int(round(x)) if isinstance(dist, IntDistribution) else float(x)


def contains(dist: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` is a value of ``dist`` (a choice, or in bounds and on the grid)."""
    if isinstance(dist, CategoricalDistribution):
        return any(value == c and type(value) is type(c) for c in dist.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not dist.low <= value <= dist.high:  # type: ignore[attr-defined]
        return False
    step = _grid(dist)  # type: ignore[arg-type]
    if step is None:
        return True
    k = (value - dist.low) / step  # type: ignore[attr-defined]
    return abs(k - round(k)) < 1e-8


def draw(dist: BaseDistribution, rng: np.random.RandomState) -> Any:
    """A uniform draw (log-uniform when ``log``) from ``dist``."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[int(rng.randint(len(dist.choices)))]
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    step = _grid(dist)
    if step is not None and not dist.log:
        return _snap(dist, dist.low + step * int(rng.randint(_n_values(dist))))
    lo, hi = _bounds(dist)
    if isinstance(dist, IntDistribution):
        lo, hi = (math.log(dist.low - 0.5 + 1e-9), math.log(dist.high + 0.5)) if dist.log else (lo, hi)
    u = rng.uniform(lo, hi)
    return _snap(dist, math.exp(u) if dist.log else u)


def mutate_value(dist: BaseDistribution, value: Any, rng: np.random.RandomState, scale: float) -> Any:
    """Another value of ``dist`` near ``value`` (see the module docstring); ``value`` if none."""
    if not can_change(dist):
        return value
    if isinstance(dist, CategoricalDistribution):
        others = [c for c in dist.choices if not (c == value and type(c) is type(value))]
        return others[int(rng.randint(len(others)))]
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    if not contains(dist, value):
        return draw(dist, rng)
    lo, hi = _bounds(dist)
    z = rng.randn()
    u = (math.log(value) if dist.log else float(value)) + scale * (hi - lo) * z
    u = min(max(2 * lo - u if u < lo else 2 * hi - u if u > hi else u, lo), hi)
    new = _snap(dist, math.exp(u) if dist.log else u)
    if new == value:
        step = _grid(dist)
        if step is None:
            return new
        direction = 1.0 if z >= 0 else -1.0
        new = _snap(dist, value + direction * step)
        if new == value:
            new = _snap(dist, value - direction * step)
    return new


def cross_value(dist: BaseDistribution, a: Any, b: Any, rng: np.random.RandomState) -> Any:
    """One param of a crossover child: ``a`` or ``b`` with probability 1/2 each for a
    categorical; for a number, a blend ``snap(u_a + t * (u_b - u_a))``, ``t ~ U(-0.5, 1.5)``
    (BLX-0.5 on the internal scale), kept in bounds."""
    if isinstance(dist, CategoricalDistribution) or not (contains(dist, a) and contains(dist, b)):
        return a if rng.random_sample() < 0.5 else b
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    lo, hi = _bounds(dist)
    ua, ub = (math.log(a), math.log(b)) if dist.log else (float(a), float(b))
    u = min(max(ua + rng.uniform(-0.5, 1.5) * (ub - ua), lo), hi)
    return _snap(dist, math.exp(u) if dist.log else u)


def inherit(
    values: Mapping[str, Any], space: Distributions, rng: np.random.RandomState
) -> dict[str, Any]:
    """``values`` over ``space``: each name's value where it is one of its distribution's,
    else a fresh draw."""
    out = {}
    for name, dist in space.items():
        value = values.get(name, _MISSING)
        out[name] = value if value is not _MISSING and contains(dist, value) else draw(dist, rng)
    return out


_MISSING = object()


def pinned(dist: BaseDistribution, value: Any) -> BaseDistribution | None:
    """A distribution of ``dist``'s kind that holds ``value`` only (a fixed param: drawn,
    mutated and inherited, it stays ``value``); None if ``value`` cannot be one of its kind."""
    try:
        if isinstance(dist, CategoricalDistribution):
            return CategoricalDistribution([value])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if isinstance(dist, IntDistribution) and float(value).is_integer():
            return IntDistribution(int(value), int(value), log=dist.log and value >= 1)
        if isinstance(dist, FloatDistribution):
            return FloatDistribution(float(value), float(value), log=dist.log and value > 0)
    except (TypeError, ValueError):
        return None
    return None


def genome_key(distiller_key: str | None, extra: Mapping[str, Any]) -> str:
    """The deduplication key: the distiller's canonical key, then the other params, sorted.

    A study of distiller genes only keys by ``DistillerSpec.key`` alone.
    """
    if not extra:
        return distiller_key if distiller_key is not None else "params:{}"
    rest = ", ".join(f"{name}={extra[name]!r}" for name in sorted(extra))
    return f"{distiller_key}; {rest}" if distiller_key is not None else "params:{" + rest + "}"


def distiller_of(key: str) -> str | None:
    """The distiller key a :func:`genome_key` starts with; None for a genome without genes."""
    if key.startswith("params:{"):
        return None
    return key.split("; ", 1)[0]


def cells(extra: Mapping[str, Any], space: Distributions) -> list[tuple[str, Hashable]]:
    """The predictor cells of ``extra`` (see the module docstring); unknown names skipped."""
    out: list[tuple[str, Hashable]] = []
    for name in sorted(extra):
        dist = space.get(name)
        value = extra[name]
        if dist is None:
            continue
        if isinstance(dist, CategoricalDistribution) or _n_values(dist) <= _FEW_VALUES:
            out.append((name, _hashable(value)))
            continue
        lo, hi = _bounds(dist)  # type: ignore[arg-type]
        if not isinstance(value, (int, float)) or hi <= lo:
            continue
        u = math.log(value) if dist.log and value > 0 else float(value)  # type: ignore[attr-defined]
        out.append((name, ("bin", min(_BINS - 1, max(0, int((u - lo) / (hi - lo) * _BINS))))))
    return out


def _hashable(value: Any) -> Hashable:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return (type(value).__name__, value)
