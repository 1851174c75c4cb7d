"""kd_optuna.search.lineage: one prefix for the sampler's lineage attrs, and studies written before it."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from kd_optuna.search.lineage import NAMES, PREFIX, attr_name, read_lineage

OLD = {"proposer": "mutation", "parent": 3, "crossover_parent": 1, "mutated": ["distance"],
       "predictor": {"winner": "mutation"}, "space_state": {"basis": 50}, "sampler_note": "a note"}


def test_attr_name_prefixes_and_refuses_other_names():
    assert attr_name("proposer") == "lineage:proposer" == PREFIX + "proposer"
    with pytest.raises(KeyError):
        attr_name("val_ce")


def test_read_lineage_reads_the_prefixed_names_and_the_unprefixed_ones_of_earlier_versions():
    assert set(OLD) == set(NAMES)
    new = {PREFIX + k: v for k, v in OLD.items()}
    other = {"val_ce": 0.5, "spec": "key"}
    assert read_lineage({**new, **other}) == OLD
    assert read_lineage({**OLD, **other}) == OLD  # a study written before the prefix
    assert read_lineage(other) == {}
    assert read_lineage({"proposer": "random", PREFIX + "proposer": "llm"}) == {"proposer": "llm"}


def test_read_lineage_of_a_stored_trial_of_an_old_study():
    study = optuna.create_study()
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=1.0, params={"x": 0.5},
                                 distributions={"x": FloatDistribution(0, 1)}, user_attrs=OLD))
    assert read_lineage(study.trials[0]) == OLD
