"""`kd-optuna optimize`: N worker processes on one study, a progress bar, a clean Ctrl-C.

Each worker is a spawned process that opens its own connection to the storage, reloads the
study config from the study (JSON, never pickled), builds its objective and loops::

    under the host lock: fail stale trials; if finished >= n_trials: stop
                         if finished + running < n_trials: ask (a WAITING retry first)
    run the objective under a heartbeat; write the dashboard note; tell

where *finished* counts COMPLETE and PRUNED trials of the whole study, so ``n_trials`` is the
study's target: the same command resumes after an interruption, and workers on several hosts
share it (across hosts it may be exceeded by at most one trial per extra host, since the lock
is per host). A worker that finds every slot taken waits, so a trial whose worker died is
failed by the heartbeat and retried by a worker still alive.

Worker ``i`` of ``N`` uses GPU ``i mod count`` when CUDA is there (``--device auto`` or
``cuda``), and ``max(1, cores // N)`` CPU threads unless ``--threads`` says how many.

Ctrl-C (SIGINT) or SIGTERM: each worker fails its running trial (``fail_reason =
interrupted``), queues a copy with the same params (WAITING, run first by the next ask, so the
same command resumes with the interrupted trials: the classics' warm start is not lost) and
stops; the parent waits for them, then fails and queues again any trial its workers left
RUNNING. A database write is never cut in half: a signal only interrupts the objective, never
a storage call.

A worker that dies (a signal such as SIGKILL from the OOM killer, or an unexpected exit code)
is reported on stderr and in the summary with its index, pid and how it ended; its running
trial is failed and queued again at once, and the worker is restarted in its slot, at most
MAX_RESTARTS times per slot. A worker that stops for a reason it said itself (exit 1 or 2: a
broken setup, the database unreachable) is not restarted; its own message is shown.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import warnings
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import TrialState
from sqlalchemy import text

from kd_optuna.config import StudyConfig
from kd_optuna.errors import KdOptunaError
from kd_optuna.lineage import read_lineage
from kd_optuna import optuna_private
from kd_optuna.storage import DATABASE_ERRORS, describe_error, load_study, mask_secrets, open_storage, study_config

WORKER_ATTR = "worker"
REASON_ATTR = "reject_reason"
FAIL_REASON_ATTR = "fail_reason"
MAX_CONSECUTIVE_FAILURES = 5
POLL_S = 0.5
DB_OUTAGE_S = 120
LOCK_TIMEOUT_S = 300
MAX_RESTARTS = 3
INTERRUPTED = "interrupted"
#: Exit codes of a worker that ended on its own terms: done, stopped with its message (1, 2), interrupted.
_OWN_EXITS = (0, 1, 2, 130)


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """What a worker knows of itself; ``torch_device()`` picks and configures its device."""

    index: int
    n_workers: int
    device: str = "auto"
    threads: int | None = None

    def cpu_threads(self) -> int:
        """``threads`` if set, else an even split of this process's cores: ``max(1, cores // n_workers)``."""
        if self.threads is not None:
            return self.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // self.n_workers)

    def torch_device(self) -> str:
        """``cuda:i mod count`` (auto or cuda with CUDA present), else the device asked for;
        sets torch to ``cpu_threads()`` threads."""
        import torch

        torch.set_num_threads(self.cpu_threads())
        if self.device in ("auto", "cuda"):
            if torch.cuda.is_available():
                return f"cuda:{self.index % torch.cuda.device_count()}"
            if self.device == "cuda":
                raise KdOptunaError("--device cuda but no CUDA device is visible; use --device cpu")
            return "cpu"
        return self.device


ObjectiveFactory = Callable[[StudyConfig, WorkerContext], Callable[[optuna.Trial], float]]


def task_objective(config: StudyConfig, worker: WorkerContext) -> Callable[[optuna.Trial], float]:
    """The real objective: proxy training of the config's student (kd_optuna.objective)."""
    from pathlib import Path

    from kd_optuna.objective import Objective
    from kd_optuna.task import Task

    task = Task.from_config(config, device=worker.torch_device(), cache_dir=Path(".kd_optuna_cache"))
    return Objective(task)


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


def trial_note(trial: optuna.Trial | optuna.trial.FrozenTrial, state: TrialState, value: float | None) -> str:
    """Markdown note for the dashboard: formula, score or rejection, metrics, lineage."""
    attrs = trial.user_attrs
    lines = [f"### Trial {trial.number}: {state.name.lower()}", ""]
    if "formula" in attrs:
        lines += [f"`{attrs['formula']}`", ""]
    if value is not None:
        lines.append(f"- score: {value:.6g}")
    attrs = {**attrs, **read_lineage(trial)}
    for key in ("reject_reason", "val_ce", "val_acc", "sharpness_gap", "cka_gap", "proxy_seconds", "proposer", "parent", "spec"):
        if key in attrs:
            shown = f"{attrs[key]:.6g}" if isinstance(attrs[key], float) else str(attrs[key])
            lines.append(f"- {key}: {shown}")
    lines += [f"- canonical form: {note}" for note in canonical_notes(trial.params)]
    return "\n".join(lines) + "\n"


def canonical_notes(params: Mapping[str, Any]) -> list[str]:
    """``DistillerSpec.canonical_notes()`` of a trial's params: why a transform or a T/lambda
    pair shown in the params is not what the canonical spec computes ([] for other params)."""
    from kd_optuna.space import DistillerSpec

    try:
        return DistillerSpec.from_params(params).canonical_notes()
    except Exception:  # not a distiller's params (a user's own study), or an invalid one
        return []


class _Heartbeat:
    """Writes the trial's heartbeat every ``interval`` seconds until stopped (a daemon thread)."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int):
        self._storage = storage
        self._trial_id = trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "_Heartbeat":
        interval = self._storage.get_heartbeat_interval()
        if interval is not None:
            self._storage.record_heartbeat(self._trial_id)
            self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True)
            self._thread.start()
        return self

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception:  # a database hiccup: the next beat tries again
                pass

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class _Interrupt:
    """SIGINT/SIGTERM: remember to stop; raise KeyboardInterrupt only inside the objective."""

    def __init__(self) -> None:
        self.stop = False
        self.in_objective = False
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop:
            return
        self.stop = True
        if self.in_objective:
            raise KeyboardInterrupt


@dataclasses.dataclass(frozen=True)
class WorkerArgs:
    storage_url: str
    study_name: str
    n_trials: int
    deadline: float | None
    context: WorkerContext
    heartbeat_interval: int | None
    grace_period: int | None
    objective_factory: ObjectiveFactory
    parent_pid: int


def worker_main(args: WorkerArgs, host_lock: Any, messages: Any) -> None:
    """Entry point of one worker process; its exit code says how it ended (0, 1, 2, 130)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    interrupt = _Interrupt()
    name = f"{socket.gethostname()}:{os.getpid()}"

    def say(text_: str) -> None:
        messages.put((args.context.index, mask_secrets(text_, args.storage_url)))

    try:
        from optuna_dashboard import save_note  # imported once here, not inside a trial

        storage = open_storage(args.storage_url, args.heartbeat_interval, args.grace_period, check_filesystem=False)
        study = load_study(storage, args.study_name, args.storage_url)
        config = study_config(study)
        seed = config.search.get("seed")
        study.sampler = config.make_sampler(None if seed is None else seed + args.context.index)
        interrupt.in_objective = True  # building the task may train a teacher: Ctrl-C must reach it
        objective = args.objective_factory(config, args.context)
        interrupt.in_objective = False
    except KdOptunaError as exc:
        say(f"worker {args.context.index}: {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        say(f"worker {args.context.index} could not start: {exc.__class__.__name__}: {describe_error(exc, args.storage_url)}")
        sys.exit(1)
    code = _loop(args, storage, study, objective, interrupt, _HostLock(host_lock, say), name, say, save_note)
    storage.engine.dispose()
    sys.exit(code)


def _loop(args, storage, study, objective, interrupt, host_lock, name, say, save_note) -> int:
    """Trials until the target, the deadline or a signal; a database outage is waited out for
    up to DB_OUTAGE_S seconds (the trial in flight, if any, is failed by the heartbeat)."""
    failures = 0
    outage_since = None
    while not interrupt.stop and os.getppid() == args.parent_pid:
        if args.deadline is not None and time.time() >= args.deadline:
            return 0
        try:
            trial, done = _next_trial(args, storage, study, host_lock)
            if done:
                return 0
            if trial is None:
                time.sleep(POLL_S)
                continue
            failed = _finish(args, storage, study, trial, objective, interrupt, name, say, save_note)
            outage_since = None
        except DATABASE_ERRORS as exc:
            if outage_since is None:
                outage_since = time.time()
                say(f"worker {args.context.index}: database error, retrying: {describe_error(exc, args.storage_url)}")
            if time.time() - outage_since > DB_OUTAGE_S:
                say(f"worker {args.context.index}: database unreachable for {DB_OUTAGE_S} s; stopping")
                return 1
            time.sleep(2.0)
            continue
        if interrupt.stop:
            return 130
        failures = failures + 1 if failed else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            say(f"worker {args.context.index}: stopping after {failures} failed trials in a row")
            return 1
    return 130 if interrupt.stop else 0


class _HostLock:
    """The per-host lock around count-and-ask. A worker killed while holding it would block the
    others forever, so waiting longer than LOCK_TIMEOUT_S drops the lock for good (the trial
    target may then be exceeded by a trial or two) and says so."""

    def __init__(self, lock: Any, say: Callable[[str], None]):
        self._lock = lock
        self._say = say
        self._broken = False
        self._held = False

    def __enter__(self) -> None:
        if not self._broken:
            self._held = self._lock.acquire(timeout=LOCK_TIMEOUT_S)
            if not self._held:
                self._broken = True
                self._say(f"the host lock was held for over {LOCK_TIMEOUT_S} s (a worker killed inside it?); going on without it")

    def __exit__(self, *exc: Any) -> None:
        if self._held:
            self._held = False
            self._lock.release()


def _next_trial(args, storage, study, host_lock):
    """(trial or None, target reached): under the host lock, fail stale trials, count, ask.

    The new trial gets its first heartbeat before the lock is released, so a worker killed
    right after ``ask`` leaves a trial that goes stale like any other.
    """
    with host_lock:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
            _fail_unclaimed(storage, study)
        counts = count_states(storage, optuna_private.study_id(study))
        finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        if finished >= args.n_trials:
            return None, True
        if finished + counts[TrialState.RUNNING] < args.n_trials:
            trial = study.ask()
            if storage.get_heartbeat_interval() is not None:
                storage.record_heartbeat(optuna_private.trial_id(trial))
            return trial, False
    return None, False


def _fail_unclaimed(storage, study) -> None:
    """Fail (and retry) RUNNING trials that no worker ever claimed, once past the grace period.

    Heartbeats only fail trials that had one. A trial asked for outside a worker (or by a
    worker killed between ``ask`` and its first heartbeat, before this module recorded one
    under the lock) has none, no worker attr, and would hold a slot of ``--n-trials`` forever.
    """
    interval = storage.get_heartbeat_interval()
    if interval is None:
        return
    grace = datetime.timedelta(seconds=storage.grace_period or 2 * interval)
    now = datetime.datetime.now()
    callback = (
        storage.get_heartbeat_stale_trial_callback()  # optuna >= 4.9
        if hasattr(storage, "get_heartbeat_stale_trial_callback")
        else storage.get_failed_trial_callback()
    )
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start
        if WORKER_ATTR in trial.user_attrs or started is None or now - started < grace:
            continue
        try:
            failed = storage.set_trial_state_values(optuna_private.trial_id(trial), TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # finished meanwhile, elsewhere
            continue
        if failed and callback is not None:
            callback(study, storage.get_trial(optuna_private.trial_id(trial)))


def _finish(args, storage, study, trial, objective, interrupt, name, say, save_note) -> bool:
    """Run one trial, note it, tell it; True when it failed for a reason other than a signal.
    A trial ended by a signal is failed as ``interrupted`` and queued again with its params."""
    state, value, error = _run_trial(storage, trial, objective, interrupt, name)
    interrupted = error == INTERRUPTED
    failed = state == TrialState.FAIL and not interrupted
    if interrupted:
        trial.set_user_attr(FAIL_REASON_ATTR, INTERRUPTED)
    if failed:
        reason = trial.user_attrs.get(FAIL_REASON_ATTR)
        if reason is None:
            reason = (error or "failed")[:500]
            trial.set_user_attr(FAIL_REASON_ATTR, reason)
        say(f"worker {args.context.index}: trial {trial.number} failed: {reason}")
    if state != TrialState.FAIL:
        try:
            save_note(trial, trial_note(trial, state, value))
        except DATABASE_ERRORS:
            raise
        except Exception as exc:
            say(f"worker {args.context.index}: dashboard note of trial {trial.number} not saved: {exc}")
    try:
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    stored = storage.get_trial(optuna_private.trial_id(trial))
    if stored.state != state:
        say(f"worker {args.context.index}: trial {trial.number} was failed by the heartbeat meanwhile; its retry runs it again")
    elif interrupted:
        queue_again(study, stored)
    return failed


def queue_again(study: optuna.Study, trial: optuna.trial.FrozenTrial, retry: bool = False) -> bool:
    """Queue a copy of the ended ``trial`` (same params, WAITING), which the next ask runs
    first, as the heartbeat's retry does for a dead worker's trial; True when queued.
    ``system_attrs`` keep Optuna's retry convention (``failed_trial`` names the original trial).
    An interrupt (``retry=False``) is listed in ``interrupted_trials`` and does not count against
    ``max_retry``; a worker's death (``retry=True``) is appended to ``retry_history`` like the
    heartbeat's retries, and a trial already retried DEFAULT_MAX_RETRY times is not queued (a
    trial that kills its worker each time). The copy drops the ended run's ``fail_reason`` and
    ``worker``."""
    from kd_optuna.storage import DEFAULT_MAX_RETRY

    system_attrs = {"failed_trial": trial.number, **trial.system_attrs}
    if retry:
        system_attrs["retry_history"] = [*system_attrs.get("retry_history", []), trial.number]
        if len(system_attrs["retry_history"]) > DEFAULT_MAX_RETRY:
            return False
    else:
        system_attrs["interrupted_trials"] = [*system_attrs.get("interrupted_trials", []), trial.number]
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in (FAIL_REASON_ATTR, WORKER_ATTR)}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs=user_attrs, system_attrs=system_attrs,
        )
    )
    return True


def _run_trial(storage, trial, objective, interrupt, name):
    """Run ``objective(trial)`` under a heartbeat: (state, value, error message or None)."""
    trial.set_user_attr(WORKER_ATTR, name)
    with _Heartbeat(storage, optuna_private.trial_id(trial)):
        try:
            interrupt.in_objective = True
            if interrupt.stop:
                raise KeyboardInterrupt
            value = objective(trial)
            interrupt.in_objective = False
        except optuna.TrialPruned:
            interrupt.in_objective = False
            return TrialState.PRUNED, None, None
        except KeyboardInterrupt:
            interrupt.in_objective = False
            return TrialState.FAIL, None, INTERRUPTED
        except Exception as exc:
            interrupt.in_objective = False
            return TrialState.FAIL, None, f"{exc.__class__.__name__}: {' '.join(str(exc).split())}"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return TrialState.FAIL, None, f"the objective returned {type(value).__name__}, not a number"
    if value != value:
        return TrialState.FAIL, None, "the objective returned NaN"
    return TrialState.COMPLETE, value, None


def optimize(
    storage_url: str,
    study_name: str,
    n_trials: int,
    n_workers: int = 1,
    timeout: float | None = None,
    device: str = "auto",
    threads: int | None = None,
    heartbeat_interval: int | None = 20,
    grace_period: int | None = None,
    objective_factory: ObjectiveFactory = task_objective,
    progress: bool = True,
    on_start: Callable[[list[int]], None] | None = None,
    before_workers: Callable[[StudyConfig], None] | None = None,
) -> Summary:
    """Run ``n_workers`` processes on the study until it holds ``n_trials`` finished trials,
    ``timeout`` seconds pass, or Ctrl-C; returns the study's summary. ``threads``: torch CPU
    threads per worker (None: the cores split evenly). ``before_workers(config)`` runs once
    here when there are trials to run, before any worker starts (the CLI trains a missing
    teacher there, with a progress bar)."""
    if n_trials < 1 or n_workers < 1 or (threads is not None and threads < 1):
        raise KdOptunaError("--n-trials, --n-workers and --threads must be at least 1")
    if timeout is not None and timeout <= 0:
        raise KdOptunaError("--timeout must be a positive number of seconds")
    storage = open_storage(storage_url, heartbeat_interval, grace_period)
    study = load_study(storage, study_name, storage_url)
    config = study_config(study)
    config.check_files()
    deadline = None if timeout is None else time.time() + timeout
    counts = count_states(storage, optuna_private.study_id(study))
    if counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] >= n_trials:
        summary = summarize(study)
        summary.target_met_before = True
        storage.engine.dispose()
        return summary
    if before_workers is not None:
        before_workers(config)

    ctx = multiprocessing.get_context("spawn")
    host_lock = ctx.Lock()
    messages = ctx.Queue()

    def start(index: int):
        args = WorkerArgs(
            storage_url, study_name, n_trials, deadline, WorkerContext(index, n_workers, device, threads),
            heartbeat_interval, grace_period, objective_factory, os.getpid(),
        )
        process = ctx.Process(target=worker_main, args=(args, host_lock, messages), name=f"kd-optuna-worker-{index}")
        process.start()
        return process

    slots = [start(index) for index in range(n_workers)]
    processes = list(slots)  # every process started, replacements included
    if on_start is not None:
        on_start([p.pid for p in slots])

    errors: list[str] = []
    deaths: list[str] = []
    restarts = [0] * n_workers
    interrupted = False
    bar = _progress_bar(n_trials, progress)
    refresh_story = _story_refresher(study, bar)
    try:
        while True:
            _drain(messages, errors, bar)
            for index, process in enumerate(slots):
                if process.is_alive() or process.exitcode in _OWN_EXITS or getattr(process, "_kd_reported", False):
                    continue
                process._kd_reported = True
                replacement = _replace_dead(index, process, restarts, study, storage, deadline, n_trials, start)
                if replacement is not None:
                    slots[index] = replacement
                    processes.append(replacement)
                deaths.append(_death_line(index, process, replacement, restarts[index]))
                _say(f"kd-optuna: {deaths[-1]}", bar)
            if not any(p.is_alive() for p in slots):
                break
            _update_bar(bar, study)
            refresh_story()
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        interrupted = True
        _stop_workers(processes)
    finally:
        _drain(messages, errors, bar)
        for process in processes:
            process.join(timeout=30)
        try:
            _fail_orphans(study, storage, processes)
        except DATABASE_ERRORS as exc:
            errors.append(f"could not fail the trials of ended workers ({describe_error(exc, storage_url)}); "
                          "the next worker's heartbeat check fails them")
        _update_bar(bar, study)
        if bar is not None:
            bar.close()
    messages.close()
    messages.join_thread()
    for index, process in enumerate(slots):  # a worker that died after the loop's last look (not stopped by us)
        if not interrupted and process.exitcode not in _OWN_EXITS and not getattr(process, "_kd_reported", False):
            deaths.append(_death_line(index, process, None, restarts[index]))
            _say(f"kd-optuna: {deaths[-1]}", None)
    summary = summarize(study)
    summary.interrupted = interrupted or any(p.exitcode == 130 for p in slots)
    summary.worker_errors = errors
    summary.worker_deaths = deaths
    storage.engine.dispose()
    return summary


def how_it_ended(exitcode: int | None) -> str:
    """``killed by SIGKILL`` for a negative exit code (the signal), else ``exited with code N``."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _replace_dead(index, process, restarts, study, storage, deadline, n_trials, start):
    """A worker died: fail and queue again its running trial now (not a grace period later),
    and start a replacement in its slot unless the slot used its MAX_RESTARTS, the deadline
    passed or the target is met. The replacement, or None."""
    try:
        _fail_orphans(study, storage, [process], reason=f"its worker {how_it_ended(process.exitcode)}")
        counts = count_states(storage, optuna_private.study_id(study))
    except DATABASE_ERRORS:  # the heartbeat fails its trial; the count is checked by the workers
        counts = None
    if restarts[index] >= MAX_RESTARTS or (deadline is not None and time.time() >= deadline):
        return None
    if counts is not None and counts[TrialState.COMPLETE] + counts[TrialState.PRUNED] >= n_trials:
        return None
    restarts[index] += 1
    return start(index)


def _death_line(index: int, process, replacement, restarted: int) -> str:
    """e.g. ``worker 1 (pid 4242) killed by SIGKILL; restarted (1 of 3), now pid 4300``."""
    line = f"worker {index} (pid {process.pid}) {how_it_ended(process.exitcode)}"
    if replacement is not None:
        return f"{line}; restarted ({restarted} of {MAX_RESTARTS}), now pid {replacement.pid}"
    if restarted >= MAX_RESTARTS:
        return f"{line}; not restarted: its slot was restarted {MAX_RESTARTS} times"
    return f"{line}; not restarted"


def _say(text_: str, bar) -> None:
    """A line on stderr, above the progress bar when there is one."""
    if bar is not None:
        bar.write(text_, file=sys.stderr)
    else:
        print(text_, file=sys.stderr, flush=True)


def _story_refresher(study, bar):
    """The dashboard story's refresh every few finished trials, for a kd-optuna study (one with
    a stored config); a no-op for any other study."""
    from kd_optuna.config import CONFIG_ATTR

    if CONFIG_ATTR not in study.user_attrs:
        return lambda: False
    from kd_optuna.story import PeriodicRefresh

    return PeriodicRefresh(study, on_error=lambda message: _say(f"kd-optuna: {message}", bar))


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="trial", dynamic_ncols=True, desc="trials")


def _update_bar(bar, study: optuna.Study) -> None:
    """Show finished trials, rejected, failed, the best score and formula; redraw on a change
    (or every 10 s, for the elapsed time)."""
    if bar is None:
        return
    try:
        summary = summarize(study)
    except Exception:  # a busy database: the next poll shows it
        return
    best = "-" if summary.best_value is None else f"{summary.best_value:.4g}"
    postfix = f"rejected={summary.rejected} failed={summary.failed} best={best} {summary.best_formula or '-'}"
    shown = (min(summary.finished, bar.total), postfix)
    last = getattr(bar, "_kd_shown", (None, None, 0.0))
    if shown != last[:2] or time.time() - last[2] > 10:
        bar.n = shown[0]
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()
        bar._kd_shown = (*shown, time.time())


def _drain(messages, errors: list[str], bar) -> None:
    while True:
        try:
            _, text_ = messages.get_nowait()
        except Exception:
            return
        errors.append(text_)
        if bar is not None:
            bar.write(text_)
        else:
            logging.getLogger("kd_optuna").warning(text_)


def _stop_workers(processes, wait_s: float = 20.0) -> None:
    """SIGINT each live worker (a second one is ignored), then SIGTERM, then SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig, wait in ((signal.SIGINT, wait_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        alive = [p for p in processes if p.is_alive()]
        if not alive:
            break
        for process in alive:
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                pass
        end = time.time() + wait
        for process in alive:
            process.join(timeout=max(0.0, end - time.time()))
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _fail_orphans(study: optuna.Study, storage, processes, reason: str = INTERRUPTED) -> list[int]:
    """Fail RUNNING trials whose worker (one of ``processes``) has ended, with ``fail_reason``
    = ``reason``, and queue each again with its params; the failed trials' numbers.
    A trial that finished meanwhile (told, or failed by a heartbeat check) is left alone."""
    host = socket.gethostname()
    ended = {f"{host}:{p.pid}" for p in processes if not p.is_alive()}
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ATTR) in ended:
            try:
                storage.set_trial_user_attr(optuna_private.trial_id(trial), FAIL_REASON_ATTR, reason)
                if not storage.set_trial_state_values(optuna_private.trial_id(trial), TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:  # finished meanwhile
                continue
            failed.append(trial.number)
            queue_again(study, storage.get_trial(optuna_private.trial_id(trial)), retry=reason != INTERRUPTED)
    return failed


def check_counts(values: Mapping[str, Any]) -> None:
    """Refuse zero or negative counts with the flag's name."""
    for flag, value in values.items():
        if value is not None and value < 1:
            raise KdOptunaError(f"{flag} must be at least 1, got {value}")
