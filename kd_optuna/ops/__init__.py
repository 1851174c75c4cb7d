"""Pure tensor ops of the distiller search space, found by name.

Importing this package registers every op, each one function under one decorator of
``kd_optuna.ops.registry``: ``TRANSFORMS``, ``DISTANCES`` and ``CALIBRATIONS`` hold the ops
with their metadata, and ``kd_optuna.space`` builds its options from them. Importing it loads
no torch (the ops import it at their first call). The ops know nothing of Optuna or of models.

``RANDOM_TRANSFORMS`` (the transforms that take a generator) and ``LOGITS_NEEDED``
(calibration -> whose logits it reads, for those that read any) are read off the registries
and follow them when an op joins or leaves.
"""

from kd_optuna.ops import calibrations, distances, transforms
from kd_optuna.ops.calibrations import CalibrationInputs
from kd_optuna.ops.registry import (
    CALIBRATIONS,
    DISTANCES,
    EVERY_RANK,
    TRANSFORMS,
    CalibrationInfo,
    DistanceInfo,
    Registry,
    TransformInfo,
    calibration,
    distance,
    transform,
)

RANDOM_TRANSFORMS: set[str] = set()
LOGITS_NEEDED: dict[str, tuple[str, ...]] = {}


def _derive_random() -> None:
    RANDOM_TRANSFORMS.clear()
    RANDOM_TRANSFORMS.update(info.name for info in TRANSFORMS.infos() if info.random)


def _derive_logits() -> None:
    LOGITS_NEEDED.clear()
    LOGITS_NEEDED.update((info.name, info.logits) for info in CALIBRATIONS.infos() if info.logits)


TRANSFORMS.watch(_derive_random)
CALIBRATIONS.watch(_derive_logits)

__all__ = [
    "CALIBRATIONS",
    "DISTANCES",
    "EVERY_RANK",
    "LOGITS_NEEDED",
    "RANDOM_TRANSFORMS",
    "TRANSFORMS",
    "CalibrationInfo",
    "CalibrationInputs",
    "DistanceInfo",
    "Registry",
    "TransformInfo",
    "calibration",
    "calibrations",
    "distance",
    "distances",
    "transform",
    "transforms",
]
