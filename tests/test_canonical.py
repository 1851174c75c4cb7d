"""The canonical key is a normal form of the loss: one key, one loss; one loss, one key.

Soundness is checked against the loss as written (``DistillerLoss(literal=True)``: the three
transforms of the params, their T and magnitude) on inputs of odd sizes, batch sizes 1 and
more, with labels, the random ops seeded alike. Completeness is checked on the equivalences
the op definitions give.
"""

import importlib.util
import itertools
import os
import pathlib
import random

import pytest
import torch
import torch.nn.functional as F

from kd_optuna import space
from kd_optuna.errors import InvalidDistiller
from kd_optuna.distill.loss import DistillerLoss
from kd_optuna.space import DistillerSpec

SPECS = int(os.environ.get("KD_OPTUNA_CANONICAL_SPECS", "1000"))
INPUTS = (
    ({"logit": (10,), "emb": (6,), "feat": (3, 4, 5)}, 4),
    ({"logit": (3,), "emb": (5,), "feat": (2, 3, 3)}, 1),
)
#: The ops the identities are about, drawn more often than the rest of the space.
RULE_OPS = (
    "no relu abs leaky pow2 pow4 exp scale channel batch local_s1 local_s2 local_s4 "
    "logsoftmax_C logsoftmax_HW logsoftmax_N softmax_C softmax_HW softmax_N norm_C norm_N "
    "norm_HW batchnorm min_max_normalize zscore drop mask satt catt mm bmm natt sigmoid"
).split()


def value(spec, shapes, n, seed, literal=True):
    """The loss on one random batch (fixed by ``seed``), or the InvalidDistiller reason."""
    torch.manual_seed(seed)
    try:
        loss = DistillerLoss(spec, shapes, shapes, literal=literal)
    except InvalidDistiller as error:
        return error.reason
    generator = torch.Generator().manual_seed(seed)
    s = {k: torch.randn((n, *v), generator=generator) * 2 for k, v in shapes.items()}
    t = {k: torch.randn((n, *v), generator=generator) * 2 for k, v in shapes.items()}
    labels = torch.randint(0, shapes["logit"][0], (n,), generator=generator)
    torch.manual_seed(seed + 1)
    try:
        return loss(s, t, labels).item()
    except InvalidDistiller as error:
        return error.reason


def assert_same_loss(a, b, seed):
    for shapes, n in INPUTS:
        x, y = value(a, shapes, n, seed), value(b, shapes, n, seed)
        if isinstance(x, str) or isinstance(y, str):
            assert x == y, (a, b, x, y)
        else:
            assert abs(x - y) <= 1e-4 * max(abs(x), abs(y)) + 1e-6, (a, b, n, x, y)


def spec_of(*genes):
    return DistillerSpec(*genes)


def random_spec(rng):
    ops = RULE_OPS if rng.random() < 0.8 else space.TRANSFORMS
    return DistillerSpec(
        rng.choice(space.KNOWLEDGE), *(rng.choice(ops) for _ in range(3)),
        rng.choice(space.DISTANCES), rng.choice(space.CALIBRATIONS),
        rng.choice(space.TEMPERATURES), rng.choice(space.MAGNITUDES),
    )


# ---------------------------------------------------------------- soundness


def test_soundness_random_specs_compute_the_loss_of_their_canonical_form():
    """Every spec's loss as written equals its canonical form's, so one key gives one loss."""
    rng = random.Random(0)
    changed = 0
    for i in range(SPECS):
        spec = random_spec(rng)
        canonical = spec.canonical()
        assert canonical.canonical() == canonical
        assert space.SearchSpace().contains(canonical)
        if canonical != spec:
            changed += 1
            assert_same_loss(spec, canonical, seed=i)
    assert changed > SPECS // 2


@pytest.mark.parametrize("knowledge", space.KNOWLEDGE)
def test_soundness_every_pair_of_transforms(knowledge):
    """The transform identities act on pairs: every ordered pair, before three distances."""
    distances = ("l2", "kl", "pear", "hard", "cor")
    for i, (a, b) in enumerate(itertools.product(space.TRANSFORMS, repeat=2)):
        spec = spec_of(knowledge, a, b, "no", distances[i % len(distances)], "no", 4, 1)
        canonical = spec.canonical()
        if canonical != spec:
            shapes, n = INPUTS[0]
            x, y = value(spec, shapes, n, i), value(canonical, shapes, n, i)
            if isinstance(x, str) or isinstance(y, str):
                assert x == y, (spec, x, y)
            else:
                assert abs(x - y) <= 1e-4 * max(abs(x), abs(y)) + 1e-6, (spec, canonical, x, y)


def test_soundness_specs_sharing_a_key_give_one_value():
    """In a small space dense in equivalences, pairs with one key have one loss."""
    ops = ("no", "relu", "abs", "pow2", "scale", "channel", "batch", "drop")
    groups = {}
    for knowledge, t1, t2, t3, distance, calibration, temperature, magnitude in itertools.product(
        ("emb", "feat"), ops, ops, ops, ("l1", "l2", "cos", "kl", "hard"), ("no", "sim"),
        space.TEMPERATURES, (100, 25),
    ):
        spec = DistillerSpec(knowledge, t1, t2, t3, distance, calibration, temperature, magnitude)
        groups.setdefault(spec.key, []).append(spec)
    shared = [members for members in groups.values() if len(members) > 1]
    assert len(shared) > 1000
    rng = random.Random(1)
    for i, members in enumerate(rng.sample(shared, 300)):
        a, b = rng.sample(members, 2)
        assert_same_loss(a, b, seed=i)


def test_the_loss_computed_is_the_canonical_forms_bit_for_bit():
    a = spec_of("feat", "mask", "relu", "channel", "l2", "no", 16, 10)
    b = spec_of("feat", "mask", "abs", "no", "l2", "no", 1, 10)
    assert a.key != b.key  # relu and abs differ on a masked map of any sign
    c = spec_of("feat", "no", "mask", "relu", "l2", "no", 4, 10)
    assert a.key == c.key
    shapes, n = INPUTS[0]
    assert value(a, shapes, n, 5, literal=False) == value(c, shapes, n, 5, literal=False)


# ---------------------------------------------------------------- completeness

EQUIVALENT = {
    "l2 is invariant to T": [
        spec_of("logit", "no", "no", "no", "l2", "no", t, 10) for t in space.TEMPERATURES
    ],
    "l1: only magnitude * T counts": [
        spec_of("emb", "relu", "no", "no", "l1", "focal", 4, 25),
        spec_of("emb", "relu", "no", "no", "l1", "focal", 1, 100),
    ],
    "flattening under l2 on feat": [
        spec_of("feat", "no", "no", "no", "l2", "no", 1, 1),
        spec_of("feat", "local_s1", "no", "no", "l2", "no", 1, 1),
        spec_of("feat", "batch", "no", "no", "l2", "no", 1, 1),
        spec_of("feat", "channel", "batch", "no", "l2", "no", 1, 1),
        spec_of("feat", "channel", "no", "no", "l2", "no", 8, 1),
    ],
    "logsoftmax before kl": [
        spec_of("logit", "logsoftmax_C", "no", "no", "kl", "no", 4, 1),
        spec_of("logit", "no", "no", "no", "kl", "no", 4, 1),
    ],
    "CWD: kl on feature maps is kl over positions": [
        spec_of("feat", "channel", "no", "no", "kl", "no", 4, 1),
        spec_of("feat", "no", "no", "no", "kl", "no", 4, 1),
        spec_of("feat", "logsoftmax_HW", "no", "no", "kl", "no", 4, 1),
    ],
    "relu, abs, leaky after a non-negative op": [
        spec_of("emb", "exp", "no", "no", "cos", "no", 1, 1),
        spec_of("emb", "exp", "relu", "no", "cos", "no", 1, 1),
        spec_of("emb", "exp", "abs", "leaky", "cos", "no", 1, 1),
    ],
    "even ops and pow2 twice": [
        spec_of("emb", "abs", "pow2", "pow2", "smooth_l1", "no", 4, 1),
        spec_of("emb", "pow4", "no", "no", "smooth_l1", "no", 4, 1),
    ],
    "reshapes move past element-wise ops": [
        spec_of("feat", "batch", "relu", "no", "pear", "no", 1, 1),
        spec_of("feat", "relu", "no", "no", "pear", "no", 1, 1),
    ],
    "kl: a trailing (x+1)/2 doubles T": [
        spec_of("logit", "scale", "no", "no", "kl", "no", 4, 100),
        spec_of("logit", "no", "no", "no", "kl", "no", 8, 25),
    ],
    "l2: a trailing (x+1)/2 quarters the magnitude": [
        spec_of("emb", "scale", "no", "no", "l2", "no", 1, 100),
        spec_of("emb", "no", "no", "no", "l2", "no", 16, 25),
    ],
    "cos ignores the scale: only magnitude * T^2 counts": [
        spec_of("emb", "no", "no", "no", "cos", "sim", 4, 100),
        spec_of("emb", "no", "no", "no", "cos", "sim", 8, 25),
        spec_of("emb", "norm_C", "no", "no", "cos", "sim", 8, 25),
    ],
    "pear ignores per-sample affine maps": [
        spec_of("feat", "satt", "min_max_normalize", "zscore", "pear", "no", 1, 5),
        spec_of("feat", "satt", "scale", "no", "pear", "no", 1, 5),
        spec_of("feat", "satt", "no", "no", "pear", "no", 1, 5),
    ],
    "cor ignores per-column affine maps": [
        spec_of("emb", "tanh", "batchnorm", "norm_N", "cor", "conf", 1, 1),
        spec_of("emb", "tanh", "no", "no", "cor", "conf", 1, 1),
    ],
    "cos of z-scored samples is pear": [
        spec_of("logit", "zscore", "no", "no", "cos", "no", 4, 25),
        spec_of("logit", "no", "no", "no", "pear", "no", 4, 25),
    ],
    "ops that ignore a shift along log-softmax's axis": [
        spec_of("feat", "softmax_HW", "logsoftmax_C", "catt", "kl", "sim", 4, 10),
        spec_of("feat", "softmax_HW", "catt", "no", "kl", "sim", 4, 10),
    ],
    "hard ignores a log-softmax over classes": [
        spec_of("logit", "mish", "logsoftmax_C", "no", "hard", "entropy", 4, 1),
        spec_of("logit", "mish", "no", "no", "hard", "entropy", 4, 1),
    ],
}


@pytest.mark.parametrize("name", list(EQUIVALENT))
def test_completeness_known_equivalences_share_one_key(name):
    specs = EQUIVALENT[name]
    assert len({s.key for s in specs}) == 1, [s.key for s in specs]
    for i, spec in enumerate(specs[1:]):
        assert_same_loss(specs[0], spec, seed=i)


DISTINCT = {
    "smooth_l1 sees T": ("emb|no>no>no|smooth_l1|no|T1|x1", dict(temperature=4)),
    "kl sees T": ("logit|no>no>no|kl|no|T4|x1", dict(temperature=1)),
    "sim reads the shift of (x+1)/2": ("emb|scale>no>no|l2|sim|T1|x100", dict(calibration="no")),
    "sim reads a log-softmax": ("logit|logsoftmax_C>no>no|kl|sim|T4|x1", dict(calibration="no")),
    "batch before kl": ("feat|batch>no>no|kl|no|T4|x1", dict(transform1="no")),
    "norm_C on feature maps before cos": ("feat|norm_C>no>no|cos|no|T1|x1", dict(transform1="no")),
    "relu after an op of any sign": ("emb|tanh>relu>no|l2|no|T1|x1", dict(transform2="no")),
}


@pytest.mark.parametrize("name", list(DISTINCT))
def test_losses_that_differ_keep_distinct_keys(name):
    key, change = DISTINCT[name]
    knowledge, chain, distance, calibration, t, x = key.split("|")
    spec = DistillerSpec(knowledge, *chain.split(">"), distance, calibration, int(t[1:]), float(x[1:]))
    assert spec.key == key
    other = DistillerSpec.from_params({**spec.to_params(), **change})
    assert other.key != spec.key
    shapes, n = INPUTS[0]
    assert value(spec, shapes, n, 0) != pytest.approx(value(other, shapes, n, 0), rel=1e-3)


# ---------------------------------------------------------------- kl after a softmax


def test_kl_after_a_softmax_over_its_axis_is_refused():
    shapes = INPUTS[0][0]
    for spec in (
        spec_of("logit", "softmax_C", "no", "no", "kl", "no", 4, 1),
        spec_of("logit", "softmax_C", "relu", "no", "kl", "no", 4, 1),
        spec_of("feat", "softmax_HW", "no", "no", "kl", "no", 4, 1),
        spec_of("feat", "channel", "softmax_HW", "no", "kl", "no", 1, 1),
    ):
        assert spec.refusal() and "kl takes logits" in spec.refusal()
        with pytest.raises(InvalidDistiller, match="kl takes logits or log-probabilities"):
            DistillerLoss(spec, shapes, shapes)
    # softmax over another axis, or before another op, is a distribution kl may compare
    for spec in (
        spec_of("logit", "softmax_N", "no", "no", "kl", "no", 4, 1),
        spec_of("feat", "softmax_C", "no", "no", "kl", "no", 4, 1),
        spec_of("logit", "softmax_C", "log", "no", "kl", "no", 4, 1),
        spec_of("logit", "softmax_C", "no", "no", "l2", "no", 4, 1),
    ):
        assert spec.refusal() is None
        DistillerLoss(spec, shapes, shapes)


def test_logsoftmax_before_kl_is_textbook_kd():
    shapes = {"logit": (10,)}
    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=generator) * 3, torch.randn(6, 10, generator=generator) * 3
    spec = spec_of("logit", "logsoftmax_C", "no", "no", "kl", "no", 4, 1)
    expected = 16 * F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean")
    for literal in (False, True):
        got = DistillerLoss(spec, shapes, shapes, literal=literal)({"logit": s}, {"logit": t})
        torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- what was dropped


def test_dropped_transforms_name_the_gene_the_op_and_why():
    spec = spec_of("logit", "satt", "exp", "relu", "l2", "no", 4, 1)
    assert spec.key == "logit|exp>no>no|l2|no|T1|x1"
    dropped = spec.dropped_transforms()
    assert [(d.gene, d.name) for d in dropped] == [("transform1", "satt"), ("transform3", "relu")]
    assert "rank-2" in dropped[0].reason and "non-negative" in dropped[1].reason
    notes = spec.canonical_notes()
    assert notes[:2] == [f"{d.gene} {d.name}: {d.reason}" for d in dropped]
    assert notes[2].startswith("T4 x1 is T1 x1: l2 is homogeneous of degree 2")
    assert spec_of("logit", "no", "no", "no", "kl", "no", 4, 1).canonical_notes() == []


def test_a_kept_scale_is_not_reported_dropped():
    spec = spec_of("emb", "scale", "no", "no", "l2", "no", 1, 50)  # 50 / 4 is not a magnitude
    assert spec.key == "emb|scale>no>no|l2|no|T1|x50"
    assert spec.dropped_transforms() == ()


def test_the_canonical_form_is_a_fixed_point_over_the_whole_space():
    rng = random.Random(2)
    for _ in range(20 * SPECS):
        spec = DistillerSpec(*(rng.choice(space.FULL_OPTIONS[g]) for g in space.GENES))
        canonical = spec.canonical()
        assert canonical.canonical() == canonical and canonical.key == spec.key
        assert canonical.dropped_transforms() == ()
        assert canonical.refusal() == spec.refusal()


# ---------------------------------------------------------------- the collapse benchmark


def _benchmark():
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "key_collapse.py"
    module_spec = importlib.util.spec_from_file_location("key_collapse", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_the_benchmarks_count_of_keys_is_the_brute_force_count():
    """key_collapse.whole_space counts keys without building specs: check it on a small space."""
    options = {
        "knowledge": ("emb", "feat"),
        "transform1": ("no", "scale", "channel", "zscore"),
        "transform2": ("no", "relu", "batch", "logsoftmax_C", "scale"),
        "transform3": ("no", "abs", "scale", "norm_C"),
        "distance": ("l1", "l2", "kl", "cos", "pear", "cor"),
        "calibration": ("sim", "no", "focal"),
        "temperature": (1, 4, 8),
        "magnitude": (100, 25, 1),
    }
    benchmark = _benchmark()
    specs = [DistillerSpec(*genes) for genes in itertools.product(*options.values())]
    old = {benchmark.old_key(s) for s in specs}
    assert benchmark.whole_space(options) == (len(specs), len(old), len({s.key for s in specs}))
    assert len({s.key for s in specs}) < 0.5 * len(old)
