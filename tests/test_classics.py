"""The classic distillers as specs compute what their papers define."""

import pytest
import torch
import torch.nn.functional as F

from kd_optuna.distill.classics import CLASSICS, classic_specs
from kd_optuna.distill.loss import DistillerLoss

STUDENT = {"logit": (100,), "emb": (64,), "feat": (64, 8, 8)}
TEACHER = {"logit": (100,), "emb": (256,), "feat": (256, 8, 8)}


def batch(shapes, n=8, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn((n, *shape), generator=generator) * 3).requires_grad_(requires_grad)
        for name, shape in shapes.items()
    }


def test_vanilla_kd_spec_equals_the_textbook_hinton_loss():
    spec = CLASSICS["kd"][0]
    s, t = batch(STUDENT), batch(TEACHER, seed=1)
    value = DistillerLoss(spec, STUDENT, TEACHER)(s, t, torch.arange(8))
    temperature = 4
    hinton = temperature**2 * F.kl_div(
        F.log_softmax(s["logit"] / temperature, dim=1),
        F.softmax(t["logit"] / temperature, dim=1),
        reduction="batchmean",
    )
    torch.testing.assert_close(value, hinton, rtol=1e-6, atol=1e-6)


def test_kd_with_logit_standardization_is_kd_on_z_scored_logits():
    """Against the paper's own formula (its code's normalize(), unbiased std, eps 1e-7)."""
    spec = CLASSICS["kd_ls"][0]
    assert list(CLASSICS)[:2] == ["kd", "kd_ls"]
    s, t = batch(STUDENT), batch(TEACHER, seed=1)

    def standardize(z):
        return (z - z.mean(dim=-1, keepdim=True)) / (1e-7 + z.std(dim=-1, keepdim=True))

    temperature, weight = spec.temperature, spec.magnitude
    expected = weight * temperature**2 * F.kl_div(
        F.log_softmax(standardize(s["logit"]) / temperature, dim=1),
        F.softmax(standardize(t["logit"]) / temperature, dim=1),
        reduction="batchmean",
    )
    value = DistillerLoss(spec, STUDENT, TEACHER)(s, t)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    # the logits' scale and shift no longer matter, unlike vanilla KD's
    shifted = {"logit": s["logit"] * 5 + 2}
    torch.testing.assert_close(DistillerLoss(spec, STUDENT, TEACHER)(shifted, t), value)
    kd = DistillerLoss(CLASSICS["kd"][0], STUDENT, TEACHER)
    assert kd(shifted, t).item() != pytest.approx(kd(s, t).item(), rel=0.01)


@pytest.mark.parametrize("name", list(CLASSICS))
@pytest.mark.parametrize("n", [1, 2, 64])
def test_every_classic_builds_and_gives_a_finite_loss_and_gradient(name, n):
    spec, description = CLASSICS[name]
    assert description
    loss = DistillerLoss(spec, STUDENT, TEACHER)
    s = batch(STUDENT, n=n, requires_grad=True)
    value = loss(s, batch(TEACHER, n=n, seed=1), torch.randint(0, 100, (n,)))
    assert torch.isfinite(value) and value >= 0
    value.backward()
    grad = s[spec.knowledge].grad
    assert grad is not None and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", list(CLASSICS))
def test_every_classic_is_zero_when_the_student_matches_the_teacher(name):
    spec = CLASSICS[name][0]
    if spec.distance == "hard":
        pytest.skip("cross-entropy against the argmax is not 0 at equality")
    t = batch(TEACHER, n=4)
    loss = DistillerLoss(spec, TEACHER, TEACHER)
    assert loss(t, {k: v.clone() for k, v in t.items()}).item() == pytest.approx(0, abs=1e-5)


def test_attention_transfer_compares_normalised_spatial_attention():
    s, t = batch(STUDENT, n=4), batch(STUDENT, n=4, seed=1)

    def attention(f):
        a = 64 * F.softmax(f.abs().mean(1).flatten(1) / 0.5, dim=1)
        return F.normalize(a, dim=1)

    expected = 100 * (attention(s["feat"]) - attention(t["feat"])).pow(2).mean(1).mean()
    value = DistillerLoss(CLASSICS["at"][0], STUDENT, STUDENT)(s, t)
    torch.testing.assert_close(value, expected)


def test_similarity_preserving_compares_row_normalised_sample_grams():
    s, t = batch(STUDENT, n=4), batch(STUDENT, n=4, seed=1)

    def gram(f):
        flat = f.flatten(1)
        return F.normalize(flat @ flat.t(), dim=1)

    expected = 100 * (gram(s["feat"]) - gram(t["feat"])).pow(2).mean()
    value = DistillerLoss(CLASSICS["sp"][0], STUDENT, STUDENT)(s, t)
    torch.testing.assert_close(value, expected)


def test_channel_wise_distillation_is_kl_over_positions_per_channel():
    s, t = batch(STUDENT, n=4), batch(STUDENT, n=4, seed=1)
    p = F.softmax(t["feat"].flatten(2) / 4, dim=2)
    log_q = F.log_softmax(s["feat"].flatten(2) / 4, dim=2)
    expected = 16 * (p * (p.log() - log_q)).sum(2).mean()
    value = DistillerLoss(CLASSICS["cwd"][0], STUDENT, STUDENT)(s, t)
    torch.testing.assert_close(value, expected)


def test_classic_specs_keep_population_order():
    assert classic_specs()[0] == CLASSICS["kd"][0]
    assert len(set(s.key for s in classic_specs())) == len(CLASSICS)
