"""The settings of a proxy trial (:class:`ProxySettings`, the study config's ``[proxy]`` table)
and the recipe they are derived from by default (:meth:`ProxySettings.from_recipe`: the study's
full training shrunk, DESIGN.md "Scoring")."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kd_optuna.errors import KdOptunaError
from kd_optuna.proxy.score import ScoreWeights
from kd_optuna.train.schedule import SCHEDULES, lr_factor

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
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
        from kd_optuna.train import engine

        return engine.make_optimizer(self.optimizer, params, lr=self.lr, momentum=self.momentum,
                                     weight_decay=self.weight_decay, nesterov=self.nesterov and self.momentum > 0)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at ``step``: 0.5 * (1 + cos(pi * step / steps)) for cosine,
        gamma ** #{m in milestones : m * steps <= step} for step, else 1."""
        milestones = [m * self.steps for m in self.milestones]
        return lr_factor(self.schedule, step, self.steps, 1, milestones, self.gamma)

    def data_key(self) -> dict[str, object]:
        """The settings that decide the proxy data and views (what the teacher cache depends on)."""
        names = ("labels_per_class", "label_seed", "kd_source", "kd_pool_size", "views",
                 "augment", "shift", "view_seed")
        return {name: getattr(self, name) for name in names}
