"""The loss-rejection protocol (seed D.1): is a candidate distiller worth a proxy trial?

A few cheap checks, in this order, each with a stable reason (stored as ``reject_reason``):

    invalid        DistillerLoss cannot be built or run for these shapes (InvalidDistiller).
    repulsive      on the teacher's own outputs t, the KD term is not smallest at s = t:
                   mean_k L(t + d_k, t) < L(t, t) - tol for seeded perturbations d_k of size
                   0.1 and 1 times std(t) (for a loss convex in s, the mean is >= L(t, t)).
    non_finite     a NaN/inf loss, an overflowing knowledge tensor, or non-finite gradients
                   in ``reject_steps`` training steps on one fixed batch.
    exploding      the KD term exceeds ``reject_ratio`` x the CE term at the first step.
    zero_gradient  the KD term's gradient w.r.t. the student's outputs (through the adapter)
                   is zero at every step, relative to the CE gradient w.r.t. the logits (< 1e-9
                   of its norm): the distiller does nothing.

The steps use the student as initialised with the proxy's first seed (``new_student`` may
hand back one model reset to those weights), the proxy's optimiser and the same batch every
time, so the verdict depends only on the spec and the task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_optuna.train.engine import Hooks, train_steps
from kd_optuna.errors import InvalidDistiller, first_line
from kd_optuna.proxy.settings import ProxySettings
from kd_optuna.proxy.views import ProxyData, TeacherLookup
from kd_optuna.proxy.training import memory_format
from kd_optuna.space import DistillerSpec

REASONS = ("invalid", "repulsive", "non_finite", "exploding", "zero_gradient")
_NON_FINITE_MESSAGES = ("non-finite", "overflow")
PERTURBATION_SCALES = (0.1, 1.0)
PERTURBATIONS = 4
ZERO_GRADIENT_RATIO = 1e-9


@dataclass(frozen=True)
class Rejection:
    """Why a distiller was rejected: ``reason`` in REASONS, ``detail`` a one-line explanation."""

    reason: str
    detail: str


@dataclass(frozen=True)
class RejectionBatch:
    """One fixed batch: labelled images xl (L, ...) with labels yl (L,), KD images xk (B, ...)
    with the teacher's outputs t on them (float32). When the proxy's KD batch is labelled
    (``ProxySettings.labelled_kd``), L = 0 and ``kd_y`` (B,) holds the KD images' labels: CE
    and the distiller both see them, as in training."""

    labelled_x: Tensor
    labelled_y: Tensor
    kd_x: Tensor
    teacher: Mapping[str, Tensor]
    kd_y: Tensor | None = None

    @classmethod
    def build(cls, data: ProxyData, teacher: TeacherLookup, settings: ProxySettings) -> "RejectionBatch":
        n_pool = data.pool.shape[0]
        b = min(settings.reject_batch_size, n_pool)
        generator = torch.Generator().manual_seed(settings.seeds[0])
        positions = torch.randperm(n_pool, generator=generator)[:b].to(data.device)
        views = torch.zeros_like(positions)
        rows = data.labelled[: min(settings.label_batch_size, b)]
        kd_y = data.train_y[data.pool[positions]] if settings.labelled_kd else None
        return cls(
            data.train_images(rows), data.train_y[rows], data.pool_images(positions, views),
            {k: v.float() for k, v in teacher(positions, views).items()}, kd_y,
        )


def _classify(error: InvalidDistiller) -> Rejection:
    reason = "non_finite" if any(m in error.reason for m in _NON_FINITE_MESSAGES) else "invalid"
    return Rejection(reason, error.reason)


def _grad_norm(grads) -> Tensor:
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))


def check_repulsion(probe: nn.Module, teacher: Mapping[str, Tensor], seed: int = 0) -> Rejection | None:
    """``repulsive`` when perturbing the student's outputs away from t lowers the KD term.

    ``probe`` is the spec's DistillerLoss built for teacher shapes on both sides. Every
    evaluation draws the random transforms (drop, mask) from the same seed.
    """
    knowledge = probe.spec.knowledge
    names = [knowledge] + (["logit"] if knowledge != "logit" and "logit" in teacher else [])
    generator = torch.Generator().manual_seed(seed)

    def value(student: Mapping[str, Tensor]) -> float:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return float(probe(student, teacher).detach())

    with torch.no_grad():
        at_teacher = value(teacher)
        tolerance = 1e-3 * abs(at_teacher) + 1e-9
        for scale in PERTURBATION_SCALES:
            total = 0.0
            for _ in range(PERTURBATIONS):
                moved = dict(teacher)
                for name in names:
                    t = teacher[name]
                    noise = torch.randn(t.shape, generator=generator).to(t.device)
                    moved[name] = t + scale * float(t.std().clamp_min(1e-6)) * noise
                total += value(moved)
            mean = total / PERTURBATIONS
            if mean < at_teacher - tolerance:
                return Rejection(
                    "repulsive",
                    f"KD term {at_teacher:.4g} at s = t but {mean:.4g} on average at "
                    f"{scale:g} std away: it pushes the student from the teacher",
                )
    return None


class _Verdict(Exception):
    """Raised inside a rejection step to end the steps with ``rejection``."""

    def __init__(self, rejection: Rejection):
        super().__init__(rejection.detail)
        self.rejection = rejection


def check_steps(
    student: nn.Module,
    distiller: nn.Module,
    batch: RejectionBatch,
    settings: ProxySettings,
) -> Rejection | None:
    """``reject_steps`` training steps on ``batch``: non_finite, exploding, zero_gradient.

    The KD gradient is taken w.r.t. the student's outputs (through the adapter), which is zero
    exactly when no parameter would move; each step costs one forward and one backward pass.
    """
    params = [p for p in list(student.parameters()) + list(distiller.parameters()) if p.requires_grad]
    optimizer = settings.make_optimizer(params)
    fmt = memory_format(settings)
    x = torch.cat([batch.labelled_x, batch.kd_x]).contiguous(memory_format=fmt)
    student.to(memory_format=fmt)
    student.train()
    distiller.train()
    step_loss = _RejectionStep(student, distiller, batch, settings)

    def finite_gradients(step: int) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            raise _Verdict(Rejection("non_finite", f"non-finite gradient at rejection step {step}"))

    try:
        train_steps(optimizer, [x] * settings.reject_steps, step_loss, hooks=Hooks(after_backward=finite_gradients))
    except _Verdict as verdict:
        return verdict.rejection
    if not (step_loss.any_gradient or settings.reject_steps == 0):
        return Rejection("zero_gradient", "the KD term's gradient is zero: the distiller does nothing")
    return None


class _RejectionStep:
    """The loss ``ce_weight * CE + KD`` of one rejection step on the images x (L + B, ...), after
    the checks on its KD term (raising :class:`_Verdict`); ``any_gradient`` records whether the
    KD gradient w.r.t. the student's outputs was ever above ZERO_GRADIENT_RATIO x the CE one."""

    def __init__(self, student: nn.Module, distiller: nn.Module, batch: RejectionBatch, settings: ProxySettings):
        self.student, self.distiller, self.batch, self.settings = student, distiller, batch, settings
        self.step, self.any_gradient = 0, False

    def __call__(self, x: Tensor) -> Tensor:
        batch, step = self.batch, self.step
        self.step += 1
        n_labelled = batch.labelled_x.shape[0]
        out = self.student(x)
        if batch.kd_y is None:
            ce = F.cross_entropy(out["logit"][:n_labelled], batch.labelled_y)
        else:
            ce = F.cross_entropy(out["logit"], batch.kd_y)
        kd_inputs = {k: v[n_labelled:].contiguous() for k, v in out.items()}
        try:
            kd = self.distiller(kd_inputs, batch.teacher, batch.kd_y)
        except InvalidDistiller as error:
            raise _Verdict(_classify(error)) from None
        self._check_term(step, kd, ce)
        if kd.requires_grad:
            self._check_gradient(step, kd, ce, list(kd_inputs.values()), out["logit"])
        return self.settings.ce_weight * ce + kd

    def _check_term(self, step: int, kd: Tensor, ce: Tensor) -> None:
        kd_value, ce_value = float(kd.detach()), float(ce.detach())
        ratio = self.settings.reject_ratio
        if not math.isfinite(kd_value):
            raise _Verdict(Rejection("non_finite", f"non-finite KD term at rejection step {step}"))
        if step == 0 and kd_value > ratio * ce_value:
            raise _Verdict(Rejection("exploding", f"KD term {kd_value:.4g} is over {ratio:g} x CE {ce_value:.4g}"))

    def _check_gradient(self, step: int, kd: Tensor, ce: Tensor, outputs: list[Tensor], logits: Tensor) -> None:
        kd_grads = torch.autograd.grad(kd, outputs, retain_graph=True, allow_unused=True)
        (ce_grad,) = torch.autograd.grad(ce, [logits], retain_graph=True)
        kd_norm, ce_norm = float(_grad_norm(kd_grads)), float(_grad_norm([ce_grad]))
        if not math.isfinite(kd_norm):
            raise _Verdict(Rejection("non_finite", f"non-finite KD gradient at rejection step {step}"))
        if kd_norm > ZERO_GRADIENT_RATIO * max(ce_norm, 1e-12):
            self.any_gradient = True


def reject(
    spec: DistillerSpec,
    make_distiller: Callable[[DistillerSpec, bool], nn.Module],
    make_probe: Callable[[DistillerSpec], nn.Module],
    new_student: Callable[[], nn.Module],
    batch: RejectionBatch,
    settings: ProxySettings,
) -> Rejection | None:
    """Run the whole protocol on ``spec``; None means it is worth training.

    ``make_distiller(spec, check_finite)`` builds its DistillerLoss for the task's student and
    teacher shapes, ``make_probe(spec)`` the same loss with teacher shapes on both sides.
    A CUDA out-of-memory error is not a verdict on the spec and propagates.
    """
    student = new_student()
    torch.manual_seed(settings.seeds[0])
    try:
        distiller = make_distiller(spec, True)
        probe = make_probe(spec)
        verdict = check_repulsion(probe, batch.teacher, seed=settings.seeds[0])
    except InvalidDistiller as error:
        return _classify(error)
    if verdict is not None:
        return verdict
    try:
        return check_steps(student, distiller, batch, settings)
    except torch.cuda.OutOfMemoryError:
        raise
    except InvalidDistiller as error:
        return _classify(error)
    except RuntimeError as error:
        return Rejection("invalid", f"{type(error).__name__}: {first_line(error, default=type(error).__name__)}")
