"""DistillerLoss: the contract other modules code against, adapters, and the seed's defects."""

import pytest
import torch
import torch.nn.functional as F

import kd_optuna.distill.loss as loss_module
from kd_optuna.errors import InvalidDistiller
from kd_optuna.distill.loss import DistillerLoss
from kd_optuna.space import DistillerSpec

SHAPES = {"logit": (10,), "emb": (12,), "feat": (6, 4, 4)}
WIDE = {"logit": (10,), "emb": (16,), "feat": (8, 5, 3)}


def spec(knowledge="logit", t1="no", t2="no", t3="no", distance="kl", calibration="no", temperature=4, magnitude=1):
    return DistillerSpec(knowledge, t1, t2, t3, distance, calibration, temperature, magnitude)


def outputs(shapes, n=4, seed=0, requires_grad=False, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn((n, *shape), generator=generator).to(dtype).requires_grad_(requires_grad)
        for name, shape in shapes.items()
    }


def test_returns_a_float32_scalar_and_no_parameters_when_shapes_agree():
    loss = DistillerLoss(spec("feat", "satt", distance="l2"), SHAPES, SHAPES)
    value = loss(outputs(SHAPES), outputs(SHAPES, seed=1), torch.arange(4))
    assert value.shape == () and value.dtype == torch.float32
    assert list(loss.parameters()) == []


def test_formula_is_magnitude_t_squared_mean_of_weighted_distance():
    s, t = outputs(SHAPES), outputs(SHAPES, seed=1)
    labels = torch.tensor([0, 3, 5, 9])
    loss = DistillerLoss(spec("emb", "tanh", distance="l1", calibration="conf", temperature=8, magnitude=5), SHAPES, SHAPES)
    weights = F.softmax(t["logit"], 1)[torch.arange(4), labels]
    distance = (torch.tanh(s["emb"]) / 8 - torch.tanh(t["emb"]) / 8).abs().mean(1)
    torch.testing.assert_close(loss(s, t, labels), 5 * 64 * (weights * distance).mean())


def test_defect_unified_loss_swapped_teacher_and_student():
    """KL(teacher || student), and only the student gets gradients."""
    s, t = outputs(SHAPES, requires_grad=True), outputs(SHAPES, seed=1, requires_grad=True)
    value = DistillerLoss(spec(temperature=1), SHAPES, SHAPES)(s, t)
    p, q = F.softmax(t["logit"], 1), F.softmax(s["logit"], 1)
    torch.testing.assert_close(value, (p * (p.log() - q.log())).sum(1).mean())
    value.backward()
    assert s["logit"].grad is not None and torch.isfinite(s["logit"].grad).all()
    assert t["logit"].grad is None


def test_defect_mask_and_drop_share_one_mask_between_teacher_and_student():
    x = outputs(SHAPES)
    for t1, t2 in (("mask", "no"), ("drop", "no"), ("mask", "drop")):
        loss = DistillerLoss(spec("feat", t1, t2, distance="l2"), SHAPES, SHAPES)
        same = loss(x, {k: v.clone() for k, v in x.items()})
        assert same.item() == 0.0, (t1, t2)


def test_random_transforms_are_deterministic_given_the_seed():
    loss = DistillerLoss(spec("feat", "mask", "drop", distance="l2", magnitude=100), SHAPES, SHAPES)
    s, t = outputs(SHAPES), outputs(SHAPES, seed=1)
    torch.manual_seed(5)
    first = loss(s, t)
    torch.manual_seed(5)
    again = loss(s, t)
    other = loss(s, t)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_deterministic_specs_leave_the_global_generator_alone():
    loss = DistillerLoss(spec("feat", "satt", distance="kl"), SHAPES, SHAPES)
    state = torch.get_rng_state()
    loss(outputs(SHAPES), outputs(SHAPES, seed=1))
    assert torch.equal(state, torch.get_rng_state())


def test_logit_class_mismatch_is_invalid_with_a_stable_reason():
    with pytest.raises(InvalidDistiller) as error:
        DistillerLoss(spec(), {"logit": (10,)}, {"logit": (100,)})
    assert error.value.reason == "logit classes differ: student 10, teacher 100"


@pytest.mark.parametrize(
    "student, teacher, reason",
    [
        ({}, SHAPES, "no student shape for 'feat'"),
        ({"feat": (6, 4)}, SHAPES, "student feat shape (6, 4) must have 3 positive dims"),
        ({"feat": (6, 0, 4)}, SHAPES, "must have 3 positive dims"),
        ({"feat": "big"}, SHAPES, "must be a tuple of ints"),
    ],
)
def test_bad_shapes_are_invalid(student, teacher, reason):
    with pytest.raises(InvalidDistiller, match=reason.replace("(", r"\(").replace(")", r"\)")):
        DistillerLoss(spec("feat", distance="l2"), student, teacher)


def test_calibrations_that_read_logits_need_their_shapes():
    feat_only = {"feat": SHAPES["feat"]}
    with pytest.raises(InvalidDistiller, match="calibration entropy needs the teacher's logits"):
        DistillerLoss(spec("feat", distance="l2", calibration="entropy"), SHAPES, feat_only)
    DistillerLoss(spec("feat", distance="l2", calibration="entropy"), feat_only, SHAPES)
    with pytest.raises(InvalidDistiller, match="focal needs equal logit classes: student 10, teacher 7"):
        DistillerLoss(spec("feat", distance="l2", calibration="focal"), SHAPES, {**SHAPES, "logit": (7,)})


def test_forward_inputs_that_do_not_match_the_declared_shapes_are_invalid():
    loss = DistillerLoss(spec("feat", distance="l2"), SHAPES, SHAPES)
    with pytest.raises(InvalidDistiller, match="student outputs lack a 'feat' tensor"):
        loss({"emb": torch.zeros(2, 12)}, outputs(SHAPES))
    with pytest.raises(InvalidDistiller, match=r"teacher feat has per-sample shape \(6, 4, 5\)"):
        loss(outputs(SHAPES), {"feat": torch.zeros(4, 6, 4, 5)})
    with pytest.raises(InvalidDistiller, match="batch sizes differ: student 4, teacher 2"):
        loss(outputs(SHAPES), outputs(SHAPES, n=2))
    with pytest.raises(InvalidDistiller, match="empty batch"):
        loss(outputs(SHAPES, n=0), outputs(SHAPES, n=0))


def test_op_errors_at_construction_become_invalid_distiller(monkeypatch):
    def broken(student, teacher):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied\nstack")

    monkeypatch.setattr(loss_module, "DISTANCES", {"l2": broken})
    with pytest.raises(InvalidDistiller, match="cannot be computed for these shapes: RuntimeError: mat1"):
        DistillerLoss(spec("feat", distance="l2"), SHAPES, SHAPES)


def test_non_finite_loss_is_invalid_unless_unchecked():
    bad = outputs(SHAPES)
    bad["logit"][0, 0] = float("nan")
    with pytest.raises(InvalidDistiller) as error:
        DistillerLoss(spec(), SHAPES, SHAPES)(bad, outputs(SHAPES, seed=1))
    assert error.value.reason == "non-finite loss"
    unchecked = DistillerLoss(spec(), SHAPES, SHAPES, check_finite=False)
    assert torch.isnan(unchecked(bad, outputs(SHAPES, seed=1)))


def test_overflowing_transforms_are_invalid_even_when_the_loss_is_finite():
    """pow4 twice on values near 100 gives 1e16; tanh squashes it to a finite loss whose
    gradient would be NaN (0 * inf)."""
    loss = DistillerLoss(spec("feat", "pow4", "pow4", "tanh", distance="l2"), SHAPES, SHAPES)
    big = {"feat": torch.full((2, 6, 4, 4), 100.0)}
    with pytest.raises(InvalidDistiller, match="knowledge overflows after transforms"):
        loss(big, outputs({"feat": SHAPES["feat"]}, n=2))


def test_embedding_adapter_is_a_linear_layer_trained_with_the_student():
    loss = DistillerLoss(spec("emb", distance="l2", temperature=1), SHAPES, WIDE)
    params = list(loss.parameters())
    assert [p.shape for p in params] == [(16, 12), (16,)]
    s = outputs(SHAPES, requires_grad=True)
    value = loss(s, outputs(WIDE, seed=1))
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    before = params[0].detach().clone()
    torch.optim.SGD(params, lr=0.1).step()
    assert not torch.equal(before, params[0])


def test_feature_adapter_projects_channels_and_pools_to_the_teacher_size():
    loss = DistillerLoss(spec("feat", distance="l2", temperature=1), SHAPES, WIDE)
    assert {tuple(p.shape) for p in loss.parameters()} == {(8, 6, 1, 1), (8,)}
    s = outputs(SHAPES, requires_grad=True)
    loss(s, outputs(WIDE, seed=1)).backward()
    assert torch.isfinite(s["feat"].grad).all() and s["feat"].grad.abs().sum() > 0
    assert loss.adapter(torch.zeros(2, 6, 4, 4)).shape == (2, 8, 5, 3)


def test_feature_maps_of_other_size_but_equal_channels_are_pooled_without_parameters():
    teacher = {"feat": (6, 2, 2)}
    loss = DistillerLoss(spec("feat", distance="l2", temperature=1), SHAPES, teacher)
    assert list(loss.parameters()) == []
    s, t = outputs(SHAPES), outputs(teacher, seed=1)
    expected = (F.adaptive_avg_pool2d(s["feat"], 2) - t["feat"]).pow(2).flatten(1).mean(1).mean()
    torch.testing.assert_close(loss(s, t), expected)


def test_feature_adapter_takes_a_single_value_per_channel_in_training():
    loss = DistillerLoss(spec("feat", distance="l2"), {"feat": (6, 1, 1)}, {"feat": (8, 1, 1)})
    loss.train()
    s = {"feat": torch.randn(1, 6, 1, 1, requires_grad=True)}
    value = loss(s, {"feat": torch.randn(1, 8, 1, 1)})
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s["feat"].grad).all()


def test_construction_leaves_adapter_statistics_and_mode_unchanged():
    loss = DistillerLoss(spec("feat", distance="l2"), SHAPES, WIDE)
    assert loss.training
    assert torch.equal(loss.adapter.bn.running_mean, torch.zeros(8))
    assert loss.adapter.bn.num_batches_tracked == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    loss = DistillerLoss(spec("feat", "channel", distance="kl", magnitude=10), SHAPES, SHAPES)
    s, t = outputs(SHAPES, dtype=dtype), outputs(SHAPES, seed=1, dtype=dtype)
    value = loss(s, t)
    assert value.dtype == torch.float32
    reference = loss({k: v.float() for k, v in s.items()}, {k: v.float() for k, v in t.items()})
    torch.testing.assert_close(value, reference)


@pytest.mark.parametrize("knowledge", ["emb", "feat"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_an_adapter_cast_with_the_student_computes_in_its_dtype(knowledge, dtype):
    loss = DistillerLoss(spec(knowledge, distance="l2"), SHAPES, WIDE).to(dtype)
    s, t = outputs(SHAPES, requires_grad=True, dtype=dtype), outputs(WIDE, seed=1, dtype=dtype)
    value = loss(s, t)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert all(p.grad is not None and p.grad.dtype == dtype for p in loss.adapter.parameters())


def test_labels_given_as_a_list_or_array_are_class_indices_and_other_objects_are_invalid():
    loss = DistillerLoss(spec(calibration="focal"), SHAPES, SHAPES)
    s, t = outputs(SHAPES), outputs(SHAPES, seed=1)
    reference = loss(s, t, torch.tensor([0, 1, 2, 3]))
    assert loss(s, t, [0, 1, 2, 3]) == reference
    assert loss(s, t, torch.tensor([0, 1, 2, 3]).numpy()) == reference
    with pytest.raises(InvalidDistiller, match="labels must be class indices .* got object"):
        loss(s, t, object())


def test_labels_are_optional_and_default_to_the_teacher_argmax():
    loss = DistillerLoss(spec(calibration="focal"), SHAPES, SHAPES)
    s, t = outputs(SHAPES), outputs(SHAPES, seed=1)
    torch.testing.assert_close(loss(s, t), loss(s, t, t["logit"].argmax(1)))
    with pytest.raises(InvalidDistiller, match="labels have 3 entries for a batch of 4"):
        loss(s, t, torch.tensor([0, 1, 2]))
    with pytest.raises(InvalidDistiller, match=r"labels must be class indices in \[0, 10\)"):
        loss(s, t, torch.tensor([0, 1, 2, 10]))


def test_repr_shows_the_formula():
    assert "16 * mean_n(KL(softmax(t_logit/4) || softmax(s_logit/4)))" in repr(
        DistillerLoss(spec(), SHAPES, SHAPES)
    )


@pytest.mark.parametrize("calibration", ["entropy", "conf", "focal", "sim", "no"])
def test_loss_creates_no_tensor_off_the_inputs_device(calibration):
    """On the meta device every op, mask and weight must follow the inputs (no .cuda(), no CPU
    constants): a stand-in for a GPU check on machines without one."""
    for t1, t2, distance in (("mask", "drop", "cor"), ("satt", "norm_HW", "kl"), ("bmm", "batchnorm", "hard")):
        loss = DistillerLoss(spec("feat", t1, t2, distance=distance, calibration=calibration),
                             SHAPES, WIDE, check_finite=False).to("meta")
        student = {k: torch.empty((3, *v), device="meta") for k, v in SHAPES.items()}
        teacher = {k: torch.empty((3, *v), device="meta") for k, v in WIDE.items()}
        value = loss(student, teacher, torch.empty(3, dtype=torch.long, device="meta"))
        assert value.device.type == "meta" and value.shape == ()


def test_defect_raise_string_shape_errors_are_real_exceptions():
    """The seed did ``raise f'invalid shape ...'`` (a TypeError at best); a knowledge tensor of
    the wrong rank is an InvalidDistiller, a KdOptunaError with a message."""
    loss = DistillerLoss(spec("feat", "norm_HW", distance="l2"), SHAPES, SHAPES)
    with pytest.raises(InvalidDistiller, match=r"student feat has per-sample shape \(6, 4, 4, 1\)"):
        loss({"feat": torch.zeros(2, 6, 4, 4, 1)}, {"feat": torch.zeros(2, 6, 4, 4)})
    with pytest.raises(InvalidDistiller, match=r"teacher feat shape \(6, 4, 4, 1\) must have 3"):
        DistillerLoss(spec("feat", distance="l2"), SHAPES, {"feat": (6, 4, 4, 1)})


def test_autocast_regions_leave_the_distiller_in_float32():
    loss = DistillerLoss(spec("feat", "mm", distance="l2", magnitude=100), SHAPES, SHAPES)
    s, t = outputs(SHAPES), outputs(SHAPES, seed=1)
    reference = loss(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(s, t)
    assert value.dtype == torch.float32
    assert torch.equal(value, reference)
