"""The proxy trial: a short, seeded training of the student with one distiller, then its metrics.

Regime (DESIGN.md "Scoring"): a study's proxy is its full-training recipe shrunk
(:meth:`ProxySettings.from_recipe`): the same SGD, learning rate, loss scale, batch size and
labels as the exported training, for a third of its epochs. Measured on digits_hard, the first
version's regime (Adam, 5 labels per class, the distillation term on unlabelled images) picked
distillers that trained worse than vanilla KD under the real recipe; it is still what
``ProxySettings()`` gives, for experiments and tests. Every trial uses the same seeds,
labelled subset and views, so trials differ only by their distiller.

The settings live in :mod:`kd_optuna.proxy.settings`; the data, its views and the teacher
lookup in :mod:`kd_optuna.proxy.views`. All proxy data lives on the device as tensors.
Augmentation is a fixed pool of ``views`` shifted (and optionally flipped) copies per image,
rendered in batches on the device; the teacher's outputs for each (image, view) are what
``kd_optuna.proxy.cache`` stores. One step, with
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
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_optuna.errors import InvalidDistiller
from kd_optuna.proxy.settings import ProxySettings
from kd_optuna.proxy.views import ProxyData, TeacherLookup
from kd_optuna.train import engine
from kd_optuna.train.batch_norm import batch_norms, stale_batch_norm
from kd_optuna.train.graphs import CudaGraphs, GraphBackend, GraphedStep
from kd_optuna.proxy.metrics import (
    EVAL_ACTIVATIONS,
    accuracy,
    adaptive_sharpness,
    calibrated_cross_entropy,
    cka_gap,
    cross_entropy,
    rows_within,
)
from kd_optuna.proxy.score import ScoreWeights, combined_score


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


#: At most this many KD-pool images (a seeded sample, un-augmented) recompute stale BatchNorm
#: statistics (:func:`fresh_batch_norm`).
BN_REFRESH_IMAGES = 1024


@contextlib.contextmanager
def fresh_batch_norm(model: nn.Module, data: "ProxyData", settings: ProxySettings):
    """Inside, ``model`` is in eval mode with BatchNorm statistics that describe its current
    weights; yields whether they were recomputed. Short proxies leave them stale
    (:func:`kd_optuna.train.batch_norm.stale_batch_norm`): the eval-mode student then computes with mean 0 / variance 1
    where its layers have other statistics, and scores at chance or with logits of 1e6 and more
    while it classifies well in train mode. Stale statistics are recomputed as a cumulative
    average over batches of ``settings.batch_size`` from at most BN_REFRESH_IMAGES pool images
    (a sample seeded with 0, view 0), only the BatchNorm layers in train mode (no dropout, no
    random draw), without gradients. On exit the model's statistics, momentum and mode are
    restored, so training goes on exactly as without it. Statistics that are not stale are
    used as they are."""
    was_training = model.training
    layers = batch_norms(model)
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
