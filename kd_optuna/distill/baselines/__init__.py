"""Reference distillers that the search space cannot express: PKT, RKD, CRD, DML, DKD, KD+LS,
DKD+LS and ReviewKD.

The losses have the interface of ``kd_optuna.distill.loss.DistillerLoss``::

    loss = build_baseline("dkd", student_shapes, teacher_shapes, num_data=50000)
    loss.set_epoch(epoch)                                           # each epoch start, 0-based
    term = loss(student_outputs, teacher_outputs, labels, index)   # 0-dim, CE not included
    total = loss.ce_weight * cross_entropy + term                   # the published recipe

``labels`` are required where ``needs_labels`` (dkd, dkd+ls), ``index`` where ``needs_index``
(crd); ``set_epoch`` drives the warm-up of dkd, dkd+ls and reviewkd and is a no-op elsewhere.
See ``kd_optuna.distill.baselines._base`` for the details.

DML trains a second student instead of reading a frozen teacher, so it is a trainer-side
object, :class:`MutualLearning` (``BASELINES["dml"]``), built from the peer and its optimizer.
"""

from __future__ import annotations

from typing import Any

from kd_optuna.distill.baselines._base import BaselineLoss, InvalidBaseline, Shapes
from kd_optuna.distill.baselines.crd import CRD
from kd_optuna.distill.baselines.dkd import DKD, DKDLS
from kd_optuna.distill.baselines.dml import MutualLearning, mutual_kl
from kd_optuna.distill.baselines.ls import KDLS, standardize
from kd_optuna.distill.baselines.pkt import PKT
from kd_optuna.distill.baselines.reviewkd import ReviewKD
from kd_optuna.distill.baselines.rkd import RKD

#: name -> class: the seed's Table 3 in its order, then the 2022-2024 methods.
BASELINES: dict[str, type] = {
    "pkt": PKT,
    "crd": CRD,
    "rkd": RKD,
    "dml": MutualLearning,
    "dkd": DKD,
    "kd+ls": KDLS,
    "dkd+ls": DKDLS,
    "reviewkd": ReviewKD,
}

#: name -> one line for ``--help`` and the exported script, for every key of BASELINES.
METHOD_DESCRIPTIONS: dict[str, str] = {
    "pkt": "PKT (Passalis & Tefas 2018): KL of cosine-kernel neighbour distributions of emb, x3e4",
    "crd": "CRD (Tian et al. 2020): contrastive NCE on emb, memory bank, 16384 negatives, x0.8",
    "rkd": "RKD (Park et al. 2019): Huber loss on emb pair distances (x25) and triplet angles (x50)",
    "dml": "DML (Zhang et al. 2018): a peer student trained alongside, KL(p_peer || p_student), T 1",
    "dkd": "DKD (Zhao et al. 2022): target/non-target decoupled KD, alpha 1, beta 8, T 4, warm-up 20",
    "kd+ls": "KD+LS (Sun et al. 2024): KD on per-sample z-scored logits, T 2, x9, CE weight 0.1",
    "dkd+ls": "DKD+LS (Sun et al. 2024): DKD on z-scored logits, T 2, alpha 9, beta 72, warm-up 20",
    "reviewkd": "ReviewKD (Chen et al. 2021) on feat + emb only: ABF fusion, HCL, x5, warm-up 20",
}


def build_baseline(
    name: str,
    student_shapes: Shapes,
    teacher_shapes: Shapes,
    *,
    num_data: int | None = None,
    **kw: Any,
) -> BaselineLoss:
    """The loss baseline ``name`` (a key of BASELINES but "dml") for these per-sample shapes.

    ``num_data``, the training set's size, is required by the baselines that read sample
    indices (CRD, ``needs_index``) and ignored by the others, so a trainer can pass it to all.
    ``kw`` goes to the class (e.g. ``weight``, ``num_negatives``, ``warmup_epochs``).
    """
    if name == "dml":
        raise InvalidBaseline(
            "dml trains a peer student, it is not a loss; build "
            "kd_optuna.distill.baselines.MutualLearning(peer, optimizer) instead"
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
        help_name = f"kd_optuna.distill.baselines.{BASELINES[name].__name__}"
        raise InvalidBaseline(f"{name}: {exc}; see help({help_name})") from None


__all__ = [
    "BASELINES",
    "BaselineLoss",
    "CRD",
    "DKD",
    "DKDLS",
    "InvalidBaseline",
    "KDLS",
    "METHOD_DESCRIPTIONS",
    "MutualLearning",
    "PKT",
    "RKD",
    "ReviewKD",
    "build_baseline",
    "mutual_kl",
    "standardize",
]
