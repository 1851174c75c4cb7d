"""The interface every loss baseline shares, the same as ``kd_optuna.distill.loss.DistillerLoss``.

A baseline is an ``nn.Module`` built from the per-sample shapes of the knowledge each side
offers, e.g. ``{"logit": (100,), "emb": (64,), "feat": (64, 8, 8)}``. Its forward takes the
student's and the teacher's knowledge dicts (batch first: ``emb`` is (N, D), ``feat`` is
(N, C, H, W)), the labels (N,) or None and the dataset indices (N,) or None, and returns a
0-dim tensor: the weighted distillation term only (the trainer adds cross-entropy). Teacher
tensors are detached here, so no gradient ever reaches the teacher; any trainable part of a
baseline (CRD's embedding heads, ReviewKD's fusion layers) is in ``.parameters()`` and is
trained with the student.
As in ``DistillerLoss``, the loss is computed in float32 whatever the inputs' dtype or autocast.
The class docstring of :class:`BaselineLoss` says what a trainer passes, and when.
"""

from __future__ import annotations

import numbers
from typing import ClassVar, Mapping

import torch
from torch import nn

from kd_optuna.errors import KdOptunaError

Shapes = Mapping[str, tuple[int, ...]]


class InvalidBaseline(KdOptunaError, ValueError):
    """A baseline name, option or input that the baseline cannot use."""


def _knowledge_shape(shapes: Shapes, knowledge: str, side: str, method: str) -> tuple[int, ...]:
    if knowledge not in shapes:
        offered = ", ".join(sorted(shapes)) or "nothing"
        raise InvalidBaseline(
            f"{method} compares '{knowledge}' but the {side} offers {offered}; "
            f"tap the {side} with kd_optuna.models.tap_model"
        )
    return tuple(int(n) for n in shapes[knowledge])


class BaselineLoss(nn.Module):
    """Base of the loss baselines: picks the knowledge, checks shapes, detaches the teacher.

    Subclasses set ``name`` and ``knowledge`` and implement ``compute(s, t, labels, index)``
    on flattened tensors ``s`` (N, Ds) and ``t`` (N, Dt), ``t`` already detached; ``labels``
    is checked ((N,) integers in [0, Ds)) and on ``s``'s device when ``needs_labels``.

    What a trainer passes, and when:

    - ``labels`` (N,) int64 class indices, on every call. The baselines with
      ``needs_labels`` (DKD, DKD+LS: their target-class split) raise :class:`InvalidBaseline`
      when it is None; the others ignore it.
    - ``index`` (N,) positions in the training set, where ``needs_index`` (CRD).
    - ``set_epoch(epoch)`` at the start of every training epoch, ``epoch`` 0-based. Every
      baseline has it (a no-op on those without a schedule); DKD, DKD+LS and ReviewKD scale
      their term by the linear warm-up ``min((epoch + 1) / warmup_epochs, 1)``, mdistiller's
      ``min(epoch / warmup, 1)`` with its 1-based epochs. A loss whose ``set_epoch`` is never
      called is fully warmed up (factor 1), the loss as the paper writes it.
    - ``ce_weight``: the weight the method's published recipe puts on the cross-entropy the
      trainer adds (1 for most; 0.1 for KD+LS). A trainer that follows the recipes uses
      ``ce_weight * CE + loss(...)``.

    The warm-up epoch is not in ``state_dict``: a resumed training calls ``set_epoch`` again.
    """

    name: ClassVar[str]
    knowledge: ClassVar[str] = "emb"
    needs_index: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    #: the cross-entropy weight of the method's published recipe (the trainer adds the CE)
    ce_weight: ClassVar[float] = 1.0

    def __init__(self, student_shapes: Shapes, teacher_shapes: Shapes):
        super().__init__()
        self.student_shape = _knowledge_shape(student_shapes, self.knowledge, "student", self.name)
        self.teacher_shape = _knowledge_shape(teacher_shapes, self.knowledge, "teacher", self.name)
        self.student_dim = _numel(self.student_shape)
        self.teacher_dim = _numel(self.teacher_shape)

    def forward(
        self,
        student: Mapping[str, torch.Tensor],
        teacher: Mapping[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        s = self._take(student, self.student_shape, "student")
        t = self._take(teacher, self.teacher_shape, "teacher").detach()
        if s.shape[0] != t.shape[0]:
            raise InvalidBaseline(
                f"{self.name}: student batch {s.shape[0]} != teacher batch {t.shape[0]}; "
                "feed both networks the same images"
            )
        if self.needs_index and index is None:
            raise InvalidBaseline(
                f"{self.name} needs the dataset index of every sample; pass index= "
                "(a loader yielding (image, label, index))"
            )
        if self.needs_labels:
            labels = self._checked_labels(labels, s.shape[0], self.student_dim, s.device)
        with torch.autocast(s.device.type, enabled=False):
            return self.compute(s.flatten(1).float(), t.flatten(1).float(), labels, index)

    def set_epoch(self, epoch: float) -> None:
        """Tell the loss that training epoch ``epoch`` (0-based) starts; a no-op here.

        Baselines with a warm-up (DKD, ReviewKD) override it; a trainer may call it on all.
        """
        _check_epoch(epoch, self.name)

    def _checked_labels(
        self, labels: torch.Tensor | None, n: int, num_classes: int, device: torch.device
    ) -> torch.Tensor:
        if labels is None:
            raise InvalidBaseline(
                f"{self.name} needs the labels (its target-class split); pass labels= (N,) "
                "class indices: loss(student_out, teacher_out, labels)"
            )
        labels = torch.as_tensor(labels).to(device=device).flatten()
        if labels.shape[0] != n or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise InvalidBaseline(
                f"{self.name}: labels must be {n} integer class indices, got "
                f"{tuple(labels.shape)} {labels.dtype}"
            )
        labels = labels.long()
        if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise InvalidBaseline(
                f"{self.name}: labels must lie in [0, {num_classes}); got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return labels

    def compute(
        self,
        s: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None,
        index: torch.Tensor | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def _take(
        self,
        outputs: Mapping[str, torch.Tensor],
        shape: tuple[int, ...],
        side: str,
        knowledge: str | None = None,
    ) -> torch.Tensor:
        knowledge = self.knowledge if knowledge is None else knowledge
        if knowledge not in outputs:
            raise InvalidBaseline(
                f"{self.name} needs the {side}'s '{knowledge}'; "
                f"got {', '.join(sorted(outputs)) or 'nothing'}"
            )
        x = outputs[knowledge]
        if tuple(x.shape[1:]) != shape:
            raise InvalidBaseline(
                f"{self.name}: the {side}'s '{knowledge}' is {tuple(x.shape[1:])} per sample, "
                f"built for {shape}; build the baseline from the shapes the model gives"
            )
        return x


class WarmUp:
    """The linear warm-up of DKD and ReviewKD: ``factor = min((epoch + 1) / warmup_epochs, 1)``.

    ``epoch`` is 0-based, set by ``set_epoch`` at each epoch start; before any call the factor
    is 1 (fully warmed up), and ``warmup_epochs = 0`` turns the warm-up off.
    """

    def __init__(self, warmup_epochs: float, method: str):
        if warmup_epochs < 0:
            raise InvalidBaseline(f"{method}: warmup_epochs={warmup_epochs}; give 0 (off) or more")
        self.warmup_epochs = float(warmup_epochs)
        self.method = method
        self.epoch: float | None = None

    def set_epoch(self, epoch: float) -> None:
        _check_epoch(epoch, self.method)
        self.epoch = float(epoch)

    @property
    def factor(self) -> float:
        if self.epoch is None or self.warmup_epochs == 0:
            return 1.0
        return min((self.epoch + 1.0) / self.warmup_epochs, 1.0)


def _check_epoch(epoch: float, method: str) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Real) or not epoch >= 0:
        raise InvalidBaseline(f"{method}: set_epoch({epoch!r}); give the 0-based epoch, a number >= 0")


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total
