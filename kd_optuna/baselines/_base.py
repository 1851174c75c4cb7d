"""The interface every loss baseline shares, the same as ``kd_optuna.loss.DistillerLoss``.

A baseline is an ``nn.Module`` built from the per-sample shapes of the knowledge each side
offers, e.g. ``{"logit": (100,), "emb": (64,), "feat": (64, 8, 8)}``. Its forward takes the
student's and the teacher's knowledge dicts (batch first: ``emb`` is (N, D), ``feat`` is
(N, C, H, W)), the labels (N,) or None and the dataset indices (N,) or None, and returns a
0-dim tensor: the weighted distillation term only (the trainer adds cross-entropy). Teacher
tensors are detached here, so no gradient ever reaches the teacher; any trainable part of a
baseline (CRD's embedding heads) is in ``.parameters()`` and is trained with the student.
As in ``DistillerLoss``, the loss is computed in float32 whatever the inputs' dtype or autocast.
"""

from __future__ import annotations

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
    """Base of PKT, RKD and CRD: picks the knowledge, checks shapes, detaches the teacher.

    Subclasses set ``name`` and ``knowledge`` and implement ``compute(s, t, labels, index)``
    on flattened tensors ``s`` (N, Ds) and ``t`` (N, Dt), ``t`` already detached.
    """

    name: ClassVar[str]
    knowledge: ClassVar[str] = "emb"
    needs_index: ClassVar[bool] = False

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
        with torch.autocast(s.device.type, enabled=False):
            return self.compute(s.flatten(1).float(), t.flatten(1).float(), labels, index)

    def compute(
        self,
        s: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None,
        index: torch.Tensor | None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def _take(
        self, outputs: Mapping[str, torch.Tensor], shape: tuple[int, ...], side: str
    ) -> torch.Tensor:
        if self.knowledge not in outputs:
            raise InvalidBaseline(
                f"{self.name} needs the {side}'s '{self.knowledge}'; "
                f"got {', '.join(sorted(outputs)) or 'nothing'}"
            )
        x = outputs[self.knowledge]
        if tuple(x.shape[1:]) != shape:
            raise InvalidBaseline(
                f"{self.name}: the {side}'s '{self.knowledge}' is {tuple(x.shape[1:])} per sample, "
                f"built for {shape}; build the baseline from the shapes the model gives"
            )
        return x


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total
