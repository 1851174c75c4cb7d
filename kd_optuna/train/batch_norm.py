"""How far a model's BatchNorm running statistics still sit at their start.

Eval-mode BatchNorm normalises by running statistics, an exponential average with momentum m
that starts at mean 0 and variance 1: after S training batches the start still weighs
``(1 - m) ** S``. A short training leaves that weight large (m = 0.1, torch's default: above
1% before 44 steps; torchvision's MobileNetV3 and EfficientNets use m = 0.01: before 459),
and the eval-mode model then computes with the wrong statistics: it scores at chance, or with
logits of 1e6 and more, while it classifies well in train mode. The proxy recomputes such
statistics before scoring (``kd_optuna.proxy.training.fresh_batch_norm``); the full training
says so (``kd_optuna.export.training``).
"""

from __future__ import annotations

import math

from torch import nn

#: Above this weight of their start the running statistics are stale.
BN_STALE_WEIGHT = 0.01


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


def start_weight(layer: nn.modules.batchnorm._BatchNorm) -> float:
    """The weight ``layer``'s initial running statistics still hold: ``(1 - m) ** S`` after S
    batches at momentum m; for a cumulative average (momentum None) 1 before its first batch
    and 0 after."""
    tracked = int(layer.num_batches_tracked)
    return float(tracked == 0) if layer.momentum is None else (1.0 - layer.momentum) ** tracked


def stalest(model: nn.Module) -> nn.modules.batchnorm._BatchNorm | None:
    """The BatchNorm layer of ``model`` whose statistics weigh their start the most; None
    without BatchNorm."""
    return max(batch_norms(model), key=start_weight, default=None)


def stale_batch_norm(model: nn.Module) -> bool:
    """Whether a BatchNorm layer of ``model`` still holds more than BN_STALE_WEIGHT of its
    initial running statistics."""
    layer = stalest(model)
    return layer is not None and start_weight(layer) > BN_STALE_WEIGHT


def steps_to_fresh(momentum: float) -> int:
    """Training batches after which momentum ``momentum`` leaves at most BN_STALE_WEIGHT of
    the start: ``ceil(log(BN_STALE_WEIGHT) / log(1 - momentum))``."""
    return math.ceil(math.log(BN_STALE_WEIGHT) / math.log(1.0 - momentum))


def stale_note(model: nn.Module, whose: str) -> str | None:
    """A sentence for the user when ``model``'s BatchNorm statistics are stale after its training
    (``whose``: "the student's"), naming the steps, the momentum, the weight left and the steps
    that would freshen them; None when they are not."""
    layer = stalest(model)
    if layer is None or layer.momentum is None or start_weight(layer) <= BN_STALE_WEIGHT:
        return None
    return (f"after {int(layer.num_batches_tracked)} steps {whose} BatchNorm running statistics (momentum "
            f"{layer.momentum:g}) still hold {100 * start_weight(layer):.0f}% of their initial values, so its "
            f"eval-mode top-1 reads statistics the training barely moved; train for at least "
            f"{steps_to_fresh(layer.momentum)} steps")
