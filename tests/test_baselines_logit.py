"""DKD, KD+LS and DKD+LS against references written as explicit loops over samples and classes."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from kd_optuna.distill.baselines import DKD, DKDLS, KDLS, InvalidBaseline, build_baseline, standardize
from kd_optuna.distill.baselines.dkd import dkd_terms
from kd_optuna.distill.baselines.ls import kd_divergence

K = 7
SHAPES = {"logit": (K,), "emb": (3,)}


def _logits(seed, n=6, k=K, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * scale, torch.randn(n, k, generator=g) * scale, torch.randint(
        0, k, (n,), generator=g
    )


# --- references: plain Python floats, one sample and one class at a time ---------------------


def _softmax(row, temperature):
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _zscore(row):
    mean, std = statistics.mean(row), statistics.stdev(row)  # stdev: the unbiased estimate
    return [(v - mean) / (1e-7 + std) for v in row]


def _reference_dkd(s, t, labels, alpha, beta, temperature, zscore=False):
    """The paper's definitions, sample by sample."""
    tckd = nckd = 0.0
    rows = list(zip(s.double().tolist(), t.double().tolist(), labels.tolist()))
    for s_row, t_row, y in rows:
        if zscore:
            s_row, t_row = _zscore(s_row), _zscore(t_row)
        p_s, p_t = _softmax(s_row, temperature), _softmax(t_row, temperature)
        tckd += _kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        others = [k for k in range(len(s_row)) if k != y]
        hat_s = _softmax([s_row[k] for k in others], temperature)
        hat_t = _softmax([t_row[k] for k in others], temperature)
        nckd += _kl(hat_t, hat_s)
    n = len(rows)
    return temperature**2 * (alpha * tckd + beta * nckd) / n


def _reference_kd(s, t, temperature, weight, zscore):
    total = 0.0
    for s_row, t_row in zip(s.double().tolist(), t.double().tolist()):
        if zscore:
            s_row, t_row = _zscore(s_row), _zscore(t_row)
        total += _kl(_softmax(t_row, temperature), _softmax(s_row, temperature))
    return weight * temperature**2 * total / s.shape[0]


# --- DKD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dkd_matches_the_sample_by_sample_reference(seed):
    s, t, y = _logits(seed)
    loss = DKD(SHAPES, SHAPES)({"logit": s}, {"logit": t}, y)
    assert loss.item() == pytest.approx(_reference_dkd(s, t, y, 1.0, 8.0, 4.0), rel=1e-4)
    other = DKD(SHAPES, SHAPES, alpha=0.5, beta=2.0, temperature=1.5)({"logit": s}, {"logit": t}, y)
    assert other.item() == pytest.approx(_reference_dkd(s, t, y, 0.5, 2.0, 1.5), rel=1e-4)


def test_dkd_terms_recompose_kd_for_one_sample():
    # the paper's Eq. (1): KL(p_t || p_s) = TCKD + (1 - p_t[y]) * NCKD, exactly, for each sample
    s, t, y = _logits(3, n=1)
    tckd, nckd = dkd_terms(s, t, y, temperature=2.0)
    p_t_target = torch.softmax(t / 2.0, dim=1)[0, y[0]]
    recomposed = tckd + (1 - p_t_target) * nckd
    assert recomposed.item() == pytest.approx(kd_divergence(s, t, 2.0).item(), rel=1e-5)


def test_dkd_of_equal_logits_is_zero_and_otherwise_positive():
    s, t, y = _logits(4)
    dkd = DKD(SHAPES, SHAPES)
    assert dkd({"logit": s}, {"logit": s.clone()}, y).item() == pytest.approx(0.0, abs=1e-6)
    for seed in range(5, 10):
        s, t, y = _logits(seed)
        assert dkd({"logit": s}, {"logit": t}, y).item() > 0


def test_dkd_is_finite_with_a_finite_gradient_on_saturated_logits():
    # softmax at 300 / 4 underflows to 0 for the other classes; log(0) would be -inf in
    # probability space, the log-space split keeps everything finite
    s, t, y = _logits(11, scale=300.0)
    s.requires_grad_(True)
    loss = DKD(SHAPES, SHAPES)({"logit": s}, {"logit": t}, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert loss.item() == pytest.approx(_reference_dkd(s.detach(), t, y, 1.0, 8.0, 4.0), rel=1e-3)


def test_dkd_warm_up_is_linear_over_the_epochs_and_full_before_any_epoch():
    s, t, y = _logits(12)
    dkd = DKD(SHAPES, SHAPES)
    full = dkd({"logit": s}, {"logit": t}, y).item()
    expected = {0: 1 / 20, 9: 10 / 20, 18: 19 / 20, 19: 1.0, 100: 1.0}
    for epoch, factor in expected.items():
        dkd.set_epoch(epoch)
        assert dkd({"logit": s}, {"logit": t}, y).item() == pytest.approx(factor * full, rel=1e-6)
    short = DKD(SHAPES, SHAPES, warmup_epochs=4)
    short.set_epoch(1)
    assert short({"logit": s}, {"logit": t}, y).item() == pytest.approx(0.5 * full, rel=1e-6)
    off = DKD(SHAPES, SHAPES, warmup_epochs=0)
    off.set_epoch(0)
    assert off({"logit": s}, {"logit": t}, y).item() == pytest.approx(full, rel=1e-6)


def test_dkd_refuses_missing_or_bad_labels_and_bad_settings():
    s, t, y = _logits(13)
    dkd = DKD(SHAPES, SHAPES)
    with pytest.raises(InvalidBaseline, match="needs the labels"):
        dkd({"logit": s}, {"logit": t})
    with pytest.raises(InvalidBaseline, match=r"lie in \[0, 7\)"):
        dkd({"logit": s}, {"logit": t}, torch.full((6,), 7))
    with pytest.raises(InvalidBaseline, match="6 integer class indices"):
        dkd({"logit": s}, {"logit": t}, y[:5])
    with pytest.raises(InvalidBaseline, match="6 integer class indices"):
        dkd({"logit": s}, {"logit": t}, y.float())
    with pytest.raises(InvalidBaseline, match="set_epoch"):
        dkd.set_epoch(-1)
    with pytest.raises(InvalidBaseline, match="same classes"):
        DKD(SHAPES, {"logit": (K + 1,)})
    with pytest.raises(InvalidBaseline, match="warmup_epochs"):
        DKD(SHAPES, SHAPES, warmup_epochs=-1)
    with pytest.raises(InvalidBaseline, match="temperature"):
        DKD(SHAPES, SHAPES, temperature=0)


def test_dkd_sends_the_gradient_to_the_student_logits_only():
    s, t, y = _logits(14)
    s.requires_grad_(True)
    t.requires_grad_(True)
    emb = torch.randn(6, 3, requires_grad=True)
    loss = build_baseline("dkd", SHAPES, SHAPES)({"logit": s, "emb": emb}, {"logit": t, "emb": emb}, y)
    loss.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None and emb.grad is None


# --- logit standardization -----------------------------------------------------------------------


def test_standardize_matches_mean_and_unbiased_stdev_per_sample():
    s, _, _ = _logits(15)
    expected = torch.tensor([_zscore(row) for row in s.double().tolist()], dtype=torch.float64)
    assert torch.allclose(standardize(s).double(), expected, atol=1e-5)


@pytest.mark.parametrize("standardize_logits", [True, False])
def test_kd_ls_matches_the_sample_by_sample_reference(standardize_logits):
    s, t, _ = _logits(16)
    loss = KDLS(SHAPES, SHAPES, standardize=standardize_logits)({"logit": s}, {"logit": t})
    assert loss.item() == pytest.approx(_reference_kd(s, t, 2.0, 9.0, standardize_logits), rel=1e-4)
    other = KDLS(SHAPES, SHAPES, temperature=3.0, weight=1.0, standardize=standardize_logits)
    assert other({"logit": s}, {"logit": t}).item() == pytest.approx(
        _reference_kd(s, t, 3.0, 1.0, standardize_logits), rel=1e-4
    )


def test_kd_ls_ignores_each_sides_per_sample_shift_and_scale():
    # LS's point: only the logits' relations matter, not their range
    s, t, _ = _logits(17)
    g = torch.Generator().manual_seed(18)
    scale, shift = torch.rand(6, 1, generator=g) * 5 + 0.2, torch.randn(6, 1, generator=g) * 10
    kd_ls = build_baseline("kd+ls", SHAPES, SHAPES)
    base = kd_ls({"logit": s}, {"logit": t}).item()
    assert base > 0
    moved = kd_ls({"logit": s * scale + shift}, {"logit": 0.3 * t - 2})
    assert moved.item() == pytest.approx(base, rel=1e-4)
    dkd_ls = build_baseline("dkd+ls", SHAPES, SHAPES)
    y = torch.arange(6) % K
    base = dkd_ls({"logit": s}, {"logit": t}, y).item()
    moved = dkd_ls({"logit": s * scale + shift}, {"logit": 4 * t}, y)
    assert moved.item() == pytest.approx(base, rel=1e-4)


def test_kd_ls_on_constant_student_logits_is_finite_with_a_finite_gradient():
    s = torch.zeros(4, K, requires_grad=True)  # a zero-initialised classifier
    t, _, _ = _logits(19, n=4)
    loss = build_baseline("kd+ls", SHAPES, SHAPES)({"logit": s}, {"logit": t})
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and torch.isfinite(s.grad).all()


def test_dkd_ls_is_dkd_on_standardized_logits_with_the_authors_settings():
    s, t, y = _logits(20)
    dkd_ls = build_baseline("dkd+ls", SHAPES, SHAPES)
    assert isinstance(dkd_ls, DKDLS) and dkd_ls.needs_labels
    assert (dkd_ls.alpha, dkd_ls.beta, dkd_ls.temperature) == (9.0, 72.0, 2.0)
    expected = _reference_dkd(s, t, y, 9.0, 72.0, 2.0, zscore=True)
    assert dkd_ls({"logit": s}, {"logit": t}, y).item() == pytest.approx(expected, rel=1e-4)
    dkd_ls.set_epoch(4)
    assert dkd_ls({"logit": s}, {"logit": t}, y).item() == pytest.approx(expected * 5 / 20, rel=1e-4)


def test_published_cross_entropy_weights():
    assert KDLS.ce_weight == 0.1
    assert DKD.ce_weight == DKDLS.ce_weight == 1.0
    assert not KDLS.needs_labels and DKD.needs_labels
