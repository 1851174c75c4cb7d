"""kd_optuna.train.batch_norm: how much of their start a model's BatchNorm statistics hold."""

import pytest
import torch
from torch import nn

from kd_optuna.train.batch_norm import BN_STALE_WEIGHT, stale_batch_norm, stalest, start_weight, steps_to_fresh


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.5])
def test_steps_to_fresh_is_the_first_step_count_at_or_below_the_stale_weight(momentum):
    steps = steps_to_fresh(momentum)
    assert (1 - momentum) ** steps <= BN_STALE_WEIGHT < (1 - momentum) ** (steps - 1)


def test_the_stalest_layer_is_the_one_with_the_smallest_momentum_and_training_freshens_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.1), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4, momentum=0.01))
    assert start_weight(stalest(model)) == 1.0 and stale_batch_norm(model)
    model.train()
    with torch.no_grad():
        for _ in range(steps_to_fresh(0.1)):
            model(torch.randn(2, 3, 8, 8))
    assert start_weight(model[1]) <= BN_STALE_WEIGHT and stale_batch_norm(model)  # the 0.01 layer is not yet
    assert stalest(model) is model[3]
    assert start_weight(model[3]) == pytest.approx(0.99 ** 44)
    model[3].num_batches_tracked.fill_(steps_to_fresh(0.01))
    assert not stale_batch_norm(model)


def test_a_cumulative_average_is_stale_only_before_its_first_batch_and_no_batch_norm_never():
    layer = nn.BatchNorm1d(3, momentum=None)
    assert start_weight(layer) == 1.0
    layer(torch.randn(4, 3))
    assert start_weight(layer) == 0.0 and not stale_batch_norm(layer)
    assert stalest(nn.Linear(2, 2)) is None and not stale_batch_norm(nn.Linear(2, 2))
    assert stalest(nn.BatchNorm1d(3, track_running_stats=False)) is None
