"""DKD: decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022).

KD's KL splits at the target class y of each sample. From p = softmax(z/T) over the K classes,

    b = (p_y, 1 - p_y)                      the binary target / non-target distribution
    p^ = softmax over k != y of z_k / T     the distribution among the K - 1 non-target classes

    TCKD = T^2 * (1/N) sum_n KL(b^t_n || b^s_n)
    NCKD = T^2 * (1/N) sum_n KL(p^t_n || p^s_n)

and DKD = ``warm-up * (alpha * TCKD + beta * NCKD)``, where KD itself is TCKD + (1 - p^t_y) NCKD:
DKD frees NCKD's weight from the teacher's confidence. ``labels`` (N,) are required.

Published defaults (CIFAR-100, the authors' mdistiller): alpha 1, beta 8, T 4, CE weight 1,
and a linear warm-up of the term over 20 epochs, ``min((epoch + 1) / warmup_epochs, 1)`` with
the 0-based epoch that the trainer gives ``set_epoch`` (mdistiller: ``min(epoch / 20, 1)``,
epochs from 1); before any ``set_epoch`` the factor is 1. Their per-pair betas: 2 for
resnet56 -> resnet20 and resnet110 -> resnet32, 6 for vgg13 -> vgg8 / MobileNetV2 and
wrn_40_2 -> wrn_16_2 / wrn_40_1, 8 elsewhere. For a short training give ``warmup_epochs``
in proportion (e.g. 20/240 of the epochs), or 0 for none.

DKD+LS (``dkd+ls``, Sun et al., CVPR 2024) is DKD on logits z-scored per sample
(``kd_optuna.distill.baselines.ls.standardize``) with the authors' `--base-temp 2 --kd-weight 9`:
T = 2 and both alpha and beta multiplied by 9, i.e. alpha 9, beta 72, CE weight 1, warm-up 20
(their per-pair logs vary T, 2 to 3, the multiplier, 9 to 18, and beta, 2 to 8).

The log-probabilities are computed in log space (log b = (log p_y, logsumexp_{k != y} log p_k),
p^ from a log-softmax over the K - 1 non-target logits), the same numbers as the authors'
``torch.log`` of summed probabilities and their ``- 1000 * gt_mask`` trick, without underflow.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kd_optuna.distill.baselines._base import BaselineLoss, Shapes, WarmUp
from kd_optuna.distill.baselines.ls import check_logits, check_temperature, standardize


def _split(
    z: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) logits -> log b (N, 2) and log p^ (N, K - 1), both at temperature T."""
    n, k = z.shape
    scaled = z / temperature
    log_p = F.log_softmax(scaled, dim=1)
    target = torch.zeros_like(z, dtype=torch.bool).scatter_(1, labels[:, None], True)
    log_p_target = log_p.gather(1, labels[:, None])
    log_p_other = log_p[~target].view(n, k - 1)
    log_b = torch.cat([log_p_target, torch.logsumexp(log_p_other, dim=1, keepdim=True)], dim=1)
    log_p_hat = F.log_softmax(scaled[~target].view(n, k - 1), dim=1)
    return log_b, log_p_hat


def _kl(log_q_student: torch.Tensor, log_q_teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(log_q_student, log_q_teacher, reduction="batchmean", log_target=True)


def dkd_terms(
    s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of student logits ``s`` against teacher logits ``t`` (N, K); both 0-dim,
    T^2 included, batch means."""
    log_b_s, log_hat_s = _split(s, labels, temperature)
    log_b_t, log_hat_t = _split(t, labels, temperature)
    scale = temperature**2
    return _kl(log_b_s, log_b_t) * scale, _kl(log_hat_s, log_hat_t) * scale


def dkd_loss(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD; 0-dim, no warm-up."""
    tckd, nckd = dkd_terms(s, t, labels, temperature)
    return alpha * tckd + beta * nckd


class DKD(BaselineLoss):
    """DKD on the logits ``logit`` (N, K) with the labels; no trainable parameters.

    ``standardize=True`` z-scores both sides' logits first (the LS switch; ``dkd+ls`` is
    :class:`DKDLS`). ``set_epoch(e)`` (0-based) drives the warm-up.
    """

    name = "dkd"
    knowledge = "logit"
    needs_labels = True

    def __init__(
        self,
        student_shapes: Shapes,
        teacher_shapes: Shapes,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: float = 20,
        standardize: bool = False,
    ):
        super().__init__(student_shapes, teacher_shapes)
        check_logits(self.name, self.student_dim, self.teacher_dim)
        check_temperature(self.name, temperature)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.standardize = bool(standardize)
        self.warmup = WarmUp(warmup_epochs, self.name)

    def set_epoch(self, epoch: float) -> None:
        """Epoch ``epoch`` (0-based) starts: the term is scaled by min((epoch + 1) / warmup, 1)."""
        self.warmup.set_epoch(epoch)

    def compute(self, s, t, labels, index):
        if self.standardize:
            s, t = standardize(s), standardize(t)
        loss = dkd_loss(s, t, labels, self.alpha, self.beta, self.temperature)
        return self.warmup.factor * loss


class DKDLS(DKD):
    """DKD+LS: DKD on standardised logits, the authors' T = 2, alpha 9, beta 72 (= 9 x DKD's)."""

    name = "dkd+ls"

    def __init__(
        self,
        student_shapes: Shapes,
        teacher_shapes: Shapes,
        *,
        alpha: float = 9.0,
        beta: float = 72.0,
        temperature: float = 2.0,
        warmup_epochs: float = 20,
        standardize: bool = True,
    ):
        super().__init__(
            student_shapes,
            teacher_shapes,
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            warmup_epochs=warmup_epochs,
            standardize=standardize,
        )
