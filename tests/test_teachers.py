"""The training loop, evaluation, schedules and teacher training on digits."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_optuna.train.checkpoints import load_model
from kd_optuna.errors import KdOptunaError
from kd_optuna.train.teachers import load_or_train_teacher, train_teacher
from kd_optuna.train.engine import default_device, evaluate
from kd_optuna.train.schedule import lr_factor
from kd_optuna.train.classifier import train_classifier
from test_data import tiny_cifar100  # noqa: F401  (fixture)


def separable(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def test_training_on_tensors_learns_a_separable_problem():
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    x, y = separable()
    result = train_classifier(model, (x, y), epochs=10, batch_size=32, lr=0.5, weight_decay=0.0,
                              val_data=separable(seed=1), device="cpu", progress=False)
    assert [h["epoch"] for h in result.history] == list(range(1, 11))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.final["val_accuracy"] > 0.95


def test_training_on_a_dataloader_with_adam_and_augmentation_hook():
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    calls = []
    x, y = separable()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    train_classifier(model, loader, epochs=10, optimizer="adam", lr=0.1, weight_decay=0.0, device="cpu", progress=False)
    assert evaluate(model, *separable(seed=1)).accuracy > 0.9
    train_classifier(model, (x, y), epochs=1, batch_size=64, device="cpu", progress=False,
                     augment=lambda xb, g: calls.append(len(xb)) or xb)
    assert sum(calls) == len(y)


def test_a_batch_norm_model_trains_where_the_last_batch_would_hold_one_row():
    """33 rows in batches of 32: the lone last row is dropped (BatchNorm raises on one row in
    train mode), each epoch is one step, and the schedule counts one step an epoch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    x, y = separable(33)
    seen = []
    train_classifier(model, (x, y), epochs=2, batch_size=32, device="cpu", progress=False,
                     augment=lambda xb, g: seen.append(len(xb)) or xb)
    assert seen == [32, 32]


def test_same_seed_gives_the_same_weights():
    x, y = separable()
    weights = []
    for _ in range(2):
        torch.manual_seed(1)
        model = nn.Linear(2, 2)
        train_classifier(model, (x, y), epochs=2, batch_size=16, device="cpu", progress=False, seed=3)
        weights.append(model.weight.detach().clone())
    assert torch.equal(*weights)


def test_step_loss_and_extra_params_are_trained():
    model, extra = nn.Linear(2, 2), nn.Linear(2, 2)
    before = extra.weight.detach().clone()
    x, y = separable(64)

    def loss(m, xb, yb):
        return nn.functional.cross_entropy(m(xb) + extra(xb), yb)

    train_classifier(model, (x, y), epochs=1, step_loss=loss, extra_params=extra.parameters(),
                     device="cpu", progress=False)
    assert not torch.equal(before, extra.weight)


def test_bf16_autocast_and_channels_last_run_on_cpu():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    result = train_classifier(model, (x, y), epochs=1, batch_size=8, bf16=True, channels_last=True,
                              device="cpu", progress=False)
    assert torch.isfinite(torch.tensor(result.final["loss"]))
    assert 0.0 <= evaluate(model, x, y, bf16=True).accuracy <= 1.0


def test_num_threads_is_restored():
    before = torch.get_num_threads()
    train_classifier(nn.Linear(2, 2), separable(32), epochs=1, num_threads=1, device="cpu", progress=False)
    assert torch.get_num_threads() == before


def test_schedules():
    assert lr_factor("cosine", 0, 100, 10) == 1.0
    assert lr_factor("cosine", 50, 100, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 99, 100, 10) < 0.01
    assert lr_factor("step", 55, 100, 10, milestones=(2, 5), gamma=0.1) == pytest.approx(0.01)
    assert lr_factor("step", 25, 100, 10, milestones=(2, 5), gamma=0.1) == pytest.approx(0.1)
    assert lr_factor("step", 15, 100, 10, milestones=(2, 5), gamma=0.1) == pytest.approx(1.0)
    assert lr_factor("constant", 0, 100, 10, warmup_steps=4) == pytest.approx(0.25)
    with pytest.raises(KdOptunaError):
        lr_factor("linear", 0, 10, 1)


def test_evaluate_counts_correct_predictions_and_restores_mode():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.stack([x[:, 0], -x[:, 0]], 1) + self.w

    model = Fixed().train()
    x = torch.tensor([[1.0], [2.0], [-1.0], [3.0]])
    result = evaluate(model, x, torch.tensor([0, 0, 1, 1]))
    assert result.accuracy == 0.75 and result.count == 4 and model.training


def test_bad_optimizer_and_empty_data_are_user_errors():
    with pytest.raises(KdOptunaError, match="optimizer"):
        train_classifier(nn.Linear(2, 2), separable(8), epochs=1, optimizer="lion", device="cpu", progress=False)
    with pytest.raises(KdOptunaError, match="empty"):
        train_classifier(nn.Linear(2, 2), (torch.zeros(0, 2), torch.zeros(0).long()), epochs=1, device="cpu",
                         progress=False)


def test_device_defaults_to_gpu_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device().type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device().type == "cuda"
    assert default_device("cpu").type == "cpu"


def test_train_teacher_writes_a_loadable_checkpoint(tmp_path):
    report = train_teacher("digits", "digits_student", tmp_path / "t.pt", epochs=1, progress=False, device="cpu")
    model, meta = load_model(report.path)
    assert meta["dataset"] == "digits" and meta["model_name"] == "digits_student"
    assert meta["accuracy"] == report.test_accuracy and meta["split_seed"] == 0
    # one epoch of 64-image batches is 17 steps: the statistics (momentum 0.1) still hold 0.9 ** 17 = 17% of their start
    assert report.stale_batch_norm.startswith("after 17 steps the teacher's BatchNorm running statistics (momentum 0.1) still "
                                  "hold 17% of their initial values"), report.stale_batch_norm


@pytest.mark.slow
def test_digits_teacher_reaches_97_percent(tmp_path):
    report = train_teacher("digits", "digits_teacher", tmp_path / "teacher.pt", progress=False, device="cpu")
    assert report.test_accuracy >= 0.97 and report.stale_batch_norm is None


def test_load_or_train_teacher_trains_once_then_loads(tmp_path):
    path = tmp_path / "teacher.pt"
    model, meta = load_or_train_teacher("digits", "digits_student", path, epochs=1, progress=False, device="cpu")
    written = path.stat().st_mtime_ns
    again, meta_again = load_or_train_teacher("digits", "digits_student", path, device="cpu")
    assert path.stat().st_mtime_ns == written and meta_again == meta
    assert not again.training
    with pytest.raises(KdOptunaError, match="trained on digits"):
        load_or_train_teacher("digits_hard", "digits_student", path, device="cpu")


def test_unknown_recipe_override_is_a_user_error(tmp_path):
    with pytest.raises(KdOptunaError, match="epochz"):
        train_teacher("digits", "digits_student", tmp_path / "t.pt", epochz=3)


def test_cifar_teacher_trains_through_the_augmenting_loader(tiny_cifar100, tmp_path):
    report = train_teacher("cifar100", "resnet8", tmp_path / "r8.pt", root=tiny_cifar100, epochs=1,
                           batch_size=8, num_workers=0, progress=False, device="cpu")
    model, meta = load_model(report.path)
    assert meta["dataset"] == "cifar100" and meta["num_classes"] == 5 and model.fc.out_features == 5
    assert 0.0 <= report.test_accuracy <= 1.0


# -- the trained-teacher cache is keyed by all that changes the teacher (issue 11, point 2) ------

def _own_teacher_config(tmp_path, root):
    from kd_optuna.run.config import load_config
    from test_own_models import own_model_toml

    path = tmp_path / f"{root.name}.toml"
    path.write_text(own_model_toml(root))
    return load_config(path)


def test_teacher_key_follows_root_files_classes_recipe_and_seed(tmp_path):
    import os

    from kd_optuna.train.teachers import teacher_identity, teacher_key
    from test_own_models import image_folder

    a = image_folder(tmp_path / "a", per_class=2)
    b = image_folder(tmp_path / "b", per_class=2)
    key = teacher_key(teacher_identity("imagefolder", "resnet18", a))
    assert key == teacher_key(teacher_identity("imagefolder", "resnet18", str(a) + "/"))
    assert key == teacher_key(teacher_identity("imagefolder", "resnet18", a, num_threads=1))
    assert key != teacher_key(teacher_identity("imagefolder", "resnet18", b))
    assert key != teacher_key(teacher_identity("imagefolder", "resnet34", a))
    assert key != teacher_key(teacher_identity("imagefolder", "resnet18", a, seed=1))
    assert key != teacher_key(teacher_identity("imagefolder", "resnet18", a, epochs=5))
    image = a / "train" / "cat" / "0.png"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = teacher_key(teacher_identity("imagefolder", "resnet18", a))
    assert touched != key
    (a / "train" / "cat").rename(a / "train" / "lion")
    identity = teacher_identity("imagefolder", "resnet18", a)
    assert identity["classes"] == ["dog", "lion"] and teacher_key(identity) != touched
    assert teacher_key(teacher_identity("digits", "digits_teacher")) == teacher_key(
        teacher_identity("digits", "digits_teacher", tmp_path))


@pytest.mark.slow
def test_a_second_image_folder_study_trains_its_own_teacher(tmp_path, monkeypatch, caplog):
    import logging

    from kd_optuna.train import teachers
    from kd_optuna.proxy.task import SAID_ENV, Task
    from test_own_models import image_folder

    monkeypatch.setitem(teachers.RECIPES, "imagefolder", dict(teachers.RECIPES["imagefolder"], epochs=1, batch_size=8))
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    first = _own_teacher_config(tmp_path, image_folder(tmp_path / "first"))
    second = _own_teacher_config(tmp_path, image_folder(tmp_path / "second", classes=("ant", "bee"), shade=60))
    with caplog.at_level(logging.WARNING, logger="kd_optuna"):
        task_first = Task.from_config(first, device="cpu", cache_dir=cache)
        task_second = Task.from_config(second, device="cpu", cache_dir=cache)
    trained = sorted(cache.glob("teacher-imagefolder-mobilenet_v3_small-*.pt"))
    assert len(trained) == 2 and task_first.teacher_sha256 != task_second.teacher_sha256
    assert [r for r in caplog.records if "reusing" in r.getMessage()] == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kd_optuna"):  # the same command: trained here, said once
        Task.from_config(first, device="cpu", cache_dir=cache)
    assert [r for r in caplog.records if "reusing" in r.getMessage()] == []
    monkeypatch.delenv(SAID_ENV)  # a new command
    with caplog.at_level(logging.WARNING, logger="kd_optuna"):
        again = Task.from_config(first, device="cpu", cache_dir=cache)
    assert again.teacher_sha256 == task_first.teacher_sha256
    reuse = [r.getMessage() for r in caplog.records if "reusing" in r.getMessage()]
    assert len(reuse) == 1 and str(tmp_path / "first") in reuse[0] and str(cache) in reuse[0]


def test_a_teacher_at_the_old_name_is_reused_only_for_its_own_key(tmp_path, monkeypatch, caplog):
    import logging

    from kd_optuna.train import teachers
    from kd_optuna.train.checkpoints import save_checkpoint
    from kd_optuna.models import build_model
    from kd_optuna.proxy.task import cached_teacher_checkpoint
    from kd_optuna.train.teachers import teacher_identity, teacher_key
    from test_own_models import image_folder

    root = image_folder(tmp_path / "images", per_class=1)
    legacy = tmp_path / "teacher-imagefolder-resnet18.pt"
    calls = []

    def fake_train(dataset, model_name, out_path, **kwargs):
        calls.append(out_path)
        save_checkpoint(out_path, build_model(model_name, 2), model_name=model_name, num_classes=2,
                        dataset=dataset, accuracy=0.5)
        return teachers.TeacherReport(out_path, model_name, dataset, 0.5, 0.5, 0.0, 1)

    save_checkpoint(legacy, build_model("resnet18", 2), model_name="resnet18", num_classes=2, dataset="imagefolder",
                    accuracy=0.5)
    monkeypatch.setattr(teachers, "train_teacher", fake_train)
    with caplog.at_level(logging.WARNING, logger="kd_optuna"):
        path = cached_teacher_checkpoint("imagefolder", "resnet18", tmp_path, root=root)
    assert path != legacy and calls == [path]
    assert any("not reusing" in r.getMessage() and str(legacy) in r.getMessage() for r in caplog.records)
    path.unlink()
    key = teacher_key(teacher_identity("imagefolder", "resnet18", root))
    save_checkpoint(legacy, build_model("resnet18", 2), model_name="resnet18", num_classes=2, dataset="imagefolder",
                    accuracy=0.5, extra={"cache_key": key})
    assert cached_teacher_checkpoint("imagefolder", "resnet18", tmp_path, root=root) == legacy and len(calls) == 1


@pytest.mark.slow
def test_optimize_trains_a_missing_teacher_once_before_the_workers_with_a_progress_bar(tmp_path, monkeypatch, capsys):
    """Issue 11.9: the first `kd-optuna optimize` of a study without a checkpoint shows the
    teacher's epochs on stderr; the workers read the cached teacher."""
    from pathlib import Path

    from conftest import invoke_cli, tiny_digits_toml

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_digits_toml())
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    assert invoke_cli(capsys, "create-study", str(config), "--storage", url)[0] == 0
    code, out, err = invoke_cli(capsys, "optimize", "--storage", url, "--n-trials", "1", "--n-workers", "1")
    assert code == 0, err
    assert "teacher digits_teacher" in err and "/15 [" in err and "epoch" in err
    cached = list(Path(".kd_optuna_cache").glob("teacher-digits-digits_teacher-*.pt"))
    assert len(cached) == 1 and out.startswith("1 finished")


def test_a_teachers_epochs_are_its_datasets_recipe_not_train_epochs_as_the_readme_says(tmp_path, monkeypatch, capsys,
                                                                                       caplog):
    """Issue 11: a teacher trained on first use takes its dataset's recipe, whatever the study's
    [train] epochs (the student's); `train-teacher --epochs N` without -o is not what the search
    reuses; README and the config templates say so, with the recipes' own numbers."""
    import logging
    from pathlib import Path

    from conftest import invoke_cli, tiny_digits_toml
    from kd_optuna.proxy.task import cached_teacher_checkpoint
    from kd_optuna.train import teachers
    from kd_optuna.train.checkpoints import read_checkpoint

    repo = Path(__file__).resolve().parent.parent
    readme = " ".join((repo / "README.md").read_text().split())
    recipes = teachers.RECIPES
    assert recipes["digits"]["epochs"] == recipes["digits_hard"]["epochs"] == 15
    assert recipes["cifar10"]["epochs"] == recipes["cifar100"]["epochs"] == 240 and recipes["imagefolder"]["epochs"] == 100
    for words in ("digits and digits_hard 15 epochs", "CIFAR-10/100 240 epochs", "imagefolder 100 epochs",
                  "`[train] epochs` does not change it", "no config key does",
                  "`kd-optuna train-teacher CONFIG --epochs N -o teacher.pt` and `checkpoint = \"teacher.pt\"`"):
        assert words in readme, words
    for template in ("digits.toml", "digits_hard.toml"):
        assert "(15 epochs; no key sets them, [train] below is the student's)" in (
            repo / "kd_optuna" / "studies" / template).read_text()

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_digits_toml())  # [train] epochs = 1
    code, out, err = invoke_cli(capsys, "train-teacher", str(config), "--epochs", "1")
    assert code == 0, err
    legacy = Path(".kd_optuna_cache") / "teacher-digits-digits_teacher.pt"
    assert ("note: the search reuses a cached teacher only when it was trained for the recipe's 15 epochs; to search "
            f"with this one, set `checkpoint = '{legacy}'` under [teacher]") in out, out
    assert read_checkpoint(legacy)[1]["epochs"] == 1
    trained = []

    def recorded(dataset, model_name, out_path, **kwargs):  # what the search would train, in a blink
        trained.append(kwargs)
        return real(dataset, model_name, out_path, **{**kwargs, "epochs": 1})

    real = teachers.train_teacher
    monkeypatch.setattr(teachers, "train_teacher", recorded)
    with caplog.at_level(logging.WARNING, logger="kd_optuna"):
        path = cached_teacher_checkpoint("digits", "digits_teacher", Path(".kd_optuna_cache"))
    assert path != legacy and len(trained) == 1 and "epochs" not in trained[0]  # the recipe's 15
    said = [r.getMessage() for r in caplog.records]
    assert any("not reusing" in line and str(legacy) in line for line in said)
    # what was trained is said, and here (1 epoch: 17 steps) that its BatchNorm statistics are stale
    assert any(line.startswith("trained the teacher digits_teacher: test top-1 ") for line in said), said
    assert any(line.startswith("note: after 17 steps the teacher's BatchNorm") and "train-teacher CONFIG --epochs N"
               in line for line in said), said


def test_training_a_teacher_leaves_the_callers_random_state_as_it_was(tmp_path):
    torch.manual_seed(7)
    before = torch.get_rng_state()
    train_teacher("digits", "digits_student", tmp_path / "t.pt", epochs=1, progress=False, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)


def test_the_exported_training_is_the_same_whether_it_trained_the_teacher_or_read_it_from_the_cache(tmp_path):
    """The first run of a fresh machine trains the teacher into the cache; it must train the
    student of its seed exactly as every later run does (before, the teacher's training reseeded
    torch, so the first run's student started from the teacher's seed, whatever --seed said)."""
    from kd_optuna.distill.classics import CLASSICS
    from kd_optuna.export.training import train_with_distiller

    recipe = dict(epochs=1, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=[], gamma=0.1,
                  num_workers=0, seed=3, dataset="digits", data_root=None, download=False, teacher="digits_student",
                  teacher_checkpoint=None, student="digits_student", device="cpu", max_steps=3,
                  cache_dir=str(tmp_path / "cache"), progress=False)
    params = CLASSICS["kd"][0].to_params()
    first = train_with_distiller(params, **recipe, output_dir=str(tmp_path / "first"))
    assert len(list((tmp_path / "cache").glob("teacher-*.pt"))) == 1
    again = train_with_distiller(params, **recipe, output_dir=str(tmp_path / "again"))
    assert first["history"] == again["history"] and first["final_top1"] == again["final_top1"]
    first_weights = torch.load(tmp_path / "first" / "last.pt", weights_only=True)
    again_weights = torch.load(tmp_path / "again" / "last.pt", weights_only=True)
    student = [k for k in first_weights if "student" in k]
    assert student and all(_equal(first_weights[k], again_weights[k]) for k in student)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def test_a_teacher_output_that_cannot_be_written_is_refused_before_the_training(tmp_path, capsys, monkeypatch):
    """`train-teacher -o PATH` with PATH unwritable (here: below a file) trained the whole recipe
    and then failed to save: a raw torch error or an OSError, exit 1, the training lost."""
    from conftest import invoke_cli
    from kd_optuna.train import classifier, teachers

    def no_training(*args, **kwargs):
        raise AssertionError("trained a teacher it cannot save")

    monkeypatch.setattr(teachers, "train_classifier", no_training)
    monkeypatch.setattr(classifier, "train_classifier", no_training)
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = tmp_path / "notes.txt" / "teacher.pt"
    code, _, err = invoke_cli(capsys, "train-teacher", "digits", "-o", str(out), "--device", "cpu")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"cannot write the checkpoint {out}" in err and "choose another path" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_teacher_output_under_the_home_folder_is_written_where_the_config_line_reads_it(tmp_path, capsys,
                                                                                          monkeypatch):
    """`train-teacher --output=~/t.pt` (no shell expands ~ after =) wrote ./~/t.pt and said
    `checkpoint = '~/t.pt'`, which the workers read as $HOME/t.pt: 'does not exist'."""
    from conftest import invoke_cli
    from kd_optuna.train.checkpoints import read_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    code, out, err = invoke_cli(capsys, "train-teacher", "digits", "--output=~/t.pt", "--epochs", "1",
                                "--device", "cpu")
    assert code == 0, err
    assert not (tmp_path / "~").exists()
    assert read_checkpoint("~/t.pt")[1]["epochs"] == 1
    assert f"checkpoint = '{tmp_path / 'home' / 't.pt'}'" in out


def test_train_teacher_without_o_refuses_a_config_whose_teacher_has_a_checkpoint(tmp_path, capsys, monkeypatch):
    """Without -o the teacher goes to the cache, 'the cache the search reads' (--help); a study
    whose [teacher] names a checkpoint never reads it, so the training was lost."""
    from conftest import invoke_cli, tiny_digits_toml
    from kd_optuna.models import build_model

    monkeypatch.chdir(tmp_path)
    torch.save(build_model("digits_teacher", 10).state_dict(), tmp_path / "mine.pt")
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_digits_toml().replace('model = "digits_teacher"\n',
                                                 'model = "digits_teacher"\ncheckpoint = "mine.pt"\n'))
    code, _, err = invoke_cli(capsys, "train-teacher", str(config), "--epochs", "1", "--device", "cpu")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "teacher.checkpoint = 'mine.pt'" in err and "give -o PATH" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.pt", "tiny.toml"]
    code, out, err = invoke_cli(capsys, "train-teacher", str(config), "--epochs", "1", "--device", "cpu",
                                "-o", "other.pt")
    assert code == 0 and "checkpoint = 'other.pt'" in out, err


def test_train_teacher_makes_the_checkpoint_its_config_names(tmp_path, capsys, monkeypatch):
    """With checkpoint = "new.pt" set first (README's two steps in the other order),
    `train-teacher CONFIG -o new.pt` refused: 'teacher.checkpoint = new.pt is not a file; fix
    the path, or remove the key', the file it was asked to make."""
    from conftest import invoke_cli, tiny_digits_toml

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_digits_toml().replace('model = "digits_teacher"\n',
                                                 'model = "digits_teacher"\ncheckpoint = "new.pt"\n'))
    code, out, err = invoke_cli(capsys, "train-teacher", str(config), "--epochs", "1", "--device", "cpu",
                                "-o", "new.pt")
    assert code == 0, err
    code, out, err = invoke_cli(capsys, "create-study", str(config), "--storage", f"sqlite:///{tmp_path / 's.db'}")
    assert code == 0, err
