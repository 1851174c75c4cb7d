"""The module paths of kd-optuna 0.1, before the subpackages, kept as aliases.

``import kd_optuna.sampler`` gives the very module object ``kd_optuna.search.sampler`` (not a
copy), so code and scripts written against the flat layout, pickles and monkeypatches keep
working. Only the names below are aliased; nothing is imported until an old path is used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old name under ``kd_optuna`` -> the module it now is.
MOVED = {
    "classics": "kd_optuna.distill.classics",
    "loss": "kd_optuna.distill.loss",
    "baselines": "kd_optuna.distill.baselines",
    "engine": "kd_optuna.train.engine",
    "training": "kd_optuna.train.classifier",
    "teachers": "kd_optuna.train.teachers",
    "checkpoints": "kd_optuna.train.checkpoints",
    "devices": "kd_optuna.train.devices",
    "cache": "kd_optuna.proxy.cache",
    "rejection": "kd_optuna.proxy.rejection",
    "metrics": "kd_optuna.proxy.metrics",
    "task": "kd_optuna.proxy.task",
    "objective": "kd_optuna.proxy.objective",
    "sampler": "kd_optuna.search.sampler",
    "evolution": "kd_optuna.search.evolution",
    "proposers": "kd_optuna.search.proposers",
    "predictor": "kd_optuna.search.predictor",
    "lineage": "kd_optuna.search.lineage",
    "script": "kd_optuna.export.script",
    "compare": "kd_optuna.run.compare",
    "correlate": "kd_optuna.run.correlate",
    "config": "kd_optuna.run.config",
    "storage": "kd_optuna.run.storage",
    "workers": "kd_optuna.run.workers",
    "trial_loop": "kd_optuna.run.trial_loop",
    "summary": "kd_optuna.run.summary",
    "cli": "kd_optuna.run.cli",
    "story": "kd_optuna.run.story",
    "report": "kd_optuna.run.report",
    "demo": "kd_optuna.run.demo",
}


def new_name(fullname: str) -> str | None:
    """``kd_optuna.ops.transforms`` -> ``kd_optuna.ops.transforms``; None if not moved."""
    prefix, _, rest = fullname.partition(".")
    head, _, tail = rest.partition(".")
    if prefix != "kd_optuna" or head not in MOVED:
        return None
    return MOVED[head] + ("." + tail if tail else "")


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        target_name = new_name(fullname)
        if target_name is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=False)

    def create_module(self, spec):
        return importlib.import_module(new_name(spec.name))

    def exec_module(self, module):
        pass


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
