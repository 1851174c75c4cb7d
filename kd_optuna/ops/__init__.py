"""Pure tensor ops of the distiller search space, found by name.

Importing this package registers every op: ``TRANSFORMS``, ``DISTANCES`` and ``CALIBRATIONS``
hold exactly the names of ``kd_optuna.space``. The ops know nothing of Optuna or of models.
"""

from kd_optuna.ops import calibrations, distances, transforms
from kd_optuna.ops.calibrations import LOGITS_NEEDED, CalibrationInputs
from kd_optuna.ops.registry import CALIBRATIONS, DISTANCES, TRANSFORMS, Registry
from kd_optuna.ops.transforms import RANDOM_TRANSFORMS

__all__ = [
    "CALIBRATIONS",
    "DISTANCES",
    "LOGITS_NEEDED",
    "RANDOM_TRANSFORMS",
    "TRANSFORMS",
    "CalibrationInputs",
    "Registry",
    "calibrations",
    "distances",
    "transforms",
]
