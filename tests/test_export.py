"""`kd-optuna export`: the script is valid and inert whatever the study holds, and it trains."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from kd_optuna.distill.classics import CLASSICS
from kd_optuna.run.config import CONFIG_ATTR, StudyConfig, load_config
from kd_optuna.export.training import METHODS, build_method_term
from kd_optuna.export.script import SETTINGS, script_defaults, write_script
from kd_optuna.space import FULL_OPTIONS, GENES

REPO = Path(__file__).resolve().parent.parent
EVIL = 'x"""\'\'\'\nimport os; os.system("touch PWNED")  # %s {0} \\'


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def completed_trial(spec, user_attrs=None):
    distributions = {g: CategoricalDistribution(list(FULL_OPTIONS[g])) for g in GENES}
    attrs = {"formula": spec.formula(), "spec": spec.key, **(user_attrs or {})}
    return optuna.trial.create_trial(params=spec.to_params(), distributions=distributions, value=0.25, user_attrs=attrs)


def digits_config(**teacher) -> StudyConfig:
    data = load_config("digits").to_dict()
    data["teacher"].update(teacher)
    data["train"].update({"epochs": 2, "batch_size": 256, "milestones": [1], "num_workers": 0})
    return StudyConfig.from_dict(data)


def test_script_is_valid_and_inert_with_hostile_study_data(tmp_path):
    config = StudyConfig.from_dict(
        load_config("digits").to_dict() | {"data": {"dataset": "digits", "root": EVIL, "download": False}}
    )
    trial = completed_trial(CLASSICS["kd"][0], {"formula": EVIL, "note": EVIL})
    path = write_script(tmp_path / "train_best.py", EVIL, trial, config)
    text = path.read_text()
    compile(text, str(path), "exec")
    tree = ast.parse(text)
    data_literals = {  # the values of the script's module-level NAME = literal lines
        id(node.value) for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
    }
    hostile = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and "PWNED" in str(n.value)]
    assert hostile and all(id(n) in data_literals for n in hostile)
    assert "PWNED" not in text.split("DISTILLER = ", 1)[0]
    module = _script_module(path)
    assert (module.STUDY, module.DATA_ROOT) == (EVIL, EVIL)
    assert module.FORMULA == CLASSICS["kd"][0].formula()  # the spec's own, never the trial's user attr
    result = subprocess.run(
        [sys.executable, str(path), "--help"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "PWNED").exists()
    for name in SETTINGS:
        assert "--" + name.replace("_", "-") in result.stdout
    assert "--resume" in result.stdout


def test_defaults_come_from_the_train_table():
    defaults = script_defaults(load_config("cifar100_resnet56_resnet20"))
    assert (defaults["epochs"], defaults["batch_size"], defaults["lr"], defaults["milestones"]) == (240, 64, 0.05, [150, 180, 210])
    assert defaults["teacher_checkpoint"] == "save/models/resnet56_vanilla/ckpt_epoch_240.pth"


def test_export_refuses_a_missing_directory(tmp_path):
    from kd_optuna.errors import KdOptunaError

    with pytest.raises(KdOptunaError, match="does not exist"):
        write_script(tmp_path / "no" / "x.py", "s", completed_trial(CLASSICS["kd"][0]), digits_config())


def test_export_gives_the_script_the_teacher_the_search_used(tmp_path, monkeypatch, capsys):
    """A config without a checkpoint searched with the teacher cached in the working directory;
    the script, run from any folder, must distil from it instead of training another."""
    from conftest import invoke_cli
    from kd_optuna.models import build_model
    from kd_optuna.train.checkpoints import save_checkpoint
    from kd_optuna.train.teachers import teacher_identity, teacher_key

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="minimize")
    study.set_user_attr(CONFIG_ATTR, digits_config().to_json())
    study.add_trial(completed_trial(CLASSICS["kd"][0]))
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke_cli(capsys, "export", "--storage", url, "-o", "none.py")
    assert code == 0, err
    assert _script_module(tmp_path / "none.py").TEACHER_CHECKPOINT is None and "teacher" not in out

    key = teacher_key(teacher_identity("digits", "digits_teacher"))
    cached = tmp_path / ".kd_optuna_cache" / f"teacher-digits-digits_teacher-{key[:16]}.pt"
    save_checkpoint(cached, build_model("digits_teacher", 10), model_name="digits_teacher", num_classes=10,
                    dataset="digits", accuracy=0.1, extra={"cache_key": key})
    code, out, err = invoke_cli(capsys, "export", "--storage", url, "-o", "cached.py")
    assert code == 0, err
    assert _script_module(tmp_path / "cached.py").TEACHER_CHECKPOINT == str(cached.resolve())
    assert f"it distils from the search's teacher {cached.resolve()}" in out


def test_export_to_a_path_it_cannot_write_names_that_path_and_leaves_nothing(tmp_path, capsys):
    from conftest import invoke_cli

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="minimize")
    study.set_user_attr(CONFIG_ATTR, digits_config().to_json())
    study.add_trial(completed_trial(CLASSICS["kd"][0]))
    (tmp_path / "a_file").write_text("")
    target = tmp_path / "a_file" / "train_best.py"
    code, _, err = invoke_cli(capsys, "export", "--storage", url, "-o", str(target))
    assert code == 2 and err.count("\n") == 1 and "a_file" in err and "choose another -o" in err, err
    from kd_optuna.errors import KdOptunaError

    with pytest.raises(KdOptunaError) as refused:  # below the CLI's check of -o: the write itself
        write_script(target, "s", study.best_trial, digits_config())
    assert f"cannot write {target} (Not a directory); choose another -o" in str(refused.value)
    assert ".partial" not in str(refused.value)
    assert (tmp_path / "a_file").read_text() == "" and not list(tmp_path.glob("**/*.py*"))


@pytest.mark.slow
def test_exported_script_trains_one_epoch_then_resumes(tmp_path):
    import torch

    from kd_optuna.train.checkpoints import save_checkpoint
    from kd_optuna.models import build_model

    torch.manual_seed(0)
    teacher_path = tmp_path / "it's a \"teacher\".pt"
    save_checkpoint(teacher_path, build_model("digits_teacher", 10), model_name="digits_teacher",
                    num_classes=10, dataset="digits", accuracy=0.1)
    config = digits_config(checkpoint=str(teacher_path))
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=url, study_name="s", direction="minimize")
    study.set_user_attr(CONFIG_ATTR, config.to_json())
    study.add_trial(completed_trial(CLASSICS["kd"][0]))
    script = tmp_path / "train_best.py"
    code = subprocess.run(
        [sys.executable, "-m", "kd_optuna.run.cli", "export", "--storage", url, "-o", str(script)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert code.returncode == 0, code.stderr
    common = [sys.executable, str(script), "--device", "cpu", "--output-dir", "run", "--no-progress", "--max-steps", "2"]
    first = subprocess.run(common + ["--epochs", "1"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "final top-1" in first.stdout and "best val top-1" in first.stdout
    # --no-progress hides the bars only: a log still gets each epoch's line
    assert "epoch 1/1: loss " in first.stdout and "val top-1 " in first.stdout
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and json.loads(state["spec"]) == CLASSICS["kd"][0].to_params()
    second = subprocess.run(common + ["--epochs", "2", "--resume"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert (tmp_path / "run" / "best_student.pt").is_file()
    # the student whose test top-1 is printed is kept, in the format a teacher checkpoint has
    from kd_optuna.train.checkpoints import read_checkpoint

    weights, meta = read_checkpoint(tmp_path / "run" / "last_student.pt")
    printed = float(second.stdout.split("final top-1: ")[1].split("%")[0])
    assert meta["epoch"] == 2 and meta["chosen_on"] == "last epoch"
    assert 100 * meta["accuracy"] == pytest.approx(printed, abs=0.006)
    last_state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["student"]
    assert all(torch.equal(weights[name], last_state[name].cpu()) for name in last_state)


@pytest.fixture(scope="module")
def exported_at_script(tmp_path_factory):
    """A script exported from a study whose trial is attention transfer (not kd), and its teacher."""
    import torch

    from kd_optuna.train.checkpoints import save_checkpoint
    from kd_optuna.models import build_model

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    teacher_path = root / "teacher.pt"
    save_checkpoint(teacher_path, build_model("digits_teacher", 10), model_name="digits_teacher",
                    num_classes=10, dataset="digits", accuracy=0.1)
    trial = completed_trial(CLASSICS["at"][0])
    return write_script(root / "train_best.py", "s", trial, digits_config(checkpoint=str(teacher_path)))


def _script_module(path):
    spec = importlib.util.spec_from_file_location("exported_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: What each method leaves in the checkpoint's distiller state besides the term itself.
METHOD_STATE = {"crd": "memory_student", "dml": "peer"}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_adds_its_term_to_the_students_ce(exported_at_script, method, tmp_path, capsys):
    import torch

    run = tmp_path / "run"
    _script_module(exported_at_script).main([
        "--method", method, "--epochs", "1", "--max-steps", "1", "--batch-size", "16",
        "--device", "cpu", "--output-dir", str(run), "--no-progress",
    ])
    out = capsys.readouterr().out
    assert "final top-1" in out
    assert ("distiller: " + (CLASSICS["at"][0].formula() if method == "searched" else method)) in out
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["method"] == method
    first = state["history"][0]
    assert first["term"] > 0
    from kd_optuna.distill.baselines import BASELINES

    ce_weight = getattr(BASELINES.get(method), "ce_weight", 1.0)  # 0.1 for kd+ls, as its paper trains
    assert first["loss"] == pytest.approx(ce_weight * first["ce"] + first["term"])
    if method in METHOD_STATE:
        assert any(key.startswith(METHOD_STATE[method]) for key in state["distiller"])


def test_methods_give_distinct_terms_on_the_same_batch():
    import torch

    from kd_optuna.distill.loss import DistillerLoss
    from kd_optuna.models import build_model, knowledge_shapes, tap_model

    torch.manual_seed(0)
    student = tap_model(build_model("digits_student", 10), "digits_student")
    teacher = tap_model(build_model("digits_teacher", 10), "digits_teacher").eval()
    x, y, index = torch.randn(8, 1, 16, 16), torch.arange(8) % 10, torch.arange(8)
    s_out, t_out = student(x), teacher(x)
    sgd = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "milestones": [1], "gamma": 0.1}
    values = {}
    for method in METHODS:
        torch.manual_seed(1)
        term = build_method_term(method, CLASSICS["at"][0], student, teacher, (1, 16, 16), num_data=100,
                                 student_name="digits_student", num_classes=10, sgd=sgd, device="cpu")
        values[method] = term(x, y, index, s_out, t_out).item()
    assert len({round(v, 6) for v in values.values()}) == len(METHODS), values
    shapes = knowledge_shapes(student, (1, 16, 16)), knowledge_shapes(teacher, (1, 16, 16))
    assert values["kd"] == pytest.approx(DistillerLoss(CLASSICS["kd"][0], *shapes)(s_out, t_out, y).item())
    torch.manual_seed(1)
    assert values["searched"] == pytest.approx(DistillerLoss(CLASSICS["at"][0], *shapes)(s_out, t_out, y).item())


def test_an_unknown_method_is_refused(exported_at_script, capsys):
    from kd_optuna.errors import KdOptunaError

    with pytest.raises(SystemExit):
        _script_module(exported_at_script).main(["--method", "fitnet"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(KdOptunaError, match="unknown --method"):
        build_method_term("fitnet", CLASSICS["kd"][0], None, None, (1, 16, 16), num_data=1,
                          student_name="digits_student", num_classes=10, sgd={}, device="cpu")


@pytest.mark.slow
def test_resume_continues_the_same_method_and_refuses_another(exported_at_script, tmp_path, capsys):
    import torch

    script = _script_module(exported_at_script)
    common = ["--max-steps", "1", "--batch-size", "16", "--device", "cpu", "--output-dir", str(tmp_path), "--no-progress"]
    script.main(["--method", "dml", "--epochs", "1"] + common)
    peer_before = torch.load(tmp_path / "last.pt", weights_only=True)["distiller"]["peer"]
    script.main(["--method", "dml", "--epochs", "2", "--resume"] + common)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert any(not torch.equal(peer_before[k], state["distiller"]["peer"][k]) for k in peer_before)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--method", "crd", "--epochs", "3", "--resume"] + common)
    assert exit_info.value.code == 2 and "written by --method dml" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # weights of epoch 2 are not what --epochs 1 asks for
        script.main(["--method", "dml", "--epochs", "1", "--resume"] + common)
    assert exit_info.value.code == 2 and "is at epoch 2, past --epochs 1; give --epochs 2 or more" in capsys.readouterr().err


def test_running_the_script_again_into_the_same_folder_keeps_the_earlier_run(exported_at_script, tmp_path, capsys):
    """Without --resume, a folder holding a run is refused before anything loads, both files kept."""
    script = _script_module(exported_at_script)
    common = ["--epochs", "1", "--max-steps", "1", "--batch-size", "16", "--device", "cpu",
              "--output-dir", str(tmp_path), "--no-progress"]
    script.main(common)
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"last.pt", "best_student.pt", "last_student.pt"}
    with pytest.raises(SystemExit) as exit_info:
        script.main(common + ["--seed", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"--output-dir {tmp_path} holds an earlier run (last.pt, best_student.pt, last_student.pt)" in err
    assert "add --resume to continue it, or give another --output-dir" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_an_output_dir_that_is_a_file_is_refused_before_anything_loads(exported_at_script, tmp_path, capsys,
                                                                         monkeypatch):
    import kd_optuna.data

    def no_data(*args, **kwargs):
        raise AssertionError("the data were loaded before --output-dir was checked")

    monkeypatch.setattr(kd_optuna.data, "load_dataset", no_data)
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        _script_module(exported_at_script).main(["--device", "cpu", "--output-dir", str(tmp_path / "a_file")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"--output-dir {tmp_path / 'a_file'} is a file; give a folder" in err
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_milestones_below_one_are_refused_and_ones_past_the_epochs_are_said(exported_at_script, tmp_path, capsys,
                                                                           caplog):
    """--epochs 3 with the default 150,180,210 would train at a constant lr without a word."""
    script = _script_module(exported_at_script)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--milestones", "0,2", "--device", "cpu", "--output-dir", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "--milestones 0,2: give positive epochs below --epochs" in err and not (tmp_path / "refused").exists()
    script.main(["--epochs", "2", "--milestones", "1,5", "--max-steps", "1", "--batch-size", "16", "--device", "cpu",
                 "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert "--milestones 1,5: 5 is not before the last of --epochs 2, so the lr never decays there" in caplog.text


@pytest.mark.parametrize("flag, model, words", [
    ("--student", "resnet8", "--student resnet8 takes (3, 32, 32) inputs but digits images are (1, 16, 16); "
                             "give a digits model with --student"),
    ("--teacher", "mobilenet_v3_small", "--teacher mobilenet_v3_small takes 3-channel images but digits images"),
])
def test_a_model_that_cannot_take_the_dataset_s_images_is_one_line(exported_at_script, tmp_path, capsys, flag, model,
                                                                   words):
    """Before: a traceback of the first convolution's RuntimeError."""
    with pytest.raises(SystemExit) as exit_info:
        _script_module(exported_at_script).main([flag, model, "--device", "cpu", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "run").exists()


def test_an_image_folder_crop_a_vit_cannot_take_is_named_with_the_error(tmp_path):
    from kd_optuna.errors import KdOptunaError
    from kd_optuna.export.training import _check_models

    with pytest.raises(KdOptunaError, match=r"--student vit_tiny_cifar cannot take imagefolder images of \(3, 64, 64\) "
                                            r"\(AssertionError: .*\); give a model for 3-channel images with --student "
                                            r"or another --image-size"):
        _check_models("vit_tiny_cifar", "resnet8", 3, "imagefolder", (3, 64, 64))
    _check_models("resnet8", "vit_tiny_cifar", 3, "imagefolder", (3, 32, 32))


def test_another_student_with_the_exported_nodes_is_told_to_give_its_own():
    """The script of a mobilenet_v3_small study keeps its nodes as the --student-nodes default:
    ``--student resnet18`` alone lacks them, and the line names the flag (it named ``nodes=``)."""
    from kd_optuna.errors import KdOptunaError
    from kd_optuna.export.training import _check_models

    mobilenet = {"feat": "features", "emb": "flatten", "logit": "classifier.3"}
    with pytest.raises(KdOptunaError, match=r"^--student resnet18: tap node\(s\) features, classifier.3 not in .*; "
                                            r"give its nodes with --student-nodes '.*' \(or --student-nodes none"):
        _check_models("resnet18", None, 3, "imagefolder", (3, 32, 32), student_nodes=mobilenet)
    _check_models("resnet18", None, 3, "imagefolder", (3, 32, 32))


@pytest.mark.parametrize("seed", [str(2**64), str(-2**63 - 1)])
def test_a_seed_torch_cannot_take_is_refused_in_one_line(exported_at_script, seed, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _script_module(exported_at_script).main(["--seed=" + seed, "--device", "cpu", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert f"--seed {seed} is outside torch's 64-bit seed range; give a seed from 0 to 2**63 - 1" in err
    assert not (tmp_path / "o").exists()


def test_resume_refuses_a_last_checkpoint_it_cannot_use_in_one_line(exported_at_script, tmp_path, capsys):
    """An empty or truncated last.pt, one of another tool, or one of another student: exit 2, one
    line saying how to start over, never a traceback; nothing in the folder is changed."""
    import torch

    from kd_optuna.models import build_model

    script = _script_module(exported_at_script)
    student = build_model("digits_student", 10).state_dict()
    other = build_model("digits_teacher", 10).state_dict()
    spec = json.dumps(CLASSICS["at"][0].to_params(), sort_keys=True)
    state = {"spec": spec, "method": "searched", "student": other, "distiller": {}, "optimizer": {},
             "epoch": 1, "best_top1": 0.5, "best_epoch": 1, "history": []}
    cases = {
        b"": "cannot be read",
        b"PK\x03\x04 truncated": "cannot be read",
        "not ours": "is not a checkpoint of this training (it lacks spec, student, distiller",
        "other student": "holds weights that do not fit this run's student",
    }
    for content, words in cases.items():
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        if content == "not ours":
            torch.save(student, folder / "last.pt")
        elif content == "other student":
            torch.save(state, folder / "last.pt")
        else:
            (folder / "last.pt").write_bytes(content)
        before = (folder / "last.pt").read_bytes()
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--resume", "--epochs", "2", "--max-steps", "1", "--batch-size", "16", "--device", "cpu",
                         "--output-dir", str(folder), "--no-progress"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (content, err)
        assert err.count("\n") == 1 and words in err and "run without --resume to start over" in err, (content, err)
        assert [p.name for p in folder.iterdir()] == ["last.pt"] and (folder / "last.pt").read_bytes() == before


def test_a_resumed_run_draws_what_an_uninterrupted_one_draws(exported_at_script, tmp_path, capsys):
    """With a random transform (mask: a fresh mask each step from torch's generator), stopping
    after epoch 1 and resuming gives the weights of one run straight to epoch 2."""
    import torch

    from kd_optuna.space import DistillerSpec

    params = {**CLASSICS["fitnets"][0].to_params(), "transform1": "mask"}
    config = digits_config(checkpoint=str(exported_at_script.parent / "teacher.pt"))
    script = _script_module(write_script(tmp_path / "masked.py", "s", completed_trial(DistillerSpec.from_params(params)),
                                         config))
    common = ["--max-steps", "2", "--batch-size", "16", "--device", "cpu", "--no-progress"]
    script.main(common + ["--epochs", "2", "--output-dir", str(tmp_path / "straight")])
    script.main(common + ["--epochs", "1", "--output-dir", str(tmp_path / "resumed")])
    script.main(common + ["--epochs", "2", "--output-dir", str(tmp_path / "resumed"), "--resume"])
    straight, resumed = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("straight", "resumed"))
    assert straight["history"] == resumed["history"]
    for part in ("student", "distiller"):
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part]), part


class _RandomlyAugmented:
    """Items (x, y) where x is drawn from torch's generator, as a random crop or flip draws."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        import torch

        return torch.rand(3), i % 2


def test_an_epochs_augmentations_in_loader_workers_depend_on_the_seed_and_epoch_alone():
    """Epoch 1 of a loader that ran epoch 0 draws what a fresh loader (a resumed run) draws in epoch 1."""
    from types import SimpleNamespace

    import torch

    from kd_optuna.export.training import _indexed_loader

    def epoch(loader, number):
        loader.generator.manual_seed(3 + number)
        return [x for x, _, _ in loader]

    splits = SimpleNamespace(train=_RandomlyAugmented(), augmentation="crop_flip")
    straight = _indexed_loader(splits, 4, 2, seed=3)
    epoch(straight, 0)
    resumed = _indexed_loader(splits, 4, 2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(epoch(straight, 1), epoch(resumed, 1), strict=True))


@pytest.mark.parametrize("batch_size, batches", [(100, 11), (98, 11)])
def test_in_memory_batches_are_the_data_loaders_batches(batch_size, batches):
    """The tensor fast path yields exactly what DataLoader(shuffle, generator) over the split
    does; 1,079 digits in batches of 98 leave one image, which both drop."""
    import torch
    from torch.utils.data import DataLoader

    from kd_optuna.data import load_dataset
    from kd_optuna.export.training import IndexedDataset, _indexed_loader

    splits = load_dataset("digits")
    fast = _indexed_loader(splits, batch_size, 0, seed=5)
    slow = DataLoader(IndexedDataset(splits.train), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(5), drop_last=batch_size == 98)
    assert len(fast) == len(slow) == batches == len(list(fast))
    for epoch in range(2):
        fast.generator.manual_seed(5 + epoch)
        slow.generator.manual_seed(5 + epoch)
        for (fx, fy, fi), (sx, sy, si) in zip(fast, slow):
            assert torch.equal(fx, sx) and torch.equal(fy, sy) and torch.equal(fi, si)


@pytest.mark.slow
def test_the_exported_script_answers_bad_input_with_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """Each bad flag: exit 2, one error line naming the flag and the fix, no traceback, nothing
    written. The garbage checkpoint runs the script as a process (torch.load's own warnings reach
    its stderr there); the other cases call the script's main(argv) in this process, the same code
    path after the interpreter starts, without importing torch twelve more times."""
    import torch

    from kd_optuna.train.checkpoints import save_checkpoint
    from kd_optuna.models import build_model

    torch.manual_seed(0)
    teacher_path = save_checkpoint(tmp_path / "teacher.pt", build_model("digits_teacher", 10),
                                   model_name="digits_teacher", num_classes=10, dataset="digits", accuracy=0.1)
    script = write_script(tmp_path / "train_best.py", "s", completed_trial(CLASSICS["kd"][0]),
                          digits_config(checkpoint=str(teacher_path)))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    from PIL import Image

    for name in ("cat", "dog"):
        for part in ("train", "val"):
            (tmp_path / "two" / part / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8)).save(tmp_path / "two" / part / name / f"{i}.png")
    # the folder and a parent it lacks, as with the default kd_optuna_runs/best
    common = ["--device", "cpu", "--no-progress", "--max-steps", "1", "--output-dir", str(tmp_path / "runs" / "out")]

    def one_error_line(args, stderr):
        errors = [line for line in stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and "Traceback" not in stderr, (args, stderr)
        assert "weights_only=False" not in stderr and "study config" not in stderr
        return errors[0]

    args = ("--teacher-checkpoint", str(tmp_path / "garbage.pt"))
    run = subprocess.run([sys.executable, str(script), *common, *args],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, (args, run.stderr)
    assert "not a PyTorch checkpoint" in one_error_line(args, run.stderr)

    cases = {
        ("--teacher-checkpoint", str(tmp_path / "missing.pt")): "does not exist",
        # the script's own switch, not the study config's `download = true` under [data] (Issue 11)
        ("--dataset", "cifar100", "--data-root", str(tmp_path)):
            "CIFAR-100 at {}/cifar-100-python is missing: run it again with --download true, or place".format(tmp_path),
        ("--dataset", "cifar10", "--data-root", str(tmp_path / "absent")): "is missing: run it again with --download true",
        ("--dataset", "bogus"): "unknown dataset",
        ("--student", "bogus"): "unknown model",
        ("--teacher", "bogus"): "unknown model",
        ("--epochs", "0"): "--epochs: expected a positive integer",
        ("--batch-size", "0"): "--batch-size: expected a positive integer",
        ("--lr", "-1"): "--lr: expected a number > 0",
        ("--student-nodes", "[1]"): "--student-nodes: expected JSON",
        ("--image-size", "0"): "--image-size: expected a positive integer",
        ("--image-size", "64"): "--image-size crops imagefolder images; digits images have one size",
        ("--val-fraction", "1"): "--val-fraction: expected a number between 0 and 1 (exclusive), or none",
        ("--val-fraction", "x"): "--val-fraction: expected a number between 0 and 1 (exclusive), or none",
        ("--val-fraction", "0.2"): "--val-fraction holds out part of CIFAR's or an image folder's train split; digits",
        ("--dataset", "imagefolder", "--data-root", str(tmp_path / "two"), "--val-fraction", "0.9"):
            "--val-fraction 0.9 holds out every train image of {} class(es) cat, dog: give a smaller --val-fraction "
            "or add train images".format(tmp_path / "two" / "train"),
    }
    monkeypatch.chdir(tmp_path)
    main = _script_module(script).main
    capsys.readouterr()
    for args, words in cases.items():
        with pytest.raises(SystemExit) as stopped:
            main([*common, *args])
        assert stopped.value.code == 2, (args, capsys.readouterr().err)
        assert words in one_error_line(args, capsys.readouterr().err), args
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob(".kd_optuna_cache/*bogus*"))


def _digits_recipe(tmp_path, **changes):
    recipe = dict(epochs=1, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=[], gamma=0.1,
                  num_workers=0, seed=0, dataset="digits", data_root=None, download=False, teacher="digits_student",
                  teacher_checkpoint=None, student="digits_student", device="cpu", max_steps=2,
                  cache_dir=str(tmp_path / "cache"), progress=False, output_dir=str(tmp_path / "run"))
    return {**recipe, **changes}


def test_a_student_left_with_stale_batch_norm_statistics_is_said(tmp_path, capsys):
    """A training too short for the student's BatchNorm momentum (MobileNetV3's 0.01 needs 459
    steps) leaves eval mode normalising by the statistics' start: the top-1 printed is then at
    chance while the student classifies in train mode. The run says so, and says nothing when
    the statistics moved."""
    from kd_optuna.export.training import train_with_distiller

    short = dict(_digits_recipe(tmp_path, output_dir=str(tmp_path / "short")), epoch_lines=True)
    result = train_with_distiller(CLASSICS["kd"][0].to_params(), **short)
    assert result["stale_batch_norm"].startswith("after 2 steps the student's BatchNorm")
    out = capsys.readouterr().out
    assert ("note: after 2 steps the student's BatchNorm running statistics (momentum 0.1) still hold 81% "
            "of their initial values" in out and "train for at least 44 steps (--epochs)" in out), out
    longer = dict(short, output_dir=str(tmp_path / "longer"), max_steps=None, epochs=5, batch_size=64)
    result = train_with_distiller(CLASSICS["kd"][0].to_params(), **longer)
    out = capsys.readouterr().out
    assert len(result["history"]) == 5 and "epoch 5/5: loss " in out and "note:" not in out, out
    assert result["stale_batch_norm"] is None


def test_a_second_run_into_a_folder_being_trained_into_is_refused_and_changes_nothing(tmp_path):
    """Two runs into one folder overwrote each other's ``last.pt`` epoch by epoch (or crashed on
    the shared temporary file); the second is now refused before it loads anything."""
    from kd_optuna.errors import KdOptunaError
    from kd_optuna.export.training import train_with_distiller
    from kd_optuna.files import file_lock

    run = tmp_path / "run"
    with file_lock(run / ".lock"):
        with pytest.raises(KdOptunaError, match=r"another run is training into .*run; wait for it .* another --output-dir"):
            train_with_distiller(CLASSICS["kd"][0].to_params(), **_digits_recipe(tmp_path))
    assert not (tmp_path / "cache").exists()


def test_a_device_the_machine_lacks_is_the_only_line_said(tmp_path, caplog):
    """The late-milestones note came before the error that stopped the run."""
    import torch

    from kd_optuna.errors import KdOptunaError
    from kd_optuna.export.training import train_with_distiller

    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with caplog.at_level("WARNING"), pytest.raises(KdOptunaError, match="--device cuda:7 but"):
        train_with_distiller(CLASSICS["kd"][0].to_params(), **_digits_recipe(tmp_path, device="cuda:7", milestones=[5]))
    assert not caplog.records and not (tmp_path / "run").exists()


def test_a_run_that_fails_before_writing_leaves_no_folder_and_a_file_is_not_a_run_folder(tmp_path):
    from kd_optuna.errors import KdOptunaError
    from kd_optuna.export.training import train_with_distiller

    with pytest.raises(KdOptunaError, match="digits_studnet"):
        train_with_distiller(CLASSICS["kd"][0].to_params(), **_digits_recipe(tmp_path, student="digits_studnet"))
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").write_text("notes")
    with pytest.raises(KdOptunaError, match="--output-dir .*run is a file"):
        train_with_distiller(CLASSICS["kd"][0].to_params(), **_digits_recipe(tmp_path))
    assert (tmp_path / "run").read_text() == "notes"
