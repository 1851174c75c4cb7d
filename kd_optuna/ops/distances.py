"""The 8 distances of the search space (seed E.2, Listing 3), registered by name.

A distance ``d(student, teacher)`` takes two tensors of one shape, ``(N, ...)`` with rank 2 to 4,
and returns ``(N,)``: one value per sample, never negative, and 0 when student equals teacher
(except ``hard``, a cross-entropy against the teacher's argmax, which is only >= 0). The
argument order is fixed: student first, teacher second (the seed swapped the names).

Each is one function under one ``@distance(name, formula=...)`` decorator
(``kd_optuna.ops.registry``); ``formula`` is its per-sample term in ``DistillerSpec.formula``.
The order of the definitions is the order of the options of the ``distance`` gene. torch is
imported at the first call (``kd_optuna.ops.lazy``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kd_optuna.ops.lazy import lazy_import
from kd_optuna.ops.registry import distance

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())
    F = lazy_import("torch.nn.functional", globals(), "F")

NORM_EPS = 1e-8
#: Exponent alpha of the seed's correlation distance (Eq. 12).
COR_ALPHA = 1.01


def _mean_per_sample(values: Tensor) -> Tensor:
    return values.flatten(1).mean(dim=1)


#: A centred vector below this share of the uncentred one's norm is float noise of a constant.
CONSTANT_TOLERANCE = 1e-5


def _centre(x: Tensor, dim: int) -> Tensor:
    """x - mean(x) along ``dim``, set to 0 where it is rounding noise of a constant.

    The mean of equal float32 values can miss them by an ulp; normalising that residue would
    turn a constant (distance 0) into a random unit vector. Where the centred vector's norm is
    at most 1e-5 times the vector's own it counts as 0.
    """
    centred = x - x.mean(dim=dim, keepdim=True)
    noise = centred.norm(dim=dim, keepdim=True) <= CONSTANT_TOLERANCE * x.norm(dim=dim, keepdim=True)
    return centred.masked_fill(noise, 0.0)


def _unit_difference(student: Tensor, teacher: Tensor, dim: int) -> Tensor:
    """0.5 * ||s/|s| - t/|t|||^2 along ``dim`` = 1 - cos(s, t) when neither is 0.

    Written this way it is exactly 0 when s == t (also when both are 0) and has finite
    gradients everywhere; a zero vector against a non-zero one gives 0.5.
    """
    s = F.normalize(student, dim=dim, eps=NORM_EPS)
    t = F.normalize(teacher, dim=dim, eps=NORM_EPS)
    return 0.5 * (s - t).pow(2).sum(dim=dim)


@distance("l1", formula="|{s} - {t}|")
def l1(student: Tensor, teacher: Tensor) -> Tensor:
    """mean over non-batch dims of |s - t| -> (N,)."""
    return _mean_per_sample((student - teacher).abs())


@distance("l2", formula="({s} - {t})^2")
def l2(student: Tensor, teacher: Tensor) -> Tensor:
    """mean over non-batch dims of (s - t)^2 -> (N,) (mean squared error, as the seed's)."""
    return _mean_per_sample((student - teacher).pow(2))


@distance("kl", formula="KL(softmax({t}) || softmax({s}))")
def kl(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(softmax(t) || softmax(s)) along the last axis, summed there, mean over the rest -> (N,).

    Rank 2 (N, K): over classes, Hinton's KD. Rank 3 (N, C, L): over the trailing axis, for
    instance positions after ``channel`` (CWD). Rank 4 (N, C, H, W): H*W flattened first, as
    rank 3. Both sides go through log_softmax (the seed fed probabilities to F.kl_div); the
    result is clamped at 0 against rounding.
    """
    if student.dim() == 4:
        student, teacher = student.flatten(2), teacher.flatten(2)
    log_s = F.log_softmax(student, dim=-1)
    log_t = F.log_softmax(teacher, dim=-1)
    per_row = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return per_row.reshape(per_row.shape[0], -1).mean(dim=1).clamp(min=0)


@distance("hard", formula="CE({s}, argmax {t})")
def hard(student: Tensor, teacher: Tensor) -> Tensor:
    """Cross-entropy of the student against the teacher's argmax over dim 1 -> (N,).

    (N, K): one CE per sample. (N, C, L) or (N, C, H, W): C is the class axis, one CE per
    position, mean over positions. >= 0; not 0 at s == t unless the student is one-hot.
    """
    target = teacher.argmax(dim=1)
    per_position = F.cross_entropy(student, target, reduction="none")
    return per_position.reshape(per_position.shape[0], -1).mean(dim=1)


@distance("smooth_l1", formula="smoothL1({s} - {t})")
def smooth_l1(student: Tensor, teacher: Tensor) -> Tensor:
    """mean over non-batch dims of Huber(s - t), beta 1 -> (N,)."""
    return _mean_per_sample(F.smooth_l1_loss(student, teacher, reduction="none"))


@distance("cos", formula="1 - cos({s}, {t})", compound=True)
def cos(student: Tensor, teacher: Tensor) -> Tensor:
    """1 - cos(s, t) of the flattened samples, in [0, 2] -> (N,). The seed returned cos itself."""
    return _unit_difference(student.flatten(1), teacher.flatten(1), dim=1)


@distance("pear", formula="1 - pearson({s}, {t})", compound=True)
def pear(student: Tensor, teacher: Tensor) -> Tensor:
    """1 - Pearson(s, t) of the flattened samples, in [0, 2] -> (N,).

    Pearson is the cosine of the samples centred on their own mean. A constant sample centres
    to 0 (also through float rounding, see ``_centre``); two constant samples are at distance
    0. The seed returned a similarity here too.
    """
    s, t = student.flatten(1), teacher.flatten(1)
    return _unit_difference(_centre(s, 1), _centre(t, 1), 1)


@distance("cor", formula="cor({s}, {t})")
def cor(student: Tensor, teacher: Tensor) -> Tensor:
    """Batch correlation distance (seed Eq. 12, Barlow-Twins style), broadcast to (N,).

    Samples are flattened to (N, D); each of the D columns is centred over the batch and
    scaled to unit length (the batch standardisation of Eq. 12, with eps). v_i is the
    correlation of column i of student and teacher, and |v_i - 1| = 0.5 ||s_i - t_i||^2 of the
    unit columns. The distance is log2(1 + sum_i |v_i - 1|^(2 * 1.01)): >= 0 and 0 when
    s == t. The seed's log2(sum_i ...) is negative whenever the sum is below 1. At batch
    size 1 every column centres to 0 and the distance is 0; so does a column constant over the
    batch, also through float rounding (see ``_centre``).
    """
    s, t = student.flatten(1), teacher.flatten(1)
    off_one = _unit_difference(_centre(s, 0), _centre(t, 0), dim=0)
    value = torch.log2(1 + off_one.pow(2 * COR_ALPHA).sum())
    return value.expand(s.shape[0])
