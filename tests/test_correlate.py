import pytest
import torch

from kd_optuna.correlate import (
    COMBINATIONS,
    SEED_TABLE_1,
    Candidate,
    correlate,
    correlation_table,
    format_table,
)
from kd_optuna.data import load_dataset
from kd_optuna.models import tap_model
from kd_optuna.models.digits import DigitsCNN
from kd_optuna.proxy import ProxyData, ProxySettings
from kd_optuna.space import DistillerSpec
from kd_optuna.task import Task


FAST = ProxySettings(labels_per_class=2, steps=3, batch_size=16, report_every=3, sharpness_size=32,
                     reject_batch_size=16)
SPEC = DistillerSpec("logit", "no", "no", "no", "kl", "no", 4, 1)


def fake(ce, gap, cka, acc):
    return Candidate("c", SPEC, {"val_ce": ce, "val_ce_raw": ce, "val_acc": acc, "sharpness_gap": gap,
                                 "cka_gap": cka}, acc, 0.0, 0.0, 0.0)


def test_table_by_hand():
    candidates = [fake(0.1, 0.0, 0.3, 0.9), fake(0.2, -0.5, 0.2, 0.8), fake(0.3, 0.1, 0.1, 0.7)]
    spearman, kendall = correlation_table(candidates)
    assert spearman["CE Loss"] == pytest.approx(1.0) and kendall["CE Loss"] == pytest.approx(1.0)
    assert spearman["CKA-gap"] == pytest.approx(-1.0)
    # |S-gap| = 0, 0.5, 0.1 ranks the accuracies 0.9 > 0.7 > 0.8
    assert spearman["S-gap"] == pytest.approx(0.5) and kendall["S-gap"] == pytest.approx(1 / 3)
    assert spearman["proxy acc"] == pytest.approx(1.0)
    assert len(COMBINATIONS) == len(SEED_TABLE_1)
    flat = correlation_table([fake(0.1, 0.0, 0.3, 0.9), fake(0.2, 0.0, 0.2, 0.9)])[0]
    assert flat["CE Loss"] != flat["CE Loss"]


def test_correlate_runs_end_to_end_on_a_tiny_task():
    splits = load_dataset("digits")
    x, y = splits.tensors("train", torch.arange(100))
    vx, vy = splits.tensors("val", torch.arange(30))
    data = ProxyData.build(x, y, vx, vy, FAST, num_classes=10)
    torch.manual_seed(4)
    task = Task(data, tap_model(DigitsCNN((8, 8, 16))), lambda: tap_model(DigitsCNN((4, 8, 8))), FAST,
                test=splits.tensors("test", torch.arange(40)))
    lines = []
    result = correlate(task, n_candidates=4, classics=2, final_steps=4, final_seeds=(7,), progress=lines.append)
    assert [c.name for c in result.candidates[:2]] == ["kd", "fitnets"]
    assert len(result.candidates) == 4 and len(lines) == 4
    assert len({c.spec.key for c in result.candidates}) == 4
    assert all(task.reject(c.spec) is None for c in result.candidates)
    assert set(result.spearman) >= set(COMBINATIONS)
    table = format_table(result)
    assert "| Spearman |" in table and "| seed Table 1 | 0.755" in table and "`logit|no>no>no|kl|no|T4|x1`" in table
    assert result.final_steps == 4 and result.suggested_weights["score_ce"] == 1.0
