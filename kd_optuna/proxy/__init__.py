"""The cheap trial that scores a candidate: its settings (``settings``), data and views (``views``),
training and evaluation (``training``), the teacher-output cache, the loss-rejection check, the
metrics and score, one task per study and the Optuna objective.

``kd_optuna.proxy.ProxySettings`` and the other names of :mod:`kd_optuna.proxy.settings`,
:mod:`kd_optuna.proxy.views` and :mod:`kd_optuna.proxy.training` stay reachable here, loaded on
first use.
"""

_MODULES = ("settings", "views", "cache", "rejection", "metrics", "task", "objective", "training")
_MISSING = object()


def __getattr__(name: str):
    import importlib

    if name.startswith("__") or name in _MODULES:
        raise AttributeError(name)
    for module in ("settings", "views", "training"):
        value = getattr(importlib.import_module(f"kd_optuna.proxy.{module}"), name, _MISSING)
        if value is not _MISSING:
            return value
    raise AttributeError(f"module 'kd_optuna.proxy' has no attribute {name!r}")
