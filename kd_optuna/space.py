"""The distiller search space of KD-Zero (seed E.1-E.3, Listing 1), as Optuna categoricals.

A distiller is eight genes, each suggested under a fixed public parameter name::

    knowledge    which outputs are compared: logit (N, K), emb (N, D) or feat (N, C, H, W)
    transform1-3 three transforms applied in order to both teacher and student knowledge
    distance     d(student, teacher) -> one value per sample, never negative
    calibration  a detached, non-negative weight per sample
    temperature  T, the knowledge is divided by T after the transforms
    magnitude    the loss weight lambda

and the loss it stands for is ``lambda * T^2 * mean_n(w_n * d_n)`` (see ``kd_optuna.loss``).

This module is plain data: it imports no torch, so the sampler and the command line can use it
without loading a deep-learning stack. What a transform does to the *rank* of a tensor is part
of that data (``TRANSFORM_RANKS``): it decides which transforms are no-ops on which knowledge,
and so the canonical form of a spec.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Mapping

from kd_optuna.errors import InvalidSpace

KNOWLEDGE: tuple[str, ...] = ("logit", "emb", "feat")

#: Rank of each knowledge tensor: logits and embeddings are (N, K), feature maps (N, C, H, W).
KNOWLEDGE_RANK: dict[str, int] = {"logit": 2, "emb": 2, "feat": 4}

_EVERY_RANK = {2: 2, 3: 3, 4: 4}

#: For each transform, ``{input rank: output rank}`` for the ranks it acts on; at any rank not
#: listed the transform returns its input unchanged. Listing 1's 38 names plus Listing 2's
#: ``abs`` and ``swish``, spelled as in Listing 1.
TRANSFORM_RANKS: dict[str, dict[int, int]] = {
    # element-wise
    "exp": _EVERY_RANK,
    "mish": _EVERY_RANK,
    "leaky": _EVERY_RANK,
    "relu": _EVERY_RANK,
    "tanh": _EVERY_RANK,
    "sigmoid": _EVERY_RANK,
    "pow2": _EVERY_RANK,
    "pow4": _EVERY_RANK,
    "log": _EVERY_RANK,
    "sqrt": _EVERY_RANK,
    "abs": _EVERY_RANK,
    "swish": _EVERY_RANK,
    "scale": _EVERY_RANK,
    "drop": _EVERY_RANK,
    "no": {},
    # attention and masks (FGD, MGD)
    "satt": {4: 4},
    "natt": _EVERY_RANK,
    "catt": _EVERY_RANK,
    "mask": {4: 4},
    # relations: Gram matrices between channels (ICKD) and between samples (SP)
    "bmm": {3: 3, 4: 3},
    "mm": {2: 2, 3: 2, 4: 2},
    # reshapes
    "batch": {3: 2, 4: 2},
    "channel": {4: 3},
    # multi-scale (KR) and local (LKD)
    "scale_r1": {},
    "scale_r2": {4: 4},
    "multi_scale_r4": {4: 4},
    "local_s1": {4: 2},
    "local_s2": {4: 4},
    "local_s4": {4: 4},
    # normalisations
    "norm_HW": {3: 3, 4: 4},
    "norm_C": _EVERY_RANK,
    "norm_N": _EVERY_RANK,
    "softmax_N": _EVERY_RANK,
    "softmax_C": _EVERY_RANK,
    "softmax_HW": {3: 3, 4: 3},
    "logsoftmax_N": _EVERY_RANK,
    "logsoftmax_C": _EVERY_RANK,
    "logsoftmax_HW": {3: 3, 4: 3},
    "min_max_normalize": _EVERY_RANK,
    "batchnorm": _EVERY_RANK,
}

TRANSFORMS: tuple[str, ...] = tuple(TRANSFORM_RANKS)
DISTANCES: tuple[str, ...] = ("l1", "l2", "kl", "hard", "smooth_l1", "cos", "pear", "cor")
CALIBRATIONS: tuple[str, ...] = ("entropy", "focal", "sim", "conf", "no")
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

FULL_OPTIONS: dict[str, tuple[Any, ...]] = {
    "knowledge": KNOWLEDGE,
    "transform1": TRANSFORMS,
    "transform2": TRANSFORMS,
    "transform3": TRANSFORMS,
    "distance": DISTANCES,
    "calibration": CALIBRATIONS,
    "temperature": TEMPERATURES,
    "magnitude": MAGNITUDES,
}


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

    def effective_transforms(self) -> tuple[str, ...]:
        """The transforms that change the knowledge, in order, tracking the rank through them."""
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
        """The same distiller with no-op transforms removed and ``no`` padded at the end.

        Two specs with equal canonical forms compute the same loss, so they share one ``key``.
        """
        acting = self.effective_transforms()
        padded = acting + ("no",) * (3 - len(acting))
        return dataclasses.replace(
            self, transform1=padded[0], transform2=padded[1], transform3=padded[2]
        )

    @property
    def key(self) -> str:
        """Canonical key, e.g. ``logit|no>no>no|kl|no|T4|x1``: what deduplication uses."""
        c = self.canonical()
        return (
            f"{c.knowledge}|{'>'.join(c.transforms)}|{c.distance}|{c.calibration}"
            f"|T{c.temperature}|x{c.magnitude:g}"
        )

    def formula(self) -> str:
        """A formula a person can read, e.g. for the dashboard."""
        c = self.canonical()

        def side(who: str) -> str:
            expr = f"{who}_{c.knowledge}"
            for name in c.effective_transforms():
                expr = f"{name}({expr})"
            return f"{expr}/{c.temperature}" if c.temperature != 1 else expr

        s, t = side("s"), side("t")
        distance = {
            "l1": f"|{s} - {t}|",
            "l2": f"({s} - {t})^2",
            "kl": f"KL(softmax({t}) || softmax({s}))",
            "hard": f"CE({s}, argmax {t})",
            "smooth_l1": f"smoothL1({s} - {t})",
            "cos": f"1 - cos({s}, {t})",
            "pear": f"1 - pearson({s}, {t})",
            "cor": f"cor({s}, {t})",
        }[c.distance]
        weighted = distance if c.calibration == "no" else f"w_{c.calibration} * {distance}"
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
