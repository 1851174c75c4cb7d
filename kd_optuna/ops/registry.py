"""Ops found by name: one registry per kind, filled by a decorator (torchdistill style).

    >>> from kd_optuna.ops.registry import DISTANCES
    >>> @DISTANCES.register("my_l1")          # doctest: +SKIP
    ... def my_l1(student, teacher): ...

``kd_optuna.ops`` imports the modules that register the ops, so importing it fills
``TRANSFORMS``, ``DISTANCES`` and ``CALIBRATIONS`` with exactly the names of
``kd_optuna.space``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from kd_optuna.errors import InvalidSpace

Op = TypeVar("Op", bound=Callable)


class Registry(Mapping[str, Callable]):
    """A read-only name -> op mapping that ops join with ``@registry.register(name)``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._ops: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Op], Op]:
        def add(op: Op) -> Op:
            if name in self._ops:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._ops[name] = op
            return op

        return add

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


TRANSFORMS = Registry("transform")
DISTANCES = Registry("distance")
CALIBRATIONS = Registry("calibration")
