"""``[data] val_fraction``: the share of CIFAR's or an image folder's train images held out as val,
from the study config through the proxy, the teacher cache and the exported script."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_PROXY, refused_at_create_study
from kd_optuna.data import VAL_FRACTION, DataError, load_dataset
from test_data import tiny_cifar100  # noqa: F401  (a fixture)
from test_own_models import image_folder


def _counts(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels, minlength=2).tolist()


def test_val_fraction_sets_the_share_of_each_class_held_out(tmp_path):
    root = image_folder(tmp_path / "images", per_class=8, size=36)
    default = load_dataset("imagefolder", root=root, image_size=32)
    half = load_dataset("imagefolder", root=root, image_size=32, val_fraction=0.5)
    assert _counts(default._labels["val"]) == [1, 1] and _counts(default._labels["train"]) == [7, 7]  # round(0.8) = 1
    assert _counts(half._labels["val"]) == [4, 4] and _counts(half._labels["train"]) == [4, 4]
    assert len(half.val) == 8 and len(half.train) == 8 and len(half.test) == 16
    same = load_dataset("imagefolder", root=root, image_size=32, val_fraction=VAL_FRACTION)
    assert torch.equal(same._labels["val"], default._labels["val"])


def test_a_val_fraction_that_takes_a_class_s_last_train_image_names_the_class(tmp_path):
    root = image_folder(tmp_path / "images", per_class=2, size=36)
    load_dataset("imagefolder", root=root, image_size=32, val_fraction=0.6)  # round(1.2) = 1 of 2 held out
    with pytest.raises(DataError, match=r"val_fraction 0.8 holds out every train image of .*train class\(es\) "
                                        r"cat, dog: give a smaller val_fraction or add train images"):
        load_dataset("imagefolder", root=root, image_size=32, val_fraction=0.8)
    with pytest.raises(DataError, match="between 0 and 1"):
        load_dataset("imagefolder", root=root, image_size=32, val_fraction=1.0)


def test_cifar_holds_out_its_val_fraction_too(tiny_cifar100):
    half = load_dataset("cifar100", root=tiny_cifar100, val_fraction=0.5)  # 4 train images a class
    assert half.labels("val").bincount().tolist() == [2] * 5 and len(half.train) == 10
    with pytest.raises(DataError, match=r"of cifar100 class\(es\) apple, bear, cloud, dolphin, elephant: give a smaller"):
        load_dataset("cifar100", root=tiny_cifar100, val_fraction=0.9)


def _config(tmp_path, data: str, model: str = "resnet8", classes: str = "num_classes = 2\n"):
    config = tmp_path / "study.toml"
    config.write_text(f'[data]\n{data}\n\n[teacher]\nmodel = "{model}"\n{classes}\n[student]\nmodel = "{model}"\n{classes}')
    return config


@pytest.mark.parametrize(
    "data, words",
    [
        ('dataset = "digits"\nval_fraction = 0.2', ["data.val_fraction", "digits has a fixed val split", "remove the key"]),
        ('dataset = "imagefolder"\nroot = "ROOT"\nval_fraction = 0', ["val_fraction must be between 0 and 1", "got 0"]),
        ('dataset = "imagefolder"\nroot = "ROOT"\nval_fraction = 1.5', ["val_fraction must be between 0 and 1"]),
        ('dataset = "imagefolder"\nroot = "ROOT"\nval_fraction = "0.2"', ["data.val_fraction must be a number"]),
        ('dataset = "imagefolder"\nroot = "ROOT"\nval_fraction = 0.8',
         ["holds out every train image of", "cat, dog", "give a smaller val_fraction"]),
    ],
)
def test_a_bad_val_fraction_is_one_line_at_create_study(tmp_path, capsys, monkeypatch, data, words):
    monkeypatch.chdir(tmp_path)
    root = image_folder(tmp_path / "images", per_class=2, size=36)
    digits = "digits" in data
    config = _config(tmp_path, data.replace("ROOT", str(root)), *(("digits_student", "") if digits else ()))
    line = refused_at_create_study(capsys, config, f"sqlite:///{tmp_path / 'kd.db'}")
    for word in words:
        assert word in line, line


def test_val_fraction_is_part_of_a_cached_teacher_s_key_unless_it_is_the_default(tmp_path):
    from kd_optuna.train.teachers import teacher_identity, teacher_key

    root = image_folder(tmp_path / "images", per_class=1)
    default = teacher_identity("imagefolder", "resnet8", root)
    assert "val_fraction" not in default
    assert teacher_identity("imagefolder", "resnet8", root, val_fraction=VAL_FRACTION) == default
    keys = {teacher_key(teacher_identity("imagefolder", "resnet8", root, val_fraction=f)) for f in (None, 0.2, 0.3)}
    assert len(keys) == 3
    assert teacher_identity("digits", "digits_teacher", val_fraction=0.2) == teacher_identity("digits", "digits_teacher")


def test_the_proxy_validates_on_the_share_the_config_holds_out(tmp_path, monkeypatch):
    from kd_optuna.models import build_model
    from kd_optuna.proxy.task import Task
    from kd_optuna.run.config import load_config
    from kd_optuna.train.checkpoints import save_checkpoint

    monkeypatch.chdir(tmp_path)
    root = image_folder(tmp_path / "images", per_class=8, size=36)
    teacher = save_checkpoint(tmp_path / "teacher.pt", build_model("resnet8", 2), model_name="resnet8", num_classes=2,
                              dataset="imagefolder", accuracy=0.5)
    proxy = TINY_PROXY | {"labels_per_class": 1, "val_size": 0, "sharpness_size": 4, "batch_size": 4}
    config = _config(tmp_path, f'dataset = "imagefolder"\nroot = "{root}"\nimage_size = 32\nval_fraction = 0.5')
    config.write_text(config.read_text().replace('num_classes = 2\n\n[student]', f'num_classes = 2\ncheckpoint = "{teacher}"'
                                                 '\n\n[student]', 1)
                      + "\n[proxy]\n" + "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in proxy.items()) + "\n")
    loaded = load_config(str(config))
    assert loaded.data.val_fraction == 0.5
    task = Task.from_config(loaded, device="cpu", cache_dir=tmp_path / "cache")
    assert _counts(task.data.val_y.cpu()) == [4, 4]


def test_the_exported_script_carries_val_fraction_as_a_flag(tmp_path, monkeypatch):
    import kd_optuna.export
    from kd_optuna.distill.classics import CLASSICS
    from kd_optuna.export.script import script_defaults, write_script
    from kd_optuna.run.config import load_config
    from test_export import _script_module, completed_trial

    root = image_folder(tmp_path / "images", per_class=2, size=36)
    config = load_config(str(_config(tmp_path, f'dataset = "imagefolder"\nroot = "{root}"\nval_fraction = 0.25')))
    assert script_defaults(config)["val_fraction"] == 0.25
    assert script_defaults(load_config("digits"))["val_fraction"] is None
    script = write_script(tmp_path / "train_best.py", "s", completed_trial(CLASSICS["kd"][0]), config)
    assert "VAL_FRACTION = 0.25" in script.read_text()

    class Called(Exception):
        pass

    def record(spec_params, **settings):
        raise Called(settings)

    monkeypatch.setattr(kd_optuna.export, "train_with_distiller", record)
    main = _script_module(script).main
    for argv, expected in (([], 0.25), (["--val-fraction", "0.4"], 0.4), (["--val-fraction", "none"], None)):
        with pytest.raises(Called) as called:
            main(["--device", "cpu", *argv])
        assert called.value.args[0]["val_fraction"] == expected, argv
