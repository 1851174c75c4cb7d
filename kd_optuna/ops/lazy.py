"""A module imported at its first use, so that importing the op modules loads no torch.

    torch = lazy_import("torch", globals())
    F = lazy_import("torch.nn.functional", globals(), "F")

The stand-in imports the real module the first time one of its attributes is read and then
puts it in its place under that name in the owning module's namespace: later calls find the
real module there, at no cost. Nothing is added to ``sys.modules`` until that first read, so
``kd_optuna.space`` can import the op registries (their names, ranks and formulas) without
loading a deep-learning stack.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, MutableMapping


class LazyModule:
    """Stand-in for module ``name``, bound to ``alias`` in ``namespace`` until its first use."""

    def __init__(self, name: str, namespace: MutableMapping[str, Any], alias: str):
        self._name, self._namespace, self._alias = name, namespace, alias

    def load(self) -> ModuleType:
        module = importlib.import_module(self._name)
        if self._namespace.get(self._alias) is self:
            self._namespace[self._alias] = module
        return module

    def __getattr__(self, attr: str) -> Any:
        if attr in ("_name", "_namespace", "_alias"):  # read before __init__ (copy, pickle)
            raise AttributeError(attr)
        return getattr(self.load(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}, not imported yet>"


def lazy_import(name: str, namespace: MutableMapping[str, Any], alias: str | None = None) -> Any:
    """A stand-in for module ``name`` to bind as ``alias`` in ``namespace`` (the caller's
    ``globals()``); ``alias`` defaults to ``name`` and is required for a dotted name."""
    if alias is None:
        if "." in name:
            raise ValueError(f"give the name {name!r} is bound to, e.g. alias='F'")
        alias = name
    return LazyModule(name, namespace, alias)
