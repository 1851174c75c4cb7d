"""The training engine every training in kd-optuna runs on: optimiser, steps, evaluation.

One step of :func:`train_steps` on a batch b (whatever the caller's ``batches`` yield)::

    every param group's lr = lr * lr_at(step)          (only when lr_at is given)
    loss = step_loss(b)                                (0-dim tensor)
    hooks.after_loss(step, loss)                       (finiteness checks: raise to stop)
    zero_grad; loss.backward(); hooks.after_backward(step); optimizer.step()
    hooks.after_step(step + 1, loss, b)                (running means, reports, progress bar)

:func:`train_epochs` repeats it once per epoch between ``hooks.epoch_start(epoch)`` and
``hooks.epoch_end(epoch)`` (evaluation, checkpoints), the step count running on across epochs.
What differs between callers stays in theirs: the teacher (cached or live) and a DML peer in
``step_loss``, resume in ``first_epoch``, ``max_steps`` and the progress bar in the batches.
Users: teacher training (:mod:`kd_optuna.train.classifier`), the proxy (:mod:`kd_optuna.proxy.training`), the
rejection steps (:mod:`kd_optuna.proxy.rejection`) and full training (:mod:`kd_optuna.export.training`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kd_optuna.data import lone_last_batch
from kd_optuna.errors import KdOptunaError
from kd_optuna.train.graphs import optimizer_step

OPTIMIZERS = ("sgd", "adam", "adamw")


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else the first CUDA GPU when present, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``count`` (unchanged when None) inside, restored after."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_optimizer(
    name: str, params: Iterable, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
) -> torch.optim.Optimizer:
    """SGD(lr, momentum, weight_decay, nesterov), Adam(lr, weight_decay) or AdamW(lr, weight_decay)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise KdOptunaError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


@dataclass
class Hooks:
    """What a caller adds to the loop of :func:`train_steps` / :func:`train_epochs`; None: nothing."""

    epoch_start: Callable[[int], None] | None = None
    after_loss: Callable[[int, Tensor], None] | None = None
    after_backward: Callable[[int], None] | None = None
    after_step: Callable[[int, Tensor, Any], None] | None = None
    epoch_end: Callable[[int], None] | None = None


def train_steps(
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    step_loss: Callable[[Any], Tensor],
    *,
    lr: float = 0.0,
    lr_at: Callable[[int], float] | None = None,
    first_step: int = 0,
    max_steps: int | None = None,
    hooks: Hooks | None = None,
    run_step: Callable[[int, Any], Tensor] | None = None,
) -> int:
    """One optimiser step per batch (see the module docstring); returns the step count after.

    With ``max_steps`` the loop ends when the batch after the ``max_steps``-th is drawn.
    ``run_step(step, batch) -> loss`` replaces the eager step (:func:`~kd_optuna.train.graphs.optimizer_step`
    with these hooks), e.g. a :class:`~kd_optuna.train.graphs.GraphedStep` that replays it
    from a CUDA graph.
    """
    hooks = hooks if hooks is not None else Hooks()
    step = first_step
    for taken, batch in enumerate(batches):
        if max_steps is not None and taken >= max_steps:
            break
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_at(step)
        if run_step is not None:
            loss = run_step(step, batch)
        else:
            loss = optimizer_step(optimizer, step_loss, hooks, step, batch)
        step += 1
        if hooks.after_step is not None:
            hooks.after_step(step, loss, batch)
    return step


def train_epochs(
    optimizer: torch.optim.Optimizer,
    epoch_batches: Callable[[int], Iterable],
    step_loss: Callable[[Any], Tensor],
    *,
    epochs: int,
    first_epoch: int = 0,
    lr: float = 0.0,
    lr_at: Callable[[int], float] | None = None,
    max_steps: int | None = None,
    hooks: Hooks | None = None,
) -> int:
    """Epochs ``first_epoch`` .. ``epochs - 1`` of :func:`train_steps` over ``epoch_batches(epoch)``,
    each between ``hooks.epoch_start`` and ``hooks.epoch_end``; returns the step count."""
    hooks = hooks if hooks is not None else Hooks()
    step = 0
    for epoch in range(first_epoch, epochs):
        if hooks.epoch_start is not None:
            hooks.epoch_start(epoch)
        step = train_steps(optimizer, epoch_batches(epoch), step_loss, lr=lr, lr_at=lr_at, first_step=step,
                           max_steps=max_steps, hooks=hooks)
        if hooks.epoch_end is not None:
            hooks.epoch_end(epoch)
    return step


def batches(data, batch_size: int, device: torch.device, generator: torch.Generator | None = None):
    """(x, y) batches of ``data``: a tensor pair (x (N, ...), y (N,)) cut in ``batch_size`` rows,
    in the order randperm(N, generator) when a generator is given (a training pass: a last batch
    of one row is dropped, :func:`~kd_optuna.data.lone_last_batch`), else 0..N-1; or the batches
    of any iterable of (x, y), moved to ``device``."""
    if isinstance(data, tuple):
        x, y = data
        order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
        end = len(y) - 1 if generator is not None and lone_last_batch(len(y), batch_size) else len(y)
        for start in range(0, end, batch_size):
            idx = order[start : start + batch_size].to(x.device)
            yield x[idx], y[idx]
    else:
        for x, y in data:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.no_grad()
def eval_outputs(model: nn.Module, pairs: Iterable, *, device_type: str = "cpu", bf16: bool = False):
    """The evaluation loop: (model(x), y) for each (x, y) of ``pairs``, in eval mode, without
    gradients, under bf16 autocast when ``bf16``; the model's mode is restored at the end."""
    was_training = model.training
    model.eval()
    try:
        for x, y in pairs:
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            yield out, y
    finally:
        model.train(was_training)


@dataclass
class Evaluation:
    """Top-1 accuracy in [0, 1], mean cross-entropy and the number of examples."""

    accuracy: float
    loss: float
    count: int


def evaluate(
    model: nn.Module,
    x: Tensor | Iterable[tuple[Tensor, Tensor]],
    y: Tensor | None = None,
    *,
    batch_size: int = 1024,
    device: str | torch.device | None = None,
    bf16: bool = False,
    output: str | None = None,
) -> Evaluation:
    """Accuracy and mean cross-entropy of ``model`` on images x (N, ...) with labels y (N,), or on
    an iterable of (x, y) batches when ``y`` is None; logits (B, K) are ``model(x)``, or
    ``model(x)[output]`` for a model returning a dict. The model stays on its own device unless
    ``device`` is given."""
    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    data = (x.to(device), y.to(device)) if y is not None else x
    correct, total_loss, count = 0, 0.0, 0
    for out, yb in eval_outputs(model, batches(data, batch_size, device), device_type=device.type, bf16=bf16):
        logits = (out if output is None else out[output]).float()
        total_loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
        count += len(yb)
    if count == 0:
        raise KdOptunaError("evaluate got no examples: pass a non-empty split")
    return Evaluation(accuracy=correct / count, loss=total_loss / count, count=count)
