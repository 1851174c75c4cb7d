"""The 5 loss-weight calibrations of the search space (seed E.3, Listing 4), registered by name.

A calibration returns one weight per sample, shape ``(N,)``, float32, detached and never
negative; the loss is ``mean_n(w_n * d_n)``. Logits are the raw model outputs ``(N, K)`` at
temperature 1, with any number of classes K, on any device. When a batch has no labels
(distillation on unlabelled images), the teacher's argmax stands in for the label.

Each is one function under one ``@calibration(name, logits=...)`` decorator
(``kd_optuna.ops.registry``): ``logits`` says whose logits it reads, ``formula`` how its weight
writes in ``DistillerSpec.formula`` (``w_name``; none for ``no``). The order of the
definitions is the order of the options of the ``calibration`` gene. torch is imported at the
first call (``kd_optuna.ops.lazy``).
"""

from __future__ import annotations

import dataclasses
import math

from typing import TYPE_CHECKING

from kd_optuna.ops.lazy import lazy_import
from kd_optuna.ops.registry import calibration

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())
    F = lazy_import("torch.nn.functional", globals(), "F")

RATIO_EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class CalibrationInputs:
    """What a calibration may read.

    student, teacher: the knowledge after transforms and temperature, one shape ``(N, ...)``.
    student_logit, teacher_logit: ``(N, K)`` raw logits, or None when not given.
    labels: ``(N,)`` class indices, or None for an unlabelled batch.
    """

    student: Tensor
    teacher: Tensor
    student_logit: Tensor | None = None
    teacher_logit: Tensor | None = None
    labels: Tensor | None = None

    def label_or_teacher_argmax(self) -> Tensor:
        if self.labels is not None:
            return self.labels.to(device=self.teacher_logit.device, dtype=torch.long)
        return self.teacher_logit.argmax(dim=1)


def _logits(x: Tensor | None, who: str, name: str) -> Tensor:
    if x is None:
        raise ValueError(f"calibration {name!r} needs the {who}'s logits")
    return x.detach().float()


def _label_ce(logits: Tensor, label: Tensor) -> Tensor:
    return F.cross_entropy(logits, label, reduction="none")


@calibration("entropy", logits=("teacher",))
def entropy(inputs: CalibrationInputs) -> Tensor:
    """H(softmax(t_logit)) / log K in [0, 1]: the teacher's uncertainty, (N, K) -> (N,); 0 when
    K = 1.

    The seed's version printed and multiplied an undefined ``tensor``; this one reads the
    teacher's class distribution, as its text says.
    """
    logits = _logits(inputs.teacher_logit, "teacher", "entropy")
    classes = logits.shape[1]
    if classes < 2:
        return torch.zeros(logits.shape[0], device=logits.device)
    log_p = F.log_softmax(logits, dim=1)
    return (-(log_p.exp() * log_p).sum(dim=1) / math.log(classes)).clamp(0, 1)


@calibration("focal", logits=("student", "teacher"))
def focal(inputs: CalibrationInputs) -> Tensor:
    """WSLD's weight (seed Eq. 13): 1 - exp(-CE_s / (CE_t + 1e-7)) in [0, 1).

    CE_s, CE_t: the student's and the teacher's cross-entropy on the label (the teacher's
    argmax when labels is None), (N, K) -> (N,). Large where the student trails the teacher.
    """
    label = inputs.label_or_teacher_argmax()
    ce_s = _label_ce(_logits(inputs.student_logit, "student", "focal"), label)
    ce_t = _label_ce(_logits(inputs.teacher_logit, "teacher", "focal"), label)
    ratio = (ce_s / (ce_t + RATIO_EPS)).clamp(min=0)
    return 1 - torch.exp(-ratio)


@calibration("sim")
def sim(inputs: CalibrationInputs) -> Tensor:
    """(1 + cos(s, t)) / 2 in [0, 1] of the transformed knowledge flattened to (N, D) -> (N,).

    The seed used cos itself, which is negative for opposed samples and so pushed them apart.
    """
    s = inputs.student.detach().float().flatten(1)
    t = inputs.teacher.detach().float().flatten(1)
    return ((1 + F.cosine_similarity(s, t, dim=1, eps=1e-8)) / 2).clamp(0, 1)


@calibration("conf", logits=("teacher",))
def conf(inputs: CalibrationInputs) -> Tensor:
    """softmax(t_logit)[label] in [0, 1]: the teacher's confidence in the label (its own
    argmax when labels is None, i.e. its top probability), (N, K) -> (N,).

    The seed's 1 - CE_s went negative and hard-coded 100 classes and CUDA.
    """
    logits = _logits(inputs.teacher_logit, "teacher", "conf")
    label = inputs.label_or_teacher_argmax()
    return F.softmax(logits, dim=1).gather(1, label.unsqueeze(1)).squeeze(1)


@calibration("no", formula=None)
def no(inputs: CalibrationInputs) -> Tensor:
    """w = 1 for every sample, (N,)."""
    return torch.ones(inputs.student.shape[0], device=inputs.student.device)
