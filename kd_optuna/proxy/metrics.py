"""Measuring a proxy student: validation CE, accuracy, sharpness gap and CKA gap.

Every function here is deterministic for fixed inputs (a seed is an argument where randomness
enters) and reads held-out data only; none knows of Optuna or of other trials.

    val_ce        calibrated_cross_entropy(logits (N, K), labels (N,)): the CE after the one
                  temperature that minimises it (raw CE punishes an under-confident student
                  that ranks classes well, as high-temperature distillers make it).
    val_acc       accuracy(logits, labels) in [0, 1].
    sharpness     adaptive_sharpness(model, inputs, labels, rho): L(w + e) - L(w), with
                  e = rho * |w|^2 * g / || |w| * g || one normalised (ASAM-style) ascent step.
    sharpness_gap student sharpness - teacher sharpness (same data, same rho).
    cka_gap       1 - linear_cka(student emb (N, Ds), teacher emb (N, Dt)).

The score that combines them is :mod:`kd_optuna.proxy.score`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The interval of T searched by calibration.
_LOG_T_RANGE = (math.log(1e-3), math.log(1e3))

#: About this many bytes of activations per scoring pass: a pass over more images is cut into
#: chunks (``rows_within``). Activations per byte of input, measured for torchvision's resnet18
#: at 224 px on a CPU (BENCHMARKS.md, issue 11.3): eval mode without gradients 11 (6.4 MiB an
#: image), a forward and backward 42 (24 MiB an image); with margin:
SCORING_BUDGET = 256 * 2**20
EVAL_ACTIVATIONS = 20
GRAD_ACTIVATIONS = 64


def rows_within(inputs: Tensor, activations_per_input: int, budget: int | None = None) -> int:
    """Rows of ``inputs`` (N, ...) per pass so that a pass holds about ``budget`` bytes
    (default SCORING_BUDGET) of activations, ``activations_per_input`` times its input; at
    least 1. Small images (digits, CIFAR) fit a whole scoring pass; 224 px images 22 (eval) or
    6 (gradients) a pass."""
    budget = SCORING_BUDGET if budget is None else budget
    per_row = max(1, inputs[:1].numel() * inputs.element_size())
    return max(1, budget // (activations_per_input * per_row))


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows of ``logits`` (N, K) whose argmax equals ``labels`` (N,)."""
    return float((logits.argmax(dim=1) == labels).double().mean())


def cross_entropy(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> float:
    """mean_n(-log softmax(logits_n / T)[y_n]), computed in float64."""
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def fit_temperature(logits: Tensor, labels: Tensor, iterations: int = 60) -> float:
    """The T > 0 minimising cross_entropy(logits, labels, T), by golden-section search on log T.

    CE is convex in 1/T, so it is unimodal in log T; the search is over T in [1e-3, 1e3].
    """
    logits, labels = logits.double(), labels.long()

    def ce(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    lo, hi = _LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = ce(a), ce(b)
    for _ in range(iterations):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = ce(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = ce(b)
    return math.exp((lo + hi) / 2)


def calibrated_cross_entropy(logits: Tensor, labels: Tensor) -> float:
    """cross_entropy at the fitted temperature: never above the raw CE (T=1 is a candidate)."""
    fitted = cross_entropy(logits, labels, fit_temperature(logits, labels))
    return min(fitted, cross_entropy(logits, labels))


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two representations of the same N samples, x (N, Dx) and y (N, Dy).

    With column-centred X and Y: ``||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)`` (Kornblith et
    al. 2019), in [0, 1]; 1 for X = Y, invariant to orthogonal maps and isotropic scaling of
    either side. Computed in float64; a constant representation gives 0.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs (N, Dx) and (N, Dy), got {tuple(x.shape)}, {tuple(y.shape)}")
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norms = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if float(norms) == 0.0:
        return 0.0
    return float(cross / norms)


def cka_gap(student_emb: Tensor, teacher_emb: Tensor) -> float:
    """1 - linear_cka(student_emb (N, Ds), teacher_emb (N, Dt)): 0 when they match up to rotation."""
    return 1.0 - linear_cka(student_emb.flatten(1), teacher_emb.flatten(1))


def _logits_of(model: nn.Module, inputs: Tensor) -> Tensor:
    out = model(inputs)
    return out["logit"] if isinstance(out, Mapping) else out


def adaptive_sharpness(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    rho: float = 0.05,
    seed: int = 0,
) -> float:
    """Loss rise after one normalised, weight-scaled gradient-ascent step of radius ``rho``.

    With L(w) the mean CE of ``model`` (eval mode: BatchNorm uses running statistics) on
    ``inputs`` (N, ...) and ``labels`` (N,), g = dL/dw and |w| element-wise::

        e = rho * |w|^2 * g / || |w| * g ||_2          (ASAM, Kwon et al. 2021)
        sharpness = L(w + e) - L(w)

    Scaling by |w| makes models of different sizes comparable (a rescaled network has the
    same value). When g is zero, a direction drawn from a generator seeded with ``seed`` is
    used instead. Frozen parameters count too. The model's weights, mode and requires_grad flags
    are restored. Inputs too large for one pass (``rows_within``: 224 px images) are taken in
    chunks, the gradient of each chunk's summed CE added up and divided by N (the same L and g,
    up to float rounding), so the activations held are a chunk's, not all N images'.
    """
    params = [p for p in model.parameters() if p.is_floating_point()]
    frozen = [p for p in params if not p.requires_grad]
    was_training = model.training
    model.eval()
    for p in frozen:
        p.requires_grad_(True)
    chunk = rows_within(inputs, GRAD_ACTIVATIONS)
    try:
        if inputs.shape[0] <= chunk:
            with torch.enable_grad():
                loss = F.cross_entropy(_logits_of(model, inputs).float(), labels.long())
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        else:
            loss, grads = _chunked_loss_and_grads(model, inputs, labels, params, chunk)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        scaled = [p.detach().abs() * g for p, g in zip(params, grads)]
        norm = torch.sqrt(sum((s.double() ** 2).sum() for s in scaled))
        if float(norm) == 0.0:
            generator = torch.Generator().manual_seed(seed)
            scaled = [
                p.detach().abs() * torch.randn(p.shape, generator=generator).to(p.device)
                for p in params
            ]
            norm = torch.sqrt(sum((s.double() ** 2).sum() for s in scaled))
        if float(norm) == 0.0:
            return 0.0
        steps = [float(rho) * p.detach().abs() * s / norm.to(s.dtype) for p, s in zip(params, scaled)]
        with torch.no_grad():
            for p, e in zip(params, steps):
                p.add_(e)
            try:
                if inputs.shape[0] <= chunk:
                    raised = F.cross_entropy(_logits_of(model, inputs).float(), labels.long())
                else:
                    raised = sum(F.cross_entropy(_logits_of(model, x).float(), y.long(), reduction="sum")
                                 for x, y in zip(inputs.split(chunk), labels.split(chunk))) / inputs.shape[0]
            finally:
                for p, e in zip(params, steps):
                    p.sub_(e)
        return float(raised.detach()) - float(loss.detach())
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(False)


def _chunked_loss_and_grads(model: nn.Module, inputs: Tensor, labels: Tensor, params: list, chunk: int):
    """Mean CE over ``inputs`` and its gradients w.r.t. ``params``, ``chunk`` rows at a time."""
    n = inputs.shape[0]
    loss = torch.zeros((), dtype=torch.float32, device=inputs.device)
    grads: list[Tensor | None] = [None] * len(params)
    for x, y in zip(inputs.split(chunk), labels.split(chunk)):
        with torch.enable_grad():
            part = F.cross_entropy(_logits_of(model, x).float(), y.long(), reduction="sum") / n
            parts = torch.autograd.grad(part, params, allow_unused=True)
        loss = loss + part.detach()
        grads = [g if p is None else (p if g is None else g + p) for g, p in zip(grads, parts)]
    return loss, grads
