"""Reference distillers that the search space cannot express: PKT, RKD, CRD and DML.

PKT, RKD and CRD are losses with the interface of ``kd_optuna.loss.DistillerLoss``::

    loss = build_baseline("crd", student_shapes, teacher_shapes, num_data=50000)
    term = loss(student_outputs, teacher_outputs, labels, index)   # 0-dim, CE not included

DML trains a second student instead of reading a frozen teacher, so it is a trainer-side
object, :class:`MutualLearning` (``BASELINES["dml"]``), built from the peer and its optimizer.
"""

from __future__ import annotations

from typing import Any

from kd_optuna.baselines._base import BaselineLoss, InvalidBaseline, Shapes
from kd_optuna.baselines.crd import CRD
from kd_optuna.baselines.dml import MutualLearning, mutual_kl
from kd_optuna.baselines.pkt import PKT
from kd_optuna.baselines.rkd import RKD

#: name -> class, in the order of the seed's Table 3.
BASELINES: dict[str, type] = {"pkt": PKT, "crd": CRD, "rkd": RKD, "dml": MutualLearning}


def build_baseline(
    name: str,
    student_shapes: Shapes,
    teacher_shapes: Shapes,
    *,
    num_data: int | None = None,
    **kw: Any,
) -> BaselineLoss:
    """The loss baseline ``name`` ("pkt", "rkd" or "crd") for these per-sample shapes.

    ``num_data``, the training set's size, is required by the baselines that read sample
    indices (CRD, ``needs_index``) and ignored by the others, so a trainer can pass it to all.
    ``kw`` goes to the class (e.g. ``weight``, ``num_negatives``).
    """
    if name == "dml":
        raise InvalidBaseline(
            "dml trains a peer student, it is not a loss; build "
            "kd_optuna.baselines.MutualLearning(peer, optimizer) instead"
        )
    if name not in BASELINES:
        raise InvalidBaseline(
            f"unknown baseline {name!r}; choose one of: {', '.join(BASELINES)}"
        )
    if BASELINES[name].needs_index:
        if num_data is None:
            raise InvalidBaseline(f"{name} needs num_data=, the number of samples in the training set")
        kw["num_data"] = num_data
    try:
        return BASELINES[name](student_shapes, teacher_shapes, **kw)
    except TypeError as exc:
        help_name = f"kd_optuna.baselines.{BASELINES[name].__name__}"
        raise InvalidBaseline(f"{name}: {exc}; see help({help_name})") from None


__all__ = [
    "BASELINES",
    "BaselineLoss",
    "CRD",
    "InvalidBaseline",
    "MutualLearning",
    "PKT",
    "RKD",
    "build_baseline",
    "mutual_kl",
]
