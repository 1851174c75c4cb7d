"""The proxy trial: a short, seeded training of the student with one distiller, then its metrics.

Regime (DESIGN.md "Scoring"): a study's proxy is its full-training recipe shrunk
(:meth:`ProxySettings.from_recipe`): the same SGD, learning rate, loss scale, batch size and
labels as the exported training, for a third of its epochs. Measured on digits_hard, the first
version's regime (Adam, 5 labels per class, the distillation term on unlabelled images) picked
distillers that trained worse than vanilla KD under the real recipe; it is still what
``ProxySettings()`` gives, for experiments and tests. Every trial uses the same seeds,
labelled subset and views, so trials differ only by their distiller.

All proxy data lives on the device as tensors. Augmentation is a fixed pool of ``views``
shifted (and optionally flipped) copies per image, rendered in batches on the device; the
teacher's outputs for each (image, view) are what ``kd_optuna.proxy.cache`` stores. One step, with
KD batch xk (B, C, H, W) at views v (B,) and t the teacher's outputs of (xk, v)::

    labelled KD batch (label_batch_size 0):   out = student(xk), labels yk (B,)
        loss = ce_weight * CE(out.logit, yk) + distiller(out, t, yk)
    separate labelled batch xl (L, ...), yl:  out = student(cat(xl, xk))
        loss = ce_weight * CE(out.logit[:L], yl) + distiller({k: out[k][L:]}, t)

In the second form the KD images count as unlabelled, so the distiller gets no labels.
The steps run on :func:`kd_optuna.train.engine.train_steps` (batches from ``_proxy_batches``,
the loss ``candidate_loss`` of ``step_inputs``), with the optimiser and schedule of
``ProxySettings.make_optimizer`` and ``ProxySettings.lr_factor``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_optuna.train import engine
from kd_optuna.train.graphs import CudaGraphs, GraphBackend, GraphedStep
from kd_optuna.data import class_balanced_subset
from kd_optuna.errors import InvalidDistiller, KdOptunaError
from kd_optuna.proxy.metrics import (
    EVAL_ACTIVATIONS,
    ScoreWeights,
    accuracy,
    adaptive_sharpness,
    calibrated_cross_entropy,
    cka_gap,
    combined_score,
    cross_entropy,
    rows_within,
)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = engine.SCHEDULES
AUGMENTS = ("none", "shift", "shift_flip")
KD_SOURCES = ("train", "labelled")
CACHE_DTYPES = ("float16", "float32")
#: The proxy's length as a fraction of the full training's epochs (``ProxySettings.from_recipe``),
#: measured on digits_hard (BENCHMARKS.md, issue 16), and its cap in steps: 2,000 steps of
#: batch 64 is about the seed's budget per candidate (Table 2: 2,000 evaluations in 21 h on one
#: RTX 3090 Ti, about 38 s each); for CIFAR's 240 epochs a third would be 80 epochs a trial.
RECIPE_EPOCHS_FRACTION = 1 / 3
RECIPE_MAX_STEPS = 2000
#: How many confirmation seeds a recipe proxy has (``ProxySettings.from_recipe``).
RECIPE_CONFIRM_SEEDS = 3


def _all_ints(values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


class InvalidProxySettings(KdOptunaError, ValueError):
    """A proxy setting out of its range or not among its options."""


@dataclass(frozen=True)
class ProxySettings:
    """Every setting of a proxy trial; the study config's ``[proxy]`` table maps onto the fields.

    Data: ``labels_per_class`` labelled train images per class (0: all) chosen with
    ``label_seed``; KD batches from ``kd_source`` ("train": the whole train split, "labelled":
    the labelled images only), at most ``kd_pool_size`` of them (0: all); validation on a
    class-balanced ``val_size`` images of the val split (0: all). Augmentation: ``views`` copies per
    image (view 0 is the image itself), shifted by up to ``shift`` pixels (``augment`` =
    "shift") and flipped left-right with probability 1/2 ("shift_flip"), drawn with
    ``view_seed``. Training: ``steps`` optimiser steps (or ``epochs`` passes over the KD pool,
    when > 0) of ``batch_size`` KD images plus ``label_batch_size`` labelled ones (0: the KD
    batch is labelled, CE is taken on it), ``optimizer`` at ``lr`` (SGD with ``momentum``,
    Nesterov when ``nesterov``) with ``schedule`` ("step": x ``gamma`` at each fraction of the
    run in ``milestones``), once per seed
    in ``seeds`` (the metrics are averaged); validation CE is reported every ``report_every``
    steps. Confirmation (the Objective, :mod:`kd_optuna.proxy.confirmation`): a trial that may
    beat the study's best runs those of ``confirm_seeds`` not in ``seeds`` too, one at a time,
    while its mean over the seeds run minus ``confirm_z`` standard errors is below the best.
    Scoring: sharpness with radius ``sharpness_rho`` on ``sharpness_size`` val images;
    score = ``score_ce`` * val_ce + ``score_sharpness`` * |sharpness_gap| + ``score_cka`` *
    cka_gap (validation CE alone by default: against the exported training on digits_hard it
    ranks random candidates as well as CE + CKA-gap, Spearman 0.71 against 0.72, and the head
    of a study far better, 0.63 against 0.22, where selecting on the sum makes the CKA gap
    anti-predict; the sharpness gap predicted nothing. Both gaps are recorded, weighing 0). Rejection: ``reject_steps`` steps on fixed batches of ``reject_batch_size``, a KD
    term over ``reject_ratio`` x CE is "exploding". ``cache_dtype``: storage of the teacher's
    feat and emb (logits are always float32). ``channels_last``: the student and its input
    batches use the channels-last memory format (about 2x faster for the digits CNN on a CPU);
    the distiller always receives contiguous tensors. ``cuda_graph``: on a CUDA device, capture
    each training step as a CUDA graph after warm-up and replay it (:mod:`kd_optuna.train.graphs`),
    for schedules whose lr is piecewise constant ("step", "constant") and distillers without
    random transforms; elsewhere, and on the CPU, the step runs eagerly as without it.
    """

    labels_per_class: int = 5
    label_seed: int = 0
    kd_source: str = "train"
    kd_pool_size: int = 0
    val_size: int = 0
    views: int = 1
    augment: str = "none"
    shift: int = 2
    view_seed: int = 0
    steps: int = 200
    epochs: float = 0.0
    max_steps: int = 0
    batch_size: int = 64
    label_batch_size: int = 50
    ce_weight: float = 1.0
    optimizer: str = "adam"
    lr: float = 1e-2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    schedule: str = "cosine"
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    seeds: tuple[int, ...] = (0,)
    confirm_seeds: tuple[int, ...] = ()
    confirm_z: float = 1.0
    report_every: int = 50
    eval_batch_size: int = 1024
    sharpness_rho: float = 0.05
    sharpness_size: int = 256
    score_ce: float = 1.0
    score_sharpness: float = 0.0
    score_cka: float = 0.0
    reject_steps: int = 2
    reject_batch_size: int = 32
    reject_ratio: float = 1000.0
    cache_dtype: str = "float16"
    channels_last: bool = True
    cuda_graph: bool = False

    def __post_init__(self) -> None:
        for name in ("seeds", "confirm_seeds", "milestones"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, options in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("augment", AUGMENTS),
            ("kd_source", KD_SOURCES),
            ("cache_dtype", CACHE_DTYPES),
        ):
            if getattr(self, name) not in options:
                raise InvalidProxySettings(
                    f"proxy {name} = {getattr(self, name)!r}; choose one of: {', '.join(options)}"
                )
        positive = ("views", "steps", "batch_size", "report_every",
                    "eval_batch_size", "sharpness_size", "reject_batch_size")
        non_negative = ("labels_per_class", "kd_pool_size", "val_size", "shift", "reject_steps",
                        "label_batch_size", "max_steps")
        for name in positive + non_negative:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (name in positive):
                low = 1 if name in positive else 0
                raise InvalidProxySettings(f"proxy {name} must be an integer >= {low}, got {value!r}")
        for name in ("lr", "reject_ratio"):
            if not getattr(self, name) > 0:
                raise InvalidProxySettings(f"proxy {name} must be > 0, got {getattr(self, name)!r}")
        if self.label_batch_size == 0 and (self.labels_per_class != 0 or self.kd_source != "train"):
            raise InvalidProxySettings(
                "proxy label_batch_size = 0 (CE on the KD batch) needs every KD image labelled: "
                "set labels_per_class = 0 and kd_source = \"train\", or give label_batch_size > 0"
            )
        if not all(isinstance(m, (int, float)) and 0 < m < 1 for m in self.milestones):
            raise InvalidProxySettings(
                f"proxy milestones are fractions of the run in (0, 1), got {list(self.milestones)!r}"
            )
        for name in ("ce_weight", "momentum", "weight_decay", "sharpness_rho", "epochs", "gamma",
                     "score_ce", "score_sharpness", "score_cka"):
            if not getattr(self, name) >= 0:
                raise InvalidProxySettings(f"proxy {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.seeds or not _all_ints(self.seeds):
            raise InvalidProxySettings(f"proxy seeds must be a non-empty list of integers, got {self.seeds!r}")
        if not _all_ints(self.confirm_seeds):
            raise InvalidProxySettings(
                f"proxy confirm_seeds must be a list of integers ([] turns confirmation off), got {self.confirm_seeds!r}"
            )
        for name in ("seeds", "confirm_seeds"):  # a seed run twice scores the same twice: no evidence, half the spread
            seeds = getattr(self, name)
            if len(set(seeds)) != len(seeds):
                raise InvalidProxySettings(f"proxy {name} must be distinct seeds, got {list(seeds)!r}; remove the repeats")
        if not (isinstance(self.confirm_z, (int, float)) and not isinstance(self.confirm_z, bool) and self.confirm_z >= 0):
            raise InvalidProxySettings(f"proxy confirm_z must be a number >= 0, got {self.confirm_z!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, table: Mapping[str, object]) -> "ProxySettings":
        """Build from a config table; an unknown key raises, listing the fields."""
        unknown = sorted(set(table) - set(cls.field_names()))
        if unknown:
            raise InvalidProxySettings(
                f"unknown proxy settings {unknown}; the settings are: {', '.join(cls.field_names())}"
            )
        return cls(**table)

    @classmethod
    def from_recipe(cls, train: Any, table: Mapping[str, object] = {}, epochs_fraction: float = RECIPE_EPOCHS_FRACTION) -> "ProxySettings":
        """The study's full-training recipe shrunk, with the config's ``[proxy]`` ``table`` on top.

        ``train`` is a resolved TrainConfig (SGD at ``lr`` with ``momentum`` and
        ``weight_decay``, ``batch_size``, lr x ``gamma`` at epoch ``milestones`` of ``epochs``).
        The proxy keeps the optimiser, learning rate, loss scale, batch size and labels (every
        train image labelled, CE on the KD batch, the distiller given the labels) and trains
        ``epochs_fraction`` x ``epochs`` epochs (at most ``RECIPE_MAX_STEPS`` steps), the
        milestones at the same fractions of the run, and confirms a trial that may beat the
        study's best on the ``RECIPE_CONFIRM_SEEDS`` seeds after the highest of ``seeds``.
        Any key of ``table`` overrides the recipe's value; a table that sets ``steps`` (and not
        ``epochs``) trains that many steps, and one that sets ``labels_per_class`` or
        ``kd_source`` keeps the separate labelled batch of ``label_batch_size``.
        """
        recipe: dict[str, object] = {
            "optimizer": "sgd", "lr": float(train.lr), "momentum": float(train.momentum), "nesterov": False,
            "weight_decay": float(train.weight_decay), "batch_size": int(train.batch_size),
            "labels_per_class": 0, "label_batch_size": 0, "kd_source": "train",
            "epochs": float(train.epochs) * epochs_fraction, "max_steps": RECIPE_MAX_STEPS, "schedule": "step",
            "milestones": tuple(m / train.epochs for m in train.milestones if 0 < m < train.epochs),
            "gamma": float(train.gamma),
        }
        if "steps" in table and "epochs" not in table:
            recipe["epochs"] = 0.0
        if "labels_per_class" in table or "kd_source" in table:
            for name in ("labels_per_class", "label_batch_size", "kd_source"):
                recipe.pop(name)
        settings = cls.from_mapping({**recipe, **dict(table)})
        if "confirm_seeds" in table:
            return settings
        last = max(settings.seeds)
        return dataclasses.replace(settings, confirm_seeds=tuple(range(last + 1, last + 1 + RECIPE_CONFIRM_SEEDS)))

    @property
    def labelled_kd(self) -> bool:
        """True when the KD batch is the labelled batch (``label_batch_size`` 0): CE and the
        distiller see the same images, and the distiller gets their labels, as in full training."""
        return self.label_batch_size == 0

    def for_pool(self, pool_size: int) -> "ProxySettings":
        """These settings with ``epochs`` (passes over a KD pool of ``pool_size``) turned into
        ``steps = min(ceil(epochs * pool_size / batch_size), max_steps or inf)``; unchanged when
        ``epochs`` is 0."""
        if not self.epochs:
            return self
        steps = max(1, math.ceil(self.epochs * pool_size / self.batch_size))
        if self.max_steps:
            steps = min(steps, self.max_steps)
        return dataclasses.replace(self, epochs=0.0, steps=steps, report_every=min(self.report_every, steps))

    @property
    def score_weights(self) -> ScoreWeights:
        return ScoreWeights(self.score_ce, self.score_sharpness, self.score_cka)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The proxy's optimiser over ``params``: SGD is Nesterov when ``nesterov`` and momentum > 0."""
        return engine.make_optimizer(self.optimizer, params, lr=self.lr, momentum=self.momentum,
                                     weight_decay=self.weight_decay, nesterov=self.nesterov and self.momentum > 0)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at ``step``: 0.5 * (1 + cos(pi * step / steps)) for cosine,
        gamma ** #{m in milestones : m * steps <= step} for step, else 1."""
        milestones = [m * self.steps for m in self.milestones]
        return engine.lr_factor(self.schedule, step, self.steps, 1, milestones, self.gamma)

    def data_key(self) -> dict[str, object]:
        """The settings that decide the proxy data and views (what the teacher cache depends on)."""
        names = ("labels_per_class", "label_seed", "kd_source", "kd_pool_size", "views",
                 "augment", "shift", "view_seed")
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True)
class ViewPool:
    """``views`` fixed augmented copies of each of ``n`` images: crop offsets and flips.

    offsets (n, views, 2) in [0, 2 * shift], flips (n, views) bool, ``flipping`` whether any
    flip is set; view 0 is the identity.
    ``render(images (B, C, H, W), rows (B,), views (B,))`` pads by ``shift`` with zeros and
    crops each image at its offset, on the images' device, in one gather.
    """

    offsets: Tensor
    flips: Tensor
    shift: int
    flipping: bool = False

    @classmethod
    def build(cls, n: int, settings: ProxySettings, device: torch.device | str = "cpu") -> "ViewPool":
        generator = torch.Generator().manual_seed(settings.view_seed)
        shift = settings.shift if settings.augment != "none" else 0
        offsets = torch.randint(0, 2 * shift + 1, (n, settings.views, 2), generator=generator)
        flips = torch.rand(n, settings.views, generator=generator) < 0.5
        if settings.augment != "shift_flip":
            flips[:] = False
        offsets[:, 0] = shift
        flips[:, 0] = False
        return cls(offsets.to(device), flips.to(device), shift, bool(flips.any()))

    @property
    def views(self) -> int:
        return self.offsets.shape[1]

    def render(self, images: Tensor, rows: Tensor, views: Tensor) -> Tensor:
        if self.shift == 0 and not self.flipping:
            return images
        b, _, h, w = images.shape
        offsets = self.offsets[rows, views]
        s = self.shift
        padded = F.pad(images, (s, s, s, s))
        ys = offsets[:, 0, None] + torch.arange(h, device=images.device)
        xs = offsets[:, 1, None] + torch.arange(w, device=images.device)
        xs = torch.where(self.flips[rows, views][:, None], xs.flip(1), xs)
        batch = torch.arange(b, device=images.device)[:, None, None]
        return padded[batch, :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2).contiguous()

    def fingerprint(self) -> bytes:
        return self.offsets.cpu().numpy().tobytes() + self.flips.cpu().numpy().tobytes()


@dataclass
class ProxyData:
    """Proxy tensors on one device.

    train_x (N, C, H, W), train_y (N,); labelled (L,) and pool (P,) index train; val_x (M, ...),
    val_y (M,) is held out (training never sees it); views covers the P pool images.

    train_x is float32 and normalised, or, with ``pixel_stats`` (per-channel mean and std), the
    uint8 pixels of an 8-bit dataset (a quarter of the memory: 147 KiB instead of 588 KiB an
    image at 224 px), normalised batch by batch in :meth:`train_images` with the arithmetic of
    torchvision's ToTensor and Normalize (the same float32 values bit for bit). Read train
    images through :meth:`train_images` or :meth:`pool_images`; val_x is always float32.
    """

    train_x: Tensor
    train_y: Tensor
    labelled: Tensor
    pool: Tensor
    val_x: Tensor
    val_y: Tensor
    views: ViewPool
    num_classes: int
    pixel_stats: tuple[Tensor, Tensor] | None = None

    @classmethod
    def build(
        cls,
        train_x: Tensor,
        train_y: Tensor,
        val_x: Tensor,
        val_y: Tensor,
        settings: ProxySettings,
        device: torch.device | str = "cpu",
        num_classes: int | None = None,
        pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> "ProxyData":
        """``train_x`` float images, or uint8 pixels (N, C, H, W) with ``pixel_stats`` =
        (mean, std) per channel, as torchvision's Normalize takes them."""
        if (train_x.dtype == torch.uint8) != (pixel_stats is not None):
            raise KdOptunaError("ProxyData.build takes uint8 train pixels together with pixel_stats (mean, std), "
                                "float images without")
        stats = None
        if pixel_stats is not None:
            stats = tuple(torch.as_tensor(v, dtype=torch.float32).view(1, -1, 1, 1).to(device) for v in pixel_stats)
        labelled = class_balanced_subset(train_y, settings.labels_per_class, seed=settings.label_seed, at_most=True)
        pool = torch.arange(train_y.shape[0]) if settings.kd_source == "train" else labelled
        if settings.kd_pool_size:
            pool = pool[: settings.kd_pool_size]
        classes = num_classes or int(max(train_y.max(), val_y.max())) + 1
        if settings.val_size and settings.val_size < val_y.shape[0]:
            keep = class_balanced_subset(val_y, max(1, settings.val_size // classes), seed=0, at_most=True)
            val_x, val_y = val_x[keep[: settings.val_size]], val_y[keep[: settings.val_size]]
        return cls(
            (train_x if stats is not None else train_x.float()).to(device), train_y.long().to(device),
            labelled.to(device), pool.to(device), val_x.float().to(device), val_y.long().to(device),
            ViewPool.build(pool.shape[0], settings, device), classes, stats,
        )

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def train_images(self, rows: Tensor) -> Tensor:
        """Normalised float32 train images at ``rows`` (B,) -> (B, C, H, W)."""
        x = self.train_x[rows]
        if self.pixel_stats is None:
            return x
        mean, std = self.pixel_stats
        return x.float().div_(255).sub_(mean).div_(std)

    def pool_images(self, positions: Tensor, views: Tensor) -> Tensor:
        """Rendered pool images at pool positions (B,) and views (B,) -> (B, C, H, W)."""
        return self.views.render(self.train_images(self.pool[positions]), positions, views)


TeacherLookup = Callable[[Tensor, Tensor], Mapping[str, Tensor]]
"""(pool positions (B,), views (B,)) -> teacher outputs {feat, emb, logit} as float32."""


def live_teacher(teacher: nn.Module, data: ProxyData) -> TeacherLookup:
    """A lookup that runs the frozen teacher (eval mode) on the rendered views every time."""

    @torch.no_grad()
    def lookup(positions: Tensor, views: Tensor) -> Mapping[str, Tensor]:
        teacher.eval()
        return {k: v.float().contiguous() for k, v in teacher(data.pool_images(positions, views)).items()}

    return lookup


class NoDistillation(nn.Module):
    """The reference without KD: a distiller whose term is always 0 (the student learns by CE)."""

    graph_safe = True

    def forward(self, student, teacher, labels=None) -> Tensor:
        return student["logit"].new_zeros(())


@dataclass
class ProxyResult:
    """Metrics of one proxy trial, averaged over seeds; ``curve`` = [(step, val_ce)];
    ``step_mode`` how its steps ran (:func:`train_student`'s ``step_mode``, the last seed's);
    ``seeds`` the seeds it ran and ``seed_metrics`` each one's metrics, in that order."""

    val_ce: float
    val_ce_raw: float
    val_acc: float
    sharpness_gap: float
    cka_gap: float
    score: float
    train_seconds: float
    score_seconds: float
    curve: list[tuple[int, float]]
    step_mode: str = "eager"
    seeds: tuple[int, ...] = ()
    seed_metrics: tuple[Mapping[str, float], ...] = ()

    def metrics(self) -> dict[str, float]:
        return {
            "val_ce": self.val_ce, "val_ce_raw": self.val_ce_raw, "val_acc": self.val_acc,
            "sharpness_gap": self.sharpness_gap, "cka_gap": self.cka_gap,
        }

    def seed_scores(self, weights: ScoreWeights) -> list[float]:
        """The combined score of each seed on its own, in ``seeds`` order."""
        return [combined_score(m, weights) for m in self.seed_metrics]

    @classmethod
    def of_seeds(
        cls,
        seeds: Sequence[int],
        seed_metrics: Sequence[Mapping[str, float]],
        weights: ScoreWeights,
        train_seconds: float,
        score_seconds: float,
        curve: list[tuple[int, float]],
        step_mode: str,
    ) -> "ProxyResult":
        """The result over ``seeds``: each metric the mean of the seeds', the score
        ``combined_score`` of those means."""
        mean = {k: sum(m[k] for m in seed_metrics) / len(seed_metrics) for k in seed_metrics[0]}
        return cls(
            val_ce=mean["val_ce"], val_ce_raw=mean["val_ce_raw"], val_acc=mean["val_acc"],
            sharpness_gap=mean["sharpness_gap"], cka_gap=mean["cka_gap"],
            score=combined_score(mean, weights), train_seconds=train_seconds,
            score_seconds=score_seconds, curve=list(curve), step_mode=step_mode,
            seeds=tuple(seeds), seed_metrics=tuple(dict(m) for m in seed_metrics),
        )

    def joined(self, more: "ProxyResult", weights: ScoreWeights, steps: int) -> "ProxyResult":
        """This result and ``more`` (further seeds of the same trial) as one: metrics over all
        their seeds, seconds summed, ``more``'s curve after this one's (``steps`` a seed)."""
        offset = len(self.seeds) * steps
        return ProxyResult.of_seeds(
            self.seeds + more.seeds, self.seed_metrics + more.seed_metrics, weights,
            self.train_seconds + more.train_seconds, self.score_seconds + more.score_seconds,
            self.curve + [(offset + step, value) for step, value in more.curve], more.step_mode,
        )


def memory_format(settings: ProxySettings) -> torch.memory_format:
    return torch.channels_last if settings.channels_last else torch.contiguous_format


#: Eval-mode BatchNorm normalises by running statistics, an exponential average (momentum m)
#: that starts at mean 0 and variance 1: after S training batches the start still weighs
#: (1 - m) ** S. Above this weight the statistics are stale (m = 0.1: fewer than 44 steps;
#: torchvision's MobileNetV3 and EfficientNets use m = 0.01: fewer than 459) and
#: :func:`fresh_batch_norm` recomputes them before the student is scored.
BN_STALE_WEIGHT = 0.01
#: At most this many KD-pool images (a seeded sample, un-augmented) recompute them.
BN_REFRESH_IMAGES = 1024


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


def stale_batch_norm(model: nn.Module) -> bool:
    """Whether a BatchNorm layer of ``model`` still holds more than BN_STALE_WEIGHT of its
    initial running statistics (from ``num_batches_tracked`` and its momentum; a cumulative
    average, momentum None, is stale only before its first batch)."""
    for layer in _batch_norms(model):
        tracked = int(layer.num_batches_tracked)
        remaining = float(tracked == 0) if layer.momentum is None else (1.0 - layer.momentum) ** tracked
        if remaining > BN_STALE_WEIGHT:
            return True
    return False


@contextlib.contextmanager
def fresh_batch_norm(model: nn.Module, data: "ProxyData", settings: ProxySettings):
    """Inside, ``model`` is in eval mode with BatchNorm statistics that describe its current
    weights; yields whether they were recomputed. Short proxies leave them stale
    (:func:`stale_batch_norm`): the eval-mode student then computes with mean 0 / variance 1
    where its layers have other statistics, and scores at chance or with logits of 1e6 and more
    while it classifies well in train mode. Stale statistics are recomputed as a cumulative
    average over batches of ``settings.batch_size`` from at most BN_REFRESH_IMAGES pool images
    (a sample seeded with 0, view 0), only the BatchNorm layers in train mode (no dropout, no
    random draw), without gradients. On exit the model's statistics, momentum and mode are
    restored, so training goes on exactly as without it. Statistics that are not stale are
    used as they are."""
    was_training = model.training
    layers = _batch_norms(model)
    if not stale_batch_norm(model) or data.pool.shape[0] < 2:
        model.eval()
        try:
            yield False
        finally:
            model.train(was_training)
        return
    saved = [(layer.momentum, layer.running_mean.clone(), layer.running_var.clone(),
              layer.num_batches_tracked.clone()) for layer in layers]
    try:
        model.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None
            layer.train()
        n_pool = data.pool.shape[0]
        sample = torch.randperm(n_pool, generator=torch.Generator().manual_seed(0))[:BN_REFRESH_IMAGES]
        sample = sample.to(data.device)
        chunks = math.ceil(sample.shape[0] / settings.batch_size)
        fmt = memory_format(settings)
        with torch.no_grad():
            for part in torch.tensor_split(sample, chunks):
                model(data.train_images(data.pool[part]).contiguous(memory_format=fmt))
        model.eval()
        yield True
    finally:
        for layer, (momentum, mean, var, tracked) in zip(layers, saved):
            layer.momentum = momentum
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            layer.num_batches_tracked.copy_(tracked)
        model.train(was_training)


def predict(model: nn.Module, images: Tensor, batch_size: int) -> dict[str, Tensor]:
    """Eval-mode {emb (M, D), logit (M, K)} of ``model`` over ``images`` (M, ...), float32, in
    batches of ``batch_size`` (``eval_batch_size``), fewer where the images are large
    (:func:`~kd_optuna.proxy.metrics.rows_within`: 1,024 images at 224 px held 6.4 GiB)."""
    batch_size = max(1, min(batch_size, rows_within(images, EVAL_ACTIVATIONS)))
    slices = ((images[start : start + batch_size], None) for start in range(0, images.shape[0], batch_size))
    parts: dict[str, list[Tensor]] = {"emb": [], "logit": []}
    for out, _ in engine.eval_outputs(model, slices, device_type=images.device.type):
        for k in parts:
            parts[k].append(out[k].float())
    return {k: torch.cat(v) for k, v in parts.items()}


def train_student(
    student: nn.Module,
    distiller: nn.Module,
    data: ProxyData,
    teacher: TeacherLookup,
    settings: ProxySettings,
    seed: int,
    report: Callable[[int, float], None] | None = None,
    graphs: Callable[[torch.device], GraphBackend] | None = None,
) -> str:
    """Train ``student`` (and the distiller's adapter) for ``settings.steps`` steps in place;
    returns how the steps ran: "eager", or "cuda graph: C captures, R replays, E eager" (with
    the reason when a capture failed and the rest ran eagerly).

    Batches are drawn with a generator seeded by ``seed``. Every ``report_every`` steps and at
    the end, ``report(step, calibrated val CE)`` is called. A non-finite loss raises
    ``InvalidDistiller("non-finite loss during training")``, checked at each report.
    ``graphs(device)``: the graph backend when :func:`graphable` (default
    :class:`~kd_optuna.train.graphs.CudaGraphs`; tests pass one that runs on the CPU).
    """
    optimizer = settings.make_optimizer(list(student.parameters()) + list(distiller.parameters()))
    student.to(memory_format=memory_format(settings))
    student.train()
    distiller.train()
    bad = torch.zeros((), dtype=torch.bool, device=data.device)

    def check(step: int, loss: Tensor) -> None:
        bad.logical_or_(~torch.isfinite(loss.detach()))

    def after_step(done: int, loss: Tensor, batch) -> None:
        if done % settings.report_every == 0 or done == settings.steps:
            if bool(bad):
                raise InvalidDistiller("non-finite loss during training")
            if report is not None:
                with fresh_batch_norm(student, data, settings):
                    logits = predict(student, data.val_x, settings.eval_batch_size)["logit"]
                report(done, calibrated_cross_entropy(logits, data.val_y))

    hooks = engine.Hooks(after_loss=check, after_step=after_step)
    step_loss = _ProxyLoss(student, distiller, teacher, data, settings)
    run_step = None
    if graphable(settings, distiller, data.device, graphs is not None):
        run_step = GraphedStep(optimizer, step_loss, hooks, (graphs or CudaGraphs)(data.device))
    engine.train_steps(optimizer, _proxy_batches(data, settings, seed), step_loss,
                       lr=settings.lr, lr_at=settings.lr_factor, hooks=hooks, run_step=run_step)
    if run_step is None:
        return "eager"
    mode = f"cuda graph: {run_step.captures} captures, {run_step.replays} replays, {run_step.eager_steps} eager"
    return mode if run_step.fallback is None else f"{mode} ({run_step.fallback})"


def graphable(settings: ProxySettings, distiller: nn.Module, device: torch.device, any_device: bool = False) -> bool:
    """Whether the proxy step may be replayed from a graph: ``cuda_graph`` set, the device CUDA
    (any device when ``any_device``), the lr piecewise constant (schedule "step" or "constant":
    a graph is captured once per lr) and the distiller ``graph_safe`` (no Python-side randomness
    or state that a replay would freeze)."""
    return (settings.cuda_graph and (any_device or device.type == "cuda")
            and settings.schedule in ("step", "constant") and bool(getattr(distiller, "graph_safe", False)))


def _proxy_batches(data: ProxyData, settings: ProxySettings, seed: int):
    """``settings.steps`` batches (pool positions (B,), views (B,), labelled rows (L,) or None),
    drawn in this order from one generator seeded with ``seed`` on the data's device."""
    device = data.device
    generator = torch.Generator(device=device).manual_seed(seed)
    n_labelled, n_pool = data.labelled.shape[0], data.pool.shape[0]
    label_batch = min(settings.label_batch_size, n_labelled)
    for _ in range(settings.steps):
        positions = torch.randint(0, n_pool, (settings.batch_size,), generator=generator, device=device)
        views = torch.randint(0, data.views.views, (settings.batch_size,), generator=generator, device=device)
        rows = None
        if not settings.labelled_kd:
            if label_batch < n_labelled:
                rows = data.labelled[torch.randperm(n_labelled, generator=generator, device=device)[:label_batch]]
            else:
                rows = data.labelled
        yield positions, views, rows


class StepInputs(NamedTuple):
    """One proxy batch as the student sees it (the module docstring's two forms).

    ``images`` (L + B, C, H, W): the labelled rows, then the KD batch (L = 0 in the labelled
    form); ``labels`` (L,) or (B,): the cross-entropy targets; ``ce_rows``/``kd_rows``: the
    slices of the student's outputs that the CE and the distiller see; ``kd_labels``: the
    distiller's extra arguments, ``(labels,)`` when the KD batch is labelled, else ``()``.
    """

    images: Tensor
    labels: Tensor
    ce_rows: slice
    kd_rows: slice
    kd_labels: tuple[Tensor, ...]


def step_inputs(data: ProxyData, batch) -> StepInputs:
    """The :class:`StepInputs` of one batch of :func:`_proxy_batches`."""
    positions, views, rows = batch
    if rows is None:
        labels = data.train_y[data.pool[positions]]
        return StepInputs(data.pool_images(positions, views), labels, slice(None), slice(None), (labels,))
    n = rows.shape[0]
    images = torch.cat([data.train_images(rows), data.pool_images(positions, views)])
    return StepInputs(images, data.train_y[rows], slice(None, n), slice(n, None), ())


def candidate_loss(out: Mapping[str, Tensor], distiller, teacher: Mapping[str, Tensor], inputs: StepInputs,
                   ce_weight: float) -> Tensor:
    """``ce_weight * CE(out.logit[ce_rows], labels) + distiller(out[kd_rows], teacher, *kd_labels)``:
    one candidate's step loss from its student's outputs ``out`` on ``inputs.images``."""
    ce = F.cross_entropy(out["logit"][inputs.ce_rows], inputs.labels)
    kd = distiller({k: v[inputs.kd_rows].contiguous() for k, v in out.items()}, teacher, *inputs.kd_labels)
    return ce_weight * ce + kd


class _ProxyLoss:
    """One proxy step's loss (:func:`candidate_loss`) on a batch of :func:`_proxy_batches`."""

    def __init__(self, student, distiller, teacher: TeacherLookup, data: ProxyData, settings: ProxySettings):
        self.student, self.distiller, self.teacher, self.data, self.settings = student, distiller, teacher, data, settings
        self.fmt = memory_format(settings)

    def __call__(self, batch) -> Tensor:
        positions, views, _ = batch
        inputs = step_inputs(self.data, batch)
        out = self.student(inputs.images.contiguous(memory_format=self.fmt))
        return candidate_loss(out, self.distiller, self.teacher(positions, views), inputs, self.settings.ce_weight)


@dataclass(frozen=True)
class TeacherReference:
    """Study-level teacher values on the held-out split: val emb (M, D) and sharpness."""

    val_emb: Tensor
    val_logit: Tensor
    sharpness: float

    @classmethod
    def compute(cls, teacher: nn.Module, data: ProxyData, settings: ProxySettings) -> "TeacherReference":
        out = predict(teacher, data.val_x, settings.eval_batch_size)
        n = settings.sharpness_size
        sharp = adaptive_sharpness(teacher, data.val_x[:n], data.val_y[:n], settings.sharpness_rho)
        return cls(out["emb"], out["logit"], sharp)


def evaluate_student(
    student: nn.Module,
    data: ProxyData,
    reference: TeacherReference,
    settings: ProxySettings,
    images: Tensor | None = None,
    labels: Tensor | None = None,
) -> dict[str, float]:
    """val_ce (calibrated), val_ce_raw, val_acc, sharpness_gap, cka_gap on held-out images.

    ``images``/``labels`` default to the val split; the CKA and sharpness terms always use the
    val split, where the teacher reference was computed. BatchNorm statistics that a short
    proxy left stale are recomputed first (:func:`fresh_batch_norm`); the student is left as
    it was.
    """
    x = data.val_x if images is None else images
    y = data.val_y if labels is None else labels
    n = settings.sharpness_size
    with fresh_batch_norm(student, data, settings):
        out = predict(student, x, settings.eval_batch_size)
        val_out = out if images is None else predict(student, data.val_x, settings.eval_batch_size)
        sharp = adaptive_sharpness(student, data.val_x[:n], data.val_y[:n], settings.sharpness_rho)
    return {
        "val_ce": calibrated_cross_entropy(out["logit"], y),
        "val_ce_raw": cross_entropy(out["logit"], y),
        "val_acc": accuracy(out["logit"], y),
        "sharpness_gap": sharp - reference.sharpness,
        "cka_gap": cka_gap(val_out["emb"], reference.val_emb),
    }


def run_proxy(
    new_student: Callable[[], nn.Module],
    new_distiller: Callable[[], nn.Module],
    data: ProxyData,
    teacher: TeacherLookup,
    reference: TeacherReference,
    settings: ProxySettings,
    report: Callable[[int, float], None] | None = None,
    test: tuple[Tensor, Tensor] | None = None,
    graphs: Callable[[torch.device], GraphBackend] | None = None,
) -> ProxyResult:
    """One proxy trial: for each seed, seed torch, build a student and a distiller, train, score.

    ``report(global_step, val_ce)`` gets steps counted across seeds (seed i's step s is
    ``i * steps + s``). ``test`` = (images, labels) scores CE/accuracy there instead of val.
    ``graphs``: as in :func:`train_student`.
    """
    per_seed, curve = [], []
    train_seconds = score_seconds = 0.0
    step_mode = "eager"
    for i, seed in enumerate(settings.seeds):
        torch.manual_seed(seed)
        student = new_student()
        distiller = new_distiller()

        def record(step: int, value: float, offset: int = i * settings.steps) -> None:
            curve.append((offset + step, value))
            if report is not None:
                report(offset + step, value)

        start = time.perf_counter()
        step_mode = train_student(student, distiller, data, teacher, settings, seed, record, graphs)
        middle = time.perf_counter()
        images, labels = test if test is not None else (None, None)
        per_seed.append(evaluate_student(student, data, reference, settings, images, labels))
        train_seconds += middle - start
        score_seconds += time.perf_counter() - middle
    return ProxyResult.of_seeds(settings.seeds, per_seed, settings.score_weights,
                                train_seconds, score_seconds, curve, step_mode)
