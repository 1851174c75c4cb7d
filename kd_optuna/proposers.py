"""Where a child distiller comes from: mutation, crossover, random, or a language model.

Every proposer answers one question, ``propose(context) -> list[Candidate]``: given the
population, the tournament's top-k parents, the option weights in force and the canonical keys
that must not be proposed again, return new candidate specs (possibly none). Proposers never
touch the study; the sampler builds the :class:`ProposalContext` from the storage and writes
the lineage of the winner. They draw randomness only from ``context.rng`` so a seeded sampler
stays deterministic.

- :class:`MutationProposer`: a random top-k parent with one or more genes redrawn.
- :class:`CrossoverProposer`: uniform crossover of two top-k parents, then light mutation.
- :class:`RandomProposer`: a fresh spec drawn from the option weights (Algorithm 1's E).
- :class:`LLMProposer`: asks an OpenAI-compatible ``/v1/chat/completions`` endpoint for
  candidates, given the top of the population and the search space; its reply is parsed as
  JSON data only and validated against the space. Any failure yields no candidate and a
  logged warning, so the sampler falls back to its mutated child.
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

from kd_optuna.errors import InvalidSpace, KdOptunaError
from kd_optuna.space import GENES, DistillerSpec, SearchSpace

_logger = logging.getLogger(__name__)

#: gene -> option -> weight (>= 0; 0 means the option dropped out of the search).
Weights = Mapping[str, Mapping[Any, float]]


class ProposerConfigError(KdOptunaError, ValueError):
    """A proposer was configured with a missing or invalid setting."""


@dataclasses.dataclass(frozen=True)
class Member:
    """A completed trial of the population: its number, spec and score (lower = better)."""

    number: int
    spec: DistillerSpec
    score: float


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A proposed child and its lineage."""

    spec: DistillerSpec
    proposer: str
    parent: int | None = None
    second_parent: int | None = None
    mutated: tuple[str, ...] = ()


@dataclasses.dataclass
class ProposalContext:
    """What a proposer may look at. ``population`` and ``parents`` are best first."""

    space: SearchSpace
    weights: Weights
    population: Sequence[Member]
    parents: Sequence[Member]
    seen: Container[str]
    rng: np.random.RandomState
    mutation_prob: float = 0.2
    max_tries: int = 64

    def is_new(self, spec: DistillerSpec) -> bool:
        """In the space, no dropped option, and its canonical key not seen in the study."""
        return (
            self.space.contains(spec)
            and all(self.weights[g].get(getattr(spec, g), 0.0) > 0 for g in GENES)
            and spec.key not in self.seen
        )


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


def mutate(
    spec: DistillerSpec,
    weights: Weights,
    rng: np.random.RandomState,
    prob: float,
    at_least_one: bool = True,
) -> tuple[DistillerSpec, tuple[str, ...]]:
    """Redraw each gene with probability ``prob`` (at least one if asked) from the weights.

    A redrawn gene always changes value; genes with no other option of positive weight stay.
    """
    params = spec.to_params()
    mutable = [g for g in GENES if _has_alternative(weights[g], params[g])]
    chosen = [g for g in mutable if rng.random_sample() < prob]
    if not chosen and at_least_one and mutable:
        chosen = [mutable[int(rng.randint(len(mutable)))]]
    for gene in chosen:
        params[gene] = draw_option(weights[gene], rng, exclude=params[gene])
    return DistillerSpec.from_params(params), tuple(chosen)


class Proposer(abc.ABC):
    """Offers candidate children; ``name`` is recorded as the trial's ``proposer`` user attr."""

    name: str = "proposer"

    @abc.abstractmethod
    def propose(self, context: ProposalContext) -> list[Candidate]:
        """New candidates (``context.is_new``), best guess first; empty if none found."""


class MutationProposer(Proposer):
    """A random top-k parent, with each gene redrawn at ``mutation_prob`` (at least one)."""

    name = "mutation"

    def propose(self, context: ProposalContext) -> list[Candidate]:
        if not context.parents:
            return []
        for _ in range(context.max_tries):
            parent = context.parents[int(context.rng.randint(len(context.parents)))]
            child, mutated = mutate(
                parent.spec, context.weights, context.rng, context.mutation_prob
            )
            if context.is_new(child):
                return [Candidate(child, self.name, parent=parent.number, mutated=mutated)]
        return []


class CrossoverProposer(Proposer):
    """Uniform crossover of two distinct top-k parents, then mutation at ``mutation_prob``.

    Each gene comes from either parent with probability 1/2; ``mutated`` lists the genes
    redrawn after the crossover. Needs two parents; proposes nothing with fewer.
    """

    name = "crossover"

    def propose(self, context: ProposalContext) -> list[Candidate]:
        if len(context.parents) < 2:
            return []
        rng = context.rng
        for _ in range(context.max_tries):
            i, j = rng.choice(len(context.parents), size=2, replace=False)
            first, second = context.parents[int(i)], context.parents[int(j)]
            a, b = first.spec.to_params(), second.spec.to_params()
            mixed = {g: (a[g] if rng.random_sample() < 0.5 else b[g]) for g in GENES}
            child, mutated = mutate(
                DistillerSpec.from_params(mixed),
                context.weights,
                rng,
                context.mutation_prob,
                at_least_one=False,
            )
            if context.is_new(child):
                return [
                    Candidate(
                        child,
                        self.name,
                        parent=first.number,
                        second_parent=second.number,
                        mutated=mutated,
                    )
                ]
        return []


class RandomProposer(Proposer):
    """Fresh specs, each gene drawn from the option weights in force (Algorithm 1's E).

    ``n_candidates`` distinct new specs are offered; the sampler's predictor keeps the one
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
            spec = random_spec(context.weights, context.rng)
            if context.is_new(spec) and spec.key not in found:
                found[spec.key] = Candidate(spec, self.name)
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
            for m in list(context.population)[: self.top]
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
            if context.is_new(spec) and all(spec.key != c.spec.key for c in candidates):
                candidates.append(Candidate(spec, self.name))
        if not candidates:
            return self._give_up(
                f"no new valid distiller in the reply from {where} "
                f"({len(items)} given, {invalid} invalid)"
            )
        return candidates

    def _give_up(self, why: str) -> list[Candidate]:
        _logger.warning("language-model proposer: %s; falling back to mutation", why)
        return []
