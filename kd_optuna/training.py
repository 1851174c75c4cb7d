"""The one training loop (teacher training, full training) and evaluation.

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

from .errors import KdOptunaError

TensorPair = tuple[torch.Tensor, torch.Tensor]
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adam", "adamw")


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else the first CUDA GPU when present, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Evaluation:
    """Top-1 accuracy in [0, 1], mean cross-entropy and the number of examples."""

    accuracy: float
    loss: float
    count: int


@dataclass
class TrainResult:
    """Per-epoch history ({epoch, loss, lr, seconds[, val_accuracy, val_loss]}) and total time."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def _batches(data, batch_size: int, device: torch.device, shuffle: bool, generator: torch.Generator | None):
    if isinstance(data, tuple):
        x, y = data
        order = torch.randperm(len(y), generator=generator) if shuffle else torch.arange(len(y))
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size].to(x.device)
            yield x[idx], y[idx]
    else:
        for x, y in data:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _prepare(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor | Iterable[TensorPair],
    y: torch.Tensor | None = None,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    bf16: bool = False,
) -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` in eval mode on images x (N, ...) with labels
    y (N,), or on an iterable of (x, y) batches when ``y`` is None. The model's mode is restored;
    the model stays on its own device unless ``device`` is given."""
    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    data = (x.to(device), y.to(device)) if y is not None else x
    was_training = model.training
    model.eval()
    correct, total_loss, count = 0, 0.0, 0
    try:
        for xb, yb in _batches(data, batch_size, device, shuffle=False, generator=None):
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(xb)
            logits = logits.float()
            total_loss += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
            count += len(yb)
    finally:
        model.train(was_training)
    if count == 0:
        raise KdOptunaError("evaluate got no examples: pass a non-empty split")
    return Evaluation(accuracy=correct / count, loss=total_loss / count, count=count)


def _optimizer(name: str, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise KdOptunaError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def lr_factor(
    schedule: str, step: int, total_steps: int, steps_per_epoch: int, milestones=(), gamma: float = 0.1, warmup_steps: int = 0
) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based):
    warm-up (step + 1) / warmup_steps, then cosine 0.5 (1 + cos(pi t / T)) over the remaining
    steps, or gamma ** (number of milestones <= current epoch), or 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))
    if schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return gamma ** sum(epoch >= m for m in milestones)
    if schedule == "constant":
        return 1.0
    raise KdOptunaError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


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
    """
    arguments = dict(locals())
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(**arguments)
    finally:
        torch.set_num_threads(previous)


def _train(
    model, train_data, *, epochs, batch_size, optimizer, lr, momentum, weight_decay, schedule, milestones, gamma,
    warmup_epochs, augment, step_loss, extra_params, val_data, device, bf16, channels_last, seed, num_threads,
    progress, desc,
) -> TrainResult:
    if epochs < 1 or batch_size < 1:
        raise KdOptunaError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    device = default_device(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if isinstance(train_data, tuple):
        train_data = (train_data[0].to(device), train_data[1].to(device))
        steps_per_epoch = math.ceil(len(train_data[1]) / batch_size)
        aug_generator = torch.Generator(device=device).manual_seed(seed)
    else:
        steps_per_epoch = len(train_data)  # type: ignore[arg-type]
        aug_generator = None
    if steps_per_epoch == 0:
        raise KdOptunaError("train_classifier got an empty training set")
    params = list(model.parameters()) + list(extra_params)
    opt = _optimizer(optimizer, params, lr, momentum, weight_decay)
    total_steps = epochs * steps_per_epoch
    loss_of = step_loss or _cross_entropy
    result = TrainResult()
    start = time.perf_counter()
    bar = _progress(epochs, desc, progress)
    step, factor = 0, 1.0
    for epoch in range(epochs):
        model.train()
        running, seen = 0.0, 0
        for x, y in _batches(train_data, batch_size, device, shuffle=True, generator=generator):
            if augment is not None:
                x = augment(x, aug_generator)
            factor = lr_factor(schedule, step, total_steps, steps_per_epoch, milestones, gamma, warmup_epochs * steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr * factor
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(model, _prepare(x, channels_last), y)
            if not torch.isfinite(loss):
                raise KdOptunaError(f"training loss became {loss.item()} at epoch {epoch + 1}: lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item() * len(y)
            seen += len(y)
            step += 1
        record = {"epoch": epoch + 1, "loss": running / max(1, seen), "lr": lr * factor}
        if val_data is not None:
            vx, vy = val_data if isinstance(val_data, tuple) else (val_data, None)
            ev = evaluate(model, vx, vy, device=device, bf16=bf16)
            record.update(val_accuracy=ev.accuracy, val_loss=ev.loss)
        record["seconds"] = time.perf_counter() - start
        result.history.append(record)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "val_accuracy")})
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", disable=not enabled, leave=False)
