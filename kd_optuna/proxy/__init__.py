"""The cheap trial that scores a candidate: settings and training (``training``), the teacher-output
cache, the loss-rejection check, the metrics and score, one task per study and the Optuna objective.

``kd_optuna.proxy.ProxySettings`` and the other names of :mod:`kd_optuna.proxy.training` stay
reachable here, loaded on first use.
"""


def __getattr__(name: str):
    import importlib

    if name.startswith("__") or name in ("cache", "rejection", "metrics", "task", "objective", "training"):
        raise AttributeError(name)
    try:
        return getattr(importlib.import_module("kd_optuna.proxy.training"), name)
    except AttributeError:
        raise AttributeError(f"module 'kd_optuna.proxy' has no attribute {name!r}") from None
