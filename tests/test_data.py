"""Datasets: digits splits, CIFAR-100 in its real pickled format, an ImageFolder tree, subsets."""

import hashlib
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from kd_optuna.data import DataError, class_balanced_subset, load_dataset, random_crop_flip
from kd_optuna.errors import KdOptunaError


def test_digits_splits_are_disjoint_balanced_and_seeded():
    a, b, other = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert a.num_classes == 10 and a.input_shape == (1, 16, 16)
    sizes = {s: len(a.labels(s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797 and 355 <= sizes["val"] <= 365 and 355 <= sizes["test"] <= 365
    x_train, _ = a.tensors("train")
    x_val, _ = a.tensors("val")
    x_test, _ = a.tensors("test")
    rows = {tuple(r.tolist()) for r in x_train.flatten(1)}
    assert not rows & {tuple(r.tolist()) for r in x_test.flatten(1)}
    assert not rows & {tuple(r.tolist()) for r in x_val.flatten(1)}
    assert torch.equal(a.tensors("val")[0], b.tensors("val")[0])
    assert not torch.equal(a.tensors("val")[1], other.tensors("val")[1])
    counts = a.labels("val").bincount()
    assert counts.max() - counts.min() <= 1
    assert x_train.shape[1:] == (1, 16, 16) and abs(x_train.mean()) < 0.1


def test_class_balanced_subset_per_class_and_fraction():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = class_balanced_subset(labels, per_class=5, seed=3)
    assert labels[idx].bincount().tolist() == [5, 5, 5]
    assert torch.equal(idx, class_balanced_subset(labels, per_class=5, seed=3))
    assert not torch.equal(idx, class_balanced_subset(labels, per_class=5, seed=4))
    assert labels[class_balanced_subset(labels, fraction=0.1)].bincount().tolist() == [5, 3, 2]
    with pytest.raises(DataError, match="per_class"):
        class_balanced_subset(labels, per_class=21)
    with pytest.raises(DataError):
        class_balanced_subset(labels, per_class=2, fraction=0.5)


def test_batch_augmentation_is_a_padded_crop_with_random_flip():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = random_crop_flip(1, [-7.0])(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x[0, 0], (1, 1, 1, 1), value=-7.0)
    crops = [padded[dy : dy + 4, dx : dx + 4] for dy in range(3) for dx in range(3)]
    seen_flip = set()
    for o in out[:, 0]:
        matches = [flip for c in crops for flip in (False, True) if torch.equal(o, c.flip(1) if flip else c)]
        assert matches, "every output is one padded crop, flipped or not"
        seen_flip.update(matches)
    assert seen_flip == {False, True}
    assert len({tuple(o.flatten().tolist()) for o in out}) > 9


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_cifar100(tmp_path, monkeypatch):
    """CIFAR-100 files in torchvision's format: 20 train and 10 test images over 5 classes;
    the md5 table torchvision checks is pointed at these files."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(n):
        labels = [i % 5 for i in range(n)]
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": labels,
                "coarse_labels": [0] * n, "filenames": [f"{i}.png" for i in range(n)], "batch_label": "tiny"}

    train_md5 = _write_pickle(folder / "train", batch(20))
    test_md5 = _write_pickle(folder / "test", batch(10))
    names = ["apple", "bear", "cloud", "dolphin", "elephant"]
    meta_md5 = _write_pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["all"]})
    cls = torchvision.datasets.CIFAR100
    monkeypatch.setattr(cls, "train_list", [["train", train_md5]])
    monkeypatch.setattr(cls, "test_list", [["test", test_md5]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": meta_md5})
    return tmp_path


def test_cifar100_loads_from_a_local_root(tiny_cifar100):
    splits = load_dataset("cifar100", root=tiny_cifar100, seed=0, val_fraction=0.25)
    assert splits.num_classes == 5 and splits.input_shape == (3, 32, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 10)
    assert splits.labels("val").bincount().tolist() == [1, 1, 1, 1, 1]
    image, label = splits.train[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 5
    x, y = splits.tensors("val")
    via_transform = torch.stack([splits.val[i][0] for i in range(len(splits.val))])
    torch.testing.assert_close(x, via_transform)
    assert torch.equal(y, splits.labels("val"))
    xb, yb = next(iter(splits.loader("train", batch_size=8)))
    assert xb.shape == (8, 3, 32, 32) and yb.shape == (8,)
    aug = splits.augment_batch(x, torch.Generator().manual_seed(0))
    assert aug.shape == x.shape


def test_cifar100_corrupt_file_is_a_one_line_error(tiny_cifar100):
    path = tiny_cifar100 / "cifar-100-python" / "train"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        load_dataset("cifar100", root=tiny_cifar100)
    message = str(info.value)
    assert "corrupt" in message and str(tiny_cifar100) in message and "download=True" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda folder: (folder / "test").unlink(), ["lacks its file test"]),
        (lambda folder: (folder / "meta").write_bytes((folder / "meta").read_bytes()[:-7]),
         ["has a meta that is truncated, corrupt or not the official release"]),
        (lambda folder: (folder / "train").write_bytes((folder / "train").read_bytes()[:100]),
         ["has a train that is truncated"]),
    ],
)
def test_a_damaged_cifar_copy_is_refused_at_create_study_naming_the_file(tiny_cifar100, capsys, monkeypatch, damage,
                                                                        words):
    import optuna
    from conftest import invoke_cli

    monkeypatch.chdir(tiny_cifar100)
    damage(tiny_cifar100 / "cifar-100-python")
    config = tiny_cifar100 / "c.toml"
    config.write_text(f'[data]\ndataset = "cifar100"\nroot = "{tiny_cifar100}"\n[teacher]\nmodel = "resnet8"\n'
                      '[student]\nmodel = "resnet8"\n')
    url = f"sqlite:///{tiny_cifar100 / 'kd.db'}"
    code, _, err = invoke_cli(capsys, "create-study", str(config), "--storage", url)
    line = err.strip()
    assert code == 2 and "\n" not in line and f"CIFAR-100 at {tiny_cifar100}/cifar-100-python" in line, err
    for word in words + ["`download = true` under [data]", "place the genuine files"]:
        assert word in line, line
    assert optuna.get_all_study_names(url) == []
    with pytest.raises(DataError, match=words[0]):
        load_dataset("cifar100", root=tiny_cifar100)


def test_a_cifar_root_that_is_the_batches_folder_itself_names_its_parent(tiny_cifar100):
    from kd_optuna.data import check_cifar

    inner = tiny_cifar100 / "cifar-100-python"
    for check in (lambda: check_cifar("cifar100", inner), lambda: load_dataset("cifar100", root=inner)):
        with pytest.raises(DataError, match=f"root {inner} is the cifar-100-python folder itself; give the folder "
                                            f"that holds it, {tiny_cifar100}$"):
            check()


def test_missing_cifar_root_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(KdOptunaError) as info:
        load_dataset("cifar10", root=tmp_path / "absent")
    assert "absent" in str(info.value) and "download=True" in str(info.value)


@pytest.fixture
def tiny_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for part, count in (("train", 10), ("val", 2)):
        for cls in ("cat", "dog"):
            folder = tmp_path / part / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path


def test_imagefolder_loads_train_val_test(tiny_imagefolder):
    splits = load_dataset("imagefolder", root=tiny_imagefolder, val_fraction=0.2, image_size=32)
    assert splits.classes == ["cat", "dog"] and splits.num_classes == 2
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 4)
    assert splits.train[0][0].shape == (3, 32, 32)
    x, y = splits.tensors("test")
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]
    # written batch by batch into one tensor (issue 11.3), the same images as the items one by one
    assert torch.equal(x, torch.stack([splits.test[i][0] for i in range(4)]))
    some, labels = splits.tensors("train", [5, 0, 12], batch_size=2)
    assert torch.equal(some, torch.stack([splits._plain["train"][i][0] for i in (5, 0, 12)])) and labels.shape == (3,)
    assert splits.tensors("train", [])[0].shape == (0, 3, 32, 32)


def test_an_imagefolder_class_with_one_training_image_is_named_instead_of_losing_it_to_validation(tiny_imagefolder):
    for image in sorted((tiny_imagefolder / "train" / "dog").iterdir())[1:]:
        image.unlink()
    with pytest.raises(DataError, match=r"class folder\(s\) dog \(1\) hold fewer than 2 images.*add images or remove"):
        load_dataset("imagefolder", root=tiny_imagefolder, image_size=32)


def test_an_imagefolder_leaves_out_hidden_entries_and_reads_nested_and_uppercase_images(tiny_imagefolder):
    """.ipynb_checkpoints is no class, macOS's ._name.png companions and .DS_Store are no images;
    a nested folder's and an upper-case extension's images are."""
    train = tiny_imagefolder / "train"
    (train / ".ipynb_checkpoints").mkdir()
    (train / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (train / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (train / "cat" / ".hidden").mkdir()
    Image.new("RGB", (40, 40)).save(train / "cat" / ".hidden" / "x.png")
    (train / "dog" / "more").mkdir()
    Image.new("L", (40, 40), 90).save(train / "dog" / "more" / "nested.png")
    Image.new("P", (40, 40)).save(train / "dog" / "PALETTE.PNG")
    Image.new("RGBA", (40, 40)).convert("RGB").save(train / "dog" / "photo.JPG")
    splits = load_dataset("imagefolder", root=tiny_imagefolder, val_fraction=0.2, image_size=32)
    assert splits.classes == ["cat", "dog"]
    assert len(splits.train) + len(splits.val) == 10 + 13
    x, _ = splits.tensors("train")
    assert x.shape == (len(splits.train), 3, 32, 32)


def test_a_symlink_loop_in_an_imagefolder_is_walked_once(tiny_imagefolder):
    """A class folder holding a link to itself: os.walk(followlinks=True) repeated its images
    about 40 times (until ELOOP), and the teacher cache key's file walk raised that OSError."""
    from kd_optuna.train.teachers import teacher_identity

    (tiny_imagefolder / "train" / "dog" / "again").symlink_to(tiny_imagefolder / "train" / "dog")
    splits = load_dataset("imagefolder", root=tiny_imagefolder, val_fraction=0.2, image_size=32)
    assert (len(splits.train), len(splits.val)) == (16, 4)
    assert teacher_identity("imagefolder", "resnet8", tiny_imagefolder)["file_count"] == 24


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda root: (root / "val" / "dog").rename(root / "val" / "fish"),
         ["must hold the same class folders", "train has dog", "val has fish", "add the missing ones"]),
        (lambda root: [image.unlink() for image in (root / "val" / "dog").iterdir()],
         ["val: class folder(s) dog (0) hold no images", "add images or remove the folder"]),
        (lambda root: [(root / part / "zebra").mkdir() for part in ("train", "val")],
         ["train: class folder(s) zebra (0) hold fewer than 2 images"]),
    ],
)
def test_an_imagefolder_layout_error_is_named_before_any_image_is_read(tiny_imagefolder, change, words):
    from kd_optuna.data import open_image_folder

    change(tiny_imagefolder)
    for opener in (lambda: open_image_folder(tiny_imagefolder), lambda: load_dataset("imagefolder", tiny_imagefolder)):
        with pytest.raises(DataError) as raised:
            opener()
        for word in words:
            assert word in str(raised.value), str(raised.value)


def test_an_unreadable_image_file_is_named_with_the_fix(tiny_imagefolder):
    broken = tiny_imagefolder / "train" / "cat" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    splits = load_dataset("imagefolder", root=tiny_imagefolder, val_fraction=0.2, image_size=32)
    with pytest.raises(DataError, match=f"image file {broken} is not an image PIL can read; replace or remove it"):
        for split in ("train", "val"):  # the file is in one of them
            splits.tensors(split)
    broken.write_bytes(b"")
    with pytest.raises(DataError, match=f"image file {broken} "):
        for split in ("train", "val"):
            splits.tensors(split)


def test_imagefolder_without_val_folder_is_an_error(tiny_imagefolder):
    import shutil

    shutil.rmtree(tiny_imagefolder / "val")
    with pytest.raises(DataError, match="val"):
        load_dataset("imagefolder", root=tiny_imagefolder)


def test_unknown_dataset_lists_the_known():
    with pytest.raises(DataError, match="cifar100"):
        load_dataset("mnist")


def test_digits_hard_is_a_fixed_corruption_of_the_same_splits():
    clean, hard, hard_again = load_dataset("digits"), load_dataset("digits_hard"), load_dataset("digits_hard", seed=0)
    assert torch.equal(clean.labels("train"), hard.labels("train"))
    assert torch.equal(hard.tensors("test")[0], hard_again.tensors("test")[0])
    x_clean, x_hard = clean.tensors("test")[0], hard.tensors("test")[0]
    assert x_hard.shape == x_clean.shape and not torch.allclose(x_hard, x_clean, atol=0.1)
    assert abs(x_hard.mean()) < 0.1 and abs(x_hard.std() - 1) < 0.1


def test_a_self_made_cifar_file_names_the_config_fix_not_a_missing_flag(tmp_path, capsys, monkeypatch):
    """Issue 11.9: `kd-optuna train-teacher` on a self-made CIFAR-100 file (genuine md5s
    expected) exits 2 with one line naming [data] download = true or the genuine files."""
    from conftest import invoke_cli

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    batch = {"data": np.zeros((4, 3072), dtype=np.uint8), "fine_labels": [0, 1, 2, 3], "coarse_labels": [0] * 4,
             "filenames": ["a", "b", "c", "d"], "batch_label": "self-made"}
    for name in ("train", "test"):
        _write_pickle(folder / name, batch)
    _write_pickle(folder / "meta", {"fine_label_names": ["a", "b", "c", "d"], "coarse_label_names": ["x"]})
    config = tmp_path / "c.toml"
    config.write_text('[data]\ndataset = "cifar100"\nroot = "data"\n[teacher]\nmodel = "resnet8"\n'
                      '[student]\nmodel = "resnet8"\n')
    code, _, err = invoke_cli(capsys, "train-teacher", str(config), "--epochs", "1")
    assert code == 2 and err.count("\n") == 1, err
    assert "md5" in err and "self-made" in err and "data/cifar-100-python" in err
    assert "`download = true` under [data]" in err and "place the genuine files" in err
    assert "--download" not in err


def test_loaders_start_no_more_workers_than_cores_and_do_not_warn(tiny_imagefolder, recwarn):
    import os

    splits = load_dataset("imagefolder", root=tiny_imagefolder, val_fraction=0.2, image_size=32)
    cores = len(os.sched_getaffinity(0))
    loader = splits.loader("train", 4, num_workers=cores + 3)
    assert loader.num_workers == cores
    x, _ = next(iter(loader))
    assert x.shape == (4, 3, 32, 32)
    assert not [w for w in recwarn if "worker" in str(w.message)]
    assert splits.loader("val", 4, num_workers=0).num_workers == 0


def test_a_training_pass_drops_a_last_batch_of_one_image_and_nothing_else(tiny_imagefolder):
    """16 train images in batches of 5 leave one image: BatchNorm cannot train on it (1x1 maps
    raise "Expected more than 1 value per channel"), so the shuffled pass drops it; batches of 6
    leave 4, which are trained on; evaluation passes keep every image."""
    from kd_optuna.data import lone_last_batch

    splits = load_dataset("imagefolder", root=tiny_imagefolder, val_fraction=0.2, image_size=32)
    assert [len(y) for _, y in splits.loader("train", 5)] == [5, 5, 5]
    assert [len(y) for _, y in splits.loader("train", 6)] == [6, 6, 4]
    assert [len(y) for _, y in splits.loader("train", 5, shuffle=False)] == [5, 5, 5, 1]
    assert [lone_last_batch(n, 4) for n in (1, 4, 5, 6, 9)] == [False, False, True, False, True]
    assert not lone_last_batch(7, 1)


@pytest.mark.parametrize("name", ["imagefolder", "cifar100"])
def test_pixels_are_the_tensors_before_normalising_bit_for_bit(name, tiny_imagefolder, tiny_cifar100):
    """Issue 11.3: the proxy holds 8-bit train images as uint8 (a quarter of float32) and
    normalises each batch as ToTensor and Normalize did, to the same float32 values."""
    from kd_optuna.proxy.settings import ProxySettings
    from kd_optuna.proxy.views import ProxyData

    if name == "imagefolder":
        splits = load_dataset("imagefolder", root=tiny_imagefolder, val_fraction=0.2, image_size=32)
    else:
        splits = load_dataset("cifar100", root=tiny_cifar100)
    assert splits.has_pixels and not load_dataset("digits").has_pixels
    for split in ("train", "test"):
        x, y = splits.tensors(split)
        pixels, labels = splits.pixels(split)
        assert pixels.dtype == torch.uint8 and pixels.shape == x.shape and torch.equal(labels, y)
        assert torch.equal(splits.pixels(split, [3, 1])[0], pixels[[3, 1]])
    x, y = splits.tensors("train")
    vx, vy = splits.tensors("val")
    settings = ProxySettings(labels_per_class=2, views=2, augment="shift", shift=2)
    floats = ProxyData.build(x, y, vx, vy, settings)
    uint8 = ProxyData.build(splits.pixels("train")[0], y, vx, vy, settings, pixel_stats=(splits.mean, splits.std))
    rows = torch.arange(len(y))
    assert uint8.train_x.dtype == torch.uint8 and torch.equal(uint8.train_images(rows), x)
    assert torch.equal(uint8.pool_images(rows[:6], torch.tensor([0, 1] * 3)), floats.pool_images(rows[:6], torch.tensor([0, 1] * 3)))
    with pytest.raises(KdOptunaError, match="pixel_stats"):
        ProxyData.build(splits.pixels("train")[0], y, vx, vy, settings)
