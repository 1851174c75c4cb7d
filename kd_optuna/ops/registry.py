"""Ops found by name: an op is one function and one decorator (torchdistill's registry style).

The decorator carries everything the rest of the project knows about the op::

    @transform("satt", ranks=(4,))                          # acts on (N, C, H, W) only
    def satt(x): ...

    @transform("bmm", ranks={3: 3, 4: 3})                   # input rank -> output rank
    def bmm(x): ...

    @distance("l2", formula="({s} - {t})^2")
    def l2(student, teacher): ...

    @calibration("entropy", logits=("teacher",))
    def entropy(inputs): ...

It registers the function in ``TRANSFORMS``, ``DISTANCES`` or ``CALIBRATIONS`` with that
metadata (``TransformInfo``, ``DistanceInfo``, ``CalibrationInfo``), and ``kd_optuna.space``
builds the search space from these registries: the options of a gene are the registered
names in the order they registered (the order of the definitions in each op module, which
the sampler's seeded draws index into), the rank table is the transforms' ``ranks``, and
``DistillerSpec.formula`` writes each op with its ``formula``. Registering a new op is the
only edit a new option needs.

This module imports no torch, and the op modules load it only at an op's first call (see
``kd_optuna.ops.lazy``), so the space reads the registries without a deep-learning stack.
``Registry.watch`` tells the modules that derive tables from a registry (the space) when an op
joins or leaves; ``Registry.unregister`` is for tests that add an op of their own.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from kd_optuna.errors import InvalidSpace

Op = TypeVar("Op", bound=Callable)
Info = TypeVar("Info")

#: The ranks of the knowledge tensors and of what transforms make of them: 2, 3 and 4.
EVERY_RANK: tuple[int, ...] = (2, 3, 4)


@dataclasses.dataclass(frozen=True)
class TransformInfo:
    """What the space knows of a transform.

    ranks: ``{input rank: output rank}`` for the ranks it acts on; at any other rank it returns
        its input unchanged (the registered op enforces that).
    formula: how it writes in a formula, ``{x}`` standing for its input.
    random: it draws random numbers and so takes a ``torch.Generator``.
    """

    name: str
    ranks: Mapping[int, int]
    formula: str
    random: bool = False


@dataclasses.dataclass(frozen=True)
class DistanceInfo:
    """What the space knows of a distance.

    formula: the per-sample term ``d_n`` in a formula, ``{s}`` and ``{t}`` standing for the
        student's and the teacher's transformed knowledge.
    compound: the formula has two terms (``1 - cos(s, t)``) and takes parentheses when a
        calibration weight multiplies it.
    """

    name: str
    formula: str
    compound: bool = False


@dataclasses.dataclass(frozen=True)
class CalibrationInfo:
    """What the space and the loss know of a calibration.

    formula: the weight ``w_n`` in a formula; None for the constant weight 1, left out.
    logits: whose raw logits it reads: ``"student"``, ``"teacher"``, both or none.
    """

    name: str
    formula: str | None
    logits: tuple[str, ...] = ()


class Registry(Mapping[str, Callable], Generic[Info]):
    """A name -> op mapping, in registration order, with each op's metadata (``info``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._ops: dict[str, Callable] = {}
        self._infos: dict[str, Info] = {}
        self._watchers: list[Callable[[], None]] = []

    def register(self, name: str, info: Info | None = None) -> Callable[[Op], Op]:
        """Decorator: add ``op`` under ``name`` with ``info``; a name registers once."""

        def add(op: Op) -> Op:
            if name in self._ops:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._ops[name] = op
            self._infos[name] = info
            self._changed()
            return op

        return add

    def unregister(self, name: str) -> None:
        """Remove op ``name`` (for tests that register an op of their own)."""
        self[name]  # the error of an unknown name
        del self._ops[name], self._infos[name]
        self._changed()

    def info(self, name: str) -> Info:
        self[name]
        return self._infos[name]

    def infos(self) -> tuple[Info, ...]:
        """The metadata of every op, in registration order."""
        return tuple(self._infos.values())

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` now and after every change of this registry."""
        self._watchers.append(callback)
        callback()

    def _changed(self) -> None:
        for callback in self._watchers:
            callback()

    def __getitem__(self, name: str) -> Callable:
        try:
            return self._ops[name]
        except KeyError:
            known = ", ".join(self._ops)
            raise InvalidSpace(f"unknown {self.kind} {name!r}; choose one of: {known}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._ops)

    def __len__(self) -> int:
        return len(self._ops)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._ops)})"


TRANSFORMS: Registry[TransformInfo] = Registry("transform")
DISTANCES: Registry[DistanceInfo] = Registry("distance")
CALIBRATIONS: Registry[CalibrationInfo] = Registry("calibration")


def _rank_map(ranks: Iterable[int] | Mapping[int, int]) -> dict[int, int]:
    if isinstance(ranks, Mapping):
        table = {int(i): int(o) for i, o in ranks.items()}
    else:
        table = {int(r): int(r) for r in ranks}
    bad = [r for pair in table.items() for r in pair if r not in EVERY_RANK]
    if bad:
        raise ValueError(f"ranks must be among {EVERY_RANK}, got {bad}")
    return table


def transform(
    name: str,
    *,
    ranks: Iterable[int] | Mapping[int, int],
    formula: str | None = None,
    random: bool = False,
) -> Callable[[Callable], Callable]:
    """Register ``fn`` as transform ``name``, acting only at ``ranks``.

    ranks: the input ranks it acts on, keeping the rank (``(4,)``, ``EVERY_RANK``), or a
        mapping ``{input rank: output rank}``; ``()`` for an op that is the identity everywhere.
    formula: its text with ``{x}`` for the input; default ``name({x})``.
    random: ``fn(x, generator)`` draws random numbers; otherwise ``fn(x)``.

    The registered op has the signature ``op(x, generator=None) -> Tensor``; at a rank not in
    ``ranks`` it returns ``x`` itself, so the body only sees the ranks it is written for.
    """
    table = _rank_map(ranks)
    info = TransformInfo(name, table, formula or f"{name}({{x}})", random)

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def op(x: Any, generator: Any = None) -> Any:
            if x.dim() not in table:
                return x
            return fn(x, generator) if random else fn(x)

        return TRANSFORMS.register(name, info)(op)

    return register


def distance(name: str, *, formula: str, compound: bool = False) -> Callable[[Op], Op]:
    """Register ``fn(student, teacher) -> (N,)`` as distance ``name``; see ``DistanceInfo``."""
    return DISTANCES.register(name, DistanceInfo(name, formula, compound))


def calibration(
    name: str, *, formula: str | None = "", logits: tuple[str, ...] = ()
) -> Callable[[Op], Op]:
    """Register ``fn(CalibrationInputs) -> (N,)`` as calibration ``name``.

    formula: the weight's text, default ``w_name``; None for a constant weight 1.
    logits: whose raw logits ``fn`` reads (``"student"``, ``"teacher"``).
    """
    unknown = set(logits) - {"student", "teacher"}
    if unknown:
        raise ValueError(f"logits name 'student' or 'teacher', got {sorted(unknown)}")
    text = f"w_{name}" if formula == "" else formula
    return CALIBRATIONS.register(name, CalibrationInfo(name, text, tuple(logits)))
