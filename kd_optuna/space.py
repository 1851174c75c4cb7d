"""The distiller search space of KD-Zero (seed E.1-E.3, Listing 1), as Optuna categoricals.

A distiller is eight genes, each suggested under a fixed public parameter name::

    knowledge    which outputs are compared: logit (N, K), emb (N, D) or feat (N, C, H, W)
    transform1-3 three transforms applied in order to both teacher and student knowledge
    distance     d(student, teacher) -> one value per sample, never negative
    calibration  a detached, non-negative weight per sample
    temperature  T, the knowledge is divided by T after the transforms
    magnitude    the loss weight lambda

and the loss it stands for is ``lambda * T^2 * mean_n(w_n * d_n)`` (see ``kd_optuna.distill.loss``).

This module is plain data: it imports no torch, so the sampler and the command line can use it
without loading a deep-learning stack. The options of the transform, distance and calibration
genes are the ops registered in ``kd_optuna.ops`` (one function and one decorator each, which
register without loading torch), in registration order. What a transform does to the *rank*
of a tensor is read off its decorator (``TRANSFORM_RANKS``); this module adds the properties
of the ops that make two specs one loss (element-wise, non-negative output, which shifts and scalings a distance ignores):
from them ``DistillerSpec.canonical`` computes a normal form of the loss, whose ``key`` is
what deduplication, caching and the sampler's features use. ``DistillerSpec.
dropped_transforms`` and ``canonical_notes`` say what the normal form changed and why.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from fractions import Fraction
from typing import Any, Iterable, Mapping, NamedTuple

import kd_optuna.ops  # noqa: F401  (registers every op; loads no torch)
from kd_optuna.errors import InvalidSpace
from kd_optuna.ops.registry import CALIBRATIONS as _CALIBRATION_OPS
from kd_optuna.ops.registry import DISTANCES as _DISTANCE_OPS
from kd_optuna.ops.registry import TRANSFORMS as _TRANSFORM_OPS

KNOWLEDGE: tuple[str, ...] = ("logit", "emb", "feat")

#: Rank of each knowledge tensor: logits and embeddings are (N, K), feature maps (N, C, H, W).
KNOWLEDGE_RANK: dict[str, int] = {"logit": 2, "emb": 2, "feat": 4}

#: The options of the op genes and the rank table are read off the op registries
#: (``kd_optuna.ops.registry``): an op is one function and one decorator, and registering it
#: is the only edit a new option needs. Each tuple lists the names in registration order,
#: which is the order of the definitions in each op module. The tables follow the registries
#: when an op joins or leaves (``_derive_options``): ``TRANSFORM_RANKS`` and ``FULL_OPTIONS``
#: are updated in place, the tuples rebound (``space.TRANSFORMS`` is current; a tuple bound
#: by ``from kd_optuna.space import TRANSFORMS`` before the change is not).
#:
#: ``TRANSFORM_RANKS``: for each transform, ``{input rank: output rank}`` for the ranks it acts
#: on; at any rank not listed the transform returns its input unchanged. Listing 1's 38 names
#: plus Listing 2's ``abs`` and ``swish``, spelled as in Listing 1, and ``zscore``
#: (per-sample standardisation).
TRANSFORM_RANKS: dict[str, dict[int, int]] = {}
TRANSFORMS: tuple[str, ...] = ()
DISTANCES: tuple[str, ...] = ()
CALIBRATIONS: tuple[str, ...] = ()
TEMPERATURES: tuple[int, ...] = (1, 4, 8, 16)
MAGNITUDES: tuple[float, ...] = (100, 50, 25, 10, 5, 1, 0.1, 0.01)

#: The public Optuna parameter names, in the order a distiller is read.
GENES: tuple[str, ...] = (
    "knowledge",
    "transform1",
    "transform2",
    "transform3",
    "distance",
    "calibration",
    "temperature",
    "magnitude",
)
TRANSFORM_GENES: tuple[str, ...] = ("transform1", "transform2", "transform3")

FULL_OPTIONS: dict[str, tuple[Any, ...]] = dict.fromkeys(GENES, ())


def _derive_options() -> None:
    """Fill the op genes' options and the rank table from the registries."""
    global TRANSFORMS, DISTANCES, CALIBRATIONS
    TRANSFORM_RANKS.clear()
    TRANSFORM_RANKS.update((info.name, dict(info.ranks)) for info in _TRANSFORM_OPS.infos())
    TRANSFORMS = tuple(_TRANSFORM_OPS)
    DISTANCES = tuple(_DISTANCE_OPS)
    CALIBRATIONS = tuple(_CALIBRATION_OPS)
    FULL_OPTIONS.update(
        knowledge=KNOWLEDGE,
        transform1=TRANSFORMS,
        transform2=TRANSFORMS,
        transform3=TRANSFORMS,
        distance=DISTANCES,
        calibration=CALIBRATIONS,
        temperature=TEMPERATURES,
        magnitude=MAGNITUDES,
    )


for _registry in (_TRANSFORM_OPS, _DISTANCE_OPS, _CALIBRATION_OPS):
    _registry.watch(_derive_options)


def _check_option(gene: str, value: Any, options: Iterable[Any]) -> Any:
    options = tuple(options)
    for option in options:
        if value == option and type(value) is not bool:
            return option
    shown = ", ".join(str(o) for o in options)
    raise InvalidSpace(f"{gene} = {value!r} is not an option; choose one of: {shown}")


def _check_gene(gene: str) -> None:
    if gene not in FULL_OPTIONS:
        raise InvalidSpace(f"unknown gene {gene!r}; the genes are: {', '.join(GENES)}")


def transform_output_rank(name: str, rank: int) -> int | None:
    """Rank after applying transform ``name`` to a tensor of ``rank``; None if it is a no-op."""
    return TRANSFORM_RANKS[name].get(rank)


# ------------------------------------------------------------------------- the normal form
#
# What the ops do to values, as far as the normal form needs it. Each set is a property read
# off the op's definition in kd_optuna.ops (and checked there by tests/test_canonical.py).

#: Applied to each element on its own, the same way at every rank.
ELEMENTWISE = frozenset(
    {"exp", "mish", "leaky", "relu", "tanh", "sigmoid", "pow2", "pow4", "log", "sqrt", "abs",
     "swish", "scale"}
)
#: Output >= 0 whatever the input.
_NONNEG_OUT = frozenset(
    {"exp", "sigmoid", "pow2", "pow4", "abs", "relu", "softmax_N", "softmax_C", "softmax_HW",
     "satt", "catt", "natt", "min_max_normalize"}
)
#: Output >= 0 when the input is (positive scalings, pooling, reshapes, odd ops fixing 0).
_NONNEG_KEEP = frozenset(
    {"leaky", "tanh", "log", "sqrt", "mish", "swish", "scale", "drop", "mask", "batch", "channel",
     "local_s1", "local_s2", "local_s4", "scale_r2", "multi_scale_r4", "norm_HW", "norm_C",
     "norm_N", "bmm", "mm"}
)
#: f(x) = x for x >= 0.
_IDENTITY_ON_NONNEG = frozenset({"relu", "abs", "leaky"})
#: f(|x|) = f(x).
_EVEN = frozenset({"pow2", "pow4", "abs"})
#: X with channel>X = X>channel on (N, C, H, W): X reads H x W as one flat axis, as at rank 3.
_PAST_CHANNEL = ELEMENTWISE | {
    "natt", "norm_C", "norm_N", "norm_HW", "softmax_N", "softmax_C", "softmax_HW",
    "logsoftmax_N", "logsoftmax_C", "logsoftmax_HW", "min_max_normalize", "batchnorm", "zscore",
    "bmm", "mm",
}
#: X with batch>X = X>batch: X acts per element, per batch column or on a sample as a whole.
_PAST_BATCH = ELEMENTWISE | {
    "natt", "norm_N", "softmax_N", "logsoftmax_N", "min_max_normalize", "zscore", "mm",
}
#: Distances of the flattened sample (means of element-wise terms, cosines, batch columns).
_FLAT_DISTANCES = frozenset({"l1", "l2", "smooth_l1", "cos", "pear", "cor"})
#: d(a s, a t) = a^k d(s, t) for a > 0.
_DEGREE = {"l1": 1, "l2": 2}
#: d(a s, a t) = d(s, t) for a > 0. The other distances, and any the space has no property of,
#: see the temperature: d(s/T, t/T) is not a power of T times d(s, t).
_SCALE_FREE = frozenset({"cos", "pear", "cor"})
#: Calibrations whose reading the rules know: sim reads the transformed knowledge (the cosine
#: of the flattened samples: it ignores reshapes and positive scalings, not shifts), the others
#: read only logits or nothing. With any other calibration (a newly registered one) the normal
#: form keeps the trailing transforms, T and lambda as written.
_KNOWN_CALIBRATIONS = frozenset({"entropy", "focal", "sim", "conf", "no"})
#: Distances d(s + c, t + c) = d(s, t) for a constant c (so `scale` folds into T or lambda).
_SHIFT_FREE = frozenset({"l1", "l2", "smooth_l1", "kl", "hard"})


class DroppedTransform(NamedTuple):
    """A transform of a spec's params that its canonical form does not compute as written."""

    gene: str  #: transform1, transform2 or transform3
    name: str  #: the transform in the params
    reason: str  #: why the loss is the same without it, one line


class _Normal(NamedTuple):
    spec: "DistillerSpec"
    dropped: tuple[DroppedTransform, ...]
    refusal: str | None


_Chain = list[tuple[str, str]]  # (transform, the gene it came from)


def _rewrite_once(knowledge: str, chain: _Chain) -> tuple[_Chain, list[DroppedTransform]] | None:
    """Apply the first identity that shortens or orders ``chain``; None at a fixed point.

    Identities, each exact for every input (x = the tensor before the pair):
      no-op          a transform at a rank it does not act on returns its input;
      local_s1       on (N, C, H, W) it is batch: both flatten each sample;
      non-negative   relu, abs, leaky are the identity after an op whose output is >= 0;
      even           abs before pow2, pow4, abs: f(|x|) = f(x); leaky before relu: relu(x);
      pow2 twice     (x^2)^2 = pow4(x), with the same float operations;
      log-softmax    before an op that ignores shifts along its axis (``_absorbs_shift``);
      patches twice  local_s2 (local_s4) of 2x2 (4x4) patches returns them unchanged;
      channel>batch  = batch; channel>X = X>channel and batch>X = X>batch for the X of
                     _PAST_CHANNEL and _PAST_BATCH (reshapes move right, towards the distance).
    """
    rank, nonneg = KNOWLEDGE_RANK[knowledge], False
    for i, (name, gene) in enumerate(chain):
        out = TRANSFORM_RANKS[name].get(rank)
        rest = chain[:i] + chain[i + 1:]
        if out is None:
            return rest, [] if name == "no" else [
                DroppedTransform(gene, name, f"does not act on rank-{rank} knowledge")
            ]
        if name in _IDENTITY_ON_NONNEG and nonneg:
            return rest, [DroppedTransform(gene, name, "identity on the non-negative values before it")]
        if name == "local_s1":
            return chain[:i] + [("batch", gene)] + chain[i + 1:], [
                DroppedTransform(gene, name, "the same op as batch on feature maps; written batch")
            ]
        if i + 1 < len(chain):
            after, after_gene = chain[i + 1]
            if name == "abs" and after in _EVEN:
                return rest, [DroppedTransform(gene, name, f"{after}(|x|) = {after}(x)")]
            if _absorbs_shift(name, after, rank):
                return rest, [DroppedTransform(
                    gene, name, f"{after} absorbs the shift {name} makes along its axis"
                )]
            if name in ("local_s2", "local_s4") and after == name:
                return chain[:i + 1] + chain[i + 2:], [
                    DroppedTransform(after_gene, after, f"{name} of its own patches is the identity")
                ]
            if name == "leaky" and after == "relu":
                return rest, [DroppedTransform(gene, name, "relu(leaky(x)) = relu(x)")]
            if name == "pow2" and after == "pow2":
                merged = chain[:i] + [("pow4", gene)] + chain[i + 2:]
                return merged, [DroppedTransform(after_gene, after, f"pow2 twice is pow4 ({gene})")]
            if name == "channel" and after == "batch":
                return rest, [DroppedTransform(gene, name, "batch flattens what channel flattened")]
            if (name == "channel" and after in _PAST_CHANNEL) or (name == "batch" and after in _PAST_BATCH):
                return chain[:i] + [chain[i + 1], chain[i]] + chain[i + 2:], []
        rank = out
        nonneg = name in _NONNEG_OUT or (nonneg and name in _NONNEG_KEEP)
    return None


def _absorbs_shift(name: str, after: str, rank: int) -> bool:
    """Whether ``after`` ignores the shift log-softmax ``name`` makes (input rank ``rank``).

    log_softmax(x) = x - logsumexp(x) along its axis. softmax_X and logsoftmax_X over the same
    axis, catt at ranks 2-3 (C softmax over dim 1) and natt (N softmax over dim 0) remove any
    shift along their axis; zscore and min_max_normalize remove a per-sample shift, which
    logsoftmax_C is at rank 2; batchnorm a per-column one, which logsoftmax_N is at rank 2.
    """
    if not name.startswith("logsoftmax_"):
        return False
    axis = name[len("logsoftmax_"):]
    if after in (f"softmax_{axis}", f"logsoftmax_{axis}"):
        return True
    if axis == "C":
        return (after == "catt" and rank in (2, 3)) or (
            after in ("zscore", "min_max_normalize") and rank == 2
        )
    if axis == "N":
        return after == "natt" or (after == "batchnorm" and rank == 2)
    return False


def _kl_axis(rank: int) -> str:
    """Suffix of the (log)softmax over the axis kl normalises at this input rank."""
    return "C" if rank == 2 else "HW"


def _tail_reason(name: str, rank: int, distance: str, calibration: str) -> str | None:
    """Why the last transform (input rank ``rank``) leaves this distance's loss unchanged.

    Besides the distance, ``sim`` reads the knowledge (the cosine of the flattened samples):
    it ignores reshapes and positive scalings, not shifts.
    """
    sim = calibration == "sim"
    if name == "channel":
        return "every distance reads (N, C, H, W) as (N, C, H*W)"
    if name == "batch" and distance in _FLAT_DISTANCES:
        return f"{distance} reads each sample flattened"
    if not sim and distance == "kl" and name == f"logsoftmax_{_kl_axis(rank)}":
        return "kl's own log-softmax over that axis absorbs a shift along it"
    if not sim and distance == "hard" and name == "logsoftmax_C":
        return "cross-entropy and argmax over dim 1 absorb a shift along it"
    if distance in ("cos", "cor") and name in ("local_s2", "local_s4"):
        return f"patches permute the values and pad zeros, which {distance} ignores"
    if distance in ("cos", "pear") and name == "norm_C" and rank == 2:
        return f"a positive scaling of each sample, which {distance} ignores"
    if not sim and distance == "pear" and (
        name in ("scale", "min_max_normalize", "zscore") or (name == "logsoftmax_C" and rank == 2)
    ):
        return "a positive affine map of each sample, which pear ignores"
    if not sim and distance == "cor" and name in ("scale", "norm_N", "batchnorm", "logsoftmax_N"):
        return "a positive affine map of each batch column, which cor ignores"
    return None


def _scale_form(distance: str, temperature: int, magnitude: Fraction, scales: int) -> tuple:
    """What the loss depends on of (T, lambda) and ``scales`` trailing ``scale`` ops.

    The loss is lambda T^2 d(a s / T, a t / T) with a = 2^-scales (the shifts of `scale` cancel
    in the distances that absorb it). Homogeneous d (l1: k = 1, l2: k = 2) give
    lambda T^(2-k) a^k d(s, t); cos, pear and cor ignore the scale: lambda T^2 d(s, t); the
    others (smooth_l1, kl, hard, and a newly registered distance) see T/a and lambda T^2 apart.
    """
    if distance in _DEGREE:
        k = _DEGREE[distance]
        return ("coefficient", magnitude * Fraction(temperature) ** (2 - k) / 2 ** (k * scales))
    if distance in _SCALE_FREE:
        return ("coefficient", magnitude * temperature**2)
    return ("temperature", temperature * 2**scales, magnitude * temperature**2)


def _fraction(magnitude: float) -> Fraction:
    return Fraction(str(magnitude))


@functools.lru_cache(maxsize=None)
def _representative(distance: str, form: tuple, max_scales: int) -> tuple[int, int, float]:
    """(scales, T, lambda) of the first encoding of ``form``: fewest scales, then lowest T."""
    for scales in range(max_scales + 1):
        for temperature in TEMPERATURES:
            for magnitude in MAGNITUDES:
                if _scale_form(distance, temperature, _fraction(magnitude), scales) == form:
                    return scales, temperature, magnitude
    raise AssertionError(f"no encoding of {form}")  # the spec's own encoding is always one


@functools.lru_cache(maxsize=1 << 16)
def _reduce_chain(knowledge: str, transforms: tuple[str, ...]):
    """The chain after the distance-free identities, and the records of what went."""
    chain: _Chain = [(name, gene) for gene, name in zip(TRANSFORM_GENES, transforms)]
    dropped: list[DroppedTransform] = []
    while (step := _rewrite_once(knowledge, chain)) is not None:
        chain, records = step
        dropped += records
    return tuple(chain), tuple(dropped)


def _reduce_tail(knowledge: str, chain: tuple, distance: str, calibration: str):
    """Strip the trailing transforms this distance ignores; count the `scale` ops folded in."""
    chain, dropped, scales = list(chain), [], 0
    folds_scale = distance in _SHIFT_FREE and calibration != "sim"
    while chain and calibration in _KNOWN_CALIBRATIONS:
        rank = KNOWLEDGE_RANK[knowledge]
        for name, _ in chain[:-1]:
            rank = TRANSFORM_RANKS[name][rank]
        name, gene = chain[-1]
        if distance == "cos" and name == "zscore" and calibration != "sim":
            # cos of the standardised samples is the cosine of the centred ones: pear
            distance = "pear"
            chain.pop()
            dropped.append(DroppedTransform(gene, name, "cos after zscore is pear"))
            continue
        reason = _tail_reason(name, rank, distance, calibration)
        if reason is None and name == "scale" and folds_scale:
            reason = f"the shift of (x+1)/2 cancels in {distance}; its 1/2 moves into T or lambda"
            scales += 1
        if reason is None:
            break
        chain.pop()
        dropped.append(DroppedTransform(gene, name, reason))
    refusal = None
    if distance == "kl" and chain:
        rank = KNOWLEDGE_RANK[knowledge]
        for name, _ in chain[:-1]:
            rank = TRANSFORM_RANKS[name][rank]
        last = chain[-1][0]
        if last == f"softmax_{_kl_axis(rank)}":
            refusal = (
                f"kl takes logits or log-probabilities, not the probabilities of {last}: "
                f"use logsoftmax_{_kl_axis(rank)} or drop {last}"
            )
    return tuple(chain), tuple(dropped), scales, refusal, distance


@functools.lru_cache(maxsize=1 << 16)
def _normal_form(spec: "DistillerSpec") -> _Normal:
    chain, dropped = _reduce_chain(spec.knowledge, spec.transforms)
    chain, tail, scales, refusal, distance = _reduce_tail(
        spec.knowledge, chain, spec.distance, spec.calibration
    )
    dropped += tail
    if spec.calibration in _KNOWN_CALIBRATIONS:
        form = _scale_form(distance, spec.temperature, _fraction(spec.magnitude), scales)
        folds_scale = distance in _SHIFT_FREE and spec.calibration != "sim"
        added, temperature, magnitude = _representative(
            distance, form, 3 - len(chain) if folds_scale else 0
        )
    else:  # it may read the knowledge as it pleases: T and lambda as written
        added, temperature, magnitude = 0, spec.temperature, spec.magnitude
    if added:  # the encoding keeps some of the scale ops it folded: they are not dropped
        kept = [i for i, d in enumerate(dropped) if d.name == "scale"][-added:]
        dropped = tuple(d for i, d in enumerate(dropped) if i not in kept)
    names = [name for name, _ in chain] + ["scale"] * added
    names += ["no"] * (3 - len(names))
    canonical = DistillerSpec(spec.knowledge, *names, distance, spec.calibration, temperature, magnitude)
    return _Normal(canonical, tuple(dropped), refusal)


_WHY_SCALE_FORM = {
    "l2": "l2 is homogeneous of degree 2 in the knowledge, so T cancels",
    "l1": "l1 is homogeneous of degree 1, so only lambda * T matters",
    "cos": "cos ignores the knowledge's scale, so only lambda * T^2 matters",
    "pear": "pear ignores the knowledge's scale, so only lambda * T^2 matters",
    "cor": "cor ignores the knowledge's scale, so only lambda * T^2 matters",
}


@dataclasses.dataclass(frozen=True)
class DistillerSpec:
    """One distiller: a value for each of the eight genes. Frozen and hashable.

    >>> spec = DistillerSpec("logit", "no", "no", "no", "kl", "no", 4, 1)
    >>> spec.formula()
    '16 * mean_n(KL(softmax(t_logit/4) || softmax(s_logit/4)))'
    """

    knowledge: str
    transform1: str
    transform2: str
    transform3: str
    distance: str
    calibration: str
    temperature: int
    magnitude: float

    def __post_init__(self) -> None:
        for gene in GENES:
            value = _check_option(gene, getattr(self, gene), FULL_OPTIONS[gene])
            object.__setattr__(self, gene, value)

    @property
    def transforms(self) -> tuple[str, str, str]:
        return (self.transform1, self.transform2, self.transform3)

    def to_params(self) -> dict[str, Any]:
        """The Optuna params of this spec, keyed by the public gene names."""
        return {gene: getattr(self, gene) for gene in GENES}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "DistillerSpec":
        """Build a spec from trial params; extra params (a user's own) are ignored."""
        missing = [gene for gene in GENES if gene not in params]
        if missing:
            raise InvalidSpace(f"params lack the genes {', '.join(missing)}")
        return cls(**{gene: params[gene] for gene in GENES})

    def to_json(self) -> str:
        return json.dumps(self.to_params(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DistillerSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidSpace(f"a distiller spec must be a JSON object: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidSpace("a distiller spec must be a JSON object of the eight genes")
        unknown = sorted(set(data) - set(GENES))
        if unknown:
            raise InvalidSpace(f"unknown genes {unknown}; the genes are: {', '.join(GENES)}")
        return cls.from_params(data)

    @classmethod
    def from_key(cls, key: str) -> "DistillerSpec":
        """The canonical spec of a :attr:`key` (``knowledge|t1>t2>t3|distance|calibration|T4|x10``),
        as a study's compare runs and the sampler's history store it; ``from_key(s.key).key ==
        s.key``. Anything else raises InvalidSpace."""
        parts = str(key).split("|")
        transforms = parts[1].split(">") if len(parts) == 6 else []
        if len(transforms) != 3 or not parts[4].startswith("T") or not parts[5].startswith("x"):
            raise InvalidSpace(f"{key!r} is not a distiller key such as 'logit|no>no>no|kl|no|T4|x1'")
        try:
            temperature, magnitude = int(parts[4][1:]), float(parts[5][1:])
        except ValueError:
            raise InvalidSpace(f"{key!r} is not a distiller key: its T and x parts must be numbers") from None
        return cls(parts[0], *transforms, parts[2], parts[3], temperature, magnitude)

    def effective_transforms(self) -> tuple[str, ...]:
        """The params' transforms that act at the rank they meet, in order (rank no-ops left out).

        This is the chain as written; ``canonical().effective_transforms()`` is the chain the
        loss computes, after the identities of ``canonical``.
        """
        rank = KNOWLEDGE_RANK[self.knowledge]
        acting = []
        for name in self.transforms:
            out = transform_output_rank(name, rank)
            if out is not None:
                acting.append(name)
                rank = out
        return tuple(acting)

    def output_rank(self) -> int:
        """Rank of the knowledge after the three transforms."""
        rank = KNOWLEDGE_RANK[self.knowledge]
        for name in self.transforms:
            rank = transform_output_rank(name, rank) or rank
        return rank

    def canonical(self) -> "DistillerSpec":
        """The normal form of this distiller's loss: one spec per loss, in the space's options.

        Two specs have equal canonical forms exactly when the identities below make their
        losses equal on every input (up to float rounding and the ops' eps guards, 1e-8 on
        norms). The identities are read off the op definitions:

        * transforms: no-ops at the knowledge's rank go; relu/abs/leaky after a non-negative
          output go; abs before an even op goes; pow2>pow2 is pow4; local_s1 on feature maps
          is batch; channel and batch move right past the ops that read H x W (or the sample)
          as a flat axis, and channel>batch is batch (see ``_rewrite_once``);
        * the last transforms a distance cannot see go: channel always (every distance reads
          (N, C, H, W) as (N, C, H*W)), batch before a flat distance, per-sample positive
          scalings before cos/pear, local patches (a permutation plus zeros) before cos/cor; and, unless ``sim`` reads them (it sees shifts),
          logsoftmax over kl's axis before kl, logsoftmax_C before hard, positive affine maps
          before pear (per sample) and cor (per column); cos after zscore is pear;
        * temperature and magnitude: the loss is lambda T^2 d(s/T, t/T), so with l2 T cancels,
          with l1 only lambda*T counts, with cos/pear/cor only lambda*T^2; a trailing ``scale``
          ((x+1)/2) folds into T (kl, hard, smooth_l1) or lambda (l1, l2). The encoding kept is
          the one with fewest transforms, then the lowest T.

        ``dropped_transforms()`` says which transforms of the params went and why.
        """
        return _normal_form(self).spec

    def dropped_transforms(self) -> tuple[DroppedTransform, ...]:
        """The params' transforms the canonical form does not compute as written, with why.

        >>> DistillerSpec("logit", "satt", "relu", "abs", "l2", "no", 1, 1).dropped_transforms()[0]
        DroppedTransform(gene='transform1', name='satt', reason='does not act on rank-2 knowledge')
        """
        return _normal_form(self).dropped

    def canonical_notes(self) -> list[str]:
        """One line per difference between the params and the canonical form, for a person."""
        notes = [f"{d.gene} {d.name}: {d.reason}" for d in self.dropped_transforms()]
        c = self.canonical()
        if (c.temperature, c.magnitude) != (self.temperature, self.magnitude):
            why = _WHY_SCALE_FORM.get(
                self.distance, f"{self.distance} depends only on T/a and lambda * T^2"
            )
            notes.append(
                f"T{self.temperature} x{self.magnitude:g} is T{c.temperature} x{c.magnitude:g}: {why}"
            )
        return notes

    def refusal(self) -> str | None:
        """Why this spec is not a distiller (DistillerLoss raises InvalidDistiller), or None.

        ``kl`` takes logits (or log-probabilities, which its log-softmax maps to the same
        distribution): a softmax over kl's own axis as the last transform would make kl compare
        the softmax of probabilities, a near-uniform pair (0.012 where plain KD gives 0.865), so
        that combination is refused rather than computed.
        """
        return _normal_form(self).refusal

    @property
    def key(self) -> str:
        """Canonical key, e.g. ``logit|no>no>no|kl|no|T4|x1``: what deduplication uses.

        Equal keys exactly when the canonical forms are equal (see ``canonical``).
        """
        c = self.canonical()
        return (
            f"{c.knowledge}|{'>'.join(c.transforms)}|{c.distance}|{c.calibration}"
            f"|T{c.temperature}|x{c.magnitude:g}"
        )

    def formula(self) -> str:
        """A formula a person can read, e.g. for the dashboard, of the canonical form.

        ``coefficient * mean_n(w_n * d_n)`` with the coefficient lambda * T^2; each op writes
        as its decorator's ``formula`` says, and a distance of two terms (``compound``) is in
        parentheses where a weight multiplies it.
        """
        c = self.canonical()

        def side(who: str) -> str:
            expr = f"{who}_{c.knowledge}"
            for name in c.effective_transforms():
                expr = _TRANSFORM_OPS.info(name).formula.format(x=expr)
            return f"{expr}/{c.temperature}" if c.temperature != 1 else expr

        measure = _DISTANCE_OPS.info(c.distance)
        distance = measure.formula.format(s=side("s"), t=side("t"))
        weight = _CALIBRATION_OPS.info(c.calibration).formula
        if weight is None:
            weighted = distance
        else:
            weighted = f"{weight} * " + (f"({distance})" if measure.compound else distance)
        coefficient = c.magnitude * c.temperature**2
        return f"{coefficient:g} * mean_n({weighted})"

    def __str__(self) -> str:
        return self.key


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The options of every gene. The default is the whole space of the seed.

    A study config narrows it per gene, for example slot 1 to attention and mask ops::

        SearchSpace().narrow(transform1=["satt", "catt", "mask", "no"])
    """

    options: Mapping[str, tuple[Any, ...]] = dataclasses.field(
        default_factory=lambda: dict(FULL_OPTIONS)
    )

    def __post_init__(self) -> None:
        checked: dict[str, tuple[Any, ...]] = {}
        for gene in GENES:
            values = self.options.get(gene, FULL_OPTIONS[gene])
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise InvalidSpace(f"{gene} must be a list of options, got {values!r}")
            values = tuple(_check_option(gene, v, FULL_OPTIONS[gene]) for v in values)
            if not values:
                raise InvalidSpace(f"{gene} has no options left; give at least one")
            if len(set(values)) != len(values):
                raise InvalidSpace(f"{gene} lists an option twice: {list(values)}")
            checked[gene] = values
        for gene in self.options:
            _check_gene(gene)
        object.__setattr__(self, "options", checked)

    def __getitem__(self, gene: str) -> tuple[Any, ...]:
        _check_gene(gene)
        return self.options[gene]

    def narrow(self, **genes: Iterable[Any]) -> "SearchSpace":
        """A copy with the given genes limited to the given options."""
        for gene in genes:
            _check_gene(gene)
        return SearchSpace({**self.options, **genes})

    def contains(self, spec: DistillerSpec) -> bool:
        return all(getattr(spec, gene) in self.options[gene] for gene in GENES)

    def size(self) -> int:
        """Number of distinct params sets (before canonicalisation)."""
        total = 1
        for gene in GENES:
            total *= len(self.options[gene])
        return total

    def to_dict(self) -> dict[str, list[Any]]:
        return {gene: list(self.options[gene]) for gene in GENES}

    def __hash__(self) -> int:
        return hash(tuple((g, self.options[g]) for g in GENES))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchSpace) and self.to_dict() == other.to_dict()


def suggest_distiller(trial: Any, space: SearchSpace | None = None) -> DistillerSpec:
    """Ask ``trial`` for each gene with ``suggest_categorical`` and return the spec."""
    space = space or SearchSpace()
    params = {gene: trial.suggest_categorical(gene, list(space[gene])) for gene in GENES}
    return DistillerSpec.from_params(params)


def _clear_caches() -> None:
    _reduce_chain.cache_clear()
    _normal_form.cache_clear()


for _registry in (_TRANSFORM_OPS, _DISTANCE_OPS, _CALIBRATION_OPS):
    _registry.watch(_clear_caches)
