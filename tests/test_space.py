"""The search space: genes, options, specs, canonical keys, formulas, Optuna suggestions."""

import json
import subprocess
import sys

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kd_optuna.distill.classics import CLASSICS, classic_specs
from kd_optuna.errors import InvalidSpace
from kd_optuna.space import (
    CALIBRATIONS,
    DISTANCES,
    GENES,
    KNOWLEDGE,
    MAGNITUDES,
    TEMPERATURES,
    TRANSFORMS,
    DistillerSpec,
    SearchSpace,
    suggest_distiller,
)

LISTING_1_TRANSFORMS = (
    "exp mish leaky relu tanh sigmoid pow2 pow4 log sqrt drop no satt natt catt mask bmm mm "
    "batch channel scale_r1 scale_r2 multi_scale_r4 local_s1 local_s2 local_s4 norm_HW norm_C "
    "norm_N softmax_N softmax_C softmax_HW scale logsoftmax_N logsoftmax_C logsoftmax_HW "
    "min_max_normalize batchnorm"
).split()

specs = st.builds(
    DistillerSpec,
    st.sampled_from(KNOWLEDGE),
    st.sampled_from(TRANSFORMS),
    st.sampled_from(TRANSFORMS),
    st.sampled_from(TRANSFORMS),
    st.sampled_from(DISTANCES),
    st.sampled_from(CALIBRATIONS),
    st.sampled_from(TEMPERATURES),
    st.sampled_from(MAGNITUDES),
)


def test_options_are_the_seeds():
    assert len(LISTING_1_TRANSFORMS) == 38
    assert set(TRANSFORMS) == set(LISTING_1_TRANSFORMS) | {"abs", "swish", "zscore"}
    assert len(TRANSFORMS) == 41
    assert DISTANCES == ("l1", "l2", "kl", "hard", "smooth_l1", "cos", "pear", "cor")
    assert CALIBRATIONS == ("entropy", "focal", "sim", "conf", "no")
    assert TEMPERATURES == (1, 4, 8, 16)
    assert MAGNITUDES == (100, 50, 25, 10, 5, 1, 0.1, 0.01)
    assert KNOWLEDGE == ("logit", "emb", "feat")
    assert GENES == (
        "knowledge", "transform1", "transform2", "transform3",
        "distance", "calibration", "temperature", "magnitude",
    )


def test_suggest_distiller_asks_optuna_for_each_gene_by_its_public_name():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    spec = suggest_distiller(trial)
    assert set(trial.params) == set(GENES)
    assert spec == DistillerSpec.from_params(trial.params)
    for gene in GENES:
        distribution = trial.distributions[gene]
        assert isinstance(distribution, optuna.distributions.CategoricalDistribution)
        assert tuple(distribution.choices) == SearchSpace()[gene]


def test_suggest_distiller_respects_a_narrowed_space():
    space = SearchSpace().narrow(transform1=["satt", "mask"], distance=["kl"], temperature=[4])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        spec = suggest_distiller(study.ask(), space)
        assert spec.transform1 in ("satt", "mask")
        assert spec.distance == "kl" and spec.temperature == 4
        assert space.contains(spec)


@settings(max_examples=300, deadline=None)
@given(specs)
def test_spec_round_trips_through_json_and_params(spec):
    assert DistillerSpec.from_json(spec.to_json()) == spec
    assert DistillerSpec.from_params(spec.to_params()) == spec
    assert hash(DistillerSpec.from_json(spec.to_json())) == hash(spec)
    json.loads(spec.to_json())


@settings(max_examples=300, deadline=None)
@given(specs)
def test_canonical_form_is_idempotent_and_keeps_the_key(spec):
    canonical = spec.canonical()
    assert canonical.canonical() == canonical
    assert canonical.key == spec.key
    assert canonical.formula() == spec.formula()
    assert canonical.refusal() == spec.refusal()
    assert canonical.dropped_transforms() == ()
    assert DistillerSpec.from_key(spec.key) == canonical


@pytest.mark.parametrize("key", ["", "logit|no>no|kl|no|T4|x1", "logit|no>no>no|kl|no|4|x1", "logit|no>no>no|kl|no|T4|xten",
                                 "logit|no>no>no|kl|no|T3|x1", "pixel|no>no>no|kl|no|T4|x1"])
def test_from_key_refuses_what_is_not_a_key(key):
    with pytest.raises(InvalidSpace):
        DistillerSpec.from_key(key)


def test_transforms_that_cannot_act_on_logits_collapse_to_no():
    spatial = DistillerSpec("logit", "satt", "mask", "local_s2", "kl", "no", 4, 1)
    plain = DistillerSpec("logit", "no", "no", "no", "kl", "no", 4, 1)
    assert spatial.key == plain.key
    assert spatial.canonical() == plain


def test_no_ops_in_any_slot_share_one_key():
    a = DistillerSpec("emb", "no", "relu", "no", "l2", "no", 1, 1)
    b = DistillerSpec("emb", "relu", "no", "scale_r1", "l2", "no", 1, 1)
    assert a.key == b.key == "emb|relu>no>no|l2|no|T1|x1"


def test_rank_is_tracked_through_the_transforms():
    # `batch` flattens a feature map to (N, CHW): a spatial op after it is a no-op...
    flattened = DistillerSpec("feat", "batch", "satt", "no", "l2", "no", 1, 1)
    assert flattened.key == DistillerSpec("feat", "batch", "no", "no", "l2", "no", 1, 1).key
    # ...but before it, it acts.
    attended = DistillerSpec("feat", "satt", "batch", "no", "l2", "no", 1, 1)
    assert attended.effective_transforms() == ("satt", "batch")
    assert DistillerSpec("feat", "channel", "no", "no", "kl", "no", 1, 1).output_rank() == 3


def test_distinct_losses_keep_distinct_keys():
    keys = {s.key for s in classic_specs()}
    assert len(keys) == len(CLASSICS)
    base = DistillerSpec("logit", "no", "no", "no", "kl", "no", 4, 1)
    for gene, other in [("distance", "l2"), ("temperature", 8), ("magnitude", 0.1),
                        ("calibration", "focal"), ("transform1", "relu")]:
        assert DistillerSpec(**{**base.to_params(), gene: other}).key != base.key


def test_formula_reads_like_the_textbook_kd_loss():
    kd = CLASSICS["kd"][0]
    assert kd.formula() == "16 * mean_n(KL(softmax(t_logit/4) || softmax(s_logit/4)))"
    weighted = DistillerSpec("feat", "satt", "no", "no", "l2", "focal", 1, 0.1)
    assert weighted.formula() == "0.1 * mean_n(w_focal * (satt(s_feat) - satt(t_feat))^2)"


def test_defect_formula_put_no_parentheses_around_a_weighted_difference():
    pear = DistillerSpec("logit", "no", "no", "no", "pear", "focal", 1, 100)
    assert pear.formula() == "100 * mean_n(w_focal * (1 - pearson(s_logit, t_logit)))"
    cos = DistillerSpec("emb", "relu", "no", "no", "cos", "sim", 1, 1)
    assert cos.formula() == "1 * mean_n(w_sim * (1 - cos(relu(s_emb), relu(t_emb))))"
    assert DistillerSpec("emb", "no", "no", "no", "cos", "no", 1, 1).formula() == (
        "1 * mean_n(1 - cos(s_emb, t_emb))"
    )


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"distance": "euclid"}, "distance = 'euclid' is not an option; choose one of: l1, l2"),
        ({"temperature": 3}, "temperature = 3 is not an option; choose one of: 1, 4, 8, 16"),
        ({"transform2": "softmax"}, "transform2 = 'softmax' is not an option"),
        ({"temperature": "4"}, "temperature = '4' is not an option"),
        ({"magnitude": True}, "magnitude = True is not an option"),
    ],
)
def test_invalid_options_name_the_gene_and_the_valid_options(params, fragment):
    base = CLASSICS["kd"][0].to_params()
    with pytest.raises(InvalidSpace, match=".*") as info:
        DistillerSpec(**{**base, **params})
    assert fragment in str(info.value)


def test_narrowing_validates_names_and_keeps_at_least_one_option():
    with pytest.raises(InvalidSpace, match="unknown gene 'transform4'"):
        SearchSpace().narrow(transform4=["relu"])
    with pytest.raises(InvalidSpace, match="transform1 = 'attention' is not an option"):
        SearchSpace().narrow(transform1=["attention"])
    with pytest.raises(InvalidSpace, match="distance has no options left"):
        SearchSpace().narrow(distance=[])
    with pytest.raises(InvalidSpace, match="must be a list"):
        SearchSpace().narrow(distance="kl")
    with pytest.raises(InvalidSpace, match="twice"):
        SearchSpace().narrow(distance=["kl", "kl"])
    narrow = SearchSpace().narrow(transform3=["norm_C", "norm_HW", "no"])
    assert narrow["transform3"] == ("norm_C", "norm_HW", "no")
    assert narrow["transform1"] == TRANSFORMS
    assert SearchSpace(narrow.to_dict()) == narrow


def test_from_json_refuses_unknown_genes_and_non_objects():
    with pytest.raises(InvalidSpace, match="unknown genes"):
        DistillerSpec.from_json(json.dumps({**CLASSICS["kd"][0].to_params(), "code": "x"}))
    with pytest.raises(InvalidSpace, match="JSON object"):
        DistillerSpec.from_json("[1, 2]")
    with pytest.raises(InvalidSpace, match="JSON object"):
        DistillerSpec.from_json("{not json")


def test_space_is_importable_without_torch():
    code = (
        "import sys, kd_optuna.space, kd_optuna.distill.classics; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_classics_each_have_a_description_naming_a_paper():
    for name, (spec, description) in CLASSICS.items():
        assert isinstance(spec, DistillerSpec)
        assert any(str(year) in description for year in range(2014, 2027)), name
