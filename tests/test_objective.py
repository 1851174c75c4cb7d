import math

import optuna
import pytest
import torch

from conftest import tiny_digits_task
from kd_optuna.distill.classics import CLASSICS
from kd_optuna.proxy.objective import Objective
from kd_optuna.proxy.settings import ProxySettings
from kd_optuna.proxy.rejection import Rejection
from kd_optuna.space import GENES
from kd_optuna.proxy.task import Task


FAST = ProxySettings(labels_per_class=2, steps=4, batch_size=16, report_every=2, sharpness_size=32,
                     reject_batch_size=16)
ATTRS = ("val_ce", "val_acc", "sharpness_gap", "cka_gap", "proxy_seconds", "spec", "formula",
         "rejection_seconds", "training_seconds", "scoring_seconds")


@pytest.fixture(scope="module")
def task():
    return tiny_digits_task(FAST, seed=2)


def study_with(*params):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for p in params:
        study.enqueue_trial(p)
    return study


def test_a_completed_trial_has_its_value_reports_and_attrs(task):
    spec = CLASSICS["kd"][0]
    study = study_with(spec.to_params(), spec.to_params())
    study.optimize(Objective(task, threads=1), n_trials=2)
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert all(name in first.user_attrs for name in ATTRS)
    assert first.user_attrs["spec"] == spec.key and first.params == spec.to_params()
    assert first.value == pytest.approx(first.user_attrs["val_ce"])
    assert sorted(first.intermediate_values) == [2, 4]
    assert first.intermediate_values[4] == pytest.approx(first.user_attrs["val_ce"])
    assert second.value == first.value, "a trial's value must not depend on the trials before it"


def test_a_rejected_trial_is_pruned_with_its_reason(task, monkeypatch):
    monkeypatch.setattr(task, "reject", lambda spec: Rejection("exploding", "KD term 1e6 x CE"))
    study = study_with(CLASSICS["kd"][0].to_params())
    study.optimize(Objective(task), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["reject_reason"] == "exploding"
    assert "val_ce" not in trial.user_attrs


def test_a_pruner_stops_a_trial_on_its_reports(task):
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1e-9))
    study.enqueue_trial(CLASSICS["kd"][0].to_params())
    study.optimize(Objective(task), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["pruned_at_step"] == 2 and list(trial.intermediate_values) == [2]


def test_out_of_memory_fails_the_trial_and_the_worker_goes_on(task, monkeypatch):
    calls = []

    def run(spec, **kwargs):
        calls.append(spec)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(task, "run", run)
    study = study_with(CLASSICS["kd"][0].to_params(), CLASSICS["fitnets"][0].to_params())
    study.optimize(Objective(task), n_trials=2)
    assert len(calls) == 2
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.FAIL
        assert trial.user_attrs["fail_reason"].startswith("CUDA out of memory")


def test_out_of_memory_in_rejection_fails_only_that_trial(task, monkeypatch):
    def reject(spec):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(task, "reject", reject)
    study = study_with(CLASSICS["kd"][0].to_params())
    study.optimize(Objective(task), n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.FAIL


def test_non_finite_training_is_pruned_with_a_reason(task, monkeypatch):
    from kd_optuna.errors import InvalidDistiller

    def run(spec, **kwargs):
        raise InvalidDistiller("non-finite loss during training")

    monkeypatch.setattr(task, "run", run)
    study = study_with(CLASSICS["kd"][0].to_params())
    study.optimize(Objective(task), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["reject_reason"] == "non_finite"


def test_a_non_finite_score_after_a_finite_training_is_a_rejection_said_once(task, monkeypatch, caplog):
    """A proxy lr too high for its student leaves the training loss finite and the eval-mode
    logits overflowed: the score was NaN, and Optuna failed the trial with 'the objective
    returned NaN'."""
    import dataclasses

    finite = task.run(CLASSICS["kd"][0])
    overflowed = dataclasses.replace(finite, val_ce=math.nan, score=math.nan)
    monkeypatch.setattr(task, "run", lambda spec, **kwargs: overflowed)
    study = study_with(CLASSICS["kd"][0].to_params(), CLASSICS["fitnets"][0].to_params())
    study.optimize(Objective(task), n_trials=2)
    for trial in study.trials:
        assert trial.state == optuna.trial.TrialState.PRUNED
        assert trial.user_attrs["reject_reason"] == "non_finite"
        assert "eval-mode logits overflowed" in trial.user_attrs["reject_detail"]
    said = [r.getMessage() for r in caplog.records if "trains too fast for this student" in r.getMessage()]
    assert len(said) == 1 and f"lower [proxy] lr (now {task.proxy.lr:g}" in said[0]


def test_params_are_the_public_gene_names(task):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    study.optimize(Objective(task), n_trials=1)
    assert set(study.trials[0].params) == set(GENES)
    assert not math.isnan(study.trials[0].user_attrs["rejection_seconds"])


def _digits_config(checkpoint, **proxy):
    import dataclasses

    from kd_optuna.run.config import load_config

    config = load_config("digits")
    return dataclasses.replace(
        config,
        teacher=dataclasses.replace(config.teacher, checkpoint=checkpoint),
        proxy=dataclasses.replace(config.proxy, **proxy),
    )


def test_task_from_config_loads_the_checkpoint_and_caches_teacher_outputs(tmp_path, monkeypatch):
    from kd_optuna.data import DatasetSplits
    from kd_optuna.train.checkpoints import save_checkpoint
    from kd_optuna.models import build_model

    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "teacher.pt", build_model("digits_teacher", 10), model_name="digits_teacher",
                           num_classes=10, dataset="digits", accuracy=0.0)
    config = _digits_config(str(path), steps=2, report_every=2, sharpness_size=16)
    loaded = []
    tensors = DatasetSplits.tensors
    monkeypatch.setattr(DatasetSplits, "tensors", lambda self, split, *a, **k: loaded.append(split) or tensors(self, split, *a, **k))
    task = Task.from_config(config, device="cpu", cache_dir=tmp_path / "cache")
    assert task.device.type == "cpu" and task.proxy == config.proxy.for_pool(task.data.pool.shape[0]) and task.space == config.space
    assert task.student_shapes["logit"] == (10,) and task.teacher_shapes["feat"][0] == 128
    assert loaded == ["train", "val"]  # issue 11.3: an optimize worker never holds the test split's images
    assert task.test is not None and task.test[0].shape[1:] == (1, 16, 16) and task.data.val_x.shape[1:] == (1, 16, 16)
    assert loaded == ["train", "val", "test"] and task.test is task.test
    task.teacher_outputs
    assert len(list((tmp_path / "cache").glob("teacher-outputs-*.pt"))) == 1
    assert not any(p.requires_grad for p in task.teacher.parameters())


def test_a_missing_teacher_is_trained_once_per_cache_folder(tmp_path, monkeypatch):
    from kd_optuna.train import teachers
    from kd_optuna.train.checkpoints import save_checkpoint
    from kd_optuna.models import build_model
    from kd_optuna.proxy.task import cached_teacher_checkpoint

    calls = []

    def fake_train(dataset, model_name, out_path, **kwargs):
        calls.append((dataset, model_name))
        save_checkpoint(out_path, build_model(model_name, 10), model_name=model_name, num_classes=10,
                        dataset=dataset, accuracy=0.5)
        return teachers.TeacherReport(out_path, model_name, dataset, 0.5, 0.5, 0.0, 1)

    monkeypatch.setattr(teachers, "train_teacher", fake_train)
    first = cached_teacher_checkpoint("digits", "digits_teacher", tmp_path)
    second = cached_teacher_checkpoint("digits", "digits_teacher", tmp_path)
    assert first == second and first.exists() and calls == [("digits", "digits_teacher")]
    task = Task.from_config(_digits_config(None), device="cpu", cache_dir=tmp_path)
    assert len(calls) == 1 and task.teacher_sha256


def test_a_trial_scored_at_chance_is_said_once(task, monkeypatch, caplog):
    """Issue 11: a 224 px study's best score was exactly ln 4; a score at chance now says so."""
    import dataclasses

    from kd_optuna.proxy.objective import at_chance

    real = task.run(CLASSICS["kd"][0])
    chance = dataclasses.replace(real, val_ce=math.log(10) - 1e-5, score=math.log(10) - 1e-5, val_acc=0.1)
    monkeypatch.setattr(task, "run", lambda spec, report=None: chance)
    assert at_chance(math.log(4), 4) and not at_chance(math.log(4) - 0.01, 4) and not at_chance(0.0, 1)
    study = study_with(CLASSICS["kd"][0].to_params(), CLASSICS["kd_ls"][0].to_params())
    with caplog.at_level("WARNING", logger="kd_optuna.proxy.objective"):
        study.optimize(Objective(task), n_trials=2)
    said = [r.getMessage() for r in caplog.records if r.name == "kd_optuna.proxy.objective"]
    assert len(said) == 1 and "trial 0 scored at chance" in said[0] and "ln 10" in said[0]
    assert f"{task.proxy.steps} steps of batch {task.proxy.batch_size}" in said[0] and "[proxy] epochs or steps" in said[0]
    monkeypatch.setattr(task, "run", lambda spec, report=None: real)
    caplog.clear()
    with caplog.at_level("WARNING", logger="kd_optuna.proxy.objective"):
        study_with(CLASSICS["kd"][0].to_params()).optimize(Objective(task), n_trials=1)
    assert not caplog.records


def test_a_trial_that_classifies_every_validation_image_is_said_once(task, monkeypatch, caplog):
    """Its calibrated CE is about 0 whatever the distiller (1e-13 on a 3-class image folder):
    such trials cannot be ranked, and the user is told why; a trial that misses one is not said."""
    import dataclasses

    real = task.run(CLASSICS["kd"][0])
    assert real.val_acc < 1.0
    perfect = dataclasses.replace(real, val_ce=1.8e-13, score=1.8e-13, val_acc=1.0)
    results = iter([real, perfect, perfect])
    monkeypatch.setattr(task, "run", lambda spec, report=None: next(results))
    study = study_with(CLASSICS["kd"][0].to_params(), CLASSICS["kd_ls"][0].to_params(), CLASSICS["fitnets"][0].to_params())
    with caplog.at_level("WARNING", logger="kd_optuna.proxy.objective"):
        study.optimize(Objective(task), n_trials=3)
    said = [r.getMessage() for r in caplog.records if r.name == "kd_optuna.proxy.objective"]
    assert len(said) == 1 and said[0].startswith(f"trial 1 classified all {task.data.val_y.shape[0]} validation images")
    assert "1.8e-13" in said[0] and "cannot tell" in said[0]


def test_a_trial_at_chance_after_one_that_learned_is_the_distiller_and_nothing_is_said(task, monkeypatch, caplog):
    """A distiller that stops its student learning scores ln K in a healthy study: advice to
    train the proxy longer would be wrong there."""
    import dataclasses

    real = task.run(CLASSICS["kd"][0])
    chance = dataclasses.replace(real, val_ce=math.log(10), score=math.log(10), val_acc=0.1)
    results = iter([real, chance, chance])
    monkeypatch.setattr(task, "run", lambda spec, report=None: next(results))
    study = study_with(CLASSICS["kd"][0].to_params(), CLASSICS["kd_ls"][0].to_params(), CLASSICS["fitnets"][0].to_params())
    with caplog.at_level("WARNING", logger="kd_optuna.proxy.objective"):
        study.optimize(Objective(task), n_trials=3)
    assert [t.value for t in study.trials][1:] == [math.log(10)] * 2
    assert not [r for r in caplog.records if r.name == "kd_optuna.proxy.objective"]
