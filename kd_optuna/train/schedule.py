"""The learning-rate schedules every training in kd-optuna follows (:func:`lr_factor`).

Plain arithmetic, without torch: the config reader checks a schedule's name against
:data:`SCHEDULES` without importing torch.
"""

from __future__ import annotations

import math

from kd_optuna.errors import KdOptunaError

SCHEDULES = ("cosine", "step", "constant")


def lr_factor(
    schedule: str, step: int, total_steps: int, steps_per_epoch: int = 1, milestones=(), gamma: float = 0.1,
    warmup_steps: int = 0,
) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based) of ``total_steps``.

    Warm-up (step + 1) / warmup_steps; then cosine 0.5 (1 + cos(pi (step - w) / max(1, T - w))),
    step gamma ** #{m in milestones : step // steps_per_epoch >= m} (milestones in epochs of
    ``steps_per_epoch`` steps; with 1 they are in steps), or constant 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))
    if schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return gamma ** sum(epoch >= m for m in milestones)
    if schedule == "constant":
        return 1.0
    raise KdOptunaError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
