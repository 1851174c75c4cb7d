"""The EvolutionSampler that a study config's checked [search] table describes, proposer included.

:mod:`kd_optuna.run.config` checks the table and holds it; this module builds from it. The table
holds EvolutionSampler's keyword arguments (``space`` comes from the config's [space]), with
``warm_start`` true/false or a list of classic names (``kd_optuna.distill.classics.CLASSICS``),
and the :data:`PROPOSER_KEYS`, which make its ``proposer``: ``proposer = "random"`` (the default)
a ``RandomProposer()``, ``"llm"`` an ``LLMProposer`` of ``llm_url``, ``llm_model``,
``llm_timeout`` and ``llm_candidates``, ``"none"`` no proposer.

The sampler and the proposers are imported only when one is built, so the config layer reads
:data:`PROPOSER_KEYS` without importing Optuna.
"""

from __future__ import annotations

from typing import Any, Mapping

from kd_optuna.space import SearchSpace

#: The values of ``proposer`` in a [search] table.
PROPOSERS = ("random", "llm", "none")

#: [search] keys that build the proposer rather than go to EvolutionSampler as they are: key -> type.
PROPOSER_KEYS: dict[str, Any] = {
    "proposer": str,
    "llm_url": str,
    "llm_model": str,
    "llm_timeout": float,
    "llm_candidates": int,
}


def build_proposer(search: Mapping[str, Any], check_only: bool = False):
    """The proposer of a checked [search] table: a ``RandomProposer()`` for ``random`` (the
    default), an ``LLMProposer`` for ``llm``, None for ``none``, and for ``llm`` when
    ``check_only`` (no language model is set up to check settings or read weights)."""
    from kd_optuna.search.proposers import LLMProposer, RandomProposer

    proposer_name = search.get("proposer", "random")
    if proposer_name == "random":
        return RandomProposer()
    if proposer_name == "llm" and not check_only:
        llm = {"url": search.get("llm_url"), "model": search.get("llm_model")}
        if "llm_timeout" in search:
            llm["timeout"] = search["llm_timeout"]
        if "llm_candidates" in search:
            llm["n_candidates"] = search["llm_candidates"]
        return LLMProposer(**llm)
    return None


def build_sampler(search: Mapping[str, Any], space: SearchSpace, check_only: bool = False):
    """An EvolutionSampler from a checked [search] table and the study's space:
    the table's sampler keys as they are, ``warm_start`` names as the classics' specs, and the
    proposer of :func:`build_proposer` (``check_only``: no language model)."""
    from kd_optuna.distill.classics import CLASSICS
    from kd_optuna.search.sampler import EvolutionSampler

    kwargs = {k: v for k, v in search.items() if k not in PROPOSER_KEYS}
    if isinstance(kwargs.get("warm_start"), list):
        kwargs["warm_start"] = [CLASSICS[name][0] for name in kwargs["warm_start"]]
    return EvolutionSampler(space=space, proposer=build_proposer(search, check_only), **kwargs)
