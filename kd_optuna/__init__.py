"""kd-optuna: KD-Zero's distiller search on Optuna.

The subpackages follow a trial's path: :mod:`kd_optuna.ops` and :mod:`kd_optuna.space` (the
vocabulary of the genes, a candidate and its canonical key), :mod:`kd_optuna.search` (the
sampler that proposes it), :mod:`kd_optuna.distill` (the loss built from it, the published and
hand-made methods), :mod:`kd_optuna.models` and
:mod:`kd_optuna.data` (what it distils), :mod:`kd_optuna.train` (the one training engine),
:mod:`kd_optuna.proxy` (the cheap trial that scores it), :mod:`kd_optuna.export` (the full
training and the script a user keeps) and :mod:`kd_optuna.run` (configs, storages, workers,
the command line). :mod:`kd_optuna.errors` and :mod:`kd_optuna.optuna_private` serve them all.
Each may import only from those before it in ``tests/test_layout.py``'s ``LAYERS``.
"""

from kd_optuna._moved import install as _install

__version__ = "0.1.0"

_install()
