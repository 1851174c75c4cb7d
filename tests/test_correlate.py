import pytest
import torch

from kd_optuna.distill.classics import CLASSICS
from kd_optuna.run.correlate import (
    COMBINATIONS,
    SEED_TABLE_1,
    Candidate,
    correlate,
    correlation_table,
    exported_training,
    format_table,
    proxy_on_test,
)
from kd_optuna.data import load_dataset
from kd_optuna.models import tap_model
from kd_optuna.models.digits import DigitsCNN
from kd_optuna.proxy.settings import ProxySettings
from kd_optuna.proxy.views import ProxyData
from kd_optuna.space import DistillerSpec
from kd_optuna.proxy.task import Task


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
    # 10/30 trained here and 10/30 read back as (100 x) / 100 differ in the last bit: a tie, not a ranking
    third, kept = 1 / 3, 100 * (1 / 3) / 100
    assert third != kept
    ties = correlation_table([fake(0.1, 0.0, 0.3, third), fake(0.2, 0.1, 0.2, kept), fake(0.3, 0.2, 0.1, third)])[0]
    assert all(v != v for v in ties.values())


def _tiny_task():
    splits = load_dataset("digits")
    x, y = splits.tensors("train", torch.arange(100))
    vx, vy = splits.tensors("val", torch.arange(30))
    data = ProxyData.build(x, y, vx, vy, FAST, num_classes=10)
    torch.manual_seed(4)
    return Task(data, tap_model(DigitsCNN((8, 8, 16))), lambda: tap_model(DigitsCNN((4, 8, 8))), FAST,
                test=splits.tensors("test", torch.arange(40)))


def test_correlate_runs_end_to_end_on_a_tiny_task():
    task = _tiny_task()
    lines = []
    result = correlate(task, proxy_on_test(task, 4), n_candidates=4, classics=2, final_seeds=(7,),
                       progress=lines.append, final_name="longer proxy")
    assert [c.name for c in result.candidates[:2]] == list(CLASSICS)[:2]
    assert len(result.candidates) == 4 and len(lines) == 4
    assert len({c.spec.key for c in result.candidates}) == 4
    assert all(task.reject(c.spec) is None for c in result.candidates)
    assert set(result.spearman) >= set(COMBINATIONS)
    table = format_table(result)
    assert "| Spearman |" in table and "| seed Table 1 | 0.755" in table and "`logit|no>no>no|kl|no|T4|x1`" in table
    assert "final: longer proxy" in table and result.suggested_weights["score_ce"] == 1.0
    kd = next(c for c in result.candidates if c.name == "kd")
    assert set(result.top_names) == {c.name for c in result.candidates if c.final_acc >= kd.final_acc - 0.02}


def test_given_candidates_keep_their_metrics_and_vanilla_kd_is_the_reference():
    task = _tiny_task()
    spec = DistillerSpec("logit", "no", "no", "no", "l2", "no", 1, 1)
    other = DistillerSpec("logit", "no", "no", "no", "l1", "no", 1, 1)
    metrics = {"val_ce": 0.5, "val_ce_raw": 0.6, "val_acc": 0.8, "sharpness_gap": 0.0, "cka_gap": 0.1}
    finals = {CLASSICS["kd"][0].key: 0.9, spec.key: 0.85, other.key: 0.8}
    seen = []

    def final(candidate, seed):
        seen.append((candidate.key, seed))
        return finals[candidate.key]

    result = correlate(task, final, candidates=[("trial3", spec, metrics), ("trial5", other, metrics)],
                       final_seeds=(0, 1))
    assert [c.name for c in result.candidates] == ["kd", "trial3", "trial5"]
    assert result.candidates[1].proxy == metrics and result.candidates[1].final_acc == 0.85
    assert sorted(seen) == sorted((k, s) for k in finals for s in (0, 1))


def test_a_distiller_whose_final_training_diverges_is_left_out_and_said():
    """A drawn distiller can make the full recipe's loss non-finite: it has no accuracy to rank,
    so it is left out of the correlation with a line, and the others are still measured."""
    from kd_optuna.errors import KdOptunaError, TrainingDiverged

    task = _tiny_task()
    metrics = {"val_ce": 0.5, "val_ce_raw": 0.6, "val_acc": 0.8, "sharpness_gap": 0.0, "cka_gap": 0.1}
    specs = [DistillerSpec("logit", "no", "no", "no", d, "no", 1, 1) for d in ("l2", "l1", "kl", "cos")]
    wild = specs[1]

    def final(spec, seed):
        if spec.key == wild.key and seed == 1:
            raise TrainingDiverged("the loss became nan in epoch 2")
        return 0.8 + 0.01 * specs.index(spec) if spec in specs else 0.9

    lines = []
    result = correlate(task, final, candidates=[(f"trial{i}", s, metrics) for i, s in enumerate(specs)],
                       final_seeds=(0, 1), progress=lines.append)
    assert [c.name for c in result.candidates] == ["kd", "trial0", "trial2", "trial3"]
    assert result.diverged == {"trial1": f"`{wild.key}` (seed 1: the loss became nan in epoch 2)"}
    assert any("trial1" in line and "diverged (seed 1: the loss became nan in epoch 2), left out" in line
               for line in lines)
    assert f"left out, their final training diverged (no accuracy to rank): trial1 `{wild.key}`" in format_table(result)
    assert "nan: every candidate" not in format_table(result)
    tied = correlate(task, lambda spec, seed: 1 / 3, candidates=[(f"trial{i}", s, metrics) for i, s in enumerate(specs)])
    assert all(v != v for v in tied.spearman.values())
    assert "nan: every candidate's final accuracy is 0.3333, so there is no order to correlate with" in format_table(tied)

    with pytest.raises(KdOptunaError, match="vanilla KD's final training .* diverged .*give a lower --lr"):
        correlate(task, lambda spec, seed: (_ for _ in ()).throw(TrainingDiverged("the loss became inf in epoch 1")),
                  candidates=[(f"trial{i}", s, metrics) for i, s in enumerate(specs)])

    def only_kd_trains(spec, seed):
        if spec.key == CLASSICS["kd"][0].key or spec.key == specs[0].key:
            return 0.9
        raise TrainingDiverged("the loss became nan in epoch 1")

    with pytest.raises(KdOptunaError, match="of 3 of the 5 distillers diverged, which leaves 2, fewer than the 3"):
        correlate(task, only_kd_trains, candidates=[(f"trial{i}", s, metrics) for i, s in enumerate(specs)])


def test_two_distillers_are_refused_since_their_rank_correlation_is_always_one():
    from kd_optuna.errors import KdOptunaError

    spec = DistillerSpec("logit", "no", "no", "no", "l2", "no", 1, 1)
    metrics = {"val_ce": 0.5, "val_ce_raw": 0.6, "val_acc": 0.8, "sharpness_gap": 0.0, "cka_gap": 0.1}
    with pytest.raises(KdOptunaError, match="at least 3 distinct distillers"):
        correlate(_tiny_task(), lambda spec, seed: 0.5, candidates=[("trial3", spec, metrics)])


def test_the_exported_training_is_the_final(tmp_path, monkeypatch):
    """One epoch of the real recipe on digits: what the exported script reports, last epoch on test."""
    from kd_optuna.train.checkpoints import save_checkpoint
    from kd_optuna.export.training import train_with_distiller
    from kd_optuna.models import build_model

    torch.manual_seed(0)
    teacher = save_checkpoint(tmp_path / "teacher.pt", build_model("digits_teacher", 10), model_name="digits_teacher",
                              num_classes=10, dataset="digits", accuracy=0.0)
    recipe = dict(epochs=1, batch_size=256, lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=[], gamma=0.1,
                  num_workers=0, dataset="digits", data_root=None, download=False, teacher="digits_teacher",
                  teacher_checkpoint=str(teacher), student="digits_student", device="cpu",
                  output_dir=str(tmp_path / "x"))
    kd = CLASSICS["kd"][0]
    value = exported_training(recipe)(kd, 3)
    again = train_with_distiller(kd.to_params(), **{**recipe, "seed": 3}, progress=False)["final_top1"]
    assert value == 100 * again / 100 and 0.0 <= value <= 1.0

    # a kept run is read back, not trained again; another seed or recipe is trained
    from kd_optuna.run.compare import FileRuns

    runs = FileRuns(tmp_path / "runs.json")
    first = exported_training(recipe, runs=runs)(kd, 3)
    assert first == value and len(runs._read()) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    import kd_optuna.export.training

    monkeypatch.setattr(kd_optuna.export.training, "train_with_distiller", refuse)
    assert exported_training(recipe, runs=FileRuns(tmp_path / "runs.json"))(kd, 3) == value  # to the last bit
    with pytest.raises(AssertionError, match="trained again"):
        exported_training(recipe, runs=runs)(kd, 4)
    with pytest.raises(AssertionError, match="trained again"):
        exported_training({**recipe, "lr": 0.01}, runs=runs)(kd, 3)


def test_correlate_trains_a_missing_teacher_with_its_progress_bar(tmp_path, capsys, monkeypatch):
    """optimize and compare train a missing teacher with an epoch bar; correlate trained it
    silently inside the task (on CIFAR, 240 epochs without a sign of life)."""
    from conftest import invoke_cli, tiny_digits_toml
    from kd_optuna.errors import KdOptunaError
    from kd_optuna.train import teachers

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(teachers.RECIPES, "digits", {**teachers.RECIPES["digits"], "epochs": 1})

    def stop(*args, **kwargs):
        raise KdOptunaError("the task is built after the teacher")

    monkeypatch.setattr(Task, "from_config", stop)
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_digits_toml())
    code, _, err = invoke_cli(capsys, "correlate", str(config), "--device", "cpu", "--threads", "1")
    assert code == 2 and "the task is built after the teacher" in err
    assert "teacher digits_teacher" in err and "1/1 [" in err and "epoch" in err, err
