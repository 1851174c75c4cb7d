import dataclasses

import pytest
import torch

from kd_optuna.distill.classics import CLASSICS
from kd_optuna.data import class_balanced_subset, load_dataset
from kd_optuna.models import tap_model
from kd_optuna.models.digits import DigitsCNN
from kd_optuna.proxy.settings import InvalidProxySettings, ProxySettings
from kd_optuna.proxy.views import ProxyData, ViewPool
from kd_optuna.proxy.task import Task


FAST = ProxySettings(labels_per_class=3, steps=6, batch_size=16, report_every=3, sharpness_size=32)


def tiny_task(settings=FAST, **kwargs):
    splits = load_dataset("digits")
    x, y = splits.tensors("train", torch.arange(200))
    vx, vy = splits.tensors("val", torch.arange(60))
    data = ProxyData.build(x, y, vx, vy, settings, num_classes=10)
    torch.manual_seed(123)
    teacher = tap_model(DigitsCNN((8, 8, 16)))
    return Task(data, teacher, lambda: tap_model(DigitsCNN((4, 8, 8))), settings,
                test=splits.tensors("test", torch.arange(60)), **kwargs)


def test_settings_validate_and_map_from_a_table():
    s = ProxySettings.from_mapping({"steps": 10, "seeds": [3, 4]})
    assert s.steps == 10 and s.seeds == (3, 4)
    with pytest.raises(InvalidProxySettings, match="labels_per_class"):
        ProxySettings.from_mapping({"stepz": 1})
    with pytest.raises(InvalidProxySettings, match="optimizer"):
        ProxySettings(optimizer="rmsprop")
    with pytest.raises(InvalidProxySettings, match="steps"):
        ProxySettings(steps=0)
    with pytest.raises(InvalidProxySettings, match="seeds"):
        ProxySettings(seeds=())


def test_cosine_schedule_decays_to_zero():
    s = ProxySettings(steps=100)
    assert s.lr_factor(0) == 1.0 and s.lr_factor(50) == pytest.approx(0.5) and s.lr_factor(100) == pytest.approx(0)
    assert dataclasses.replace(s, schedule="constant").lr_factor(70) == 1.0


def test_class_balanced_subset_at_most():
    labels = torch.tensor([0, 1, 2] * 10)
    chosen = class_balanced_subset(labels, 4, seed=0, at_most=True)
    assert torch.bincount(labels[chosen]).tolist() == [4, 4, 4]
    assert torch.equal(chosen, class_balanced_subset(labels, 4, seed=0, at_most=True))
    assert not torch.equal(chosen, class_balanced_subset(labels, 4, seed=1, at_most=True))
    assert torch.equal(class_balanced_subset(labels, 0, seed=0, at_most=True), torch.arange(30))


def test_view_pool_renders_shifts_and_flips():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    settings = ProxySettings(views=5, augment="shift_flip", shift=1, view_seed=3)
    pool = ViewPool.build(2, settings)
    rows = torch.tensor([0, 1])
    assert torch.equal(pool.render(images, rows, torch.tensor([0, 0])), images)
    for v in range(5):
        out = pool.render(images, rows, torch.tensor([v, v]))
        for i in range(2):
            dy, dx = pool.offsets[i, v].tolist()
            padded = torch.nn.functional.pad(images[i], (1, 1, 1, 1))
            expected = padded[:, dy : dy + 4, dx : dx + 4]
            if pool.flips[i, v]:
                expected = expected.flip(-1)
            assert torch.equal(out[i], expected)
    assert pool.flips.any() and (pool.offsets != 1).any()
    plain = ViewPool.build(2, ProxySettings(views=3))
    assert plain.render(images, rows, torch.tensor([2, 1])) is images


def test_proxy_data_split():
    task = tiny_task()
    data = task.data
    assert torch.bincount(data.train_y[data.labelled], minlength=10).tolist() == [3] * 10
    assert data.pool.shape[0] == 200 and data.val_x.shape[0] == 60
    labelled_only = ProxyData.build(data.train_x, data.train_y, data.val_x, data.val_y,
                                    dataclasses.replace(FAST, kd_source="labelled", val_size=20))
    assert torch.equal(labelled_only.pool, labelled_only.labelled) and labelled_only.val_x.shape[0] == 20
    assert torch.bincount(labelled_only.val_y, minlength=10).tolist() == [2] * 10


def test_proxy_run_is_deterministic_reports_and_tells_kd_from_none():
    task = tiny_task()
    spec = CLASSICS["kd"][0]
    reports = []
    first = task.run(spec, report=lambda step, value: reports.append((step, value)))
    again = task.run(spec)
    assert first.metrics() == again.metrics()
    assert [s for s, _ in reports] == [3, 6] and reports == first.curve
    none = task.run(None)
    assert none.metrics() != first.metrics()
    for result in (first, none):
        assert 0.0 <= result.val_acc <= 1.0 and 0.0 <= result.cka_gap <= 1.0
        assert 0.0 < result.val_ce <= result.val_ce_raw + 1e-12
        assert result.score == pytest.approx(result.val_ce)
    weighted = task.run(spec, dataclasses.replace(FAST, score_cka=2.0))
    assert weighted.val_ce == first.val_ce
    assert weighted.score == pytest.approx(weighted.val_ce + 2.0 * weighted.cka_gap) != first.score
    two_seeds = task.run(spec, dataclasses.replace(FAST, seeds=(0, 1)))
    assert [s for s, _ in two_seeds.curve] == [3, 6, 9, 12]
    test = task.run(spec, on_test=True)
    assert test.val_acc != first.val_acc or test.val_ce != first.val_ce


def test_the_recipe_shrunk_follows_the_train_settings():
    from kd_optuna.run.config import TrainConfig

    train = TrainConfig(epochs=30, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                        milestones=(15, 22, 27), gamma=0.1)
    s = ProxySettings.from_recipe(train)
    assert (s.optimizer, s.lr, s.momentum, s.nesterov, s.weight_decay, s.batch_size) == ("sgd", 0.05, 0.9, False, 5e-4, 64)
    assert s.labelled_kd and s.labels_per_class == 0 and s.epochs == pytest.approx(10.0)
    assert s.schedule == "step" and s.milestones == pytest.approx((0.5, 22 / 30, 0.9))
    changed = ProxySettings.from_recipe(dataclasses.replace(train, lr=0.2, batch_size=32, epochs=60, milestones=(30,)))
    assert (changed.lr, changed.batch_size, changed.epochs, changed.milestones) == (0.2, 32, 20.0, (0.5,))
    assert ProxySettings.from_recipe(train, {"steps": 7}).for_pool(1000).steps == 7
    assert ProxySettings.from_recipe(train, {"steps": 7, "epochs": 0}).for_pool(1000).steps == 7
    assert ProxySettings.from_recipe(train, {"epochs": 2}).for_pool(640).steps == 20
    few = ProxySettings.from_recipe(train, {"labels_per_class": 5})
    assert not few.labelled_kd and few.label_batch_size == 50 and few.optimizer == "sgd"
    with pytest.raises(InvalidProxySettings, match="label_batch_size = 0"):
        ProxySettings(labels_per_class=5, label_batch_size=0)


def test_epochs_become_steps_over_the_kd_pool_and_the_step_schedule_decays_at_fractions():
    s = ProxySettings(labels_per_class=0, label_batch_size=0, epochs=2.0, batch_size=64, schedule="step",
                      milestones=(0.5, 0.75), gamma=0.1).for_pool(1000)
    assert s.steps == 32 and s.epochs == 0
    assert [s.lr_factor(step) for step in (0, 15, 16, 23, 24, 31)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_labelled_kd_batches_give_the_distiller_the_true_labels():
    settings = dataclasses.replace(FAST, labels_per_class=0, label_batch_size=0, optimizer="sgd", lr=0.05)
    task = tiny_task(settings)
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, student, teacher, labels=None):
            seen.append(labels)
            return student["logit"].sum() * 0

    from kd_optuna.proxy.training import train_student

    torch.manual_seed(0)
    train_student(task.new_student(), Spy(), task.data, task.teacher_outputs, task.proxy, seed=0)
    assert len(seen) == settings.steps and all(labels is not None and labels.shape == (16,) for labels in seen)
    assert task.reject(CLASSICS["kd"][0]) is None


def test_a_long_recipe_is_capped_in_steps():
    from kd_optuna.run.config import TrainConfig
    from kd_optuna.proxy.settings import RECIPE_MAX_STEPS

    cifar = TrainConfig(epochs=240, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
                        milestones=(150, 180, 210), gamma=0.1)
    s = ProxySettings.from_recipe(cifar).for_pool(50000)
    assert s.steps == RECIPE_MAX_STEPS and s.milestones == pytest.approx((150 / 240, 180 / 240, 210 / 240))
    assert ProxySettings.from_recipe(cifar, {"max_steps": 0}).for_pool(50000).steps == 80 * 50000 // 64


def _shifted_digits_task(settings):
    """Digits moved far from mean 0 / variance 1, and a student whose BatchNorm layers have
    torchvision MobileNetV3's momentum 0.01: after a short proxy its running statistics are
    still mostly the initial ones (0.99 ** 30 = 74%)."""
    splits = load_dataset("digits")
    x, y = splits.tensors("train", torch.arange(400))
    vx, vy = splits.tensors("val", torch.arange(100))
    data = ProxyData.build(3 * x + 4, y, 3 * vx + 4, vy, settings, num_classes=10)

    def new_student():
        student = tap_model(DigitsCNN((8, 8, 16)))
        for layer in student.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.momentum = 0.01
        return student

    torch.manual_seed(0)
    return Task(data, tap_model(DigitsCNN((8, 8, 16))), new_student, settings)


def test_a_short_proxy_is_scored_with_fresh_batch_norm_statistics(monkeypatch):
    """Issue 11 anomalies: an own-model study scored 5.25e+06 and a 224 px one exactly ln 4. The
    eval-mode student normalised by the running statistics a short proxy never moved from their
    start (torchvision's MobileNetV3: momentum 0.01), so it scored at chance, or with logits of
    1e6 and more, while it classified well in train mode."""
    from kd_optuna.train import batch_norm

    settings = ProxySettings(labels_per_class=0, label_batch_size=0, steps=30, batch_size=64, optimizer="sgd",
                             lr=0.1, schedule="constant", report_every=15, sharpness_size=32)
    task = _shifted_digits_task(settings)
    fixed = task.run(None)
    assert fixed.val_acc > 0.5 and fixed.val_ce < 1.5, fixed
    with monkeypatch.context() as patch:
        patch.setattr(batch_norm, "BN_STALE_WEIGHT", 1.0)  # never stale: the scoring before the fix
        stale = task.run(None)
    assert stale.val_acc < 0.3 and stale.val_ce > 2.2 and stale.val_ce_raw > 5, stale  # chance: ln 10 = 2.303
    assert task.run(None).metrics() == fixed.metrics()  # deterministic, and the student left as it was


def test_fresh_batch_norm_recomputes_only_stale_statistics_and_restores_them():
    from kd_optuna.proxy.training import fresh_batch_norm
    from kd_optuna.train.batch_norm import BN_STALE_WEIGHT, stale_batch_norm

    settings = dataclasses.replace(FAST, batch_size=32)
    task = _shifted_digits_task(settings)
    student = task.new_student().train()
    layers = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert stale_batch_norm(student)
    with torch.no_grad():
        for _ in range(3):
            student(task.data.train_x[:32])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rng = torch.get_rng_state()
    with fresh_batch_norm(student, task.data, settings) as recomputed:
        assert recomputed and not student.training and all(not m.training for m in layers)
        assert all(m.momentum is None for m in layers)  # a cumulative average meanwhile
        moved = [m.running_mean.clone() for m in layers]
    assert student.training and all(m.momentum == 0.01 for m in layers)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert not all(torch.equal(a, m.running_mean) for a, m in zip(moved, layers))
    assert torch.equal(rng, torch.get_rng_state())  # no random draw: training goes on as without it

    for layer in layers:  # after 500 batches at momentum 0.01, 0.99 ** 500 = 0.7% of the start remains
        layer.num_batches_tracked.fill_(500)
    assert 0.99 ** 500 < BN_STALE_WEIGHT < 0.99 ** 450 and not stale_batch_norm(student)
    with fresh_batch_norm(student, task.data, settings) as recomputed:
        assert not recomputed and not student.training
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items() if "num_batches" not in k)
