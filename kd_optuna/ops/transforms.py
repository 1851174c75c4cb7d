"""The 41 knowledge transforms of the search space (seed E.1, Listing 2, and ``zscore``), by name.

Every transform maps a float tensor whose dim 0 is the batch ``N`` to a tensor whose dim 0 is
still ``N``. Each is one function under one ``@transform(name, ranks=...)`` decorator
(``kd_optuna.ops.registry``): ``ranks`` are the input ranks it acts on (a mapping where the
rank changes, ``{input: output}``), and at any other rank the op returns its input unchanged
(spatial ops on logits, for instance), so the body of each op only sees the ranks it is
written for. The order of the definitions is the order of the options of ``transform1-3``.

Shapes: rank 2 is ``(N, C)`` (logits ``C = K`` classes, embeddings ``C = D``), rank 3
``(N, C, L)``, rank 4 ``(N, C, H, W)``.

Random ops (``drop``, ``mask``) take a ``torch.Generator``; ``DistillerLoss`` gives the
student's and the teacher's call generators seeded alike, so both draw the same mask.

torch is imported at the first call of an op (``kd_optuna.ops.lazy``): importing this module
only registers the ops and their metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kd_optuna.ops.lazy import lazy_import
from kd_optuna.ops.registry import EVERY_RANK, transform

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor
else:
    torch = lazy_import("torch", globals())
    F = lazy_import("torch.nn.functional", globals(), "F")

#: exp's input is capped here: exp(20) ~ 4.9e8 leaves room for a distance without overflow.
EXP_CAP = 20.0
#: sqrt's offset: the gradient near 0 is at most 1 / (2 sqrt(eps)) = 500.
SQRT_EPS = 1e-6
#: Temperature of the attention ops (FGD's tau).
ATTENTION_TAU = 0.5
DROP_P = 0.1
#: Share of pixels MGD's mask zeroes (its lambda).
MASK_RATIO = 0.65
NORM_EPS = 1e-8
BATCHNORM_EPS = 1e-5
MIN_MAX_EPS = 1e-6
#: zscore's denominator offset, as logit standardization's reference code (1e-7 + std).
ZSCORE_EPS = 1e-7
#: Floor of the variance under zscore's square root: at a constant sample the gradient of
#: sqrt(var) would be inf * 0 = NaN; below it the std is off by at most 1e-12, under the eps.
ZSCORE_VAR_FLOOR = 1e-24
#: A centred sample below this share of the sample's norm is rounding noise of a constant.
ZSCORE_CONSTANT = 1e-5


def _per_sample(stat: Tensor, x: Tensor) -> Tensor:
    """Reshape an (N,) statistic to broadcast against ``x``."""
    return stat.view(-1, *([1] * (x.dim() - 1)))


def _uniform(shape: tuple[int, ...], x: Tensor, generator: torch.Generator | None) -> Tensor:
    if x.device.type == "meta":
        return torch.empty(shape, device=x.device, dtype=x.dtype)
    return torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------- element-wise, every rank


@transform("exp", ranks=EVERY_RANK)
def exp(x: Tensor) -> Tensor:
    """exp(min(x, 20)): capped so a logit of 1e4 gives exp(20), not inf (gradient 0 above)."""
    return torch.exp(x.clamp(max=EXP_CAP))


@transform("mish", ranks=EVERY_RANK)
def mish(x: Tensor) -> Tensor:
    """x * tanh(softplus(x)), element-wise, same shape."""
    return F.mish(x)


@transform("leaky", ranks=EVERY_RANK)
def leaky(x: Tensor) -> Tensor:
    """leaky_relu(x) = max(x, 0.01 x), element-wise, same shape."""
    return F.leaky_relu(x, 0.01)


@transform("relu", ranks=EVERY_RANK)
def relu(x: Tensor) -> Tensor:
    """max(x, 0), element-wise, same shape."""
    return F.relu(x)


@transform("tanh", ranks=EVERY_RANK)
def tanh(x: Tensor) -> Tensor:
    """tanh(x), element-wise, same shape."""
    return torch.tanh(x)


@transform("sigmoid", ranks=EVERY_RANK)
def sigmoid(x: Tensor) -> Tensor:
    """1 / (1 + exp(-x)), element-wise, same shape."""
    return torch.sigmoid(x)


@transform("pow2", ranks=EVERY_RANK)
def pow2(x: Tensor) -> Tensor:
    """x^2, element-wise, same shape."""
    return x * x


@transform("pow4", ranks=EVERY_RANK)
def pow4(x: Tensor) -> Tensor:
    """x^4, element-wise, same shape."""
    square = x * x
    return square * square


@transform("log", ranks=EVERY_RANK)
def log(x: Tensor) -> Tensor:
    """sign(x) * log(1 + |x|): odd, finite at 0 with gradient 1/(1+|x|) <= 1.

    Written with log, not log1p, which is 7x slower on CPU; values below 6e-8 in magnitude map
    to 0 instead of x. The seed's sign(x) * log(|x| + 1e-9) sends values near 0 to -20.7 with
    gradient 1e9.
    """
    return torch.sign(x) * torch.log(1 + x.abs())


@transform("sqrt", ranks=EVERY_RANK)
def sqrt(x: Tensor) -> Tensor:
    """sign(x) * (sqrt(|x| + 1e-6) - sqrt(1e-6)): signed, 0 at 0, gradient at most 500.

    Computed as the equal x / (sqrt(|x| + 1e-6) + sqrt(1e-6)): fewer passes, no cancellation
    near 0. The seed's sqrt(x) is NaN for negative x (6% of its random specs died of it).
    """
    return x / (torch.sqrt(x.abs() + SQRT_EPS) + SQRT_EPS**0.5)


@transform("abs", ranks=EVERY_RANK)
def abs_(x: Tensor) -> Tensor:
    """|x|, element-wise, same shape."""
    return x.abs()


@transform("swish", ranks=EVERY_RANK)
def swish(x: Tensor) -> Tensor:
    """x * sigmoid(x), element-wise, same shape."""
    return F.silu(x)


@transform("scale", ranks=EVERY_RANK)
def scale(x: Tensor) -> Tensor:
    """(x + 1) / 2: maps [-1, 1] to [0, 1], element-wise, same shape."""
    return (x + 1.0) * 0.5


@transform("drop", ranks=EVERY_RANK, random=True)
def drop(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Inverted dropout, p = 0.1: x * keep / 0.9 with keep ~ Bernoulli(0.9).

    Rank 4 drops whole channels (keep has shape (N, C, 1, 1), as ``dropout2d``); ranks 2 and
    3 drop single elements. Always active: it is part of the loss, not of a model.
    """
    shape = (*x.shape[:2], 1, 1) if x.dim() == 4 else tuple(x.shape)
    keep = _uniform(shape, x, generator) >= DROP_P
    return x * keep / (1.0 - DROP_P)


@transform("no", ranks=())
def no(x: Tensor) -> Tensor:  # pragma: no cover - it lists no rank
    """Identity at every rank (it lists none)."""
    return x


# ---------------------------------------------------------------- attention and masks


@transform("satt", ranks=(4,))
def satt(x: Tensor) -> Tensor:
    """FGD spatial attention: H*W * softmax_hw(mean_c |F| / 0.5), (N,C,H,W) -> (N,1,H,W)."""
    n, _, h, w = x.shape
    pooled = x.abs().mean(dim=1).reshape(n, h * w)
    return (h * w * F.softmax(pooled / ATTENTION_TAU, dim=1)).view(n, 1, h, w)


@transform("natt", ranks=EVERY_RANK)
def natt(x: Tensor) -> Tensor:
    """Attention over the batch: N * softmax(x / 0.5, dim=0), same shape."""
    return x.shape[0] * F.softmax(x / ATTENTION_TAU, dim=0)


@transform("catt", ranks=EVERY_RANK)
def catt(x: Tensor) -> Tensor:
    """FGD channel attention: C * softmax_c(g / 0.5).

    Ranks 2 and 3: g = x, same shape. Rank 4: g = mean_hw |F|, (N,C,H,W) -> (N,C,1,1).
    """
    channels = x.shape[1]
    if x.dim() == 4:
        pooled = x.abs().mean(dim=(2, 3), keepdim=True)
        return channels * F.softmax(pooled / ATTENTION_TAU, dim=1)
    return channels * F.softmax(x / ATTENTION_TAU, dim=1)


@transform("mask", ranks=(4,), random=True)
def mask(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """MGD's random mask: zeroes each pixel (all channels) with probability 0.65.

    (N,C,H,W) -> (N,C,H,W), x * keep with keep of shape (N,1,H,W); not rescaled, as in MGD.
    """
    n, _, h, w = x.shape
    keep = _uniform((n, 1, h, w), x, generator) >= MASK_RATIO
    return x * keep


# ---------------------------------------------------------------- relations


@transform("bmm", ranks={3: 3, 4: 3})
def bmm(x: Tensor) -> Tensor:
    """Channel Gram matrix (ICKD): G = F F^T / L with F of shape (N, C, L), L = H*W.

    (N,C,H,W) or (N,C,L) -> (N,C,C). Dividing by the contracted length L keeps the scale
    independent of the feature map's size.
    """
    flat = x.flatten(2)
    return torch.bmm(flat, flat.transpose(1, 2)) / flat.shape[2]


@transform("mm", ranks={2: 2, 3: 2, 4: 2})
def mm(x: Tensor) -> Tensor:
    """Sample Gram matrix (SP): G = X X^T / D with X the flattened samples, (N, D).

    Ranks 2, 3, 4 -> (N, N); divided by D so the scale does not grow with the sample size.
    The seed left rank 2 unchanged, so SP on embeddings could not be expressed.
    """
    flat = x.flatten(1)
    return flat @ flat.t() / flat.shape[1]


# ---------------------------------------------------------------- reshapes


@transform("batch", ranks={3: 2, 4: 2})
def batch(x: Tensor) -> Tensor:
    """Flatten each sample: (N, C, L) or (N, C, H, W) -> (N, C*L) or (N, C*H*W)."""
    return x.flatten(1)


@transform("channel", ranks={4: 3})
def channel(x: Tensor) -> Tensor:
    """Flatten the spatial dims: (N, C, H, W) -> (N, C, H*W)."""
    return x.flatten(2)


# ---------------------------------------------------------------- multi-scale and local


@transform("scale_r1", ranks=())
def scale_r1(x: Tensor) -> Tensor:  # pragma: no cover - it lists no rank
    """Identity: the seed's max over 1x1 windows changes nothing."""
    return x


def _max_pool(x: Tensor, ratio: int) -> Tensor:
    return F.max_pool2d(x, kernel_size=ratio, stride=ratio, ceil_mode=True)


@transform("scale_r2", ranks=(4,))
def scale_r2(x: Tensor) -> Tensor:
    """Max over 2x2 windows, stride 2: (N,C,H,W) -> (N,C,ceil(H/2),ceil(W/2)).

    ceil_mode lets the last window hang over the edge, so any H, W >= 1 works (the seed's
    rearrange needed H and W divisible by 2).
    """
    return _max_pool(x, 2)


@transform("multi_scale_r4", ranks=(4,))
def multi_scale_r4(x: Tensor) -> Tensor:
    """Max over 4x4 windows, stride 4: (N,C,H,W) -> (N,C,ceil(H/4),ceil(W/4))."""
    return _max_pool(x, 4)


@transform("local_s1", ranks={4: 2})
def local_s1(x: Tensor) -> Tensor:
    """Every pixel of every channel as its own patch: (N,C,H,W) -> (N, C*H*W)."""
    return x.flatten(1)


def _patches(x: Tensor, size: int) -> Tensor:
    n, c, h, w = x.shape
    pad_h, pad_w = -h % size, -w % size
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    rows, cols = (h + pad_h) // size, (w + pad_w) // size
    x = x.reshape(n, c, rows, size, cols, size).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(n, c * rows * cols, size, size)


@transform("local_s2", ranks=(4,))
def local_s2(x: Tensor) -> Tensor:
    """2x2 patches (LKD): (N,C,H,W) -> (N, C*ceil(H/2)*ceil(W/2), 2, 2).

    H and W are zero-padded at the bottom and right up to a multiple of 2.
    """
    return _patches(x, 2)


@transform("local_s4", ranks=(4,))
def local_s4(x: Tensor) -> Tensor:
    """4x4 patches: (N,C,H,W) -> (N, C*ceil(H/4)*ceil(W/4), 4, 4), zero-padded like local_s2."""
    return _patches(x, 4)


# ---------------------------------------------------------------- normalisations


@transform("norm_HW", ranks=(3, 4))
def norm_HW(x: Tensor) -> Tensor:
    """L2-normalise over the trailing dims: dim 2 of (N,C,L), dims 2, 3 of (N,C,H,W)."""
    return F.normalize(x.flatten(2), dim=2, eps=NORM_EPS).view_as(x)


@transform("norm_C", ranks=EVERY_RANK)
def norm_C(x: Tensor) -> Tensor:
    """L2-normalise over dim 1 (classes or channels), same shape."""
    return F.normalize(x, dim=1, eps=NORM_EPS)


@transform("norm_N", ranks=EVERY_RANK)
def norm_N(x: Tensor) -> Tensor:
    """L2-normalise over the batch (dim 0), same shape."""
    return F.normalize(x, dim=0, eps=NORM_EPS)


@transform("softmax_N", ranks=EVERY_RANK)
def softmax_N(x: Tensor) -> Tensor:
    """softmax over the batch (dim 0), same shape."""
    return F.softmax(x, dim=0)


@transform("softmax_C", ranks=EVERY_RANK)
def softmax_C(x: Tensor) -> Tensor:
    """softmax over dim 1, same shape."""
    return F.softmax(x, dim=1)


@transform("softmax_HW", ranks={3: 3, 4: 3})
def softmax_HW(x: Tensor) -> Tensor:
    """softmax over positions: (N,C,L) -> (N,C,L) over dim 2; (N,C,H,W) -> (N,C,H*W).

    The seed returned nothing for 3-D input.
    """
    return F.softmax(x.flatten(2), dim=2)


@transform("logsoftmax_N", ranks=EVERY_RANK)
def logsoftmax_N(x: Tensor) -> Tensor:
    """log_softmax over the batch (dim 0), same shape. The seed normalised over dim 1."""
    return F.log_softmax(x, dim=0)


@transform("logsoftmax_C", ranks=EVERY_RANK)
def logsoftmax_C(x: Tensor) -> Tensor:
    """log_softmax over dim 1, same shape."""
    return F.log_softmax(x, dim=1)


@transform("logsoftmax_HW", ranks={3: 3, 4: 3})
def logsoftmax_HW(x: Tensor) -> Tensor:
    """log_softmax over positions, shapes as softmax_HW."""
    return F.log_softmax(x.flatten(2), dim=2)


@transform("min_max_normalize", ranks=EVERY_RANK)
def min_max_normalize(x: Tensor) -> Tensor:
    """(x - min) / (max - min + 1e-6) with min, max over each sample's values, same shape.

    Per sample: the seed took min and max over the whole batch, so one sample changed another's
    result.
    """
    flat = x.flatten(1)
    low = _per_sample(flat.amin(dim=1), x)
    high = _per_sample(flat.amax(dim=1), x)
    return (x - low) / (high - low + MIN_MAX_EPS)


@transform("batchnorm", ranks=EVERY_RANK)
def batchnorm(x: Tensor) -> Tensor:
    """Parameter-free batch standardisation per channel (dim 1): (x - mean) / sqrt(var + 1e-5).

    Mean and biased variance over every dim but 1 (N; N, L; N, H, W), as BatchNorm in training
    mode with weight 1 and bias 0. The seed built a fresh, untrained nn.BatchNorm on every call;
    this op has no parameters and no running statistics. At batch size 1 on rank 2 it returns 0.
    """
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, unbiased=False)
    return (x - mean) * torch.rsqrt(var + BATCHNORM_EPS)


@transform("zscore", ranks=EVERY_RANK)
def zscore(x: Tensor) -> Tensor:
    """Per-sample standardisation (logit standardization, Sun et al. CVPR 2024), same shape:

        z(x) = (x - mean(x)) / (std(x) + 1e-7),   std(x)^2 = sum (x - mean(x))^2 / (D - 1)

    with mean and the Bessel-corrected std over the D values of every non-batch dim of the
    sample, at ranks 2 ((N, K) logits: over the K classes, exactly the paper's code), 3 and 4
    (over C*L or C*H*W values). D = 1 gives 0. A constant sample maps to 0 with a finite
    gradient (the variance is floored at 1e-24 under the root), also when float rounding
    leaves x - mean a residue of at most 1e-5 of the sample's norm (dividing it by its own
    std would make noise of unit size).
    """
    flat = x.flatten(1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    noise = centred.norm(dim=1, keepdim=True) <= ZSCORE_CONSTANT * flat.norm(dim=1, keepdim=True)
    centred = centred.masked_fill(noise, 0.0)
    var = centred.pow(2).sum(dim=1, keepdim=True) / max(flat.shape[1] - 1, 1)
    std = var.clamp(min=ZSCORE_VAR_FLOOR).sqrt()
    return (centred / (std + ZSCORE_EPS)).view_as(x)
