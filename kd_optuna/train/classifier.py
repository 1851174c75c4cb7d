"""Teacher training on the engine (:mod:`kd_optuna.train.engine`): ``train_classifier``.

``train_classifier(model, train_data, epochs=...)`` minimises, per batch,
``step_loss(model, x, y)`` (default: cross-entropy of ``model(x)`` (N, K) against y (N,)) with SGD
or Adam, a per-step learning-rate schedule (cosine from ``lr`` to 0, step decay by ``gamma`` at
epoch ``milestones``, or constant; optional linear warm-up), on ``device`` (CUDA when present,
else CPU). ``train_data`` is either a pair of tensors (x (N, ...), y (N,)), moved once to the
device, shuffled each epoch by a seeded generator and passed through ``augment(x, generator)``,
or any iterable of (x, y) batches such as a DataLoader. A GPU user can switch on bf16 autocast
and channels_last memory format.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from kd_optuna.data import lone_last_batch
from kd_optuna.train.engine import Hooks, batches, default_device, evaluate, make_optimizer, torch_threads, train_epochs
from kd_optuna.train.schedule import lr_factor
from kd_optuna.errors import KdOptunaError

__all__ = ["TrainResult", "default_device", "train_classifier"]  # default_device: task.py, benchmarks

TensorPair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainResult:
    """Per-epoch history ({epoch, loss, lr, seconds[, val_accuracy, val_loss]}) and total time."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def _prepare(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


@dataclass(frozen=True)
class ClassifierRecipe:
    """The settings of :func:`train_classifier` that shape one run (see its docstring)."""

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    milestones: tuple[int, ...]
    gamma: float
    warmup_epochs: int
    bf16: bool
    channels_last: bool
    seed: int


def train_classifier(
    model: nn.Module,
    train_data: TensorPair | Iterable[TensorPair],
    *,
    epochs: int,
    batch_size: int = 128,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    milestones: tuple[int, ...] = (),
    gamma: float = 0.1,
    warmup_epochs: int = 0,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    step_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    extra_params: Iterable[nn.Parameter] = (),
    val_data: TensorPair | Iterable[TensorPair] | None = None,
    device: str | torch.device | None = None,
    bf16: bool = False,
    channels_last: bool = False,
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` epochs and return the per-epoch history.

    ``extra_params`` are trained with the model (a distiller's adapters, for example) and used by
    ``step_loss``. With ``val_data`` (tensors or batches) each epoch ends with an evaluation.
    ``num_threads`` sets torch's CPU threads while training (restored after): on a shared CPU
    small models train several times faster with 1 thread than with an oversubscribed pool.
    SGD is Nesterov whenever ``momentum`` > 0.
    """
    recipe = ClassifierRecipe(epochs, batch_size, optimizer, lr, momentum, weight_decay, schedule, tuple(milestones),
                              gamma, warmup_epochs, bf16, channels_last, seed)
    with torch_threads(num_threads):
        return _train(model, train_data, recipe, augment=augment, step_loss=step_loss or _cross_entropy,
                      extra_params=extra_params, val_data=val_data, device=default_device(device),
                      progress=progress, desc=desc)


def _train(model, train_data, recipe: ClassifierRecipe, *, augment, step_loss, extra_params, val_data, device,
           progress, desc) -> TrainResult:
    r = recipe
    if r.epochs < 1 or r.batch_size < 1:
        raise KdOptunaError(f"epochs and batch_size must be positive, got {r.epochs} and {r.batch_size}")
    torch.manual_seed(r.seed)
    generator = torch.Generator().manual_seed(r.seed)
    model.to(device)
    if r.channels_last:
        model.to(memory_format=torch.channels_last)
    if isinstance(train_data, tuple):
        train_data = (train_data[0].to(device), train_data[1].to(device))
        steps_per_epoch = math.ceil(len(train_data[1]) / r.batch_size) - lone_last_batch(len(train_data[1]), r.batch_size)
        aug_generator = torch.Generator(device=device).manual_seed(r.seed)
    else:
        steps_per_epoch = len(train_data)  # type: ignore[arg-type]
        aug_generator = None
    if steps_per_epoch == 0:
        raise KdOptunaError("train_classifier got an empty training set")
    params = list(model.parameters()) + list(extra_params)
    opt = make_optimizer(r.optimizer, params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                         nesterov=r.momentum > 0)
    total_steps = r.epochs * steps_per_epoch

    def epoch_batches(epoch: int):
        for x, y in batches(train_data, r.batch_size, device, generator):
            yield (augment(x, aug_generator) if augment is not None else x), y

    def loss_of(batch) -> torch.Tensor:
        x, y = batch
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=r.bf16):
            return step_loss(model, _prepare(x, r.channels_last), y)

    def lr_at(step: int) -> float:
        return lr_factor(r.schedule, step, total_steps, steps_per_epoch, r.milestones, r.gamma,
                         r.warmup_epochs * steps_per_epoch)

    log = _EpochLog(model, opt, val_data, device, r.bf16, _progress(r.epochs, desc, progress))
    train_epochs(opt, epoch_batches, loss_of, epochs=r.epochs, lr=r.lr, lr_at=lr_at, hooks=log.hooks())
    log.bar.close()
    log.result.seconds = time.perf_counter() - log.start
    return log.result


class _EpochLog:
    """The hooks of :func:`train_classifier`: finite-loss check, running loss, epoch records."""

    def __init__(self, model, optimizer, val_data, device, bf16, bar):
        self.model, self.optimizer, self.val_data, self.device, self.bf16, self.bar = (
            model, optimizer, val_data, device, bf16, bar)
        self.result = TrainResult()
        self.start = time.perf_counter()
        self.epoch, self.running, self.seen = 0, 0.0, 0

    def hooks(self) -> Hooks:
        return Hooks(epoch_start=self.epoch_start, after_loss=self.check, after_step=self.add, epoch_end=self.record)

    def epoch_start(self, epoch: int) -> None:
        self.model.train()
        self.epoch, self.running, self.seen = epoch, 0.0, 0

    def check(self, step: int, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise KdOptunaError(f"training loss became {loss.item()} at epoch {self.epoch + 1}: lower the learning rate")

    def add(self, step: int, loss: torch.Tensor, batch) -> None:
        self.running += loss.item() * len(batch[1])
        self.seen += len(batch[1])

    def record(self, epoch: int) -> None:
        record = {"epoch": epoch + 1, "loss": self.running / max(1, self.seen), "lr": self.optimizer.param_groups[0]["lr"]}
        if self.val_data is not None:
            vx, vy = self.val_data if isinstance(self.val_data, tuple) else (self.val_data, None)
            ev = evaluate(self.model, vx, vy, device=self.device, bf16=self.bf16)
            record.update(val_accuracy=ev.accuracy, val_loss=ev.loss)
        record["seconds"] = time.perf_counter() - self.start
        self.result.history.append(record)
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "val_accuracy")})


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", disable=not enabled, leave=False)
