import math

import pytest
import torch
from torch import nn

from kd_optuna.proxy.metrics import (
    accuracy,
    adaptive_sharpness,
    calibrated_cross_entropy,
    cka_gap,
    cross_entropy,
    fit_temperature,
    linear_cka,
)
from kd_optuna.proxy.score import ScoreWeights, combined_score


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_accuracy_and_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    assert accuracy(logits, labels) == pytest.approx(2 / 3)
    expected = (
        -math.log(math.e**2 / (math.e**2 + 1))
        - math.log(math.e / (math.e + 1))
        - math.log(1 / (math.e**3 + 1))
    ) / 3
    assert cross_entropy(logits, labels) == pytest.approx(expected)
    assert cross_entropy(logits * 2, labels, temperature=2.0) == pytest.approx(expected)


def test_calibration_undoes_an_under_confident_scale():
    logits = 4 * _randn(300, 10)
    labels = logits.argmax(1)
    labels[:30] = (labels[:30] + 1) % 10  # 90% accurate, so the best temperature is finite
    best = calibrated_cross_entropy(logits, labels)
    for shrink in (4.0, 16.0):
        assert cross_entropy(logits / shrink, labels) > best + 0.1
        assert calibrated_cross_entropy(logits / shrink, labels) == pytest.approx(best, abs=1e-5)
    assert fit_temperature(logits / 16, labels) == pytest.approx(fit_temperature(logits, labels) / 16, rel=1e-3)


def test_linear_cka_hand_cases():
    x = _randn(200, 8)
    assert linear_cka(x, x) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(_randn(8, 8, seed=1))
    assert linear_cka(x, 3.5 * x @ q) == pytest.approx(1.0)
    assert linear_cka(x, x + 7.0) == pytest.approx(1.0)
    noise = _randn(2000, 8, seed=2)
    assert linear_cka(_randn(2000, 8, seed=3), noise) < 0.02
    # a rank-one Y = X v: CKA = ||X^T X v||^2 / (||X^T X||_F ||X v||^2) for centred X
    v = torch.zeros(8, 1)
    v[0] = 1.0
    xc = (x - x.mean(0)).double()
    expected = float((xc.T @ xc @ v.double()).norm() ** 2 / ((xc.T @ xc).norm() * (xc @ v.double()).norm() ** 2))
    assert linear_cka(x, x @ v) == pytest.approx(expected)
    assert linear_cka(x, torch.ones(200, 3)) == 0.0
    assert cka_gap(x, x) == pytest.approx(0.0, abs=1e-12)


def test_linear_cka_rejects_mismatched_rows():
    with pytest.raises(ValueError):
        linear_cka(torch.zeros(3, 2), torch.zeros(4, 2))


class _Quadratic(nn.Module):
    """logit = (w * x, -w * x): a model whose loss curvature grows with ``scale``."""

    def __init__(self, scale):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5]))
        self.scale = scale

    def forward(self, x):
        z = self.scale * self.w * x
        return torch.stack([z, -z], dim=1)


def test_sharper_model_has_larger_sharpness():
    x = torch.ones(16)
    labels = torch.zeros(16, dtype=torch.long)
    labels[:4] = 1
    flat = adaptive_sharpness(_Quadratic(1.0), x, labels, rho=0.5)
    sharp = adaptive_sharpness(_Quadratic(8.0), x, labels, rho=0.5)
    assert sharp > flat > 0
    model = _Quadratic(8.0)
    before = model.w.detach().clone()
    again = adaptive_sharpness(model, x, labels, rho=0.5)
    assert again == sharp and torch.equal(model.w, before)


def test_sharpness_of_a_real_net_is_deterministic_and_restores_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    net.train()
    x, y = _randn(32, 4), torch.arange(32) % 3
    state = {k: v.clone() for k, v in net.state_dict().items()}
    a = adaptive_sharpness(net, x, y, rho=0.1)
    b = adaptive_sharpness(net, x, y, rho=0.1)
    assert a == b and net.training
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert adaptive_sharpness(net, x, y, rho=0.2) > a


def test_combined_score_is_a_fixed_weighted_sum():
    metrics = {"val_ce": 0.3, "sharpness_gap": -0.2, "cka_gap": 0.1}
    assert combined_score(metrics, ScoreWeights()) == pytest.approx(0.3)
    assert combined_score(metrics, ScoreWeights(1.0, 2.0, 3.0)) == pytest.approx(0.3 + 0.4 + 0.3)


def test_sharpness_and_predictions_of_large_inputs_are_taken_in_chunks_with_the_same_values(monkeypatch):
    """Issue 11.3: 256 sharpness images at 224 px held 6 GiB of activations at once (and 1,024
    eval images 6.4 GiB); chunks give the same L, g and predictions (float rounding apart)."""
    from kd_optuna.proxy import metrics
    from kd_optuna.proxy.training import predict

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 3))
    net.eval()
    tapped = _Tapped(net)
    x, y = _randn(30, 3, 8, 8), torch.arange(30) % 3
    big = torch.empty(1, 3, 224, 224)
    assert metrics.rows_within(big, metrics.GRAD_ACTIVATIONS) == 6 and metrics.rows_within(big, metrics.EVAL_ACTIVATIONS) == 22
    assert metrics.rows_within(x, metrics.GRAD_ACTIVATIONS) >= 30  # small images: one pass, as before
    whole = adaptive_sharpness(net, x, y, rho=0.1)
    with torch.no_grad():
        logits = net(x)
    calls = []
    net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    monkeypatch.setattr(metrics, "SCORING_BUDGET", 7 * metrics.GRAD_ACTIVATIONS * x[:1].numel() * 4)  # 7 rows a pass
    chunked = adaptive_sharpness(net, x, y, rho=0.1)
    assert max(calls) == 7 and sum(calls) == 60  # L(w) and L(w + e) over the 30 rows, 7 at a time
    assert chunked == pytest.approx(whole, rel=1e-4, abs=1e-7)
    calls.clear()
    out = predict(tapped, x, batch_size=1024)  # 7 * 64 / 20 = 22 rows a pass
    assert calls == [22, 8] and torch.allclose(out["logit"], logits, atol=1e-6)


class _Tapped(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        logit = self.net(x)
        return {"emb": logit, "logit": logit}
