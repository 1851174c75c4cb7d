"""Datasets: ``load_dataset(name, root=None, download=False, seed=0) -> DatasetSplits``.

Every dataset comes as three disjoint splits: ``train``, ``val`` (held out from the training set,
seeded and class-balanced; proxy training never touches it) and ``test``.

- ``digits``: scikit-learn's bundled handwritten digits (1797 images of 8x8, 10 classes), no
  download. Pixels (0..16) are scaled to [0, 1], upscaled to 16x16 by bilinear interpolation
  (align_corners=False) and normalised by the dataset's pixel mean and std: inputs are
  (1, 16, 16). A class-balanced 20% (359 images) is the test split, 25% of the rest (359) the
  validation split, 1079 images train. No augmentation.
- ``digits_hard``: the same images and splits, made harder once and for all (independently of
  ``seed``, by a generator seeded with ``HARD_DIGITS_SEED``): Gaussian pixel noise of std 0.2
  and one 4x4 square set to 0 at a random place, both in [0, 1] pixel units before
  normalisation. The digits teacher reaches about 90% there instead of 99.7%, which leaves
  distillers room to differ.
- ``cifar10`` / ``cifar100``: torchvision's datasets from ``root`` (the folder holding
  ``cifar-10-batches-py`` / ``cifar-100-python``); downloaded only with ``download=True``.
  torchvision checks every file's md5 against the official archive before unpickling it, so only
  the genuine files are ever read. Training augmentation: random crop 32 with padding 4 and
  horizontal flip; normalisation by the usual per-channel mean and std. 10% of the training set
  (class-balanced) is the validation split; the official test set is the test split.
- ``imagefolder``: torchvision ``ImageFolder`` on ``root/train/<class>/*`` and ``root/val/<class>/*``
  (the ImageNet layout; images at any depth below a class folder, hidden files and folders such
  as .DS_Store or .ipynb_checkpoints left out); ``root/val`` is the test split and 10% of
  ``root/train`` the validation split. Training: RandomResizedCrop(S) and flip; evaluation: resize to round(S * 256 / 224) and
  centre crop S; ImageNet normalisation. ``image_size`` S is 224 (ImageNet's) unless given.

``root=None`` means ``$KD_OPTUNA_DATA`` or ``./data``. Splits depend only on ``seed``: use the same
seed for the teacher and for the search. ``DatasetSplits.tensors(split, indices)`` gives
un-augmented, normalised images and labels as tensors (for teacher caches and on-device proxy
training), ``DatasetSplits.pixels(split, indices)`` the same images as uint8 before normalising
(CIFAR and ImageFolder; a quarter of the memory), and ``DatasetSplits.augment_batch`` applies
the training augmentation to such a batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import KdOptunaError

DATASET_NAMES = ("digits", "digits_hard", "cifar10", "cifar100", "imagefolder")
SPLITS = ("train", "val", "test")

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIGITS_SIZE = 16
#: The square crop of imagefolder images when a study gives no ``[data] image_size`` (ImageNet's).
IMAGEFOLDER_SIZE = 224
#: The smallest such crop: CIFAR's 32 px, what the zoo's smallest models take.
MIN_IMAGE_SIZE = 32
#: The class-balanced share of CIFAR's and an image folder's train images held out as the val
#: split when a study gives no ``[data] val_fraction``.
VAL_FRACTION = 0.1
#: The datasets whose val split is fixed (359/359 of the 1,797 digits), which a val_fraction cannot change.
FIXED_SPLIT_DATASETS = ("digits", "digits_hard")
HARD_DIGITS_SEED = 2024
HARD_DIGITS_NOISE = 0.2
HARD_DIGITS_OCCLUSION = 4


class DataError(KdOptunaError):
    """A dataset that is missing, corrupt, unknown, or asked for in a way it cannot serve."""


@dataclass
class DatasetSplits:
    """Train / val / test splits of one dataset and how its images are prepared.

    ``train`` yields augmented images (for torch DataLoaders); ``val`` and ``test`` un-augmented.
    Each item is (image (C, H, W) float32 normalised, label int). ``input_shape`` is (C, H, W).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    augmentation: str
    train_transform: Callable | None = None
    eval_transform: Callable | None = None
    augment_batch: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None
    _plain: dict[str, Dataset] = field(default_factory=dict, repr=False)
    _labels: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _fast_tensors: Callable[[str, torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    _plain_pixels: dict[str, Dataset] = field(default_factory=dict, repr=False)
    _fast_pixels: Callable[[str, torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def labels(self, split: str) -> torch.Tensor:
        """All labels of ``split`` as a LongTensor (N,), without reading any image."""
        return self._labels[_check_split(split)]

    def tensors(
        self, split: str, indices: Sequence[int] | torch.Tensor | None = None, batch_size: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-augmented normalised images (N, C, H, W) float32 and labels (N,) of ``split``
        (optionally only ``indices`` into it), on the CPU. Decoded images are written batch by
        batch into the one output tensor (never gathered in a list and concatenated: that held
        the split twice)."""
        labels = self.labels(split)
        idx = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        if self._fast_tensors is not None:
            return self._fast_tensors(split, idx), labels[idx]
        return _stacked(self._plain[split], idx, self.input_shape, torch.float32, batch_size), labels[idx]

    @property
    def has_pixels(self) -> bool:
        """Whether :meth:`pixels` serves this dataset (8-bit images: CIFAR, ImageFolder; not digits)."""
        return self._fast_pixels is not None or bool(self._plain_pixels)

    def pixels(
        self, split: str, indices: Sequence[int] | torch.Tensor | None = None, batch_size: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 pixels (N, C, H, W) of the images :meth:`tensors` gives, before ToTensor's
        division and Normalize (a quarter of the memory), and the labels (N,): ``tensors`` is
        ``(pixels.float() / 255 - mean) / std``, bit for bit. DataError where ``has_pixels`` is
        False."""
        if not self.has_pixels:
            raise DataError(f"{self.name} has no 8-bit pixels; use tensors()")
        labels = self.labels(split)
        idx = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        if self._fast_pixels is not None:
            return self._fast_pixels(split, idx), labels[idx]
        return _stacked(self._plain_pixels[split], idx, self.input_shape, torch.uint8, batch_size), labels[idx]

    def loader(
        self, split: str, batch_size: int, *, shuffle: bool | None = None, num_workers: int = 0, seed: int = 0
    ) -> DataLoader:
        """A DataLoader over ``split``; the train split shuffles (seeded) and augments by default.
        ``num_workers`` is capped at the cores this process may use (``usable_cores()``). A
        shuffled loader is a training pass: it drops a last batch of one image (:func:`lone_last_batch`)."""
        dataset = {"train": self.train, "val": self.val, "test": self.test}[_check_split(split)]
        num_workers = min(num_workers, usable_cores())
        shuffle = split == "train" if shuffle is None else shuffle
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            generator=generator,
            drop_last=shuffle and lone_last_batch(len(dataset), batch_size),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
        )


def lone_last_batch(n_items: int, batch_size: int) -> bool:
    """Whether cutting ``n_items`` into batches of ``batch_size`` leaves a last batch of one item.

    Training passes drop that batch: BatchNorm cannot normalise one image in train mode where a
    feature map is 1x1 (MobileNetV3's squeeze-excitation raises "Expected more than 1 value per
    channel"), and one image's step is noise. Only that batch, and never the only one: any other
    remainder is trained on."""
    return n_items > batch_size and n_items % batch_size == 1


def _stacked(dataset: Dataset, idx: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
             batch_size: int) -> torch.Tensor:
    """Items ``idx`` of ``dataset`` (image, label) as one (N, *shape) tensor, written batch by
    batch (never gathered in a list and concatenated: that held them twice)."""
    subset = torch.utils.data.Subset(dataset, idx.tolist())
    out = torch.empty((len(subset), *shape), dtype=dtype)
    start = 0
    for x, _ in DataLoader(subset, batch_size=batch_size, shuffle=False):
        out[start : start + x.shape[0]] = x
        start += x.shape[0]
    return out


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one): more
    DataLoader workers than that only compete for them, and torch warns once per loader."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def class_balanced_subset(
    labels: Sequence[int] | torch.Tensor,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    *,
    at_most: bool = False,
) -> torch.Tensor:
    """Sorted indices (M,) of a seeded class-balanced subset of ``labels`` (N,).

    Exactly one of ``per_class`` (that many per class; 0: every index, 0..N-1) or ``fraction``
    (per class c, max(1, round(fraction * n_c)) of its n_c items). Each class, in sorted order,
    takes the first ones of randperm(n_c) from one generator seeded with ``seed``; a class with
    fewer than ``per_class`` items raises, or gives all of them when ``at_most``.
    """
    if (per_class is None) == (fraction is None):
        raise DataError("class_balanced_subset needs exactly one of per_class or fraction")
    if per_class is not None and per_class < 0:
        raise DataError(f"per_class must be at least 0, got {per_class}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise DataError(f"fraction must be in (0, 1], got {fraction}")
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if per_class == 0:
        return torch.arange(labels.shape[0])
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        take = per_class if per_class is not None else max(1, round(fraction * len(members)))
        if take > len(members) and not at_most:
            raise DataError(f"class {c} has {len(members)} items, fewer than per_class={per_class}")
        chosen.append(members[:take])
    if not chosen:
        return torch.empty(0, dtype=torch.long)
    return torch.sort(torch.cat(chosen)).values


def _complement(n: int, indices: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[indices] = False
    return torch.nonzero(keep).flatten()


def held_out_split(labels: torch.Tensor, val_fraction: float, seed: int, classes: Sequence[str],
                   where: str, key: str = "val_fraction") -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices) of train images with labels (N,): per class c,
    max(1, round(val_fraction * n_c)) of its n_c images held out (``class_balanced_subset``).

    A class left without a train image raises DataError naming the classes of ``where`` and the
    fix, with ``key`` the name the caller's user gives the fraction by.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    val_idx = class_balanced_subset(labels, fraction=val_fraction, seed=seed)
    train_idx = _complement(len(labels), val_idx)
    kept = torch.bincount(labels[train_idx], minlength=len(classes))
    empty = [name for name, n in zip(classes, kept.tolist()) if n == 0]
    if empty:
        listed = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(f"{key} {val_fraction} holds out every train image of {where} class(es) {listed}: "
                        f"give a smaller {key} or add train images")
    return train_idx, val_idx


def default_root() -> Path:
    return Path(os.environ.get("KD_OPTUNA_DATA", "data"))


#: How a missing CIFAR copy is downloaded, in the error that says it is missing: the study
#: config's key (and the Python keyword); callers with their own switch give theirs.
DOWNLOAD_HINT = "set `download = true` under [data] in the study config (download=True in Python)"


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    *,
    val_fraction: float | None = None,
    image_size: int | None = None,
    download_hint: str = DOWNLOAD_HINT,
    val_fraction_key: str = "val_fraction",
) -> DatasetSplits:
    """Load ``name`` (one of DATASET_NAMES) as seeded train / val / test splits.

    ``val_fraction`` is the class-balanced share of the training set held out as ``val`` for
    cifar10/cifar100/imagefolder (None: ``VAL_FRACTION``; digits uses its fixed 359/359 split and
    ignores it); ``image_size`` is the
    square crop of imagefolder (None: ``IMAGEFOLDER_SIZE``); the other datasets have one size.
    A missing or corrupt root raises DataError naming the path and the fix; ``download_hint``
    is how the caller's user asks for the download (the study config's key by default; the
    exported script gives its ``--download true`` flag), and ``val_fraction_key`` what they call
    the held-out share (the script: ``--val-fraction``).
    """
    root = default_root() if root is None else Path(root)
    val_fraction = VAL_FRACTION if val_fraction is None else val_fraction
    if name in FIXED_SPLIT_DATASETS:
        return _digits(seed, hard=name == "digits_hard")
    if name in CIFAR_STATS:
        return _cifar(name, root, download, seed, val_fraction, download_hint, val_fraction_key)
    if name == "imagefolder":
        return _imagefolder(root, seed, val_fraction, image_size or IMAGEFOLDER_SIZE, val_fraction_key)
    raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")


def corrupt_digits(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) images in [0, 1] -> the same plus N(0, 0.2^2) noise, with one 4x4 square per
    image set to 0; the draws come from a generator seeded with HARD_DIGITS_SEED, in image order."""
    n, _, h, w = images.shape
    generator = torch.Generator().manual_seed(HARD_DIGITS_SEED)
    noisy = images + HARD_DIGITS_NOISE * torch.randn(images.shape, generator=generator)
    size = HARD_DIGITS_OCCLUSION
    top = torch.randint(0, h - size + 1, (n, 1, 1, 1), generator=generator)
    left = torch.randint(0, w - size + 1, (n, 1, 1, 1), generator=generator)
    rows = torch.arange(h).view(1, 1, h, 1)
    cols = torch.arange(w).view(1, 1, 1, w)
    square = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return noisy.masked_fill(square, 0.0)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) float64 in [0, 16] and labels (1797,) int,
    as ``sklearn.datasets.load_digits`` gives them.

    Read from the package's data file (``datasets/data/digits.csv.gz``: 64 pixels then the
    label on each row) without importing scikit-learn, whose import (SciPy with it) took 1.7 s
    of each worker's start; where that file is not found, ``load_digits`` reads it.
    """
    import gzip
    import importlib.util

    package = importlib.util.find_spec("sklearn")
    locations = list(package.submodule_search_locations or []) if package is not None else []
    path = Path(locations[0], "datasets", "data", "digits.csv.gz") if locations else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as rows:
            data = np.loadtxt(rows, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def _digits(seed: int, hard: bool = False) -> DatasetSplits:
    pixels, targets = digits_arrays()
    images = torch.as_tensor(pixels, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    if hard:
        images = corrupt_digits(images)
    mean, std = images.mean().item(), images.std().item()
    images = (images - mean) / std
    labels = torch.as_tensor(targets, dtype=torch.long)

    test_idx = class_balanced_subset(labels, fraction=0.2, seed=seed)
    rest = _complement(len(labels), test_idx)
    val_in_rest = class_balanced_subset(labels[rest], fraction=0.25, seed=seed + 1)
    val_idx = rest[val_in_rest]
    train_idx = rest[_complement(len(rest), val_in_rest)]
    parts = {s: (images[i], labels[i]) for s, i in zip(SPLITS, (train_idx, val_idx, test_idx))}
    datasets = {s: TensorDataset(*parts[s]) for s in SPLITS}
    return DatasetSplits(
        name="digits_hard" if hard else "digits",
        num_classes=10,
        input_shape=(1, DIGITS_SIZE, DIGITS_SIZE),
        mean=(mean,),
        std=(std,),
        train=datasets["train"],
        val=datasets["val"],
        test=datasets["test"],
        classes=[str(d) for d in range(10)],
        augmentation="none",
        _plain=datasets,
        _labels={s: parts[s][1] for s in SPLITS},
        _fast_tensors=lambda split, idx: parts[split][0][idx],
    )


class _TransformedSubset(Dataset):
    """Items ``indices`` of ``base`` (which yields (PIL image, label)) with ``transform`` applied."""

    def __init__(self, base: Dataset, indices: torch.Tensor | None, transform: Callable):
        self.base = base
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.base[i if self.indices is None else int(self.indices[i])]
        return self.transform(image), label


def random_crop_flip(padding: int, fill: Sequence[float]):
    """Batch augmentation on tensors: pad each (N, C, H, W) image by ``padding`` with the
    per-channel value ``fill`` (C,), crop a random H x W window, flip horizontally with p = 1/2.
    Equals torchvision's RandomCrop(padding) + RandomHorizontalFlip applied before normalising
    when ``fill`` is the normalised value of black, -mean / std."""

    def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
        padded = F.pad(x - fill_t, (padding,) * 4) + fill_t
        draw_on = generator.device if generator is not None else x.device
        dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=draw_on).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=draw_on).to(x.device)
        flip = (torch.rand(n, 1, generator=generator, device=draw_on) < 0.5).to(x.device)
        rows = dy + torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device).expand(n, w)
        cols = torch.where(flip, cols.flip(1), cols) + dx
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
        return padded[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]

    return augment


def _cifar_class(name: str):
    import torchvision

    return torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100


def _cifar_files_problem(cls, folder: Path) -> str | None:
    """What is wrong with the CIFAR copy in ``folder`` (``cls``: torchvision's CIFAR10 or
    CIFAR100), naming the first missing or failing file; None when every file passes
    torchvision's md5 check."""
    from torchvision.datasets.utils import check_integrity

    if not folder.is_dir():
        return "is missing"
    for filename, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
        if not (folder / filename).is_file():
            return f"lacks its file {filename}"
        if not check_integrity(str(folder / filename), md5):
            return (f"has a {filename} that is truncated, corrupt or not the official release: it fails torchvision's "
                    "md5 check, which refuses any other file (a self-made or re-pickled one too)")
    return None


def _cifar_error(name: str, root: Path, download: bool, download_hint: str, state: str) -> DataError:
    cls = _cifar_class(name)
    label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    if root.name == cls.base_folder and not (root / cls.base_folder).exists():
        return DataError(f"{label}: the data root {root} is the {cls.base_folder} folder itself; give the folder "
                         f"that holds it, {root.parent}")
    fetch = "downloading did not fix it; delete the folder and try again, or" if download else f"{download_hint}, or"
    return DataError(f"{label} at {root / cls.base_folder} {state}: {fetch} place the genuine files: extract "
                     f"{cls.filename} from {cls.url} into {root}")


def check_cifar(name: str, root: str | os.PathLike, download_hint: str = DOWNLOAD_HINT) -> None:
    """DataError naming the missing or failing file of the ``name`` copy under ``root`` and the
    fix (``download_hint`` or placing the genuine files), without unpickling anything."""
    root = Path(root).expanduser()
    problem = _cifar_files_problem(_cifar_class(name), root / _cifar_class(name).base_folder)
    if problem is not None:
        raise _cifar_error(name, root, False, download_hint, problem)


def _open_cifar(name: str, root: Path, download: bool,
                download_hint: str = DOWNLOAD_HINT) -> tuple[Dataset, Dataset]:
    """torchvision's (train, test) CIFAR-10 or CIFAR-100 under ``root``, downloaded there first if
    ``download``; a missing, corrupt or undownloadable copy is a DataError saying what to do
    (without ``download``: ``download_hint``, or placing the genuine files)."""
    cls = _cifar_class(name)
    label = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    try:
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=False)
    except RuntimeError:
        state = _cifar_files_problem(cls, root / cls.base_folder) or "cannot be read"
        raise _cifar_error(name, root, download, download_hint, state) from None
    except OSError as exc:
        raise DataError(f"could not download {label} into {root}: {exc}; copy {cls.filename} there by hand") from None


def _cifar(name: str, root: Path, download: bool, seed: int, val_fraction: float,
           download_hint: str = DOWNLOAD_HINT, val_fraction_key: str = "val_fraction") -> DatasetSplits:
    from torchvision import transforms as T

    base_train, base_test = _open_cifar(name, root, download, download_hint)
    mean, std = CIFAR_STATS[name]
    normalise = [T.ToTensor(), T.Normalize(mean, std)]
    train_transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalise])
    eval_transform = T.Compose(normalise)
    train_labels_all = torch.as_tensor(base_train.targets, dtype=torch.long)
    train_idx, val_idx = held_out_split(train_labels_all, val_fraction, seed, base_train.classes, name,
                                        val_fraction_key)
    sources = {"train": (base_train, train_idx), "val": (base_train, val_idx), "test": (base_test, None)}
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def fast_pixels(split: str, idx: torch.Tensor) -> torch.Tensor:
        base, chosen = sources[split]
        rows = idx if chosen is None else chosen[idx]
        return torch.as_tensor(base.data[rows.numpy()]).permute(0, 3, 1, 2)

    def fast_tensors(split: str, idx: torch.Tensor) -> torch.Tensor:
        pixels = fast_pixels(split, idx).float() / 255.0
        return (pixels - mean_t) / std_t

    def split_labels(split: str) -> torch.Tensor:
        base, chosen = sources[split]
        labels = torch.as_tensor(base.targets, dtype=torch.long)
        return labels if chosen is None else labels[chosen]

    return DatasetSplits(
        name=name,
        num_classes=len(base_train.classes),
        input_shape=(3, 32, 32),
        mean=mean,
        std=std,
        train=_TransformedSubset(base_train, train_idx, train_transform),
        val=_TransformedSubset(base_train, val_idx, eval_transform),
        test=_TransformedSubset(base_test, None, eval_transform),
        classes=list(base_train.classes),
        augmentation="random crop 32 padding 4, horizontal flip",
        train_transform=train_transform,
        eval_transform=eval_transform,
        augment_batch=random_crop_flip(4, [-m / s for m, s in zip(mean, std)]),
        _plain={s: _TransformedSubset(b, i, eval_transform) for s, (b, i) in sources.items()},
        _labels={s: split_labels(s) for s in SPLITS},
        _fast_tensors=fast_tensors,
        _fast_pixels=lambda split, idx: fast_pixels(split, idx).contiguous(),
    )


def read_image(path: str):
    """The RGB PIL image at ``path`` (torchvision's ``default_loader``); a file that is not an
    image PIL can read raises DataError naming it and the fix."""
    from PIL import UnidentifiedImageError
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except UnidentifiedImageError:
        raise DataError(f"image file {path} is not an image PIL can read; replace or remove it") from None
    except OSError as exc:
        reason = " ".join(str(exc).split())
        raise DataError(f"image file {path} cannot be read ({reason}); replace or remove it") from None


def _visible(name: str) -> bool:
    """Whether a file or folder name is data: hidden ones (a leading dot: .DS_Store, macOS's
    ._name.jpg companions, .ipynb_checkpoints, .git) are not."""
    return not name.startswith(".")


def image_folder_classes(folder: Path) -> list[str]:
    """The class names of an image-folder split: the sorted names of ``folder``'s visible
    sub-folders (symlinks to folders count)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and _visible(entry.name))


def walk_once(top: str | os.PathLike):
    """``os.walk(top, followlinks=True)`` (top-down) that enters each real folder once: a
    symbolic link back to a folder already walked (a loop, or a second link to it) is not
    followed again, where os.walk would repeat its files until the OS refuses the path."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        yield dirpath, dirnames, filenames


def _image_files(class_folder: Path) -> list[str]:
    """The image files below ``class_folder`` (any depth, extensions in any case, hidden files
    and folders left out), in torchvision ``make_dataset``'s order: folders by path, then names."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    found = []
    for dirpath, dirnames, filenames in walk_once(class_folder):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        names = sorted(f for f in filenames if _visible(f) and has_file_allowed_extension(f, IMG_EXTENSIONS))
        found.append((dirpath, [os.path.join(dirpath, name) for name in names]))
    return [path for _, paths in sorted(found) for path in paths]


class ImageFiles(Dataset):
    """One split of an image folder: item i is (RGB PIL image, class index) of the i-th image
    file below ``folder/<class>/`` (:func:`_image_files`). ``classes`` are the class folder
    names, ``targets`` the labels."""

    def __init__(self, folder: Path, classes: list[str]):
        self.classes = classes
        self.samples = [(path, index) for index, name in enumerate(classes) for path in _image_files(folder / name)]
        self.targets = [target for _, target in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        return read_image(path), target


def open_image_folder(root: Path) -> tuple[ImageFiles, ImageFiles]:
    """(train, val) of the image folder ``root`` after checking its layout without reading an
    image: both split folders exist and hold the same class folders, each class has 2 or more
    training images (a share is held out for validation) and 1 or more in val; else DataError
    naming what is wrong and the fix."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(root).expanduser()
    layout = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (the ImageNet layout)"
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise DataError(f"image folder {root / part} does not exist: {layout}")
    train_classes, val_classes = image_folder_classes(root / "train"), image_folder_classes(root / "val")
    if not train_classes:
        raise DataError(f"image folder {root / 'train'} holds no class folders: {layout}")
    only = {part: sorted(set(mine) - set(other)) for part, mine, other in
            (("train", train_classes, val_classes), ("val", val_classes, train_classes))}
    if any(only.values()):
        held = "; ".join(f"only {root / part} has {', '.join(names)}" for part, names in only.items() if names)
        raise DataError(f"{root}/train and {root}/val must hold the same class folders ({held}): "
                        "add the missing ones or remove the extra ones")
    train, val = ImageFiles(root / "train", train_classes), ImageFiles(root / "val", val_classes)
    for part, split, least in (("train", train, 2), ("val", val, 1)):
        counts = torch.bincount(torch.as_tensor(split.targets, dtype=torch.long), minlength=len(split.classes))
        few = [f"{name} ({int(n)})" for name, n in zip(split.classes, counts) if n < least]
        if few:
            why = " (a share is held out for validation)" if part == "train" else ""
            extensions = ", ".join(e.lstrip(".") for e in IMG_EXTENSIONS)
            held = f"fewer than {least} images" if least > 1 else "no images"
            raise DataError(f"{root}/{part}: class folder(s) {', '.join(few)} hold {held} ({extensions}); each class "
                            f"needs {least} or more there{why}: add images or remove the folder")
    return train, val


def _imagefolder(root: Path, seed: int, val_fraction: float, image_size: int,
                 val_fraction_key: str = "val_fraction") -> DatasetSplits:
    from torchvision import transforms as T

    base_train, base_test = open_image_folder(root)

    mean, std = IMAGENET_STATS
    normalise = [T.ToTensor(), T.Normalize(mean, std)]
    train_transform = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *normalise])
    resize = round(image_size * 256 / 224)
    eval_transform = T.Compose([T.Resize(resize), T.CenterCrop(image_size), *normalise])
    pixel_transform = T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.PILToTensor()])
    train_labels_all = torch.as_tensor(base_train.targets, dtype=torch.long)
    train_idx, val_idx = held_out_split(train_labels_all, val_fraction, seed, base_train.classes, str(root / "train"),
                                        val_fraction_key)
    sources = {"train": (base_train, train_idx), "val": (base_train, val_idx), "test": (base_test, None)}
    test_labels = torch.as_tensor(base_test.targets, dtype=torch.long)
    return DatasetSplits(
        name="imagefolder",
        num_classes=len(base_train.classes),
        input_shape=(3, image_size, image_size),
        mean=mean,
        std=std,
        train=_TransformedSubset(base_train, train_idx, train_transform),
        val=_TransformedSubset(base_train, val_idx, eval_transform),
        test=_TransformedSubset(base_test, None, eval_transform),
        classes=list(base_train.classes),
        augmentation=f"random resized crop {image_size}, horizontal flip",
        train_transform=train_transform,
        eval_transform=eval_transform,
        _plain={s: _TransformedSubset(b, i, eval_transform) for s, (b, i) in sources.items()},
        _labels={"train": train_labels_all[train_idx], "val": train_labels_all[val_idx], "test": test_labels},
        _plain_pixels={s: _TransformedSubset(b, i, pixel_transform) for s, (b, i) in sources.items()},
    )
