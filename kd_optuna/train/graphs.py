"""One optimiser step captured as a CUDA graph and replayed, for short launch-bound trainings.

A proxy trial of a small student on a large GPU spends most of each step launching kernels (a
resnet20 step at batch 64 is about 8 ms on an H200 for about 0.1 ms of arithmetic). A CUDA
graph records the step's kernels once and replays them with one launch. :class:`GraphedStep`
runs the step of :func:`kd_optuna.train.engine.train_steps`::

    steps 0 .. warmup - 1    eager, on a side stream (cuDNN and the allocator settle)
    step warmup              copy the batch into static tensors, capture
                             loss = step_loss(static batch); after_loss; backward;
                             after_backward; optimizer.step(), then replay it
    every later step         copy the batch into the static tensors, replay

The replayed kernels are the eager ones, on the same memory, so a graphed run computes what
the eager run computes. What a graph cannot hold, and how it is handled:

- a learning rate is a Python number baked into the captured optimiser kernels: when any
  param group's lr differs from the captured one (a step schedule's milestone) the step is
  captured again; a schedule that changes lr every step (cosine) gains nothing from graphs,
  so callers run those eagerly;
- a batch whose tensors change shape (a last, smaller batch) runs eagerly;
- Python-side randomness or state inside ``step_loss`` would be frozen at capture: callers
  must not graph such losses (the proxy runs distillers with random transforms eagerly);
- an op that synchronises with the host (``.item()``, a CPU tensor indexed by device indices)
  makes the capture raise: the step then runs eagerly from there on and ``fallback`` says why.

The graph itself is behind a small backend (:class:`CudaGraphs`) so that the bookkeeping above
is tested on the CPU with a backend that replays by calling the recorded function again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from kd_optuna.errors import first_line


class GraphBackend(Protocol):
    """Side stream for the eager warm-up, capture of a function, and its replay."""

    def eager(self, fn: Callable[[], Tensor]) -> Tensor: ...

    def capture(self, fn: Callable[[], Tensor]) -> Callable[[], None]: ...


class CudaGraphs:
    """torch.cuda graphs: eager steps on a side stream, ``capture`` into a ``CUDAGraph``
    (its own memory pool) returning the graph's ``replay``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def eager(self, fn: Callable[[], Tensor]) -> Tensor:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            out = fn()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    def capture(self, fn: Callable[[], Tensor]) -> Callable[[], None]:
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay


def _static_like(batch: Any) -> Any:
    """A structure like ``batch`` (tensors, tuples, lists, dicts, None) with every tensor cloned."""
    if isinstance(batch, Tensor):
        return batch.clone()
    if isinstance(batch, (tuple, list)):
        return type(batch)(_static_like(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _static_like(v) for k, v in batch.items()}
    return batch


def _fits(static: Any, batch: Any) -> bool:
    """True when ``batch`` has ``static``'s structure, shapes and dtypes (tensors) and values (the rest)."""
    if isinstance(static, Tensor):
        return isinstance(batch, Tensor) and batch.shape == static.shape and batch.dtype == static.dtype
    if isinstance(static, (tuple, list)):
        return type(batch) is type(static) and len(batch) == len(static) and all(map(_fits, static, batch))
    if isinstance(static, dict):
        return isinstance(batch, dict) and batch.keys() == static.keys() and all(_fits(static[k], batch[k]) for k in static)
    return static is batch or static == batch


def _copy_into(static: Any, batch: Any) -> None:
    if isinstance(static, Tensor):
        static.copy_(batch, non_blocking=True)
    elif isinstance(static, (tuple, list)):
        for s, b in zip(static, batch):
            _copy_into(s, b)
    elif isinstance(static, dict):
        for k in static:
            _copy_into(static[k], batch[k])


def optimizer_step(optimizer: torch.optim.Optimizer, step_loss: Callable[[Any], Tensor], hooks: Any,
                   index: int, batch: Any) -> Tensor:
    """One eager step: loss = step_loss(batch); hooks.after_loss(index, loss); zero_grad;
    backward; hooks.after_backward(index); optimizer.step(). Returns the loss (0-dim)."""
    loss = step_loss(batch)
    if hooks.after_loss is not None:
        hooks.after_loss(index, loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if hooks.after_backward is not None:
        hooks.after_backward(index)
    optimizer.step()
    return loss


class GraphedStep:
    """``step(index, batch) -> loss``: the optimiser step of ``train_steps``, replayed from a
    graph after ``warmup`` eager steps (see the module docstring).

    ``captures`` counts the graphs captured, ``replays`` the steps replayed, ``fallback`` is
    None or why the step went back to eager for the rest of the run.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, step_loss: Callable[[Any], Tensor], hooks: Any,
                 backend: GraphBackend, warmup: int = 3):
        self.optimizer, self.step_loss, self.hooks, self.backend, self.warmup = optimizer, step_loss, hooks, backend, warmup
        self.captures = self.replays = self.eager_steps = 0
        self.fallback: str | None = None
        self._replay: Callable[[], None] | None = None
        self._static: Any = None
        self._loss: Tensor | None = None
        self._lrs: tuple[float, ...] = ()

    def __call__(self, index: int, batch: Any) -> Tensor:
        if self.fallback is not None or self.eager_steps < self.warmup:
            return self._eager(index, batch)
        if self._static is not None and not _fits(self._static, batch):
            return self._eager(index, batch)
        if self._replay is None or self._lrs != self._current_lrs():
            if not self._capture(index, batch):
                return self._eager(index, batch)
        _copy_into(self._static, batch)
        self._replay()
        self.replays += 1
        return self._loss

    def _current_lrs(self) -> tuple[float, ...]:
        return tuple(float(group["lr"]) for group in self.optimizer.param_groups)

    def _eager(self, index: int, batch: Any) -> Tensor:
        self.eager_steps += 1
        return self.backend.eager(lambda: self._step(index, batch))

    def _step(self, index: int, batch: Any) -> Tensor:
        return optimizer_step(self.optimizer, self.step_loss, self.hooks, index, batch)

    def _capture(self, index: int, batch: Any) -> bool:
        """Capture the step on a static copy of ``batch``; False (and ``fallback`` set) if it fails."""
        self._replay = None
        self._static = _static_like(batch)
        self.optimizer.zero_grad(set_to_none=True)

        def body() -> Tensor:
            self._loss = self._step(index, self._static)
            return self._loss

        try:
            self._replay = self.backend.capture(body)
        except Exception as exc:  # any op the graph cannot hold: the run goes on eagerly
            self.fallback = f"CUDA graph capture failed, running eagerly: {first_line(exc)}"
            self._static = self._loss = None
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self._lrs = self._current_lrs()
        self.captures += 1
        return True
