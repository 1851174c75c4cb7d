"""Every use of Optuna's private API in kd-optuna, in one place.

The rest of the package uses Optuna's public API and calls these functions where none does
the job; each says in one line why no public API does it. When Optuna changes one of these
internals, this module is the only place to adapt. Optuna's own samplers use the same
internals for the same reasons (a sampler is handed a ``FrozenTrial``, which has no setters).
"""

from __future__ import annotations

from typing import Any

from optuna.storages import BaseStorage
from optuna.study import Study
from optuna.trial import FrozenTrial, Trial


def trial_id(trial: Trial | FrozenTrial) -> int:
    """The storage id of a trial: Optuna exposes only ``number``, every storage method takes the id."""
    return trial._trial_id


def study_id(study: Study) -> int:
    """The storage id of a study: no public accessor (``get_study_id_from_name`` costs a query a call)."""
    return study._study_id


def study_storage(study: Study) -> BaseStorage:
    """The storage a study reads and writes: no public accessor; study system attrs and a
    FrozenTrial's attrs can only be written through it."""
    return study._storage


def backend(storage: BaseStorage) -> BaseStorage:
    """The RDBStorage under Optuna's ``_CachedStorage`` wrapper (else ``storage``): only the
    backend has the engine, whose URL says where the study lives."""
    return getattr(storage, "_backend", storage)


def cached_trials(study: Study) -> list[FrozenTrial]:
    """The trial list as Optuna snapshots it once per trial (``_get_trials(use_cache=True)``):
    public ``get_trials`` reads the storage on every call."""
    return study._get_trials(deepcopy=False, use_cache=True)


def set_trial_user_attr(study: Study, trial: Trial | FrozenTrial, key: str, value: Any) -> None:
    """A user attr of a trial the caller holds as a FrozenTrial (a sampler): FrozenTrial has no setter."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def set_trial_system_attr(study: Study, trial: Trial | FrozenTrial, key: str, value: Any) -> None:
    """A system attr of a running trial: ``Trial.set_system_attr`` is gone from Optuna's public API."""
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def study_system_attrs(study: Study) -> dict[str, Any]:
    """The study's system attrs: ``Study.system_attrs`` is gone from Optuna's public API."""
    return study._storage.get_study_system_attrs(study._study_id)


def set_study_system_attr(study: Study, key: str, value: Any) -> None:
    """One study system attr: ``Study.set_system_attr`` is gone from Optuna's public API."""
    study._storage.set_study_system_attr(study._study_id, key, value)


def trial_system_attrs(study: Study, trial: Trial | FrozenTrial) -> dict[str, Any]:
    """A trial's system attrs as stored now (not as a possibly stale FrozenTrial holds them):
    a live Trial exposes no system attrs publicly."""
    return study._storage.get_trial_system_attrs(trial._trial_id)


def cached_storage_class() -> type:
    """The class of the cache Optuna wraps around an RDBStorage (``_CachedStorage``): private,
    and a benchmark that times storage calls has to wrap its methods too."""
    from optuna.storages._cached_storage import _CachedStorage

    return _CachedStorage


def lazy_random_state(seed: int | None = None):
    """Optuna's ``LazyRandomState``, the RandomState its own samplers hold (made on first use,
    so copies of an unseeded sampler each get their own entropy): the class is private."""
    from optuna.samplers._lazy_random_state import LazyRandomState

    return LazyRandomState(seed)



def wrapper_fixed_params(study: Study) -> dict[str, Any]:
    """The params that an ``optuna.samplers.PartialFixedSampler`` around the study's sampler
    fixes: it drops them from the relative search space and answers them itself, so its base
    sampler learns them only from this private attribute (no public accessor)."""
    from optuna.samplers import PartialFixedSampler

    sampler = getattr(study, "sampler", None)
    return dict(sampler._fixed_params) if isinstance(sampler, PartialFixedSampler) else {}
