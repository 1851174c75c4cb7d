"""PKT, RKD, CRD and DML on hand-computed cases, and the interface all baselines share.

DKD, KD+LS and DKD+LS have their own tests in test_baselines_logit.py, ReviewKD in
test_reviewkd.py.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kd_optuna.distill.baselines import (
    BASELINES,
    CRD,
    METHOD_DESCRIPTIONS,
    PKT,
    RKD,
    InvalidBaseline,
    MutualLearning,
    build_baseline,
    mutual_kl,
)
from kd_optuna.distill.baselines.crd import bank_dot, draw_negatives, nce_loss
from kd_optuna.distill.baselines.pkt import neighbour_probabilities, pkt_divergence
from kd_optuna.distill.baselines.rkd import normalised_distances, rkd_angle_loss, rkd_distance_loss
from kd_optuna.errors import KdOptunaError

STUDENT = {"logit": (5,), "emb": (6,), "feat": (6, 2, 2)}
TEACHER = {"logit": (5,), "emb": (10,), "feat": (10, 2, 2)}


def _outputs(shapes, n, generator, requires_grad=False):
    return {
        key: torch.randn(n, *shape, generator=generator).requires_grad_(requires_grad)
        for key, shape in shapes.items()
    }


def _build(name, **kw):
    if name == "crd":
        kw = {"num_data": 50, "num_negatives": 8, **kw}
    return build_baseline(name, STUDENT, TEACHER, **kw)


# --- PKT ---------------------------------------------------------------------------------


def test_pkt_of_identical_embeddings_is_zero():
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    assert pkt_divergence(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_pkt_two_samples_by_hand():
    # student: orthogonal rows, cos = 0 off the diagonal, kernel [[1, .5], [.5, 1]],
    # P^s = [[2/3, 1/3], [1/3, 2/3]]; teacher: parallel rows, kernel all 1, P^t = 1/2 everywhere.
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    p_s = neighbour_probabilities(s)
    assert torch.allclose(p_s, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]))
    row_kl = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    expected = 2 * row_kl / 4  # two rows, averaged over the 2 x 2 entries
    assert pkt_divergence(s, t).item() == pytest.approx(expected, rel=1e-5)
    loss = PKT({"emb": (2,)}, {"emb": (2,)}, weight=10.0)
    assert loss({"emb": s}, {"emb": t}).item() == pytest.approx(10 * expected, rel=1e-5)


def test_pkt_compares_different_widths_and_ignores_norms():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 6, generator=g), torch.randn(5, 10, generator=g)
    scales = torch.rand(5, 1, generator=g) + 0.5
    assert pkt_divergence(s * scales, t).item() == pytest.approx(pkt_divergence(s, t).item(), rel=1e-5)


# --- RKD ---------------------------------------------------------------------------------

COLLINEAR = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
EQUILATERAL = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])


def test_rkd_distance_three_points_by_hand():
    # collinear pair distances 1, 2, 1 (mean 4/3) normalise to 0.75, 1.5, 0.75; the equilateral
    # triangle's to 1. Huber: four entries at 0.25 -> 0.03125, two at 0.5 -> 0.125; 9 entries.
    assert torch.allclose(
        normalised_distances(COLLINEAR),
        torch.tensor([[0.0, 0.75, 1.5], [0.75, 0.0, 0.75], [1.5, 0.75, 0.0]]),
        atol=1e-5,
    )
    expected = (4 * 0.03125 + 2 * 0.125) / 9
    assert rkd_distance_loss(COLLINEAR, EQUILATERAL).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_angle_three_points_by_hand():
    # at the ends of the line both directions agree (cos 1) where the triangle has cos 60 = .5:
    # 2 entries of Huber(.5) = .125 at each end; at the middle point they are opposite (cos -1):
    # 2 entries of Huber(1.5) = 1. Matching j = k entries are 1 on both sides. 27 entries.
    expected = (2 * 0.125 + 2 * 1.0 + 2 * 0.125) / 27
    assert rkd_angle_loss(COLLINEAR, EQUILATERAL).item() == pytest.approx(expected, rel=1e-5)
    loss = RKD({"emb": (2,)}, {"emb": (2,)})
    total = 25 * (4 * 0.03125 + 2 * 0.125) / 9 + 50 * expected
    assert loss({"emb": COLLINEAR}, {"emb": EQUILATERAL}).item() == pytest.approx(total, rel=1e-5)


def test_rkd_distance_loss_is_invariant_to_scaling_both_embeddings():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(8, 6, generator=g), torch.randn(8, 10, generator=g)
    base = rkd_distance_loss(s, t).item()
    assert base > 0
    assert rkd_distance_loss(3.0 * s, 0.25 * t).item() == pytest.approx(base, rel=1e-4)


def test_rkd_angle_loss_is_zero_for_identical_embeddings():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    assert rkd_angle_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert rkd_angle_loss(x, 5.0 * x).item() == pytest.approx(0.0, abs=1e-6)


def test_rkd_of_repeated_samples_is_finite_with_finite_gradient():
    s = torch.ones(4, 6, requires_grad=True)
    loss = _build("rkd")({"emb": s}, {"emb": torch.randn(4, 10)})
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# --- CRD ---------------------------------------------------------------------------------


def test_nce_loss_by_hand():
    # K = 1 negative, P_n = 1/2: -log(1 / (1 + .5)) - log(.5 / (.5 + .5)) = log 1.5 + log 2 = log 3
    assert nce_loss(torch.tensor([[1.0, 0.5]]), 0.5).item() == pytest.approx(math.log(3.0))


@pytest.mark.parametrize("bank_rows", [5, 500])  # fewer rows than drawn (one product), more (gather)
def test_bank_dot_gives_each_anchor_its_rows_dot_products(bank_rows):
    g = torch.Generator().manual_seed(15)
    anchor, memory = torch.randn(3, 4, generator=g), torch.randn(bank_rows, 4, generator=g)
    rows = torch.randint(0, bank_rows, (3, 6), generator=g)
    expected = torch.stack([memory[rows[n]] @ anchor[n] for n in range(3)])
    assert torch.allclose(bank_dot(anchor, memory, rows), expected, atol=1e-5)


def test_negatives_exclude_the_positive_and_cover_every_other_index():
    index = torch.tensor([0, 3, 4])
    drawn = draw_negatives(index, num_data=5, count=400)
    assert drawn.shape == (3, 400)
    for row, positive in zip(drawn, index.tolist()):
        assert set(row.tolist()) == set(range(5)) - {positive}


def test_crd_updates_the_bank_at_the_indices_with_momentum():
    torch.manual_seed(4)
    crd = _build("crd", momentum=0.25)
    g = torch.Generator().manual_seed(5)
    student, teacher = _outputs(STUDENT, 4, g), _outputs(TEACHER, 4, g)
    index = torch.tensor([2, 7, 11, 40])
    before_s, before_t = crd.memory_student.clone(), crd.memory_teacher.clone()
    loss = crd(student, teacher, None, index)
    assert torch.isfinite(loss) and loss.item() > 0
    with torch.no_grad():
        g_s = F.normalize(crd.embed_student.linear(student["emb"]), dim=1)
        g_t = F.normalize(crd.embed_teacher.linear(teacher["emb"]), dim=1)
    expected_s = F.normalize(0.25 * before_s[index] + 0.75 * g_s, dim=1)
    expected_t = F.normalize(0.25 * before_t[index] + 0.75 * g_t, dim=1)
    assert torch.allclose(crd.memory_student[index], expected_s, atol=1e-6)
    assert torch.allclose(crd.memory_teacher[index], expected_t, atol=1e-6)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(crd.memory_student[untouched], before_s[untouched])
    assert torch.equal(crd.memory_teacher[untouched], before_t[untouched])


def test_crd_in_eval_mode_leaves_the_bank_and_fixes_z_once():
    torch.manual_seed(6)
    crd = _build("crd")
    g = torch.Generator().manual_seed(7)
    crd(_outputs(STUDENT, 4, g), _outputs(TEACHER, 4, g), None, torch.arange(4))
    z = (crd.z_student_anchor.item(), crd.z_teacher_anchor.item())
    assert min(z) > 0
    crd.eval()
    bank = crd.memory_student.clone()
    crd(_outputs(STUDENT, 4, g), _outputs(TEACHER, 4, g), None, torch.arange(4))
    assert torch.equal(crd.memory_student, bank)
    assert (crd.z_student_anchor.item(), crd.z_teacher_anchor.item()) == z


def test_crd_heads_are_its_parameters_and_the_bank_is_not():
    crd = _build("crd", feat_dim=16)
    shapes = sorted(tuple(p.shape) for p in crd.parameters())
    assert shapes == sorted([(16, 6), (16,), (16, 10), (16,)])
    assert crd.memory_student.shape == (50, 16) and not crd.memory_student.requires_grad


def test_crd_refuses_missing_or_out_of_range_indices():
    crd = _build("crd")
    g = torch.Generator().manual_seed(8)
    student, teacher = _outputs(STUDENT, 3, g), _outputs(TEACHER, 3, g)
    with pytest.raises(InvalidBaseline, match="index"):
        crd(student, teacher, None)
    with pytest.raises(InvalidBaseline, match="num_data"):
        crd(student, teacher, None, torch.tensor([0, 1, 50]))


# --- DML ---------------------------------------------------------------------------------


def test_mutual_kl_is_zero_for_equal_predictions_and_matches_a_hand_case():
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(9))
    assert mutual_kl(z, z.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert mutual_kl(z, z + 3.0, temperature=4.0).item() == pytest.approx(0.0, abs=1e-6)
    # p = (1/2, 1/2) against the peer's (3/4, 1/4): KL = .75 log 1.5 + .25 log .5
    logit, peer = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    assert mutual_kl(logit, peer).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))


def _linear_pair(seed):
    torch.manual_seed(seed)
    student = nn.Linear(6, 5)
    peer = nn.Linear(6, 5)
    return student, peer


def test_dml_term_is_zero_when_both_students_predict_the_same():
    student, peer = _linear_pair(10)
    peer.load_state_dict(student.state_dict())
    dml = MutualLearning(peer, torch.optim.SGD(peer.parameters(), lr=0.1))
    images, labels = torch.randn(8, 6), torch.randint(0, 5, (8,))
    term = dml.mutual_term(images, labels, student(images))
    assert term.item() == pytest.approx(0.0, abs=1e-7)


def test_dml_steps_the_peer_on_ce_plus_kl_and_sends_the_term_to_the_student_only():
    student, peer = _linear_pair(11)
    images, labels = torch.randn(8, 6), torch.randint(0, 5, (8,))
    student_logit = student(images)
    # the peer's expected step: SGD on CE(peer) + KL(p_student || p_peer)
    reference = nn.Linear(6, 5)
    reference.load_state_dict(peer.state_dict())
    expected = F.cross_entropy(reference(images), labels) + mutual_kl(reference(images), student_logit)
    expected.backward()
    expected_weight = reference.weight.detach() - 0.1 * reference.weight.grad

    dml = MutualLearning(peer, torch.optim.SGD(peer.parameters(), lr=0.1))
    term = dml.mutual_term(images, labels, student_logit)
    assert torch.allclose(peer.weight, expected_weight, atol=1e-6)
    assert student.weight.grad is None
    peer.zero_grad()
    term.backward()
    assert student.weight.grad.abs().sum() > 0
    assert peer.weight.grad is None


def test_dml_reads_logits_from_a_knowledge_dict():
    class Tapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            return {"emb": x, "logit": self.fc(x)}

    peer = Tapped()
    dml = MutualLearning(peer, torch.optim.SGD(peer.parameters(), lr=0.1), temperature=2.0)
    term = dml.mutual_term(torch.randn(4, 6), torch.randint(0, 5, (4,)), torch.randn(4, 5))
    assert torch.isfinite(term) and term.item() > 0


# --- the shared interface ------------------------------------------------------------------


#: the loss baselines and the knowledge each one reads
LOSSES = {
    "pkt": ("emb",),
    "rkd": ("emb",),
    "crd": ("emb",),
    "dkd": ("logit",),
    "kd+ls": ("logit",),
    "dkd+ls": ("logit",),
    "reviewkd": ("feat", "emb"),
}
LABELS = torch.tensor([0, 1, 2, 3, 4, 0])


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_reaches_the_student_and_never_the_teacher(name):
    loss_fn = _build(name)
    g = torch.Generator().manual_seed(12)
    student, teacher = _outputs(STUDENT, 6, g, True), _outputs(TEACHER, 6, g, True)
    loss = loss_fn(student, teacher, LABELS, torch.arange(6))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for key, tensor in student.items():
        if key in LOSSES[name]:
            assert tensor.grad.abs().sum() > 0 and torch.isfinite(tensor.grad).all()
        else:
            assert tensor.grad is None
    assert all(t.grad is None for t in teacher.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.parameters())


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_is_non_negative_and_finite_on_random_batches(name):
    for seed in range(20, 25):
        g = torch.Generator().manual_seed(seed)
        scale = 10.0 ** (seed - 22)  # 0.01 .. 100: tiny to saturating logits and features
        student = {k: v * scale for k, v in _outputs(STUDENT, 6, g).items()}
        teacher = _outputs(TEACHER, 6, g)
        loss = _build(name)(student, teacher, LABELS, torch.arange(6))
        assert torch.isfinite(loss) and loss.item() >= 0, (name, seed, loss)


@pytest.mark.parametrize("name", list(LOSSES))
def test_set_epoch_exists_on_every_loss_and_changes_only_warmed_up_ones(name):
    torch.manual_seed(26)
    loss_fn = _build(name)
    loss_fn.eval()  # CRD's bank and ReviewKD's batch norms then stay put between calls
    g = torch.Generator().manual_seed(27)
    student, teacher = _outputs(STUDENT, 6, g), _outputs(TEACHER, 6, g)
    torch.manual_seed(28)
    before = loss_fn(student, teacher, LABELS, torch.arange(6)).item()
    loss_fn.set_epoch(0)
    torch.manual_seed(28)  # CRD draws its negatives
    after = loss_fn(student, teacher, LABELS, torch.arange(6)).item()
    factor = 1 / 20 if name in ("dkd", "dkd+ls", "reviewkd") else 1.0
    assert after == pytest.approx(factor * before, rel=1e-5)
    with pytest.raises(InvalidBaseline, match="0-based epoch"):
        loss_fn.set_epoch(-1)


def test_build_baseline_refuses_bad_requests_with_a_fix():
    assert set(BASELINES) == {"pkt", "rkd", "crd", "dml", "dkd", "kd+ls", "dkd+ls", "reviewkd"}
    with pytest.raises(InvalidBaseline, match="choose one of"):
        build_baseline("fsp", STUDENT, TEACHER)
    with pytest.raises(InvalidBaseline, match="MutualLearning"):
        build_baseline("dml", STUDENT, TEACHER)
    with pytest.raises(InvalidBaseline, match="num_data"):
        build_baseline("crd", STUDENT, TEACHER)
    with pytest.raises(InvalidBaseline, match="tap"):
        build_baseline("pkt", {"logit": (5,)}, TEACHER)
    with pytest.raises(KdOptunaError, match="pkt"):
        build_baseline("pkt", STUDENT, TEACHER, temperature=4)
    with pytest.raises(KdOptunaError, match="kd_optuna.distill.baselines.DKD"):
        build_baseline("dkd", STUDENT, TEACHER, weight=2)


def test_every_baseline_has_a_one_line_description():
    assert list(METHOD_DESCRIPTIONS) == list(BASELINES)
    for name, line in METHOD_DESCRIPTIONS.items():
        assert line.strip() and "\n" not in line and len(line) <= 100, name


def test_a_baseline_refuses_knowledge_of_another_shape():
    loss_fn = _build("rkd")
    g = torch.Generator().manual_seed(13)
    student, teacher = _outputs({"emb": (7,)}, 4, g), _outputs(TEACHER, 4, g)
    with pytest.raises(InvalidBaseline, match="per sample"):
        loss_fn(student, teacher)


def test_baselines_run_on_tapped_zoo_models():
    models = pytest.importorskip("kd_optuna.models")
    torch.manual_seed(14)
    student = models.tap_model(models.build_model("digits_student", 10), "digits_student")
    teacher = models.tap_model(models.build_model("digits_teacher", 10), "digits_teacher")
    images = torch.randn(4, 1, 16, 16)
    s_shapes = models.knowledge_shapes(student, (1, 16, 16))
    t_shapes = models.knowledge_shapes(teacher, (1, 16, 16))
    with torch.no_grad():
        t_out = teacher(images)
    labels = torch.tensor([0, 3, 9, 3])
    for name in LOSSES:
        kw = {"num_data": 20, "num_negatives": 4} if name == "crd" else {}
        loss = build_baseline(name, s_shapes, t_shapes, **kw)(student(images), t_out, labels, torch.arange(4))
        assert torch.isfinite(loss), name


@pytest.mark.parametrize("name", list(LOSSES))
def test_half_precision_knowledge_gives_a_float32_loss(name):
    loss_fn = _build(name)
    g = torch.Generator().manual_seed(16)
    student = {k: v.bfloat16() for k, v in _outputs(STUDENT, 6, g).items()}
    teacher = {k: v.bfloat16() for k, v in _outputs(TEACHER, 6, g).items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(student, teacher, LABELS, torch.arange(6))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --- benchmarks/batch_time.py ------------------------------------------------------------


def _batch_time_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "batch_time.py"
    spec = importlib.util.spec_from_file_location("batch_time", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_batch_time_interleaves_methods_and_drops_one_that_raises():
    bt = _batch_time_module()
    calls = []

    def step_of(name):
        def step():
            calls.append(name)
            if name == "bad" and calls.count("bad") > 1:
                raise InvalidBaseline("boom")

        return step

    methods = [bt.Method(n, step_of(n)) for n in ("kd", "pkt", "bad")]
    ticks = iter(range(1000))
    times, notes = bt.time_methods(methods, torch.device("cpu"), 4, 2, 1, 0, lambda: next(ticks))
    assert set(times) == {"kd", "pkt"} and all(len(v) == 4 for v in times.values())
    assert len(notes) == 1 and "bad" in notes[0] and "boom" in notes[0]
    assert calls.count("kd") == 1 + 4 * 2


def test_batch_time_ratios_are_medians_against_kd_beside_the_seed():
    bt = _batch_time_module()
    rows = bt.summarise("resnet20", {"kd": [1.0, 2.0, 3.0], "dml": [2.0, 5.0, 6.0]})
    dml = next(r for r in rows if r["method"] == "dml")
    assert dml["ratio"] == pytest.approx(2.5)
    assert (dml["paired_min"], dml["paired_max"]) == pytest.approx((2.0, 2.5))
    assert dml["seed_ratio"] == pytest.approx(0.524 / 0.219)


@pytest.mark.slow
def test_batch_time_smoke_run_writes_every_baseline(tmp_path):
    bt = _batch_time_module()
    out = tmp_path / "bt.json"
    assert bt.main(["--quick", "--repeats", "1", "--batch-size", "4", "--json", str(out)]) == 0
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["kd", "pkt", "crd", "rkd", "dml"]
    assert all(r["median_ms"] > 0 for r in rows)


def test_build_baseline_passes_num_data_only_where_indices_are_read():
    crd = _build("crd", num_data=30)
    assert isinstance(crd, CRD) and crd.needs_index and crd.num_data == 30
    for name in ("pkt", "rkd", "dkd", "kd+ls", "dkd+ls", "reviewkd"):
        assert not build_baseline(name, STUDENT, TEACHER, num_data=30).needs_index
