"""Properties of DistillerLoss over the whole search space.

For any spec and the inputs users meet (batch size 1 and 2 and more, teacher and student of
different widths and sizes, bf16/fp16 outputs, logits of 1e4, constant or all-zero features):
either the loss is a finite float32 scalar whose student gradients are finite, or the spec
raises InvalidDistiller. No other exception, never a silent NaN.

fp16 gradients are the one exception to "finite": a float16 gradient above 65504 overflows by
the format itself (AMP's GradScaler exists for that), so for fp16 inputs the gradients must
only be free of NaN.
"""

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_optuna import space
from kd_optuna.errors import InvalidDistiller
from kd_optuna.distill.loss import DistillerLoss
from kd_optuna.space import DistillerSpec

EXAMPLES = int(os.environ.get("KD_OPTUNA_LOSS_EXAMPLES", "200"))
VALUE_KINDS = ("normal", "wide", "large_logits", "constant", "zeros")
KNOWN_OUTCOMES = re.compile(
    r"ok|non-finite loss|knowledge overflows after transforms"
    r"|logit classes differ: student \d+, teacher \d+"
    r"|focal needs equal logit classes: student \d+, teacher \d+"
    r"|kl takes logits or log-probabilities, not the probabilities of softmax_(C|HW): .*"
)


def make_outputs(shapes, n, kind, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        x = torch.randn((n, *shape), generator=generator)
        if kind == "wide":
            x = x * 10
        elif kind == "large_logits" and name == "logit":
            x = x * 1e4
        elif kind == "constant":
            x = torch.full_like(x, -1.5 if name == "feat" else 2.0)
        elif kind == "zeros":
            x = torch.zeros_like(x)
        tensors[name] = x.requires_grad_(True)
    cast = {name: x.to(dtype) for name, x in tensors.items()}
    return tensors, cast


def check(spec, student_shapes, teacher_shapes, n=2, kind="normal", dtype=torch.float32,
          labels=True, seed=0):
    """Run one forward and backward; return 'ok' or the InvalidDistiller reason."""
    try:
        loss = DistillerLoss(spec, student_shapes, teacher_shapes)
    except InvalidDistiller as error:
        return error.reason
    leaves, student = make_outputs(student_shapes, n, kind, dtype, seed)
    teacher_leaves, teacher = make_outputs(teacher_shapes, n, kind, dtype, seed + 1)
    classes = teacher_shapes["logit"][0]
    target = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed)) if labels else None
    try:
        value = loss(student, teacher, target)
    except InvalidDistiller as error:
        return error.reason
    assert value.shape == () and value.dtype == torch.float32
    assert torch.isfinite(value), spec
    value.backward()
    grads = [x.grad for x in leaves.values() if x.grad is not None]
    grads += [p.grad for p in loss.parameters() if p.grad is not None]
    for grad in grads:
        if dtype == torch.float16:
            assert not torch.isnan(grad).any(), spec
        else:
            assert torch.isfinite(grad).all(), spec
    assert all(x.grad is None for x in teacher_leaves.values())
    return "ok"


def shapes_pair(k=10, ds=12, dt=16, student_feat=(6, 5, 3), teacher_feat=(8, 4, 4), kt=None):
    return (
        {"logit": (k,), "emb": (ds,), "feat": student_feat},
        {"logit": (kt or k,), "emb": (dt,), "feat": teacher_feat},
    )


def one_spec(knowledge, transform="no", distance="l2", calibration="no", temperature=4, magnitude=1):
    return DistillerSpec(knowledge, transform, "no", "no", distance, calibration, temperature, magnitude)


@pytest.mark.parametrize("knowledge", space.KNOWLEDGE)
@pytest.mark.parametrize("transform", space.TRANSFORMS)
def test_every_transform_on_every_knowledge(knowledge, transform):
    student, teacher = shapes_pair()
    for n in (1, 2):
        for distance in ("l2", "kl"):
            spec = one_spec(knowledge, transform, distance)
            result = check(spec, student, teacher, n=n)
            assert result == ("ok" if spec.refusal() is None else spec.refusal()), (
                transform, distance, n, result
            )


@pytest.mark.parametrize("knowledge", space.KNOWLEDGE)
@pytest.mark.parametrize("distance", space.DISTANCES)
@pytest.mark.parametrize("calibration", space.CALIBRATIONS)
def test_every_distance_and_calibration_on_every_knowledge(knowledge, distance, calibration):
    student, teacher = shapes_pair()
    for n, labels in ((1, True), (2, False), (5, True)):
        spec = one_spec(knowledge, distance=distance, calibration=calibration)
        assert check(spec, student, teacher, n=n, labels=labels) == "ok"


@st.composite
def cases(draw):
    options = {gene: st.sampled_from(values) for gene, values in space.FULL_OPTIONS.items()}
    spec = draw(st.builds(DistillerSpec, **options))
    k = draw(st.sampled_from([1, 2, 10]))
    kt = draw(st.sampled_from([k, k, k, 100]))
    dim = st.integers(1, 9)
    side = st.integers(1, 6)
    student, teacher = shapes_pair(
        k=k, kt=kt, ds=draw(dim), dt=draw(dim),
        student_feat=(draw(side), draw(side), draw(side)),
        teacher_feat=(draw(side), draw(side), draw(side)),
    )
    return dict(
        spec=spec, student_shapes=student, teacher_shapes=teacher,
        n=draw(st.sampled_from([1, 2, 3, 8])),
        kind=draw(st.sampled_from(VALUE_KINDS)),
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        labels=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_random_specs_give_a_finite_loss_or_invalid_distiller(case):
    result = check(**case)
    assert KNOWN_OUTCOMES.fullmatch(result), result


def test_invalid_reasons_in_the_full_space_are_the_documented_ones():
    """Logit class mismatch is the only shape reason; value reasons come from overflow."""
    student, teacher = shapes_pair(kt=100)
    assert check(one_spec("logit"), student, teacher) == "logit classes differ: student 10, teacher 100"
    student, teacher = shapes_pair(student_feat=(8, 4, 4))
    big = one_spec("feat", "pow4", magnitude=100)
    saturated = DistillerSpec("feat", "pow4", "pow4", "tanh", "l2", "no", 1, 100)
    assert check(big, student, teacher, kind="wide") == "ok"
    assert check(saturated, student, teacher, kind="wide") == "knowledge overflows after transforms"


def test_determinism_same_spec_seed_and_inputs_give_a_bit_identical_loss():
    spec = DistillerSpec("feat", "drop", "mask", "norm_C", "cor", "sim", 4, 10)
    student, teacher = shapes_pair()
    values = []
    for _ in range(2):
        torch.manual_seed(123)
        loss = DistillerLoss(spec, student, teacher)
        s = make_outputs(student, 4, "normal", torch.float32, 0)[1]
        t = make_outputs(teacher, 4, "normal", torch.float32, 1)[1]
        values.append(loss(s, t, torch.tensor([1, 2, 3, 4])))
    assert values[0].item() != 0
    assert torch.equal(values[0], values[1])
