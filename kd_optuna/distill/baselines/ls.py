"""Logit standardization (Sun, Zhu, Li, Ren & Zhang, CVPR 2024), here as KD+LS.

Teacher and student need not match the logits' range, only their relations: each sample's
logits z (K classes) are z-scored before the temperature softmax,

    Z(z) = (z - mean_k z) / (eps + std_k z)        (std unbiased, over the K classes; eps = 1e-7)

which is the paper's "temperature = base temperature x the logits' own standard deviation".
KD+LS is Hinton's KD on the standardised logits of both sides (s, t: (N, K)):

    weight * T^2 * (1/N) sum_n KL( softmax(Z(t_n)/T) || softmax(Z(s_n)/T) )

Published defaults (the authors' code, CIFAR-100, `--logit-stand --base-temp 2 --kd-weight 9`):
base temperature T = 2, weight 9, and their KD recipe's cross-entropy weight 0.1 (``ce_weight``:
the trainer's CE is 0.1 CE). Their per-pair logs use T = 3 for vgg13 -> vgg8, resnet32x4 ->
wrn_16_2 / wrn_40_2 and the MobileNetV2 students (weight 1 for ResNet50 -> MobileNetV2), T = 4
and weight 12 for resnet110 -> resnet20. ``standardize=False`` is plain KD with the same T and
weight (the switch).

:func:`standardize` is also what DKD+LS (``dkd.py``) applies. One guard beyond the authors'
code: the variance is clamped at 1e-24 before the square root, so constant logits (a
zero-initialised classifier) give 0 and a finite gradient instead of NaN; any sample whose
logits are not constant to 1e-12 gets the authors' value.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kd_optuna.distill.baselines._base import BaselineLoss, InvalidBaseline, Shapes

_EPS = 1e-7


def standardize(logit: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N, K): each row minus its mean, over eps + its unbiased std (K >= 2)."""
    centred = logit - logit.mean(dim=1, keepdim=True)
    variance = centred.pow(2).sum(dim=1, keepdim=True) / (logit.shape[1] - 1)
    return centred / (_EPS + variance.clamp_min(1e-24).sqrt())


def kd_divergence(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * batch mean of KL(softmax(t/T) || softmax(s/T)) summed over classes; 0-dim."""
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def check_logits(method: str, num_student: int, num_teacher: int) -> None:
    if num_student != num_teacher:
        raise InvalidBaseline(
            f"{method}: the student has {num_student} logits and the teacher {num_teacher}; "
            "a logit distiller needs the same classes on both sides"
        )
    if num_student < 2:
        raise InvalidBaseline(f"{method}: needs at least 2 classes, got {num_student}")


def check_temperature(method: str, temperature: float) -> None:
    if not temperature > 0:
        raise InvalidBaseline(f"{method}: temperature={temperature}; choose a positive value")


class KDLS(BaselineLoss):
    """KD on standardised logits ``logit`` (N, K); no trainable parameters.

    Defaults T = 2, weight 9, ``ce_weight`` 0.1: the authors' CIFAR-100 setting.
    """

    name = "kd+ls"
    knowledge = "logit"
    ce_weight = 0.1

    def __init__(
        self,
        student_shapes: Shapes,
        teacher_shapes: Shapes,
        *,
        temperature: float = 2.0,
        weight: float = 9.0,
        standardize: bool = True,
    ):
        super().__init__(student_shapes, teacher_shapes)
        check_logits(self.name, self.student_dim, self.teacher_dim)
        check_temperature(self.name, temperature)
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.standardize = bool(standardize)

    def compute(self, s, t, labels, index):
        if self.standardize:
            s, t = standardize(s), standardize(t)
        return self.weight * kd_divergence(s, t, self.temperature)
