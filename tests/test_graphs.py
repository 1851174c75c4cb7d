"""The CUDA-graph step (kd_optuna.train.graphs) checked on the CPU.

A CUDA graph replays the kernels recorded at capture on the same memory. ``ReplayByCalling``
stands in for it on the CPU: capture records the step without running it, replay runs it
again on the static tensors. A graphed run that forgot to copy a batch into the static
tensors, or kept a stale learning rate, trains differently from the eager run, and these
tests see it.
"""

import dataclasses

import pytest
import torch
from torch import nn

from kd_optuna.distill.classics import CLASSICS
from kd_optuna.distill.loss import DistillerLoss
from kd_optuna.train import engine
from kd_optuna.train.graphs import GraphedStep
from kd_optuna.proxy.settings import ProxySettings
from kd_optuna.proxy.training import run_proxy

from tests.test_proxy import tiny_task


class ReplayByCalling:
    """A graph backend on the CPU: eager runs now, capture returns a replay that calls again."""

    def __init__(self, device=None, fail_with: Exception | None = None):
        self.fail_with = fail_with
        self.captured = 0

    def eager(self, fn):
        return fn()

    def capture(self, fn):
        if self.fail_with is not None:
            raise self.fail_with
        self.captured += 1
        return fn


def _regression(seed=0, n=96, batch=8):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=g), torch.randn(n, 1, generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _train(batches, graphed, lr_at=None, backend=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hooks = engine.Hooks()
    loss = lambda b: nn.functional.mse_loss(model(b[0]), b[1])  # noqa: E731
    run_step = GraphedStep(optimizer, loss, hooks, backend or ReplayByCalling()) if graphed else None
    engine.train_steps(optimizer, batches, loss, lr=0.05, lr_at=lr_at, hooks=hooks, run_step=run_step)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), run_step


def test_a_replayed_step_trains_what_the_eager_step_trains():
    eager, _ = _train(_regression(), graphed=False)
    graphed, step = _train(_regression(), graphed=True)
    assert torch.equal(eager, graphed)
    assert (step.captures, step.replays, step.eager_steps, step.fallback) == (1, 9, 3, None)


def test_a_new_learning_rate_is_captured_again():
    def halve_at_6(i):
        return 1.0 if i < 6 else 0.5

    eager, _ = _train(_regression(), graphed=False, lr_at=halve_at_6)
    graphed, step = _train(_regression(), graphed=True, lr_at=halve_at_6)
    assert torch.equal(eager, graphed)
    assert step.captures == 2


def test_a_batch_of_another_shape_runs_eagerly():
    batches = _regression(n=92)  # the last batch has 4 rows
    eager, _ = _train(batches, graphed=False)
    graphed, step = _train(batches, graphed=True)
    assert torch.equal(eager, graphed)
    assert (step.replays, step.eager_steps) == (8, 4)


def test_a_failed_capture_goes_on_eagerly_and_says_why():
    backend = ReplayByCalling(fail_with=RuntimeError("operation not permitted when stream is capturing\nmore"))
    eager, _ = _train(_regression(), graphed=False)
    graphed, step = _train(_regression(), graphed=True, backend=backend)
    assert torch.equal(eager, graphed)
    assert step.captures == 0 and step.eager_steps == 12
    assert step.fallback == "CUDA graph capture failed, running eagerly: operation not permitted when stream is capturing"


STEP = ProxySettings(labels_per_class=3, steps=9, batch_size=16, report_every=3, sharpness_size=32,
                     optimizer="sgd", lr=0.05, schedule="step", milestones=(0.5,), cuda_graph=True)


def _proxy(task, spec, settings, graphs):
    return run_proxy(task.new_student, lambda: task.make_distiller(spec), task.data, task.teacher_outputs,
                     task.reference, settings, graphs=graphs)


@pytest.mark.parametrize("classic", ["kd", "fitnets"])
def test_a_graphed_proxy_trial_gives_the_eager_trial_s_metrics(classic):
    task = tiny_task(STEP)
    spec = CLASSICS[classic][0]
    eager = _proxy(task, spec, dataclasses.replace(STEP, cuda_graph=False), None)
    graphed = _proxy(task, spec, STEP, ReplayByCalling)
    assert graphed.metrics() == eager.metrics() and graphed.curve == eager.curve
    assert eager.step_mode == "eager"
    assert graphed.step_mode == "cuda graph: 2 captures, 6 replays, 3 eager"


def test_the_cpu_ignores_cuda_graph_and_random_transforms_and_cosine_stay_eager():
    task = tiny_task(STEP)
    kd = CLASSICS["kd"][0]
    on_cpu = _proxy(task, kd, STEP, None)
    assert on_cpu.step_mode == "eager"
    assert on_cpu.metrics() == _proxy(task, kd, dataclasses.replace(STEP, cuda_graph=False), None).metrics()
    cosine = dataclasses.replace(STEP, schedule="cosine", milestones=())
    assert _proxy(task, kd, cosine, ReplayByCalling).step_mode == "eager"
    dropped = dataclasses.replace(kd, transform1="drop")
    assert not task.make_distiller(dropped).graph_safe
    assert _proxy(task, dropped, STEP, ReplayByCalling).step_mode == "eager"


def test_only_a_loss_without_host_reads_or_python_randomness_is_graph_safe():
    spec = CLASSICS["kd"][0]
    shapes = {"logit": (10,)}
    assert DistillerLoss(spec, shapes, shapes, check_finite=False).graph_safe
    assert not DistillerLoss(spec, shapes, shapes, check_finite=True).graph_safe
