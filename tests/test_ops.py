"""The ops of the search space, one by one: registries, rank table, formulas, seed defects."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd_optuna import space
from kd_optuna.errors import InvalidSpace
from kd_optuna.ops import CALIBRATIONS, DISTANCES, RANDOM_TRANSFORMS, TRANSFORMS, CalibrationInputs

SHAPES = {2: (3, 5), 3: (3, 4, 5), 4: (3, 4, 5, 6)}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- registries


def test_registries_hold_exactly_the_names_of_the_space():
    assert set(TRANSFORMS) == set(space.TRANSFORMS)
    assert set(DISTANCES) == set(space.DISTANCES)
    assert set(CALIBRATIONS) == set(space.CALIBRATIONS)


def test_unknown_op_name_is_a_clear_error_listing_the_options():
    with pytest.raises(InvalidSpace, match="unknown distance 'l3'.*l1"):
        DISTANCES["l3"]


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="twice"):
        DISTANCES.register("l1")(lambda s, t: s)


def test_every_op_has_a_docstring():
    for registry in (TRANSFORMS, DISTANCES, CALIBRATIONS):
        for name, op in registry.items():
            assert op.__doc__ and len(op.__doc__) > 10, name


# ---------------------------------------------------------------- the rank table


@pytest.mark.parametrize("name", space.TRANSFORMS)
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_transform_follows_the_rank_table(name, rank):
    x = randn(*SHAPES[rank])
    generator = torch.Generator().manual_seed(1)
    y = TRANSFORMS[name](x, generator)
    expected = space.TRANSFORM_RANKS[name].get(rank)
    if expected is None:
        assert y is x
    else:
        assert y.dim() == expected
        assert y.shape[0] == x.shape[0]
        assert y.dtype == torch.float32
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", space.TRANSFORMS)
def test_transform_keeps_samples_apart_unless_it_is_a_batch_op(name):
    """Changing sample 1 leaves sample 0's output alone, except for ops that mix the batch."""
    batch_ops = {"natt", "mm", "norm_N", "softmax_N", "logsoftmax_N", "batchnorm"}
    x = randn(3, 4, 5, 6)
    changed = x.clone()
    changed[1] += 1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    y, z = TRANSFORMS[name](x, g1), TRANSFORMS[name](changed, g2)
    same_sample0 = torch.equal(y[0], z[0])
    assert same_sample0 != (name in batch_ops), name


# ---------------------------------------------------------------- transform formulas


def test_elementwise_formulas():
    x = torch.tensor([[-2.0, -0.5, 0.0, 0.5, 3.0]])
    expected = {
        "relu": x.clamp(min=0),
        "leaky": torch.where(x > 0, x, 0.01 * x),
        "tanh": torch.tanh(x),
        "sigmoid": torch.sigmoid(x),
        "pow2": x**2,
        "pow4": x**4,
        "abs": x.abs(),
        "swish": x * torch.sigmoid(x),
        "mish": x * torch.tanh(F.softplus(x)),
        "scale": (x + 1) / 2,
        "exp": torch.exp(x),
        "log": torch.sign(x) * torch.log(x.abs() + 1),
    }
    for name, value in expected.items():
        torch.testing.assert_close(TRANSFORMS[name](x), value, msg=name)


def test_defect_exp_overflow_is_capped():
    y = TRANSFORMS["exp"](torch.tensor([[1e4, 20.0, -1e4]]))
    torch.testing.assert_close(y[0, :2], torch.full((2,), math.exp(20.0)))
    assert y[0, 2] == 0


def test_defect_sqrt_of_negative_values_was_nan():
    x = torch.tensor([[-4.0, -1e-9, 0.0, 1e-9, 4.0]], requires_grad=True)
    y = TRANSFORMS["sqrt"](x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y[0, [0, 4]], torch.tensor([-2.0, 2.0]), atol=2e-3, rtol=0)
    assert y[0, 2] == 0
    assert x.grad.abs().max() <= 500.0


def test_defect_log_near_zero_was_minus_twenty():
    x = torch.tensor([[-1e-12, 0.0, 1e-12]], requires_grad=True)
    y = TRANSFORMS["log"](x)
    y.sum().backward()
    assert y.abs().max() < 1e-6
    assert x.grad.abs().max() <= 1.0


def test_drop_zeroes_whole_channels_at_rank_4_and_rescales():
    x = torch.ones(64, 32, 3, 3)
    y = TRANSFORMS["drop"](x, torch.Generator().manual_seed(0))
    per_channel = y.flatten(2)
    assert ((per_channel == 0).all(2) | (per_channel == 1 / 0.9).all(2)).all()
    dropped = (per_channel == 0).all(2).float().mean()
    assert 0.05 < dropped < 0.15


def test_mask_zeroes_about_65_percent_of_pixels_in_every_channel():
    x = torch.ones(16, 3, 16, 16)
    y = TRANSFORMS["mask"](x, torch.Generator().manual_seed(0))
    assert torch.equal(y[:, 0], y[:, 2])
    assert 0.6 < (y == 0).float().mean() < 0.7


def test_random_transforms_are_the_masks():
    assert RANDOM_TRANSFORMS == {"drop", "mask"}


def test_defect_mask_and_drop_draw_the_same_mask_from_equal_generators():
    x = randn(4, 3, 5, 5)
    for name in ("drop", "mask"):
        a = TRANSFORMS[name](x, torch.Generator().manual_seed(7))
        b = TRANSFORMS[name](x, torch.Generator().manual_seed(7))
        c = TRANSFORMS[name](x, torch.Generator().manual_seed(8))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_spatial_attention_shape_and_sum():
    x = randn(2, 4, 3, 5)
    y = TRANSFORMS["satt"](x)
    assert y.shape == (2, 1, 3, 5)
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), torch.full((2,), 15.0))
    expected = 15 * F.softmax(x.abs().mean(1).flatten(1) / 0.5, dim=1)
    torch.testing.assert_close(y.flatten(1), expected)


def test_channel_attention_on_rank_4_and_rank_2():
    x = randn(2, 4, 3, 5)
    y = TRANSFORMS["catt"](x)
    assert y.shape == (2, 4, 1, 1)
    torch.testing.assert_close(y.sum(dim=1).flatten(), torch.full((2,), 4.0))
    logits = randn(2, 7)
    torch.testing.assert_close(TRANSFORMS["catt"](logits), 7 * F.softmax(logits / 0.5, dim=1))


def test_batch_attention_sums_to_n_over_the_batch():
    y = TRANSFORMS["natt"](randn(5, 3))
    torch.testing.assert_close(y.sum(dim=0), torch.full((3,), 5.0))


def test_channel_gram_is_divided_by_the_positions():
    x = randn(2, 3, 4, 5)
    flat = x.flatten(2)
    torch.testing.assert_close(TRANSFORMS["bmm"](x), flat @ flat.transpose(1, 2) / 20)


def test_defect_sample_gram_acts_on_embeddings():
    x = randn(4, 6)
    torch.testing.assert_close(TRANSFORMS["mm"](x), x @ x.t() / 6)
    assert TRANSFORMS["mm"](randn(4, 2, 3, 3)).shape == (4, 4)


def test_scale_ops_pool_any_size():
    x = randn(2, 3, 5, 3)
    assert TRANSFORMS["scale_r2"](x).shape == (2, 3, 3, 2)
    assert TRANSFORMS["multi_scale_r4"](x).shape == (2, 3, 2, 1)
    assert TRANSFORMS["multi_scale_r4"](randn(2, 3, 1, 1)).shape == (2, 3, 1, 1)
    torch.testing.assert_close(TRANSFORMS["scale_r2"](x)[..., 0, 0], x[..., :2, :2].amax((2, 3)))


def test_local_patches_cover_the_map_and_pad_odd_sizes():
    x = randn(2, 3, 4, 4)
    patches = TRANSFORMS["local_s2"](x)
    assert patches.shape == (2, 12, 2, 2)
    torch.testing.assert_close(patches[:, 0], x[:, 0, :2, :2])
    torch.testing.assert_close(patches[:, 1], x[:, 0, :2, 2:])
    odd = TRANSFORMS["local_s4"](randn(2, 3, 5, 3))
    assert odd.shape == (2, 3 * 2 * 1, 4, 4)
    assert odd[:, 1, 1:].abs().sum() == 0
    assert TRANSFORMS["local_s1"](x).shape == (2, 48)


def test_reshapes():
    assert TRANSFORMS["batch"](randn(2, 3, 4, 5)).shape == (2, 60)
    assert TRANSFORMS["channel"](randn(2, 3, 4, 5)).shape == (2, 3, 20)


def test_norms_give_unit_length_along_their_dims():
    x = randn(3, 4, 5, 6)
    assert torch.allclose(TRANSFORMS["norm_HW"](x).flatten(2).norm(dim=2), torch.ones(3, 4))
    assert torch.allclose(TRANSFORMS["norm_C"](x).norm(dim=1), torch.ones(3, 5, 6))
    assert torch.allclose(TRANSFORMS["norm_N"](x).norm(dim=0), torch.ones(4, 5, 6))
    assert torch.allclose(TRANSFORMS["norm_HW"](randn(3, 4, 5)).norm(dim=2), torch.ones(3, 4))


def test_defect_softmax_hw_and_logsoftmax_hw_returned_nothing_for_rank_3():
    x = randn(2, 3, 7)
    probs = TRANSFORMS["softmax_HW"](x)
    assert probs.shape == (2, 3, 7)
    torch.testing.assert_close(probs.sum(dim=2), torch.ones(2, 3))
    torch.testing.assert_close(TRANSFORMS["logsoftmax_HW"](x), probs.log())
    assert TRANSFORMS["softmax_HW"](randn(2, 3, 4, 5)).shape == (2, 3, 20)


def test_defect_logsoftmax_n_normalised_over_dim_1():
    x = randn(4, 6)
    torch.testing.assert_close(TRANSFORMS["logsoftmax_N"](x).exp().sum(dim=0), torch.ones(6))
    torch.testing.assert_close(TRANSFORMS["softmax_N"](x).sum(dim=0), torch.ones(6))
    torch.testing.assert_close(TRANSFORMS["logsoftmax_C"](x).exp().sum(dim=1), torch.ones(4))


def test_defect_min_max_normalize_is_per_sample_not_per_batch():
    x = torch.stack([torch.linspace(0, 1, 5), torch.linspace(-100, 100, 5)])
    y = TRANSFORMS["min_max_normalize"](x)
    torch.testing.assert_close(y[0], torch.linspace(0, 1, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1], torch.linspace(0, 1, 5), atol=1e-5, rtol=0)


def test_defect_batchnorm_built_a_fresh_untrained_module_each_call():
    """The op has no parameters or state: it standardises per channel and is deterministic."""
    x = randn(8, 3, 4, 4) * 5 + 2
    y = TRANSFORMS["batchnorm"](x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    assert torch.equal(y, TRANSFORMS["batchnorm"](x))
    one = TRANSFORMS["batchnorm"](randn(1, 5))
    assert torch.equal(one, torch.zeros(1, 5))


def zscore_reference(x):
    """Logit standardization's normalize() (Sun et al. 2024), on each flattened sample."""
    flat = x.flatten(1)
    mean = flat.mean(dim=-1, keepdim=True)
    std = flat.std(dim=-1, keepdim=True)
    return ((flat - mean) / (1e-7 + std)).view_as(x)


@pytest.mark.parametrize("shape", [(4, 10), (3, 4, 5), (2, 3, 4, 5)])
def test_zscore_is_the_papers_standardisation_over_each_sample(shape):
    x = randn(*shape) * 7 + 3
    y = TRANSFORMS["zscore"](x)
    torch.testing.assert_close(y, zscore_reference(x))
    flat = y.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(shape[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(shape[0]), atol=1e-5, rtol=0)


def test_zscore_ignores_a_positive_affine_map_of_each_sample():
    x = randn(3, 8)
    scale, shift = torch.tensor([[0.5], [3.0], [40.0]]), torch.tensor([[-2.0], [0.0], [9.0]])
    torch.testing.assert_close(TRANSFORMS["zscore"](x * scale + shift), TRANSFORMS["zscore"](x))
    torch.testing.assert_close(TRANSFORMS["zscore"](-x), -TRANSFORMS["zscore"](x))


def test_zscore_of_a_constant_sample_is_zero_with_a_finite_gradient():
    x = torch.tensor([[0.1] * 7, [2.0, -1.0, 0.5, 0.0, 3.0, 1.0, -2.0]], requires_grad=True)
    y = TRANSFORMS["zscore"](x)
    assert torch.equal(y[0], torch.zeros(7))  # 0.1 * 7 / 7 is not 0.1 in float32
    (y * torch.arange(7.0)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(TRANSFORMS["zscore"](torch.ones(3, 1)), torch.zeros(3, 1))


# ---------------------------------------------------------------- distances


@pytest.mark.parametrize("name", space.DISTANCES)
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_distance_is_per_sample_non_negative(name, rank):
    s, t = randn(*SHAPES[rank], seed=1), randn(*SHAPES[rank], seed=2)
    d = DISTANCES[name](s, t)
    assert d.shape == (3,)
    assert (d >= 0).all()


@pytest.mark.parametrize("name", sorted(set(space.DISTANCES) - {"hard"}))
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_distance_is_zero_when_student_equals_teacher(name, rank):
    x = randn(*SHAPES[rank], seed=1)
    assert torch.allclose(DISTANCES[name](x, x.clone()), torch.zeros(3), atol=1e-6)
    zeros = torch.zeros(SHAPES[rank])
    assert torch.equal(DISTANCES[name](zeros, zeros), torch.zeros(3))


def test_elementwise_distances():
    s, t = torch.tensor([[0.0, 2.0, -3.0]]), torch.tensor([[1.0, 2.0, 0.0]])
    torch.testing.assert_close(DISTANCES["l1"](s, t), torch.tensor([4.0 / 3]))
    torch.testing.assert_close(DISTANCES["l2"](s, t), torch.tensor([10.0 / 3]))
    torch.testing.assert_close(DISTANCES["smooth_l1"](s, t), torch.tensor([(0.5 + 2.5) / 3]))


def test_defect_kl_was_fed_probabilities():
    s, t = randn(4, 10, seed=1), randn(4, 10, seed=2)
    p, q = F.softmax(t, 1), F.softmax(s, 1)
    expected = (p * (p.log() - q.log())).sum(dim=1)
    torch.testing.assert_close(DISTANCES["kl"](s, t), expected)
    assert not torch.allclose(DISTANCES["kl"](s, t), DISTANCES["kl"](t, s))


def test_kl_on_feature_maps_is_over_positions_mean_over_channels():
    s, t = randn(2, 3, 4, 5, seed=1), randn(2, 3, 4, 5, seed=2)
    p = F.softmax(t.flatten(2), 2)
    q = F.softmax(s.flatten(2), 2)
    expected = (p * (p.log() - q.log())).sum(2).mean(1)
    torch.testing.assert_close(DISTANCES["kl"](s, t), expected)


def test_hard_is_cross_entropy_against_teacher_argmax():
    s, t = randn(4, 6, seed=1), randn(4, 6, seed=2)
    torch.testing.assert_close(
        DISTANCES["hard"](s, t), F.cross_entropy(s, t.argmax(1), reduction="none")
    )
    assert DISTANCES["hard"](randn(2, 3, 4, 5), randn(2, 3, 4, 5)).shape == (2,)


def test_defect_cos_and_pear_returned_a_similarity():
    x = randn(3, 8)
    torch.testing.assert_close(DISTANCES["cos"](x, -x), torch.full((3,), 2.0))
    torch.testing.assert_close(DISTANCES["cos"](x, 3 * x), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(DISTANCES["pear"](x, -2 * x + 1), torch.full((3,), 2.0))
    torch.testing.assert_close(DISTANCES["pear"](x, 2 * x + 5), torch.zeros(3), atol=1e-6, rtol=0)
    y = randn(3, 8, seed=4)
    torch.testing.assert_close(DISTANCES["cos"](x, y), 1 - F.cosine_similarity(x, y, dim=1))


def test_defect_cor_took_a_log2_that_went_negative():
    s, t = randn(16, 5, seed=1), randn(16, 5, seed=2)
    near = DISTANCES["cor"](s, s + 0.01 * t)
    far = DISTANCES["cor"](s, t)
    assert (near >= 0).all() and (far > near).all()
    assert torch.equal(near, near[0].expand(16))
    zs = (s - s.mean(0)) / s.std(0, unbiased=False)
    zt = (t - t.mean(0)) / t.std(0, unbiased=False)
    v = (zs * zt).mean(0)
    torch.testing.assert_close(far[0], torch.log2(1 + ((1 - v).abs() ** 2.02).sum()))


def test_pear_and_cor_treat_float_noise_of_a_constant_as_constant():
    """0.1 repeated has a float32 mean that misses 0.1: the residue is no direction."""
    constant = torch.full((1, 7), 0.1)
    assert torch.equal(DISTANCES["pear"](constant, randn(1, 7)), torch.full((1,), 0.5))
    assert torch.equal(DISTANCES["pear"](constant, torch.full((1, 7), -3.3)), torch.zeros(1))
    column = torch.cat([torch.full((7, 1), 0.1), randn(7, 1)], dim=1)
    other = torch.cat([randn(7, 1, seed=2), randn(7, 1, seed=3)], dim=1)
    # a constant column against any column: centred to 0, |v - 1| = 0.5 as a zero vector
    only_second = torch.log2(2 ** DISTANCES["cor"](column[:, 1:], other[:, 1:]) + 0.5**2.02)
    torch.testing.assert_close(DISTANCES["cor"](column, other), only_second)


def test_cor_takes_any_rank_and_a_batch_of_one():
    assert torch.equal(DISTANCES["cor"](randn(1, 3, 4, 4), randn(1, 3, 4, 4, seed=2)), torch.zeros(1))
    assert DISTANCES["cor"](randn(4, 3, 4, 4), randn(4, 3, 4, 4, seed=2)).shape == (4,)


# ---------------------------------------------------------------- calibrations


def inputs(classes=7, n=5, labels=True, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    s_logit = torch.randn(n, classes, generator=generator).to(device)
    t_logit = torch.randn(n, classes, generator=generator).to(device) * 3
    return CalibrationInputs(
        student=s_logit, teacher=t_logit, student_logit=s_logit, teacher_logit=t_logit,
        labels=torch.randint(0, classes, (n,), generator=generator).to(device) if labels else None,
    )


@pytest.mark.parametrize("name", space.CALIBRATIONS)
@pytest.mark.parametrize("classes", [1, 2, 7, 1000])
@pytest.mark.parametrize("labels", [True, False])
def test_calibration_is_per_sample_non_negative_and_detached(name, classes, labels):
    batch = inputs(classes, labels=labels)
    batch.student.requires_grad_(True)
    w = CALIBRATIONS[name](batch)
    assert w.shape == (5,) and w.dtype == torch.float32
    assert not w.requires_grad
    assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()


@pytest.mark.parametrize("name", space.CALIBRATIONS)
def test_defect_calibrations_hard_coded_cuda_and_run_on_any_device(name):
    """The seed called .cuda(); the weights stay on the inputs' device (meta here)."""
    w = CALIBRATIONS[name](inputs(classes=7, device="meta"))
    assert w.device.type == "meta"


def test_defect_focal_and_conf_hard_coded_100_classes():
    batch = inputs(classes=7)
    conf = CALIBRATIONS["conf"](batch)
    torch.testing.assert_close(
        conf, F.softmax(batch.teacher_logit, 1)[torch.arange(5), batch.labels]
    )
    ce_s = F.cross_entropy(batch.student_logit, batch.labels, reduction="none")
    ce_t = F.cross_entropy(batch.teacher_logit, batch.labels, reduction="none")
    torch.testing.assert_close(CALIBRATIONS["focal"](batch), 1 - torch.exp(-ce_s / (ce_t + 1e-7)))


def test_defect_teacher_entropy_printed_and_used_an_undefined_tensor(capsys):
    batch = inputs(classes=7)
    w = CALIBRATIONS["entropy"](batch)
    p = F.softmax(batch.teacher_logit, 1)
    torch.testing.assert_close(w, -(p * p.log()).sum(1) / math.log(7))
    assert capsys.readouterr().out == ""
    uniform = CalibrationInputs(student=torch.zeros(2, 4), teacher=torch.zeros(2, 4),
                                teacher_logit=torch.zeros(2, 4))
    torch.testing.assert_close(CALIBRATIONS["entropy"](uniform), torch.ones(2))


def test_defect_conf_and_sim_went_negative():
    x = randn(3, 6)
    opposed = CalibrationInputs(student=x, teacher=-x)
    torch.testing.assert_close(CALIBRATIONS["sim"](opposed), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        CALIBRATIONS["sim"](CalibrationInputs(student=x, teacher=2 * x)), torch.ones(3)
    )
    confident_wrong = CalibrationInputs(
        student=x, teacher=x, teacher_logit=torch.tensor([[10.0, -10.0]]), labels=torch.tensor([1])
    )
    assert CALIBRATIONS["conf"](confident_wrong) >= 0


def test_missing_labels_use_the_teacher_argmax():
    batch = inputs(classes=7, labels=False)
    with_argmax = CalibrationInputs(**{**batch.__dict__, "labels": batch.teacher_logit.argmax(1)})
    for name in ("conf", "focal"):
        torch.testing.assert_close(CALIBRATIONS[name](batch), CALIBRATIONS[name](with_argmax))
