"""Teacher training: ``train_teacher(dataset, model_name, out_path)`` writes a checkpoint.

Recipes (overridable by keyword): digits and digits_hard, SGD (momentum 0.9, nesterov) lr 0.1, batch 64, weight
decay 5e-4, cosine over 15 epochs, one CPU thread (whole split held as tensors on the device);
cifar10/cifar100, RepDistiller's recipe: SGD lr 0.05, batch 64, weight decay 5e-4, 240 epochs,
lr x0.1 at epochs 150, 180, 210; imagefolder: SGD lr 0.1, batch 256, weight decay 1e-4, 100 epochs,
x0.1 at 30, 60, 90. Training uses the train split only; the checkpoint's accuracy is the test
split's, and its metadata also records the validation accuracy and the split seed.

A teacher trained without a given checkpoint is cached under a name holding ``teacher_key``
of ``teacher_identity(...)``: everything that changes its weights: the dataset, the data root
(resolved) with a fingerprint of its files (relative names, sizes and modification times:
cheap, no file is read), the class folders and the crop size of an image folder, the share of
train images held out as val, the model, the recipe with its overrides and the seed. The key is also written into the checkpoint's metadata (``cache_key``),
so a file found under another name is reused only if it was trained for the same key.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kd_optuna.train.checkpoints import CheckpointError, check_writable, load_model, save_checkpoint
from kd_optuna.errors import KdOptunaError
from kd_optuna.data import image_folder_classes, load_dataset
from kd_optuna.models import build_model
from kd_optuna.train.engine import default_device, evaluate
from kd_optuna.train.classifier import train_classifier
from kd_optuna.train.batch_norm import stale_note

RECIPES: dict[str, dict] = {
    "digits": dict(epochs=15, batch_size=64, optimizer="sgd", lr=0.1, weight_decay=5e-4, schedule="cosine"),
    "cifar10": dict(
        epochs=240, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=5e-4, schedule="step", milestones=(150, 180, 210)
    ),
    "imagefolder": dict(
        epochs=100, batch_size=256, optimizer="sgd", lr=0.1, weight_decay=1e-4, schedule="step", milestones=(30, 60, 90)
    ),
}
RECIPES["cifar100"] = dict(RECIPES["cifar10"])
RECIPES["digits_hard"] = dict(RECIPES["digits"])
KNOWN_CLASS_COUNTS = {"digits": 10, "digits_hard": 10, "cifar10": 10, "cifar100": 100}


#: Training settings that change how fast, not what, a teacher learns: left out of its key.
_SPEED_ONLY = ("num_threads", "num_workers", "progress")


def _data_folders(dataset: str, root: Path) -> list[Path]:
    if dataset == "imagefolder":
        return [root / "train", root / "val"]
    if dataset in ("cifar10", "cifar100"):
        import torchvision

        cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
        return [root / cls.base_folder]
    return []


def files_fingerprint(folders: list[Path]) -> tuple[str, int]:
    """(sha256, file count) over every file below ``folders``: relative path, size and mtime
    (nanoseconds), in sorted order; a missing folder counts as absent, a folder reached again
    through a symbolic link (a loop) is not walked again. Reads no file."""
    digest = hashlib.sha256()
    count = 0
    for folder in folders:
        digest.update(f"{folder.name}|{folder.is_dir()}|".encode())
        stack = [folder] if folder.is_dir() else []
        walked: set[str] = set()
        while stack:
            current = stack.pop()
            if os.path.realpath(current) in walked:
                continue
            walked.add(os.path.realpath(current))
            with os.scandir(current) as entries:
                listed = sorted(entries, key=lambda e: e.name)
            for entry in listed:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=True):
                    stat = entry.stat()
                    rel = os.path.relpath(entry.path, folder)
                    digest.update(f"{rel}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
                    count += 1
    return digest.hexdigest(), count


def teacher_identity(
    dataset: str, model_name: str, root: str | os.PathLike | None = None, *, seed: int = 0,
    image_size: int | None = None, val_fraction: float | None = None, **overrides
) -> dict:
    """What a trained teacher's weights depend on, as plain data (see the module docstring);
    ``image_size`` None (the dataset's one size, 224 for imagefolder) and ``val_fraction`` None
    or ``VAL_FRACTION`` (the default share held out) add nothing, so those keys stay as they were."""
    from kd_optuna.data import VAL_FRACTION, default_root

    if dataset not in RECIPES:
        raise KdOptunaError(f"no teacher recipe for dataset {dataset!r}; use one of: {', '.join(RECIPES)}")
    identity: dict = {"dataset": dataset, "model": model_name, "seed": int(seed)}
    recipe = {**RECIPES[dataset], **overrides}
    identity["recipe"] = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(recipe.items())
                          if k not in _SPEED_ONLY}
    folders: list[Path] = []
    if not dataset.startswith("digits"):
        resolved = Path(default_root() if root is None else root).expanduser().resolve()
        identity["root"] = str(resolved)
        folders = _data_folders(dataset, resolved)
        if val_fraction is not None and float(val_fraction) != VAL_FRACTION:
            identity["val_fraction"] = float(val_fraction)
    if dataset == "imagefolder" and folders[0].is_dir():
        identity["classes"] = image_folder_classes(folders[0])
    if image_size is not None:
        identity["image_size"] = int(image_size)
    identity["files"], identity["file_count"] = files_fingerprint(folders)
    return identity


def teacher_key(identity: dict) -> str:
    """sha256 of ``teacher_identity(...)``'s plain data."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class TeacherReport:
    """Where the checkpoint went, its test and validation accuracy, and the training time;
    ``stale_batch_norm``: the sentence for a training too short for its BatchNorm statistics
    (:func:`kd_optuna.train.batch_norm.stale_note`), or None."""

    path: Path
    model_name: str
    dataset: str
    test_accuracy: float
    val_accuracy: float
    seconds: float
    epochs: int
    stale_batch_norm: str | None = None


def train_teacher(
    dataset: str,
    model_name: str,
    out_path: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    val_fraction: float | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 4,
    progress: bool = True,
    **overrides,
) -> TeacherReport:
    """Train ``model_name`` on ``dataset`` with its recipe (``overrides`` replace recipe entries
    and reach ``train_classifier``: epochs, lr, bf16, channels_last, num_threads, ...), evaluate
    it on the test split and save a checkpoint at ``out_path`` (checked writable before the
    training starts). ``image_size``: an image
    folder's crop; ``val_fraction``: the share of train images held out as val
    (``kd_optuna.data.load_dataset``).

    The caller's random state (torch's CPU generator and the training device's) is left as it
    was: whatever the caller builds or draws next (a student's initial weights) is the same
    whether the teacher was trained here or read from the cache."""
    allowed = set(inspect.signature(train_classifier).parameters) - {"model", "train_data", "device", "seed", "progress"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise KdOptunaError(f"unknown teacher training setting(s) {', '.join(unknown)}; use: {', '.join(sorted(allowed))}")
    check_writable(out_path)
    splits = load_dataset(dataset, root=root, download=download, seed=seed, image_size=image_size,
                          val_fraction=val_fraction)
    identity = teacher_identity(dataset, model_name, root, seed=seed, image_size=image_size, val_fraction=val_fraction,
                                **overrides)
    device = default_device(device)
    recipe = {**RECIPES[dataset], **overrides}
    if dataset.startswith("digits") and device.type == "cpu":
        recipe.setdefault("num_threads", 1)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model = build_model(model_name, splits.num_classes)
        if dataset.startswith("digits"):
            train_data = splits.tensors("train")
            val_data = splits.tensors("val")
            test_data = splits.tensors("test")
        else:
            train_data = splits.loader("train", recipe["batch_size"], num_workers=num_workers, seed=seed)
            val_data = (splits.loader("val", 256, num_workers=num_workers), None)
            test_data = (splits.loader("test", 256, num_workers=num_workers), None)
        result = train_classifier(
            model, train_data, device=device, seed=seed, progress=progress, desc=f"teacher {model_name}", **recipe
        )
        bf16 = bool(recipe.get("bf16", False))
        val = evaluate(model, *val_data, device=device, bf16=bf16)
        test = evaluate(model, *test_data, device=device, bf16=bf16)
        path = save_checkpoint(
            out_path,
            model,
            model_name=model_name,
            num_classes=splits.num_classes,
            dataset=dataset,
            accuracy=test.accuracy,
            extra={"val_accuracy": val.accuracy, "split_seed": seed, "epochs": recipe["epochs"],
                   "cache_key": teacher_key(identity), "data_root": identity.get("root"),
                   "data_files": identity["file_count"]},
        )
    return TeacherReport(path, model_name, dataset, test.accuracy, val.accuracy, result.seconds, recipe["epochs"],
                         stale_note(model, "the teacher's"))


def load_or_train_teacher(
    dataset: str,
    model_name: str,
    path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    **train_kwargs,
) -> tuple[nn.Module, dict | None]:
    """The teacher at ``path`` in eval mode on ``device``, with its metadata (None for a foreign
    checkpoint), after training it with ``train_teacher`` if the file does not exist yet.
    Our checkpoints must have been trained on ``dataset``; foreign ones (plain state dicts,
    RepDistiller's layout) take ``num_classes`` or the dataset's known class count."""
    path = Path(path)
    if not path.exists():
        train_teacher(dataset, model_name, path, device=device, **train_kwargs)
    num_classes = num_classes or KNOWN_CLASS_COUNTS.get(dataset)
    model, meta = load_model(path, model_name, num_classes, device=default_device(device))
    if meta is not None and meta.get("dataset") != dataset:
        raise CheckpointError(f"teacher {path} was trained on {meta.get('dataset')}, but the task's dataset is {dataset}")
    return model, meta
