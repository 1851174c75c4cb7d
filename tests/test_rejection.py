
import pytest
import torch
from torch import nn

from conftest import tiny_digits_task
from kd_optuna.distill.classics import CLASSICS
from kd_optuna.errors import InvalidDistiller
from kd_optuna.proxy.settings import ProxySettings
from kd_optuna.proxy.rejection import REASONS, Rejection, check_repulsion, reject
from kd_optuna.space import DistillerSpec


FAST = ProxySettings(labels_per_class=2, steps=4, batch_size=16, report_every=4, sharpness_size=32,
                     reject_batch_size=16)
KD = CLASSICS["kd"][0]


@pytest.fixture(scope="module")
def task():
    return tiny_digits_task(FAST, seed=1)


class Fake(nn.Module):
    """A stand-in distiller computing ``fn(student logits, teacher logits)``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.spec = KD

    def forward(self, student, teacher, labels=None):
        return self.fn(student["logit"], teacher["logit"])


def verdict_of(task, fn):
    return reject(KD, lambda spec, check: Fake(fn), lambda spec: Fake(fn), task.new_student,
                  task.rejection_batch, task.proxy)


def test_classic_distillers_are_accepted(task):
    for name in ("kd", "fitnets", "at", "emb_cos", "hard"):
        assert task.reject(CLASSICS[name][0]) is None, name


def test_each_reason_on_a_distiller_built_to_have_it(task):
    cases = {
        "repulsive": lambda s, t: -((s - t) ** 2).mean(),
        "exploding": lambda s, t: 1e6 * ((s - t) ** 2).mean(),
        "zero_gradient": lambda s, t: (s * 0.0).sum() + 1.0,
        "non_finite": lambda s, t: torch.log(s - t.abs().max() - 100.0).mean(),
    }
    for reason, fn in cases.items():
        verdict = verdict_of(task, fn)
        assert isinstance(verdict, Rejection) and verdict.reason == reason, (reason, verdict)
    assert verdict_of(task, lambda s, t: ((s - t) ** 2).mean()) is None


def test_a_spec_that_cannot_be_built_is_invalid(task):
    def refuse(spec, check=True):
        raise InvalidDistiller("logit classes differ")

    verdict = reject(KD, refuse, refuse, task.new_student, task.rejection_batch, task.proxy)
    assert verdict == Rejection("invalid", "logit classes differ")
    assert set(REASONS) == {"invalid", "repulsive", "non_finite", "exploding", "zero_gradient"}


def test_hard_labels_are_not_repulsive_though_not_minimal_at_the_teacher(task):
    probe = task.make_probe(CLASSICS["hard"][0])
    assert check_repulsion(probe, task.rejection_batch.teacher) is None


def test_the_verdict_is_deterministic(task):
    spec = DistillerSpec("feat", "satt", "no", "no", "l2", "no", 1, 100)
    assert task.reject(spec) == task.reject(spec)
