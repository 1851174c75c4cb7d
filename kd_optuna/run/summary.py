"""How a study stands: its trials per state (one aggregate query) and the summary that
``kd-optuna optimize`` prints, with the names of the user attrs a worker writes that they read.
"""

from __future__ import annotations

import dataclasses

import optuna
from optuna.trial import TrialState
from sqlalchemy import text

#: User attr: ``host:pid`` of the worker that runs the trial.
WORKER_ATTR = "worker"
#: User attr: why the loss rejection pruned the trial.
REASON_ATTR = "reject_reason"
#: User attr: why the trial failed (:data:`INTERRUPTED` for a signal).
FAIL_REASON_ATTR = "fail_reason"
INTERRUPTED = "interrupted"


@dataclasses.dataclass
class Summary:
    """What an optimize run leaves: counts over the whole study and the best trial."""

    complete: int
    pruned: int
    rejected: int
    failed: int
    running: int
    best_value: float | None
    best_number: int | None
    best_formula: str | None
    interrupted: bool = False
    worker_errors: list[str] = dataclasses.field(default_factory=list)
    interrupted_trials: int = 0
    waiting: int = 0
    worker_deaths: list[str] = dataclasses.field(default_factory=list)
    target_met_before: bool = False

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    def describe(self) -> str:
        """e.g. ``40 finished (31 complete, 7 rejected, 2 pruned early), 2 failed (2 interrupted),
        2 queued to run again; worker 1 (pid 4242) killed by SIGKILL, restarted (1 of 3)``."""
        text = (
            f"{self.finished} finished ({self.complete} complete, {self.rejected} rejected, "
            f"{self.pruned - self.rejected} pruned early), {self.failed} failed"
        )
        if self.interrupted_trials:
            text += f" ({self.interrupted_trials} interrupted)"
        if self.waiting:
            text += f", {self.waiting} queued to run again"
        return "; ".join([text, *self.worker_deaths])


def count_states(storage: optuna.storages.RDBStorage, study_id: int) -> dict[TrialState, int]:
    """Trials of the study per state, by one aggregate query."""
    query = text("SELECT state, COUNT(*) FROM trials WHERE study_id = :sid GROUP BY state")
    with storage.engine.connect() as connection:
        rows = connection.execute(query, {"sid": study_id}).all()
    counts = {state: 0 for state in TrialState}
    for state, n in rows:
        name = state.name if isinstance(state, TrialState) else str(state)
        counts[TrialState[name]] += n
    return counts


def summarize(study: optuna.Study) -> Summary:
    """Counts and the best trial (lowest value) of ``study``; ``rejected`` are PRUNED with a reason."""
    trials = study.get_trials(deepcopy=False)
    by_state = {state: [t for t in trials if t.state == state] for state in TrialState}
    complete = [t for t in by_state[TrialState.COMPLETE] if t.value is not None]
    best = min(complete, key=lambda t: t.value) if complete else None
    return Summary(
        complete=len(by_state[TrialState.COMPLETE]),
        pruned=len(by_state[TrialState.PRUNED]),
        rejected=sum(1 for t in by_state[TrialState.PRUNED] if REASON_ATTR in t.user_attrs),
        failed=len(by_state[TrialState.FAIL]),
        running=len(by_state[TrialState.RUNNING]),
        interrupted_trials=sum(1 for t in by_state[TrialState.FAIL] if t.user_attrs.get(FAIL_REASON_ATTR) == INTERRUPTED),
        waiting=len(by_state[TrialState.WAITING]),
        best_value=best.value if best else None,
        best_number=best.number if best else None,
        best_formula=best.user_attrs.get("formula") if best else None,
    )
