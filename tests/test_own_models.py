"""Issue 11, points 1 and 5, on the user's path: a torchvision classifier outside the zoo named
with its tap nodes, and the teacher checkpoint checked at create-study."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from PIL import Image

from conftest import TINY_PROXY, invoke_cli, refused_at_create_study
from kd_optuna.models import build_model, tap_model

MOBILENET_NODES = '{ feat = "features", emb = "flatten", logit = "classifier.3" }'


def image_folder(root, classes=("cat", "dog"), per_class=6, size=40, shade=0):
    """root/train/<class>/*.png and root/val/<class>/*.png, each class its own colour."""
    for part in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                colour = (40 + 150 * c, 90 + 10 * i + shade, 200 - 150 * c)
                Image.new("RGB", (size, size), colour).save(folder / f"{i}.png")
    return root


def own_model_toml(root, student_nodes=MOBILENET_NODES, checkpoint=None, student="mobilenet_v3_small"):
    small = TINY_PROXY | {"labels_per_class": 1, "val_size": 4, "sharpness_size": 4}
    proxy = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in small.items())
    teacher_checkpoint = f'checkpoint = "{checkpoint}"\n' if checkpoint else ""
    student_line = f"nodes = {student_nodes}\n" if student_nodes else ""
    return (
        f'[study]\nname = "own"\n\n[data]\ndataset = "imagefolder"\nroot = "{root}"\n\n'
        f'[teacher]\nmodel = "mobilenet_v3_small"\nnum_classes = 2\nnodes = {MOBILENET_NODES}\n{teacher_checkpoint}\n'
        f'[student]\nmodel = "{student}"\nnum_classes = 2\n{student_line}\n'
        f"[proxy]\n{proxy}\n\n"
        f"[search]\nshrink_after = 1000\n"
    )


def test_real_node_names_of_mobilenet_v3_small_tap_it():
    model = build_model("mobilenet_v3_small", 2).eval()
    x = torch.randn(2, 3, 64, 64)
    out = tap_model(model, "mobilenet_v3_small", nodes={"feat": "features", "emb": "flatten", "logit": "classifier.3"})(x)
    assert out["feat"].shape == (2, 576, 2, 2) and out["emb"].shape == (2, 576)
    assert torch.allclose(out["logit"], model(x), atol=1e-5)
    assert torch.allclose(out["emb"], out["feat"].mean((2, 3)), atol=1e-5)


@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "teacher.pth"
    torch.save(build_model("mobilenet_v3_small", 2).state_dict(), path)
    return path


@pytest.mark.slow
def test_torchvision_model_outside_the_zoo_runs_a_trial(tmp_path, teacher_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = image_folder(tmp_path / "images")
    config = tmp_path / "own.toml"
    config.write_text(own_model_toml(root, checkpoint=teacher_file))
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    code, out, err = invoke_cli(capsys, "create-study", str(config), "--storage", url)
    assert code == 0, err
    assert "mobilenet_v3_small -> mobilenet_v3_small" in out
    stored = json.loads(optuna.load_study(study_name="own", storage=url).user_attrs["kd_optuna_config"])
    assert stored["student"]["nodes"] == {"feat": "features", "emb": "flatten", "logit": "classifier.3"}
    code, out, err = invoke_cli(capsys, "optimize", "--storage", url, "--n-trials", "1", "--device", "cpu",
                                "--threads", "1", "--no-progress")
    assert code == 0, err
    trials = optuna.load_study(study_name="own", storage=url).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE], [t.user_attrs for t in trials]
    assert trials[0].user_attrs["val_acc"] >= 0


@pytest.mark.parametrize(
    "student, nodes, words",
    [
        ("mobilenet_v3_small", '{ feat = "features", emb = "flaten", logit = "classifier.3" }',
         ["student.nodes", "emb node 'flaten'", "flatten", "classifier.3", "features"]),
        ("mobilenet_v3_small", '{ feat = "features", emb = "flatten", logit = "classifier.0" }',
         ["student.nodes.logit", "classifier.0", "2 class logits"]),
        ("squeezenet1_0", None,  # a convolution gives class maps, pooled into logits: no embedding
         ["student.model = 'squeezenet1_0'", "outside the zoo", "could not be read off its forward",
          "nodes = {", "classifier"]),
    ],
)
def test_wrong_or_missing_nodes_are_one_line_at_create_study(tmp_path, capsys, monkeypatch, student, nodes, words):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "own.toml"
    config.write_text(own_model_toml(image_folder(tmp_path / "images", per_class=1), student_nodes=nodes,
                                     student=student))
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    code, _, err = invoke_cli(capsys, "create-study", str(config), "--storage", url)
    assert code == 2
    line = err.strip()
    assert "\n" not in line and line.startswith("kd-optuna: error:")
    for word in words:
        assert word in line, line
    assert optuna.get_all_study_names(url) == []


def test_a_cnn_classifier_without_nodes_gets_those_read_off_its_forward_kept_in_the_study(tmp_path, capsys,
                                                                                       monkeypatch, caplog):
    from kd_optuna.run.storage import load_study, open_storage, study_config

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "own.toml"
    config.write_text(own_model_toml(image_folder(tmp_path / "images", per_class=2), student_nodes=None))
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    code, _, err = invoke_cli(capsys, "create-study", str(config), "--storage", url)
    assert code == 0, err
    assert ("student.model = 'mobilenet_v3_small' taps nodes = { feat = \"features\", emb = \"classifier.1\", "
            "logit = \"classifier.3\" }, read off its forward") in caplog.text
    stored = study_config(load_study(open_storage(url), "own", url)).student
    assert stored.nodes == {"feat": "features", "emb": "classifier.1", "logit": "classifier.3"}


def test_a_model_built_for_one_image_size_has_its_nodes_read_on_the_study_s_images(tmp_path, capsys, monkeypatch,
                                                                                    caplog):
    """timm's botnet26t_256 takes 256 px images only: its nodes are read on [data] image_size."""
    pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "own.toml"
    toml = own_model_toml(image_folder(tmp_path / "images", per_class=2), student_nodes=None,
                          student="timm:botnet26t_256")
    config.write_text(toml.replace('dataset = "imagefolder"', 'dataset = "imagefolder"\nimage_size = 256'))
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    code, _, err = invoke_cli(capsys, "create-study", str(config), "--storage", url)
    assert code == 0, err
    assert ("student.model = 'timm:botnet26t_256' taps nodes = { feat = \"final_conv\", emb = \"head.global_pool.pool\", "
            "logit = \"head.flatten\" }, read off its forward") in caplog.text


def test_unknown_model_name_says_what_is_accepted(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "own.toml"
    config.write_text(own_model_toml(image_folder(tmp_path / "images", per_class=1), student="mobilenet_v9"))
    code, _, err = invoke_cli(capsys, "create-study", str(config), "--storage", f"sqlite:///{tmp_path / 'kd.db'}")
    assert code == 2 and "mobilenet_v9" in err and "torchvision classifier" in err and "resnet56" in err


@pytest.mark.parametrize("typo, meant", [("mobilenetv3_small", "mobilenet_v3_small"), ("WRN_40_2", "wrn_40_2"),
                                         ("efficientnetb0", "efficientnet_b0")])
def test_a_misspelt_model_name_names_the_close_ones(typo, meant):
    from kd_optuna.models import UnknownModel, model_entry

    with pytest.raises(UnknownModel, match=rf"unknown model '{typo}' \(did you mean [^)]*\b{meant}\b"):
        model_entry(typo)


def test_timm_model_with_nodes_is_accepted():
    pytest.importorskip("timm")
    from kd_optuna.run.config import StudyConfig

    data = {
        "data": {"dataset": "cifar100"}, "teacher": {"model": "resnet56"},
        "student": {"model": "timm:resnet18", "nodes": {"feat": "layer4", "emb": "global_pool.flatten", "logit": "fc"}},
    }
    assert StudyConfig.from_dict(data).student.model == "timm:resnet18"


def _digits_toml(tmp_path, checkpoint) -> str:
    from conftest import tiny_digits_toml

    text = tiny_digits_toml().replace('model = "digits_teacher"\n', f'model = "digits_teacher"\ncheckpoint = "{checkpoint}"\n')
    path = tmp_path / "d.toml"
    path.write_text(text)
    return str(path)


class NotWeights:
    pass


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p.write_bytes(b"this is no checkpoint"), ["not a PyTorch checkpoint", "torch.save(model.state_dict()"]),
        (lambda p: torch.save({"model": build_model("digits_teacher", 10).state_dict(), "x": NotWeights()}, p),
         ["Python objects besides tensors", "NotWeights", "never loads"]),
        (lambda p: p.write_bytes(b""), ["empty or truncated"]),
        (lambda p: torch.save(build_model("digits_student", 10).state_dict(), p),
         ["digits_student with 10 classes", "digits_teacher with 10 classes was asked for"]),
        (lambda p: None, ["is not a file"]),
    ],
)
def test_create_study_refuses_a_bad_teacher_checkpoint(tmp_path, capsys, monkeypatch, make, words):
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "teacher.pth"
    make(checkpoint)
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    code, _, err = invoke_cli(capsys, "create-study", _digits_toml(tmp_path, checkpoint), "--storage", url)
    assert code == 2
    line = err.strip()
    assert "\n" not in line and "teacher.checkpoint" in line
    assert "weights_only" not in line and "False" not in line
    for word in words:
        assert word in line, line
    assert optuna.get_all_study_names(url) == []


def test_create_study_accepts_a_good_teacher_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "teacher.pth"
    torch.save({"model": build_model("digits_teacher", 10).state_dict(), "epoch": 240}, checkpoint)
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    code, _, err = invoke_cli(capsys, "create-study", _digits_toml(tmp_path, checkpoint), "--storage", url)
    assert code == 0, err


def _mixed_image_folder(root):
    """:func:`image_folder` with one grayscale, one RGBA and one non-square image per split."""
    image_folder(root, per_class=4, size=40)
    for part in ("train", "val"):
        Image.new("L", (40, 40), 120).save(root / part / "cat" / "0.png")
        Image.new("RGBA", (40, 40), (200, 40, 40, 128)).save(root / part / "dog" / "0.png")
        Image.new("RGB", (56, 36), (40, 90, 200)).save(root / part / "cat" / "1.png")
    return root


@pytest.mark.slow
def test_an_image_folder_at_image_size_32_runs_with_cifar_models_from_search_to_exported_script(tmp_path, capsys,
                                                                                               monkeypatch):
    """With its own crop and val share: the search, its cached teacher and the exported script
    (which finds that same teacher) all take them from the config."""
    import subprocess
    import sys

    from kd_optuna.proxy.task import Task
    from kd_optuna.run.config import load_config

    monkeypatch.chdir(tmp_path)
    root = _mixed_image_folder(tmp_path / "images")
    small = TINY_PROXY | {"labels_per_class": 1, "val_size": 4, "sharpness_size": 4, "batch_size": 8}
    proxy = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in small.items())
    config = tmp_path / "small.toml"
    config.write_text(
        f'[study]\nname = "small"\n\n[data]\ndataset = "imagefolder"\nroot = "{root}"\nimage_size = 32\n'
        'val_fraction = 0.25\n\n'
        '[teacher]\nmodel = "resnet8"\nnum_classes = 2\n\n[student]\nmodel = "resnet8"\nnum_classes = 2\n\n'
        f"[proxy]\n{proxy}\n\n[train]\nepochs = 1\nbatch_size = 8\nnum_workers = 0\n"
    )
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    assert invoke_cli(capsys, "create-study", str(config), "--storage", url)[0] == 0
    code, _, err = invoke_cli(capsys, "optimize", "--storage", url, "--n-trials", "1", "--device", "cpu",
                              "--threads", "1", "--no-progress")
    assert code == 0, err
    trials = optuna.load_study(study_name="small", storage=url).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE], [t.user_attrs for t in trials]
    teachers = list((tmp_path / ".kd_optuna_cache").glob("teacher-imagefolder-resnet8-*.pt"))
    assert len(teachers) == 1
    task = Task.from_config(load_config(str(config)), device="cpu", cache_dir=tmp_path / ".kd_optuna_cache")
    assert tuple(task.data.train_x.shape[1:]) == (3, 32, 32) and tuple(task.data.val_x.shape[1:]) == (3, 32, 32)
    assert list((tmp_path / ".kd_optuna_cache").glob("teacher-imagefolder-resnet8-*.pt")) == teachers

    assert invoke_cli(capsys, "export", "--storage", url, "--trial", "best", "-o", "train_small.py")[0] == 0
    assert "IMAGE_SIZE = 32" in (tmp_path / "train_small.py").read_text()
    assert "VAL_FRACTION = 0.25" in (tmp_path / "train_small.py").read_text()
    env = {**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])}
    run = subprocess.run([sys.executable, "train_small.py", "--device", "cpu", "--no-progress", "--max-steps", "1",
                          "--output-dir", "out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "final top-1" in run.stdout
    assert list((tmp_path / ".kd_optuna_cache").glob("teacher-imagefolder-resnet8-*.pt")) == teachers

    broken = root / "train" / "dog" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    run = subprocess.run([sys.executable, "train_small.py", "--device", "cpu", "--no-progress", "--max-steps", "1",
                          "--num-workers", "2", "--output-dir", "out2"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert errors == [f"train_small.py: error: image file {broken} is not an image PIL can read; replace or remove it"]


def test_image_size_is_part_of_a_cached_teacher_s_key(tmp_path):
    from kd_optuna.train.teachers import teacher_identity, teacher_key

    root = image_folder(tmp_path / "images", per_class=1)
    default = teacher_identity("imagefolder", "resnet8", root)
    assert teacher_identity("imagefolder", "resnet8", root, image_size=None) == default
    assert "image_size" not in default
    keys = {teacher_key(teacher_identity("imagefolder", "resnet8", root, image_size=s)) for s in (None, 32, 64)}
    assert len(keys) == 3


@pytest.mark.parametrize(
    "data, words",
    [
        ('dataset = "cifar100"\nimage_size = 64', ["data.image_size", "cifar100 images are (3, 32, 32)", "remove the key"]),
        ('dataset = "imagefolder"\nroot = "ROOT"\nimage_size = 16', ["image_size must be at least 32 pixels, got 16"]),
        ('dataset = "imagefolder"\nroot = "ROOT"\nimage_size = "64"', ["data.image_size must be an integer"]),
    ],
)
def test_a_bad_image_size_is_one_line_at_create_study(tmp_path, capsys, monkeypatch, data, words):
    monkeypatch.chdir(tmp_path)
    root = image_folder(tmp_path / "images", per_class=1)
    config = tmp_path / "bad.toml"
    config.write_text(f'[data]\n{data.replace("ROOT", str(root))}\n\n[teacher]\nmodel = "resnet8"\n'
                      '\n[student]\nmodel = "resnet8"\n')
    line = refused_at_create_study(capsys, config, f"sqlite:///{tmp_path / 'kd.db'}")
    for word in words:
        assert word in line, line


@pytest.mark.parametrize(
    "data, student, words",
    [
        ('dataset = "digits_hard"', "resnet8", ["student.model = 'resnet8' takes (3, 32, 32) inputs",
                                               "digits_hard images are (1, 16, 16)", "pick a digits_hard model"]),
        ('dataset = "digits_hard"', "mobilenet_v3_small", ["(torchvision) takes 3-channel images"]),
        ('dataset = "imagefolder"\nroot = "ROOT"\nimage_size = 32', "digits_student",
         ["takes 1-channel images but imagefolder images are (3, 32, 32)", "pick a model for 3-channel images"]),
        ('dataset = "imagefolder"\nroot = "ROOT"\nimage_size = 64', "vit_tiny_cifar",
         ["cannot take imagefolder images of (3, 64, 64)", "AssertionError", "or another [data] image_size"]),
    ],
)
def test_a_student_that_cannot_take_the_images_is_one_line_at_create_study(tmp_path, capsys, monkeypatch, data,
                                                                          student, words):
    """Before: a zoo model on an image folder was not checked, and the workers failed to start
    with the forward's RuntimeError or a ViT's AssertionError."""
    monkeypatch.chdir(tmp_path)
    root = image_folder(tmp_path / "images", per_class=1)
    teacher = "digits_teacher" if "digits" in data else "resnet8"
    classes = "" if "digits" in data else "num_classes = 2\n"
    config = tmp_path / "bad.toml"
    config.write_text(f'[data]\n{data.replace("ROOT", str(root))}\n\n[teacher]\nmodel = "{teacher}"\n{classes}'
                      f'\n[student]\nmodel = "{student}"\n{classes}')
    line = refused_at_create_study(capsys, config, f"sqlite:///{tmp_path / 'kd.db'}")
    for word in words:
        assert word in line, line


@pytest.mark.parametrize("student, size", [("resnet8", 64), ("vgg8", 48), ("vit_tiny_cifar", 32)])
def test_zoo_students_that_take_an_image_folder_s_size_are_accepted(tmp_path, capsys, monkeypatch, student, size):
    monkeypatch.chdir(tmp_path)
    root = image_folder(tmp_path / "images", per_class=2)
    config = tmp_path / "ok.toml"
    config.write_text(f'[data]\ndataset = "imagefolder"\nroot = "{root}"\nimage_size = {size}\n\n'
                      f'[teacher]\nmodel = "resnet8"\nnum_classes = 2\n\n[student]\nmodel = "{student}"\nnum_classes = 2\n')
    code, _, err = invoke_cli(capsys, "create-study", str(config), "--storage", f"sqlite:///{tmp_path / 'kd.db'}")
    assert code == 0, err


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda root: (root / "val" / "dog").rename(root / "val" / "fish"), ["train has dog", "val has fish"]),
        (lambda root: (root / "val" / "dog").rename(root / "elsewhere"), ["train has dog"]),
        (lambda root: [image.unlink() for image in (root / "val" / "dog").iterdir()], ["dog (0) hold no images"]),
    ],
)
def test_an_image_folder_the_loader_would_refuse_is_refused_at_create_study(tmp_path, capsys, monkeypatch, change,
                                                                            words):
    monkeypatch.chdir(tmp_path)
    root = image_folder(tmp_path / "images", per_class=2)
    change(root)
    config = tmp_path / "own.toml"
    config.write_text(own_model_toml(root))
    line = refused_at_create_study(capsys, config, f"sqlite:///{tmp_path / 'kd.db'}")
    for word in words:
        assert word in line, line


def test_a_hidden_folder_in_an_image_folder_is_no_class_at_create_study(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = image_folder(tmp_path / "images", per_class=2)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    config = tmp_path / "own.toml"
    config.write_text(own_model_toml(root))
    code, _, err = invoke_cli(capsys, "create-study", str(config), "--storage", f"sqlite:///{tmp_path / 'kd.db'}")
    assert code == 0, err


def test_a_torchvision_regnet_is_checked_and_its_checkpoint_loads(tmp_path):
    """RegNet factories compute their widths with tensors, which the meta device cannot run:
    they are checked on the CPU instead of being refused as unbuildable."""
    from kd_optuna.run.config import StudyConfig
    from kd_optuna.train.checkpoints import load_state

    nodes = {"feat": "trunk_output", "emb": "flatten", "logit": "fc"}
    data = {"data": {"dataset": "cifar10"}, "teacher": {"model": "resnet20"},
            "student": {"model": "regnet_x_400mf", "nodes": nodes}}
    assert StudyConfig.from_dict(data).student.model == "regnet_x_400mf"
    path = tmp_path / "regnet.pth"
    torch.save(build_model("regnet_x_400mf", 10).state_dict(), path)
    assert set(load_state(path, "regnet_x_400mf", 10)) == set(build_model("regnet_x_400mf", 10).state_dict())


def test_a_relative_checkpoint_path_not_found_says_where_it_was_looked_for(tmp_path, capsys, monkeypatch):
    """A checkpoint beside the config, named relative to it, is looked for in the working
    directory: the message says so, with the directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    torch.save(build_model("digits_teacher", 10).state_dict(), tmp_path / "conf" / "teacher.pth")
    config = tmp_path / "conf" / "d.toml"
    config.write_text(open(_digits_toml(tmp_path, "teacher.pth")).read())
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    code, _, err = invoke_cli(capsys, "create-study", str(config), "--storage", url)
    assert code == 2 and f"'teacher.pth' (read from the working directory {tmp_path};" in err, err
    assert optuna.get_all_study_names(url) == []
    config.write_text(open(_digits_toml(tmp_path, "conf/teacher.pth")).read())
    assert invoke_cli(capsys, "create-study", str(config), "--storage", url)[0] == 0


@pytest.mark.slow
def test_a_teacher_checkpoint_under_the_home_folder_runs_a_trial(tmp_path, capsys, monkeypatch):
    """create-study expanded `~` in teacher.checkpoint, the workers did not: 'does not exist'."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(build_model("digits_teacher", 10).state_dict(), tmp_path / "teacher.pth")
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    assert invoke_cli(capsys, "create-study", _digits_toml(tmp_path, "~/teacher.pth"), "--storage", url)[0] == 0
    code, _, err = invoke_cli(capsys, "optimize", "--storage", url, "--n-trials", "1", "--device", "cpu",
                              "--threads", "1", "--no-progress")
    assert code == 0, err
    assert optuna.load_study(study_name="digits_tiny", storage=url).best_trial.state.name == "COMPLETE"


def test_a_teacher_that_train_teacher_put_in_the_cache_is_reused_for_a_prefixed_model_name(tmp_path, capsys,
                                                                                           monkeypatch):
    """`kd-optuna train-teacher` without -o wrote teacher-imagefolder-torchvision:NAME.pt, the
    search looked for teacher-imagefolder-torchvision_NAME.pt and trained the teacher again."""
    from pathlib import Path

    from kd_optuna.proxy.task import cached_teacher_checkpoint
    from kd_optuna.run.config import load_config
    from kd_optuna.train import teachers

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(teachers.RECIPES, "imagefolder", {**teachers.RECIPES["imagefolder"], "epochs": 1})
    config = tmp_path / "own.toml"
    text = own_model_toml(image_folder(tmp_path / "images", per_class=2))
    config.write_text(text.replace('model = "mobilenet_v3_small"\nnum_classes = 2\nnodes',
                                   'model = "torchvision:mobilenet_v3_small"\nnum_classes = 2\nnodes', 1)
                      .replace('root = ', 'image_size = 32\nroot = ', 1))
    code, out, err = invoke_cli(capsys, "train-teacher", str(config), "--device", "cpu")
    assert code == 0, err

    def train_again(*args, **kwargs):
        raise AssertionError(f"trained the teacher again into {args[2]}")

    monkeypatch.setattr(teachers, "train_teacher", train_again)
    data = load_config(str(config)).data
    found = cached_teacher_checkpoint("imagefolder", "torchvision:mobilenet_v3_small", Path(".kd_optuna_cache"),
                                      data.root, image_size=data.image_size)
    assert str(found) in out
