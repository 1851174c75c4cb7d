"""The unified distiller loss: one ``DistillerSpec`` and the models' shapes -> an ``nn.Module``.

For knowledge tensors s (student) and t (teacher) of a batch of N samples::

    s' = T3(T2(T1(adapter(s)))) / T        t' = T3(T2(T1(t))) / T
    loss = magnitude * T^2 * mean_n(w_n * d_n),   d = distance(s', t') -> (N,),
                                                  w = calibration(...)  -> (N,), detached

The module computes the spec's canonical form (``DistillerSpec.canonical``: the same loss with
the transforms it cannot see removed and T, lambda in a normal form), so specs with one key
give one loss, bit for bit; ``literal=True`` computes the params as written instead, the
reference the canonical form is tested against. The adapter (student side only) makes the student's knowledge the teacher's shape; its
parameters are the module's parameters and are trained with the student; it computes in
their dtype (float32 unless the module was cast). The teacher's tensors are detached.
Everything after the adapter is computed in float32, whatever the inputs' dtype.

    >>> from kd_optuna.distill.classics import CLASSICS
    >>> loss = DistillerLoss(CLASSICS["kd"][0], {"logit": (100,)}, {"logit": (100,)})
    >>> value = loss({"logit": student_logits}, {"logit": teacher_logits}, labels)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_optuna.errors import InvalidDistiller, first_line
from kd_optuna.ops import CALIBRATIONS, DISTANCES, TRANSFORMS, CalibrationInputs
from kd_optuna.space import KNOWLEDGE_RANK, DistillerSpec

#: A transformed knowledge tensor beyond this magnitude is rejected: past it, squares and
#: sums in the distances and their gradients come close to float32's range (3.4e38).
OVERFLOW_LIMIT = 1e12
_DRY_RUN_BATCH = 2


class FeatureAdapter(nn.Module):
    """Student feature map (N, Cs, Hs, Ws) -> the teacher's (N, Ct, Ht, Wt).

    Channels differ: 1x1 convolution Cs -> Ct, then BatchNorm2d (FitNets' regressor). Sizes
    differ: adaptive average pooling to (Ht, Wt) (it also enlarges). Where a batch holds a
    single value per channel (N = H = W = 1) the BatchNorm uses its running statistics.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = student_shape, teacher_shape
        self.conv = nn.Conv2d(cs, ct, kernel_size=1, bias=False) if cs != ct else None
        self.bn = nn.BatchNorm2d(ct) if cs != ct else None
        self.size = (ht, wt) if (hs, ws) != (ht, wt) else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            x = self.conv(x)
            single = x.shape[0] * x.shape[2] * x.shape[3] == 1
            bn = self.bn
            x = F.batch_norm(
                x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                training=self.training and not single, momentum=bn.momentum, eps=bn.eps,
            )
        if self.size is not None:
            x = F.adaptive_avg_pool2d(x, self.size)
        return x


def _build_adapter(knowledge: str, student: tuple[int, ...], teacher: tuple[int, ...]) -> nn.Module:
    if student == teacher:
        return nn.Identity()
    if knowledge == "logit":
        raise InvalidDistiller(f"logit classes differ: student {student[0]}, teacher {teacher[0]}")
    if knowledge == "emb":
        return nn.Linear(student[0], teacher[0])
    return FeatureAdapter(student, teacher)


def _per_sample_shape(shapes: Mapping[str, tuple[int, ...]], who: str, name: str, rank: int):
    if name not in shapes:
        raise InvalidDistiller(f"no {who} shape for {name!r}; give its per-sample shape")
    try:
        shape = tuple(int(n) for n in shapes[name])
    except (TypeError, ValueError):
        raise InvalidDistiller(f"{who} {name} shape must be a tuple of ints, got {shapes[name]!r}")
    if len(shape) != rank - 1 or min(shape) < 1:
        raise InvalidDistiller(
            f"{who} {name} shape {shape} must have {rank - 1} positive dims (no batch dim)"
        )
    return shape


class DistillerLoss(nn.Module):
    """The loss of one distiller spec for a given pair of models' output shapes.

    Args:
        spec: the distiller.
        student_shapes, teacher_shapes: per-sample shapes without the batch dim, e.g.
            ``{"logit": (K,), "emb": (D,), "feat": (C, H, W)}``. Only ``spec.knowledge`` is
            required, and ``logit`` when the calibration reads logits (entropy, conf: the
            teacher's; focal: both, with equal K).
        check_finite: raise ``InvalidDistiller`` when a forward pass is not finite.
        literal: apply the params' three transforms, T and magnitude as written rather than
            the canonical form (equal values, up to rounding; for tests and benchmarks).

    Raises:
        InvalidDistiller: the spec cannot be computed for these shapes (logit classes differ,
            a missing shape, ...), with a short stable ``reason``; or the spec is refused
            (``spec.refusal()``: a softmax over kl's axis right before kl).

    ``forward(student, teacher, labels=None)`` takes the two output mappings (tensors with a
    batch dim N, any float dtype) and optional labels (N,) (a tensor, list or array); it returns a 0-dim float32
    tensor. With ``check_finite`` it raises ``InvalidDistiller("non-finite loss")`` for a
    NaN/inf loss and ``InvalidDistiller("knowledge overflows after transforms")`` when the
    student's knowledge exceeds 1e12 in magnitude after a transform (its gradients would
    overflow; a saturating op such as tanh can hide that from the loss). Random
    transforms (drop, mask) draw one seed per forward from torch's global generator; the
    i-th random transform of the chain uses seed + i, and teacher and student the same masks.
    """

    def __init__(
        self,
        spec: DistillerSpec,
        student_shapes: Mapping[str, tuple[int, ...]],
        teacher_shapes: Mapping[str, tuple[int, ...]],
        check_finite: bool = True,
        literal: bool = False,
    ):
        super().__init__()
        self.spec = spec
        self.check_finite = check_finite
        refusal = spec.refusal()
        if refusal is not None:
            raise InvalidDistiller(refusal)
        computed = spec if literal else spec.canonical()
        self.transform_names = computed.effective_transforms()
        self._transforms = [TRANSFORMS[name] for name in self.transform_names]
        ordinal, self._random = 0, []
        for name in self.transform_names:
            random = TRANSFORMS.info(name).random
            self._random.append(ordinal if random else None)
            ordinal += random
        self._distance = DISTANCES[spec.distance]
        self._calibration = CALIBRATIONS[spec.calibration]
        self._temperature = float(computed.temperature)
        self._scale = float(computed.magnitude) * float(computed.temperature) ** 2

        knowledge = spec.knowledge
        rank = KNOWLEDGE_RANK[knowledge]
        self.student_shapes = {knowledge: _per_sample_shape(student_shapes, "student", knowledge, rank)}
        self.teacher_shapes = {knowledge: _per_sample_shape(teacher_shapes, "teacher", knowledge, rank)}
        self.logits_needed = CALIBRATIONS.info(spec.calibration).logits
        for who, shapes, declared in (
            ("student", student_shapes, self.student_shapes),
            ("teacher", teacher_shapes, self.teacher_shapes),
        ):
            if who in self.logits_needed:
                if "logit" not in shapes:
                    raise InvalidDistiller(
                        f"calibration {spec.calibration} needs the {who}'s logits; give a 'logit' shape"
                    )
                declared["logit"] = _per_sample_shape(shapes, who, "logit", 2)
        if "student" in self.logits_needed:
            ks, kt = self.student_shapes["logit"][0], self.teacher_shapes["logit"][0]
            if ks != kt:
                raise InvalidDistiller(f"focal needs equal logit classes: student {ks}, teacher {kt}")

        self.adapter = _build_adapter(
            knowledge, self.student_shapes[knowledge], self.teacher_shapes[knowledge]
        )
        self._dry_run()

    def extra_repr(self) -> str:
        return self.spec.formula()

    @property
    def graph_safe(self) -> bool:
        """Whether a CUDA graph replaying this loss computes what calling it again would: no
        random transform (their per-call seed is drawn in Python) and no finiteness check (it
        reads the loss on the host)."""
        return not self.check_finite and all(r is None for r in self._random)

    def forward(
        self,
        student: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor],
        labels: Tensor | None = None,
    ) -> Tensor:
        seed = None
        if any(r is not None for r in self._random):
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        loss, watched = self._compute(student, teacher, labels, seed)
        if self.check_finite:
            self._check(loss, watched)
        return loss

    # ------------------------------------------------------------------ internals

    def _compute(self, student, teacher, labels, seed):
        knowledge = self.spec.knowledge
        s = self._take(student, "student", knowledge, self.student_shapes)
        t = self._take(teacher, "teacher", knowledge, self.teacher_shapes).detach().float()
        if s.shape[0] != t.shape[0]:
            raise InvalidDistiller(
                f"batch sizes differ: student {s.shape[0]}, teacher {t.shape[0]}"
            )
        if s.shape[0] == 0:
            raise InvalidDistiller("empty batch: give at least one sample")
        s = self.adapter(s.to(self._adapter_dtype())).float()
        with _float32(s.device):
            return self._distil(s, t, student, teacher, labels, seed)

    def _distil(self, s, t, student, teacher, labels, seed):
        watched = []
        for op, random in zip(self._transforms, self._random):
            if random is not None:
                s = op(s, _generator(seed, random, s.device))
                t = op(t, _generator(seed, random, t.device))
            else:
                s, t = op(s), op(t)
            watched.append(s)
        s = s / self._temperature
        t = t / self._temperature
        distance = self._distance(s, t)
        weights = self._calibration(self._calibration_inputs(s, t, student, teacher, labels))
        loss = self._scale * (weights.detach() * distance).mean()
        return loss, watched

    def _calibration_inputs(self, s, t, student, teacher, labels) -> CalibrationInputs:
        logits = {}
        for who, outputs, shapes in (
            ("student", student, self.student_shapes),
            ("teacher", teacher, self.teacher_shapes),
        ):
            if who in self.logits_needed:
                logits[who] = self._take(outputs, who, "logit", shapes).detach().float()
        if labels is not None:
            labels = _label_tensor(labels)
            if labels.shape[0] != s.shape[0]:
                raise InvalidDistiller(
                    f"labels have {labels.shape[0]} entries for a batch of {s.shape[0]}"
                )
            if self.logits_needed and labels.numel() and labels.device.type != "meta":
                classes = self.teacher_shapes["logit"][0]
                if not (0 <= int(labels.min()) and int(labels.max()) < classes):
                    raise InvalidDistiller(f"labels must be class indices in [0, {classes})")
        return CalibrationInputs(
            student=s, teacher=t, student_logit=logits.get("student"),
            teacher_logit=logits.get("teacher"), labels=labels,
        )

    def _adapter_dtype(self) -> torch.dtype:
        """The dtype of the adapter's parameters (float32 unless the module was cast, e.g. by
        ``.to(torch.bfloat16)`` with the student), which its input must have."""
        return next((p.dtype for p in self.adapter.parameters()), torch.float32)

    @staticmethod
    def _take(outputs: Mapping[str, Tensor], who: str, name: str, shapes) -> Tensor:
        x = outputs.get(name) if isinstance(outputs, Mapping) else None
        if not isinstance(x, Tensor):
            raise InvalidDistiller(f"{who} outputs lack a {name!r} tensor")
        if tuple(x.shape[1:]) != shapes[name]:
            raise InvalidDistiller(
                f"{who} {name} has per-sample shape {tuple(x.shape[1:])}, declared {shapes[name]}"
            )
        return x

    @staticmethod
    def _check(loss: Tensor, watched: list[Tensor]) -> None:
        flags = [~torch.isfinite(loss.detach())]
        if watched:
            low, high = zip(*(x.detach().aminmax() for x in watched))
            inside = (torch.stack(low) >= -OVERFLOW_LIMIT) & (torch.stack(high) <= OVERFLOW_LIMIT)
            flags.append(~inside.all())
        non_finite, overflow = (torch.stack(flags).tolist() + [False])[:2]
        if non_finite:
            raise InvalidDistiller("non-finite loss")
        if overflow:
            raise InvalidDistiller("knowledge overflows after transforms")

    def _dry_run(self) -> None:
        """Run the spec once on a random batch of 2 to find shape errors at construction."""
        generator = torch.Generator().manual_seed(0)

        def batch(shapes):
            return {
                name: torch.randn((_DRY_RUN_BATCH, *shape), generator=generator)
                for name, shape in shapes.items()
            }

        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self._compute(batch(self.student_shapes), batch(self.teacher_shapes), None, 0)
        except InvalidDistiller:
            raise
        except Exception as exc:  # an op that cannot take these shapes
            message = first_line(exc)
            raise InvalidDistiller(
                f"{self.spec.key} cannot be computed for these shapes: "
                f"{type(exc).__name__}: {message}"
            ) from exc
        finally:
            self.train(training)


def _label_tensor(labels) -> Tensor:
    """``labels`` as a detached flat tensor: a tensor, or what ``torch.as_tensor`` takes (a list
    or an array of class indices)."""
    if not isinstance(labels, Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidDistiller(
                f"labels must be class indices (a tensor, list or array), got {type(labels).__name__}"
            ) from None
    return labels.detach().reshape(-1)


def _float32(device: torch.device):
    """Turn autocast off around the ops, so a caller's fp16/bf16 autocast region leaves the
    distiller in float32 (the adapter before it runs under the caller's autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _generator(seed: int | None, ordinal: int, device: torch.device) -> torch.Generator | None:
    """A generator seeded by (seed, ordinal of the random op): student's and teacher's draws
    coincide, and so do a spec's and its canonical form's (the normal form keeps random ops
    and their order)."""
    if seed is None or device.type == "meta":
        return None
    return torch.Generator(device=device).manual_seed(seed + ordinal)
