"""An op is one function and one decorator: registering it is the only edit a new option needs.

Each test that registers an op of its own removes it again (the ``cleanup`` fixture) and checks
that the space is exactly what it was.
"""

import subprocess
import sys

import pytest
import torch

from kd_optuna import ops
from kd_optuna import space
from kd_optuna.errors import InvalidSpace
from kd_optuna.distill.loss import DistillerLoss
from kd_optuna.ops import (
    CALIBRATIONS,
    DISTANCES,
    EVERY_RANK,
    LOGITS_NEEDED,
    RANDOM_TRANSFORMS,
    TRANSFORMS,
    calibration,
    distance,
    transform,
)
from kd_optuna.space import DistillerSpec, SearchSpace

#: The options in the order of today's space: the sampler's seeded draws index into them.
TRANSFORM_ORDER = (
    "exp mish leaky relu tanh sigmoid pow2 pow4 log sqrt abs swish scale drop no satt natt catt "
    "mask bmm mm batch channel scale_r1 scale_r2 multi_scale_r4 local_s1 local_s2 local_s4 "
    "norm_HW norm_C norm_N softmax_N softmax_C softmax_HW logsoftmax_N logsoftmax_C "
    "logsoftmax_HW min_max_normalize batchnorm zscore"
).split()
DISTANCE_ORDER = ("l1", "l2", "kl", "hard", "smooth_l1", "cos", "pear", "cor")
CALIBRATION_ORDER = ("entropy", "focal", "sim", "conf", "no")
SHAPES = {"logit": (5,), "emb": (6,), "feat": (3, 4, 4)}


def snapshot():
    return (
        {gene: tuple(values) for gene, values in space.FULL_OPTIONS.items()},
        {name: dict(ranks) for name, ranks in space.TRANSFORM_RANKS.items()},
        set(RANDOM_TRANSFORMS),
        dict(LOGITS_NEEDED),
    )


@pytest.fixture
def cleanup():
    """Unregister whatever a test registered, and check the space is back as it was."""
    before = snapshot()
    names = [(registry, list(registry)) for registry in (TRANSFORMS, DISTANCES, CALIBRATIONS)]
    yield
    for registry, known in names:
        for name in [n for n in registry if n not in known]:
            registry.unregister(name)
    assert snapshot() == before


def batch(seed=0, n=4):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn((n, *shape), generator=generator) for name, shape in SHAPES.items()}


def test_options_keep_the_order_of_the_definitions():
    assert space.TRANSFORMS == tuple(TRANSFORM_ORDER)
    assert space.DISTANCES == DISTANCE_ORDER
    assert space.CALIBRATIONS == CALIBRATION_ORDER
    assert tuple(TRANSFORMS) == space.TRANSFORMS
    assert tuple(DISTANCES) == space.DISTANCES
    assert tuple(CALIBRATIONS) == space.CALIBRATIONS
    assert list(space.FULL_OPTIONS) == list(space.GENES)


def test_the_rank_table_is_the_decorators_ranks():
    for name in space.TRANSFORMS:
        assert space.TRANSFORM_RANKS[name] == dict(TRANSFORMS.info(name).ranks)
    assert space.TRANSFORM_RANKS["satt"] == {4: 4}
    assert space.TRANSFORM_RANKS["bmm"] == {3: 3, 4: 3}
    assert space.TRANSFORM_RANKS["no"] == {}
    assert space.TRANSFORM_RANKS["exp"] == {2: 2, 3: 3, 4: 4}
    assert RANDOM_TRANSFORMS == {"drop", "mask"}
    assert LOGITS_NEEDED == {"entropy": ("teacher",), "focal": ("student", "teacher"),
                             "conf": ("teacher",)}


def test_a_new_transform_is_in_the_space_the_formula_and_the_loss(cleanup):
    @transform("test_double", ranks=EVERY_RANK, formula="(2 * {x})")
    def test_double(x):
        """2 x, element-wise, same shape."""
        return 2 * x

    assert space.TRANSFORMS[-1] == "test_double"
    assert space.TRANSFORMS[:-1] == tuple(TRANSFORM_ORDER)
    for gene in space.TRANSFORM_GENES:
        assert space.FULL_OPTIONS[gene][-1] == "test_double"
        assert SearchSpace()[gene][-1] == "test_double"
    assert space.TRANSFORM_RANKS["test_double"] == {2: 2, 3: 3, 4: 4}
    narrowed = SearchSpace().narrow(transform1=["test_double", "no"])
    assert narrowed["transform1"] == ("test_double", "no")

    spec = DistillerSpec("logit", "test_double", "no", "no", "l2", "no", 1, 1)
    assert spec.key == "logit|test_double>no>no|l2|no|T1|x1"
    assert spec.formula() == "1 * mean_n(((2 * s_logit) - (2 * t_logit))^2)"
    assert DistillerSpec.from_json(spec.to_json()) == spec

    student, teacher = batch(0), batch(1)
    doubled = DistillerLoss(spec, SHAPES, SHAPES)(student, teacher)
    plain = DistillerSpec("logit", "no", "no", "no", "l2", "no", 1, 1)
    torch.testing.assert_close(doubled, 4 * DistillerLoss(plain, SHAPES, SHAPES)(student, teacher))


def test_a_new_transform_acts_only_at_its_ranks(cleanup):
    @transform("test_pool", ranks={4: 3}, formula="pool({x})")
    def test_pool(x):
        """Mean over W: (N, C, H, W) -> (N, C, H)."""
        return x.mean(dim=3)

    assert space.TRANSFORM_RANKS["test_pool"] == {4: 3}
    logit = DistillerSpec("logit", "test_pool", "no", "no", "l2", "no", 1, 1)
    assert logit.key == "logit|no>no>no|l2|no|T1|x1"  # a no-op on logits reduces to no
    assert logit.dropped_transforms()[0].reason == "does not act on rank-2 knowledge"
    feat = DistillerSpec("feat", "test_pool", "no", "no", "l2", "no", 1, 1)
    assert feat.output_rank() == 3
    assert feat.formula() == "1 * mean_n((pool(s_feat) - pool(t_feat))^2)"
    x = torch.randn(2, 5)
    assert TRANSFORMS["test_pool"](x) is x


def test_a_new_random_transform_gets_its_generator(cleanup):
    @transform("test_noise", ranks=EVERY_RANK, random=True)
    def test_noise(x, generator):
        """x + uniform noise, drawn alike for student and teacher."""
        return x + torch.rand(x.shape, generator=generator)

    assert "test_noise" in RANDOM_TRANSFORMS
    spec = DistillerSpec("emb", "test_noise", "no", "no", "l2", "no", 1, 1)
    assert spec.formula() == "1 * mean_n((test_noise(s_emb) - test_noise(t_emb))^2)"
    same = batch(0)
    torch.manual_seed(0)
    assert float(DistillerLoss(spec, SHAPES, SHAPES)(same, same)) == 0.0  # one draw for both


def test_a_new_distance_is_in_the_space_and_the_formula(cleanup):
    @distance("test_max", formula="1 - max({s}, {t})", compound=True)
    def test_max(student, teacher):
        """max over non-batch dims of |s - t| -> (N,)."""
        return (student - teacher).abs().flatten(1).amax(dim=1)

    assert space.DISTANCES == (*DISTANCE_ORDER, "test_max")
    assert space.FULL_OPTIONS["distance"][-1] == "test_max"
    assert SearchSpace()["distance"][-1] == "test_max"
    spec = DistillerSpec("emb", "no", "no", "no", "test_max", "sim", 4, 1)
    assert spec.formula() == "16 * mean_n(w_sim * (1 - max(s_emb/4, t_emb/4)))"
    plain = DistillerSpec("emb", "no", "no", "no", "test_max", "no", 1, 1)
    assert plain.formula() == "1 * mean_n(1 - max(s_emb, t_emb))"
    student, teacher = batch(0), batch(1)
    expected = (student["emb"] - teacher["emb"]).abs().amax(dim=1).mean()
    torch.testing.assert_close(DistillerLoss(plain, SHAPES, SHAPES)(student, teacher), expected)


def test_a_new_distance_keeps_temperature_and_magnitude_apart(cleanup):
    @distance("test_l2_copy", formula="copy({s}, {t})")
    def test_l2_copy(student, teacher):
        """As l2, but the space does not know its scale: T and lambda stay as they are."""
        return (student - teacher).pow(2).flatten(1).mean(dim=1)

    cos_a = DistillerSpec("emb", "no", "no", "no", "cos", "no", 4, 100)
    cos_b = DistillerSpec("emb", "no", "no", "no", "cos", "no", 8, 25)
    assert cos_a.key == cos_b.key  # lambda T^2 = 1600 both: cos ignores the scale
    a = DistillerSpec("emb", "no", "no", "no", "test_l2_copy", "no", 4, 100)
    b = DistillerSpec("emb", "no", "no", "no", "test_l2_copy", "no", 8, 25)
    assert a.key != b.key
    assert a.canonical() == a and b.canonical() == b


def test_a_new_calibration_is_in_the_space_the_formula_and_the_loss(cleanup):
    @calibration("test_half", logits=("teacher",))
    def test_half(inputs):
        """w = 0.5 for every sample, reading the teacher's logits."""
        return torch.full((inputs.teacher_logit.shape[0],), 0.5)

    assert space.CALIBRATIONS == (*CALIBRATION_ORDER, "test_half")
    assert SearchSpace()["calibration"][-1] == "test_half"
    assert LOGITS_NEEDED["test_half"] == ("teacher",)
    spec = DistillerSpec("emb", "no", "no", "no", "cos", "test_half", 1, 1)
    assert spec.formula() == "1 * mean_n(w_test_half * (1 - cos(s_emb, t_emb)))"
    loss = DistillerLoss(spec, SHAPES, SHAPES)
    assert loss.logits_needed == ("teacher",)
    student, teacher = batch(0), batch(1)
    plain = DistillerLoss(DistillerSpec("emb", "no", "no", "no", "cos", "no", 1, 1), SHAPES, SHAPES)
    torch.testing.assert_close(loss(student, teacher), 0.5 * plain(student, teacher))


def test_a_new_calibration_keeps_the_transforms_t_and_lambda_it_may_read(cleanup):
    @calibration("test_reader")
    def test_reader(inputs):
        """1 + the student's first transformed value, clamped at 0: reads the knowledge."""
        return inputs.student.flatten(1)[:, 0].detach().clamp(min=0) + 1

    kl = DistillerSpec("logit", "logsoftmax_C", "no", "no", "kl", "no", 4, 1)
    assert kl.key == "logit|no>no>no|kl|no|T4|x1"  # kl absorbs the shift; no reads nothing
    read = DistillerSpec("logit", "logsoftmax_C", "no", "no", "kl", "test_reader", 4, 1)
    assert read.key == "logit|logsoftmax_C>no>no|kl|test_reader|T4|x1"
    l2 = DistillerSpec("emb", "no", "no", "no", "l2", "no", 4, 1)
    assert l2.key == "emb|no>no>no|l2|no|T1|x1"  # T cancels in l2
    l2_read = DistillerSpec("emb", "no", "no", "no", "l2", "test_reader", 4, 1)
    assert l2_read.canonical() == l2_read
    assert l2_read.key == "emb|no>no>no|l2|test_reader|T4|x1"
    assert DistillerSpec("logit", "satt", "relu", "abs", "l2", "test_reader", 1, 1).key == (
        "logit|relu>no>no|l2|test_reader|T1|x1"  # exact rewrites of the chain still apply
    )


def test_a_calibration_without_a_weight_text_is_left_out_of_the_formula(cleanup):
    @calibration("test_one", formula=None)
    def test_one(inputs):
        """w = 1, as no."""
        return torch.ones(inputs.student.shape[0])

    spec = DistillerSpec("logit", "no", "no", "no", "l1", "test_one", 1, 1)
    assert spec.formula() == "1 * mean_n(|s_logit - t_logit|)"


def test_a_name_registers_once_and_unknown_names_are_clear_errors(cleanup):
    with pytest.raises(ValueError, match="twice"):
        transform("satt", ranks=(4,))(lambda x: x)
    with pytest.raises(ValueError, match="ranks"):
        transform("test_rank5", ranks=(5,))
    with pytest.raises(ValueError, match="logits"):
        calibration("test_who", logits=("peer",))
    with pytest.raises(InvalidSpace, match="unknown transform 'test_none'"):
        TRANSFORMS.unregister("test_none")
    with pytest.raises(InvalidSpace, match="unknown distance 'test_none'"):
        DISTANCES.info("test_none")
    with pytest.raises(InvalidSpace, match="test_x"):
        DistillerSpec("logit", "test_x", "no", "no", "l1", "no", 1, 1)


def test_a_removed_op_leaves_the_space():
    @transform("test_gone", ranks=EVERY_RANK)
    def test_gone(x):
        """Identity."""
        return x

    assert "test_gone" in space.TRANSFORMS
    TRANSFORMS.unregister("test_gone")
    assert "test_gone" not in space.TRANSFORMS
    assert space.TRANSFORMS == tuple(TRANSFORM_ORDER)
    with pytest.raises(InvalidSpace):
        DistillerSpec("logit", "test_gone", "no", "no", "l1", "no", 1, 1)


def test_the_space_and_the_registries_load_no_torch():
    code = """
import sys
import kd_optuna.space as space, kd_optuna.ops, kd_optuna.distill.classics
from kd_optuna.ops import EVERY_RANK, transform

@transform("test_neg", ranks=EVERY_RANK)
def test_neg(x):
    return -x

spec = space.DistillerSpec("logit", "test_neg", "no", "no", "kl", "no", 4, 1)
assert space.TRANSFORMS[-1] == "test_neg", space.TRANSFORMS
assert spec.formula() == (
    "16 * mean_n(KL(softmax(test_neg(t_logit)/4) || softmax(test_neg(s_logit)/4)))"
)
assert spec.key == "logit|test_neg>no>no|kl|no|T4|x1"
space.SearchSpace().size()
sys.exit(1 if "torch" in sys.modules else 0)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_an_op_module_loads_torch_at_the_first_call():
    # this process has torch; the op modules' own names now point at the real modules
    x = torch.randn(2, 3)
    for name in ("exp", "softmax_C"):  # torch, F
        TRANSFORMS[name](x)
    for name in ("cor", "kl"):
        DISTANCES[name](x, x)
    for name in ("no", "sim"):
        CALIBRATIONS[name](ops.CalibrationInputs(student=x, teacher=x))
    for module in (ops.transforms, ops.distances, ops.calibrations):
        assert module.torch is torch
        assert module.F is torch.nn.functional
