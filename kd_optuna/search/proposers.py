"""Where a child comes from: mutation, crossover, random, or a language model.

Every proposer answers one question, ``propose(context) -> list[Candidate]``: given the
population, the tournament's top-k parents, the option weights in force and the keys that must
not be proposed again, return new candidates (possibly none). Proposers never touch the study;
the sampler builds the :class:`ProposalContext` from the storage and writes the lineage of the
winner. They draw randomness only from ``context.rng`` so a seeded sampler stays deterministic.

A candidate is a genome: the distiller genes as a :class:`DistillerSpec` (``None`` in a study
without them) and ``extra``, every other parameter of the relative search space
(``context.distributions``: a learning rate, a layer choice, ...). Genes are redrawn from the
option weights (shrinkage); other parameters mutate by type (:mod:`kd_optuna.search.evolution`). Its
key is the distiller's canonical key followed by the other params, so one loss is trained once
per setting of the user's hyperparameters.

- :class:`MutationProposer`: a random top-k parent with one or more genes or params mutated.
- :class:`CrossoverProposer`: uniform crossover of two top-k parents, then light mutation.
- :class:`RandomProposer`: a fresh genome drawn from the option weights (Algorithm 1's E).
- :class:`LLMProposer`: asks an OpenAI-compatible ``/v1/chat/completions`` endpoint for
  distillers, given the top of the population and the search space; its reply is parsed as
  JSON data only and validated against the space. Any failure yields no candidate and a
  logged warning, so the sampler falls back to its mutated child. Other params of its
  candidates are drawn at random.
"""

from __future__ import annotations

import abc
import dataclasses
import http.client
import json
import logging
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Container, Mapping, Sequence

import numpy as np
from optuna.distributions import BaseDistribution

from kd_optuna.search import evolution
from kd_optuna.errors import InvalidSpace, KdOptunaError
from kd_optuna.space import GENES, DistillerSpec, SearchSpace

_logger = logging.getLogger(__name__)

#: gene -> option -> weight (>= 0; 0 means the option dropped out of the search).
Weights = Mapping[str, Mapping[Any, float]]

_NO_EXTRA: Mapping[str, Any] = {}


class ProposerConfigError(KdOptunaError, ValueError):
    """A proposer was configured with a missing or invalid setting."""


@dataclasses.dataclass(frozen=True)
class Member:
    """A completed trial of the population: its number, spec (``None`` without the genes),
    score (lower = better) and ``extra``, its params outside the eight genes."""

    number: int
    spec: DistillerSpec | None
    score: float
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A proposed child (spec and other params) and its lineage."""

    spec: DistillerSpec | None
    proposer: str
    parent: int | None = None
    second_parent: int | None = None
    mutated: tuple[str, ...] = ()
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return evolution.genome_key(self.spec.key if self.spec else None, self.extra)

    def params(self) -> dict[str, Any]:
        """The child's params: the genes (if any) and the other params."""
        return {**(self.spec.to_params() if self.spec else {}), **self.extra}


@dataclasses.dataclass
class ProposalContext:
    """What a proposer may look at. ``population`` and ``parents`` are best first.

    ``genes``: whether the genome holds the eight distiller genes (drawn from ``space`` and
    ``weights``); ``distributions``: the other params of the genome; ``scale``: the Gaussian
    step of a mutated number, as a fraction of its (log-)range; ``numbers``: whether
    mutation and crossover children have their ints and floats mutated (``False``: the
    sampler mutates them after screening, so any child is accepted here and at least one
    mutation is left to the sampler).
    """

    space: SearchSpace
    weights: Weights
    population: Sequence[Member]
    parents: Sequence[Member]
    seen: Container[str]
    rng: np.random.RandomState
    mutation_prob: float = 0.2
    max_tries: int = 64
    distributions: Mapping[str, BaseDistribution] = dataclasses.field(default_factory=dict)
    genes: bool = True
    scale: float = 0.1
    numbers: bool = True

    def is_new(self, spec: DistillerSpec | None, extra: Mapping[str, Any] = _NO_EXTRA) -> bool:
        """In the space, no dropped option, and its key not seen in the study."""
        if self.genes:
            if spec is None or not self.space.contains(spec):
                return False
            if not all(self.weights[g].get(getattr(spec, g), 0.0) > 0 for g in GENES):
                return False
        elif spec is not None:
            return False
        return evolution.genome_key(spec.key if spec else None, extra) not in self.seen

    def random_extra(self) -> dict[str, Any]:
        """The other params drawn uniformly (log-uniformly where ``log``)."""
        return {n: evolution.draw(d, self.rng) for n, d in self.distributions.items()}

    def extra_of(self, member: Member) -> dict[str, Any]:
        """``member``'s other params over ``distributions`` (drawn where it has none)."""
        return evolution.inherit(member.extra, self.distributions, self.rng)


def draw_option(options: Mapping[Any, float], rng: np.random.RandomState, exclude: Any = None):
    """One option drawn with probability proportional to its weight; ``exclude`` never drawn.

    Returns ``None`` when no option with positive weight is left.
    """
    names = [o for o, w in options.items() if w > 0 and o != exclude]
    if not names:
        return None
    weights = np.array([options[o] for o in names], dtype=float)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def _has_alternative(options: Mapping[Any, float], current: Any) -> bool:
    return any(w > 0 and o != current for o, w in options.items())


def random_spec(weights: Weights, rng: np.random.RandomState) -> DistillerSpec:
    """A spec with each gene drawn independently from the weights."""
    return DistillerSpec.from_params({g: draw_option(weights[g], rng) for g in GENES})


def mutate_genome(
    spec: DistillerSpec | None,
    extra: Mapping[str, Any],
    weights: Weights,
    distributions: Mapping[str, BaseDistribution],
    rng: np.random.RandomState,
    prob: float,
    scale: float = 0.1,
    at_least_one: bool = True,
    numbers: bool = True,
) -> tuple[DistillerSpec | None, dict[str, Any], tuple[str, ...]]:
    """Mutate each gene and each other param with probability ``prob`` (at least one if asked).

    A gene is redrawn from the weights and always changes value; genes with no other option
    of positive weight stay. Another param mutates by its distribution
    (:func:`kd_optuna.search.evolution.mutate_value`); with ``numbers=False`` ints and floats are
    left as they are. Returns the spec, the other params and the
    names mutated (genes first, in gene order, then the others sorted).
    """
    params = spec.to_params() if spec is not None else {}
    extra = dict(extra)
    mutable = [g for g in (GENES if spec is not None else ()) if _has_alternative(weights[g], params[g])]
    mutable += [
        n
        for n in sorted(distributions)
        if evolution.can_change(distributions[n]) and (numbers or evolution.is_categorical(distributions[n]))
    ]
    chosen = [name for name in mutable if rng.random_sample() < prob]
    if not chosen and at_least_one and mutable:
        chosen = [mutable[int(rng.randint(len(mutable)))]]
    for name in chosen:
        if name in params and name in GENES:
            params[name] = draw_option(weights[name], rng, exclude=params[name])
        else:
            extra[name] = evolution.mutate_value(distributions[name], extra[name], rng, scale)
    child = DistillerSpec.from_params(params) if spec is not None else None
    return child, extra, tuple(chosen)


def mutate(
    spec: DistillerSpec,
    weights: Weights,
    rng: np.random.RandomState,
    prob: float,
    at_least_one: bool = True,
) -> tuple[DistillerSpec, tuple[str, ...]]:
    """:func:`mutate_genome` on the genes alone."""
    child, _, mutated = mutate_genome(spec, {}, weights, {}, rng, prob, at_least_one=at_least_one)
    assert child is not None
    return child, mutated


class Proposer(abc.ABC):
    """Offers candidate children; ``name`` is recorded as the trial's ``lineage:proposer`` user attr."""

    name: str = "proposer"

    @abc.abstractmethod
    def propose(self, context: ProposalContext) -> list[Candidate]:
        """New candidates (``context.is_new``), best guess first; empty if none found."""


def _parent_spec(context: ProposalContext, member: Member) -> DistillerSpec | None:
    if not context.genes:
        return None
    return member.spec if member.spec is not None else random_spec(context.weights, context.rng)


class MutationProposer(Proposer):
    """A random top-k parent, each gene and param mutated at ``mutation_prob`` (at least one)."""

    name = "mutation"

    def propose(self, context: ProposalContext) -> list[Candidate]:
        if not context.parents:
            return []
        for _ in range(context.max_tries):
            parent = context.parents[int(context.rng.randint(len(context.parents)))]
            child, extra, mutated = mutate_genome(
                _parent_spec(context, parent),
                context.extra_of(parent),
                context.weights,
                context.distributions,
                context.rng,
                context.mutation_prob,
                context.scale,
                at_least_one=context.numbers,
                numbers=context.numbers,
            )
            if context.is_new(child, extra) or not context.numbers:
                return [
                    Candidate(child, self.name, parent=parent.number, mutated=mutated, extra=extra)
                ]
        return []


class CrossoverProposer(Proposer):
    """Uniform crossover of two distinct top-k parents, then mutation at ``mutation_prob``.

    Each gene and each other param comes from either parent with probability 1/2; ``mutated``
    lists those mutated after the crossover. Needs two parents; proposes nothing with fewer.
    """

    name = "crossover"

    def propose(self, context: ProposalContext) -> list[Candidate]:
        if len(context.parents) < 2:
            return []
        rng = context.rng
        for _ in range(context.max_tries):
            i, j = rng.choice(len(context.parents), size=2, replace=False)
            first, second = context.parents[int(i)], context.parents[int(j)]
            spec = None
            if context.genes:
                a = _parent_spec(context, first).to_params()  # type: ignore[union-attr]
                b = _parent_spec(context, second).to_params()  # type: ignore[union-attr]
                spec = DistillerSpec.from_params(
                    {g: (a[g] if rng.random_sample() < 0.5 else b[g]) for g in GENES}
                )
            ea, eb = context.extra_of(first), context.extra_of(second)
            mixed = {
                n: evolution.cross_value(context.distributions[n], ea[n], eb[n], rng)
                for n in sorted(ea)
            }
            child, extra, mutated = mutate_genome(
                spec,
                mixed,
                context.weights,
                context.distributions,
                rng,
                context.mutation_prob,
                context.scale,
                at_least_one=False,
                numbers=context.numbers,
            )
            if context.is_new(child, extra) or not context.numbers:
                return [
                    Candidate(
                        child,
                        self.name,
                        parent=first.number,
                        second_parent=second.number,
                        mutated=mutated,
                        extra=extra,
                    )
                ]
        return []


class RandomProposer(Proposer):
    """Fresh genomes, each gene drawn from the option weights in force (Algorithm 1's E).

    ``n_candidates`` distinct new genomes are offered; the sampler's predictor keeps the one
    it rates best, so more candidates lean harder on the predictor.
    """

    name = "random"

    def __init__(self, n_candidates: int = 1) -> None:
        if n_candidates < 1:
            raise ProposerConfigError(f"n_candidates must be at least 1, got {n_candidates}")
        self.n_candidates = int(n_candidates)

    def __repr__(self) -> str:
        return f"RandomProposer(n_candidates={self.n_candidates})"

    def propose(self, context: ProposalContext) -> list[Candidate]:
        found: dict[str, Candidate] = {}
        for _ in range(context.max_tries):
            spec = random_spec(context.weights, context.rng) if context.genes else None
            candidate = Candidate(spec, self.name, extra=context.random_extra())
            if context.is_new(spec, candidate.extra) and candidate.key not in found:
                found[candidate.key] = candidate
                if len(found) == self.n_candidates:
                    break
        return list(found.values())


_MAX_REPLY_BYTES = 1 << 20
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def _endpoint(url: str) -> str:
    """The chat-completions URL for a base URL such as ``http://host:8000/v1``."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


def _host_of(url: str) -> str:
    """Scheme, host and port only: what an error message may show of the endpoint."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def _json_number(value: float) -> float | None:
    return round(float(value), 6) if math.isfinite(value) else None


def parse_candidates(content: str) -> list[dict[str, Any]]:
    """The candidate param dicts in a model's reply, read strictly as JSON data.

    Accepts ``{"candidates": [...]}`` or a bare list, either as the whole reply or inside a
    fenced code block. Raises ``ValueError`` when no JSON of that shape is found.
    """
    texts = [content.strip()] + [m.strip() for m in _FENCE.findall(content)]
    for start, end in (("{", "}"), ("[", "]")):
        i, j = content.find(start), content.rfind(end)
        if 0 <= i < j:
            texts.append(content[i : j + 1])
    for text in texts:
        try:
            data = json.loads(text)
        except ValueError:
            continue
        if isinstance(data, dict):
            data = data.get("candidates")
        if isinstance(data, list):
            return [item for item in data if isinstance(item, dict)]
    raise ValueError("the reply holds no JSON list of candidates")


def spec_from_reply_item(item: Mapping[str, Any], space: SearchSpace) -> DistillerSpec:
    """Validate one candidate dict: exactly the eight genes, each an option of ``space``."""
    unknown = sorted(set(item) - set(GENES), key=str)
    if unknown:
        raise InvalidSpace(f"unknown genes {unknown}")
    spec = DistillerSpec.from_params(item)
    if not space.contains(spec):
        raise InvalidSpace(f"{spec.key} is outside the search space")
    return spec


class LLMProposer(Proposer):
    """Candidates from a language model behind an OpenAI-compatible chat-completions API.

    ``url`` (a base such as ``http://host:8000/v1`` or the full ``.../chat/completions``),
    ``model`` and ``api_key`` come from the arguments or the environment variables
    ``KD_OPTUNA_LLM_URL``, ``KD_OPTUNA_LLM_MODEL`` and ``KD_OPTUNA_LLM_API_KEY``. The key is
    sent only as the ``Authorization: Bearer`` header; it is never logged, shown by ``repr``
    or put in an error message. One POST per child, ``timeout`` seconds per socket operation,
    replies over 1 MiB refused. The reply's message content is parsed by
    :func:`parse_candidates` (JSON only, never evaluated) and each candidate validated by
    :func:`spec_from_reply_item`; dropped options and seen keys are discarded.
    """

    name = "llm"

    def __init__(
        self,
        url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        n_candidates: int = 4,
        top: int = 10,
        temperature: float = 0.7,
    ) -> None:
        url = url or os.environ.get("KD_OPTUNA_LLM_URL")
        model = model or os.environ.get("KD_OPTUNA_LLM_MODEL")
        if not url:
            raise ProposerConfigError(
                "the language-model proposer has no URL; pass url= or set KD_OPTUNA_LLM_URL"
            )
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ProposerConfigError(
                f"the language-model URL must start with http:// or https://, got "
                f"{_host_of(url)}"
            )
        if not model:
            raise ProposerConfigError(
                "the language-model proposer has no model; pass model= or set "
                "KD_OPTUNA_LLM_MODEL"
            )
        if not timeout > 0 or n_candidates < 1 or top < 1:
            raise ProposerConfigError("timeout, n_candidates and top must be positive")
        self.url = _endpoint(url)
        self.model = model
        self._api_key = api_key or os.environ.get("KD_OPTUNA_LLM_API_KEY") or None
        self.timeout = float(timeout)
        self.n_candidates = int(n_candidates)
        self.top = int(top)
        self.temperature = float(temperature)

    def __repr__(self) -> str:
        return f"LLMProposer(url={_host_of(self.url)!r}, model={self.model!r})"

    def __getstate__(self) -> dict[str, Any]:
        # A pickle may reach a file or another process: the key stays out of it and the
        # unpickled proposer reads KD_OPTUNA_LLM_API_KEY from its own environment.
        state = dict(self.__dict__)
        state["_api_key"] = None
        return state

    def __copy__(self) -> "LLMProposer":
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def __deepcopy__(self, memo: dict[int, Any]) -> "LLMProposer":
        return self.__copy__()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._api_key = os.environ.get("KD_OPTUNA_LLM_API_KEY") or None

    def messages(self, context: ProposalContext) -> list[dict[str, str]]:
        """The chat messages: the task, the options left per gene, the best distillers."""
        options = {
            g: [o for o, w in context.weights[g].items() if w > 0] for g in GENES
        }
        best = [
            {"params": m.spec.to_params(), "score": _json_number(m.score)}
            for m in [m for m in context.population if m.spec is not None][: self.top]
        ]
        request = {
            "task": (
                "Propose knowledge-distillation losses (distillers) likely to score lower "
                "(better) than the best ones below. A distiller picks one option per gene: "
                "the knowledge compared, three transforms applied in order, a distance, a "
                "per-sample calibration weight, a temperature and a loss magnitude."
            ),
            "options": options,
            "best_so_far": best,
            "reply_format": {
                "candidates": [{g: "<one option of " + g + ">" for g in GENES}],
                "count": self.n_candidates,
                "rules": "Reply with only this JSON object; use the options verbatim; "
                "do not repeat a distiller listed in best_so_far.",
            },
        }
        return [
            {
                "role": "system",
                "content": "You design loss functions for knowledge distillation. "
                "You answer with JSON only.",
            },
            {"role": "user", "content": json.dumps(request)},
        ]

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps(payload).encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            raw = response.read(_MAX_REPLY_BYTES + 1)
        if len(raw) > _MAX_REPLY_BYTES:
            raise ValueError("the reply is larger than 1 MiB")
        return json.loads(raw.decode("utf-8"))

    def propose(self, context: ProposalContext) -> list[Candidate]:
        if not context.genes:
            return []
        payload = {
            "model": self.model,
            "messages": self.messages(context),
            "temperature": self.temperature,
        }
        where = _host_of(self.url)
        try:
            reply = self._post(payload)
            content = reply["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise ValueError("the message content is not text")
            items = parse_candidates(content)
        except urllib.error.HTTPError as exc:
            return self._give_up(f"HTTP {exc.code} from {where}")
        except urllib.error.URLError as exc:
            return self._give_up(f"cannot reach {where} ({type(exc.reason).__name__})")
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            return self._give_up(f"{type(exc).__name__} talking to {where}")
        except (KeyError, IndexError, TypeError) as exc:
            return self._give_up(f"reply from {where} is not a chat completion ({exc!r})")
        except ValueError as exc:
            return self._give_up(f"unusable reply from {where}: {exc}")
        candidates, invalid = [], 0
        for item in items:
            try:
                spec = spec_from_reply_item(item, context.space)
            except KdOptunaError:
                invalid += 1
                continue
            extra = context.random_extra()
            if context.is_new(spec, extra) and all(spec.key != c.spec.key for c in candidates):
                candidates.append(Candidate(spec, self.name, extra=extra))
        if not candidates:
            return self._give_up(
                f"no new valid distiller in the reply from {where} "
                f"({len(items)} given, {invalid} invalid)"
            )
        return candidates

    def _give_up(self, why: str) -> list[Candidate]:
        _logger.warning("language-model proposer: %s; falling back to mutation", why)
        return []
