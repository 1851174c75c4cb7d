"""Full training with a distiller and the script a user keeps.

:func:`kd_optuna.export.train_with_distiller` (from :mod:`kd_optuna.export.training`) is the one
public function an exported script calls; :mod:`kd_optuna.export.script` writes that script.
"""


def __getattr__(name: str):
    import importlib

    if name.startswith("__") or name in ("training", "script"):
        raise AttributeError(name)
    try:
        return getattr(importlib.import_module("kd_optuna.export.training"), name)
    except AttributeError:
        raise AttributeError(f"module 'kd_optuna.export' has no attribute {name!r}") from None
