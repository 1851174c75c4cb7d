"""One worker process: its trial loop over the study, under a heartbeat, until the target.

Each worker is a spawned process (started by ``kd_optuna.run.workers``) that opens its own
connection to the storage, reloads the study config from the study (JSON, never pickled),
builds its objective and loops::

    under the host lock: fail stale trials; if finished >= n_trials: stop
                         if finished + running < n_trials: ask (a WAITING retry first)
                         (n_trials None: no target, ask; the deadline stops the loop)
    run the objective under a heartbeat; write the dashboard note; tell

where *finished* counts COMPLETE and PRUNED trials of the whole study, so ``n_trials`` is the
study's target: the same command resumes after an interruption, and workers on several hosts
share it (across hosts it may be exceeded by at most one trial per extra host, since the lock
is per host). A worker that finds every slot taken waits, so a trial whose worker died is
failed by the heartbeat and retried by a worker still alive.

Ctrl-C (SIGINT) or SIGTERM: the worker fails its running trial (``fail_reason =
interrupted``), queues a copy with the same params (WAITING, run first by the next ask, so the
same command resumes with the interrupted trials: the classics' warm start is not lost) and
stops. A database write is never cut in half: a signal only interrupts the objective, never
a storage call. Exit codes: 0 done, 1 or 2 stopped with its own message, 130 interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from kd_optuna import optuna_private
from kd_optuna.run.config import StudyConfig
from kd_optuna.train.devices import WorkerContext
from kd_optuna.errors import KdOptunaError
from kd_optuna.run.storage import DATABASE_ERRORS, describe_error, load_study, mask_secrets, open_storage, study_config
from kd_optuna.run.story import trial_note
from kd_optuna.run.summary import FAIL_REASON_ATTR, INTERRUPTED, WORKER_ATTR, count_states

MAX_CONSECUTIVE_FAILURES = 5
POLL_S = 0.5
DB_OUTAGE_S = 120
LOCK_TIMEOUT_S = 300
LOCK_POLL_S = 0.005


ObjectiveFactory = Callable[[StudyConfig, WorkerContext], Callable[[optuna.Trial], float]]


def task_objective(config: StudyConfig, worker: WorkerContext) -> Callable[[optuna.Trial], float]:
    """The real objective: proxy training of the config's student (kd_optuna.proxy.objective)."""
    from pathlib import Path

    from kd_optuna.proxy.objective import Objective
    from kd_optuna.proxy.task import Task

    task = Task.from_config(config, device=worker.torch_device(), cache_dir=Path(".kd_optuna_cache"))
    return Objective(task)


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
    n_trials: int | None
    deadline: float | None
    context: WorkerContext
    heartbeat_interval: int | None
    grace_period: int | None
    objective_factory: ObjectiveFactory
    parent_pid: int


class _NotesToParent(logging.Handler):
    """kd_optuna's warnings in a worker (a trial at chance, the cached teacher reused) sent to
    the parent as ``(index, text, "note")``, which writes them above its progress bar: written
    to the worker's stderr they broke into the bar's line."""

    def __init__(self, messages: Any, args: WorkerArgs):
        super().__init__(logging.WARNING)
        self.messages, self.args = messages, args

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.put(_message(self.args, record.getMessage(), "note"))
        except Exception:
            self.handleError(record)


def _message(args: WorkerArgs, text_: str, kind: str) -> tuple[int, str, str]:
    """What a worker sends its parent: (worker index, text with the storage's secrets masked, kind)."""
    return args.context.index, mask_secrets(text_, args.storage_url), kind


def worker_main(args: WorkerArgs, host_lock: str, messages: Any) -> None:
    """Entry point of one worker process; its exit code says how it ended (0, 1, 2, 130).
    ``host_lock``: the path of the lock file the workers of this host share. ``messages``
    receives ``(index, text, kind)``: kind "error" for why the worker stopped or a trial
    failed, "note" for kd_optuna's warnings."""
    notes = _NotesToParent(messages, args)
    logging.getLogger("kd_optuna").addHandler(notes)
    try:
        _worker_main(args, host_lock, messages)
    finally:
        logging.getLogger("kd_optuna").removeHandler(notes)


def _worker_main(args: WorkerArgs, host_lock: str, messages: Any) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    interrupt = _Interrupt()
    name = f"{socket.gethostname()}:{os.getpid()}"

    def say(text_: str) -> None:
        messages.put(_message(args, text_, "error"))

    try:
        from kd_optuna.run.dashboard_writers import save_note  # loaded once here, not inside a trial

        storage = open_storage(args.storage_url, args.heartbeat_interval, args.grace_period, must_exist=True,
                               check_filesystem=False)
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
    code = _loop(args, storage, study, config.space, objective, interrupt, _HostLock(host_lock, say), name, say, save_note)
    storage.engine.dispose()
    gc.freeze()  # the interpreter's last collection at exit would walk every object torch made: seconds
    sys.exit(code)


def _loop(args, storage, study, space, objective, interrupt, host_lock, name, say, save_note) -> int:
    """Trials until the target, the deadline, a signal or a repeat of a distiller because
    ``space`` holds no other; a database outage is waited out for up to DB_OUTAGE_S seconds
    (the trial in flight, if any, is failed by the heartbeat)."""
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
        if not failed and _space_exhausted(storage, study, trial, space):
            say(f"worker {args.context.index}: every distiller of the study's [space] was tried (trial "
                f"{trial.number} repeated one, and the seeded proxy scores a repeat the same); more trials "
                "would only repeat them: create a study with a wider [space] to search further")
            return 0
        failures = failures + 1 if failed else 0
        if failures >= MAX_CONSECUTIVE_FAILURES:
            say(f"worker {args.context.index}: stopping after {failures} failed trials in a row")
            return 1
    return 130 if interrupt.stop else 0


def _space_exhausted(storage, study, trial, space) -> bool:
    """Whether the finished ``trial`` repeated a distiller because ``space`` holds no other: the
    sampler's lineage note says so, or the space is a single distiller (Optuna never asks a
    sampler about a single choice) that an earlier trial tried."""
    from kd_optuna.search.lineage import read_lineage
    from kd_optuna.search.sampler import REPEAT_NOTE

    note = read_lineage(storage.get_trial(optuna_private.trial_id(trial))).get("sampler_note")
    if isinstance(note, str) and REPEAT_NOTE in note:
        return True
    if space.size() != 1:
        return False
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return any(t.number != trial.number for t in finished)


class _HostLock:
    """The per-host lock around count-and-ask: an exclusive ``flock`` on the file ``path``
    (``kd_optuna.files.file_lock``), which the kernel releases when its holder dies, so a
    worker killed inside it blocks no one. A holder alive but stuck for LOCK_TIMEOUT_S drops
    the lock for good (the trial target may then be exceeded by a trial or two), said once."""

    def __init__(self, path: str, say: Callable[[str], None]):
        self._path = path
        self._say = say
        self._broken = False
        self._held: contextlib.ExitStack | None = None

    def __enter__(self) -> None:
        from kd_optuna.files import LockHeld, file_lock

        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while not self._broken:
            held = contextlib.ExitStack()
            try:
                held.enter_context(file_lock(self._path, wait=False))
            except LockHeld:
                if time.monotonic() < deadline:
                    time.sleep(LOCK_POLL_S)
                    continue
                self._broken = True
                self._say(f"the host lock was held for over {LOCK_TIMEOUT_S} s (a worker stuck inside it?); "
                          "going on without it")
            else:
                self._held = held
                return

    def __exit__(self, *exc: Any) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            held.close()


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
        if args.n_trials is not None and finished >= args.n_trials:
            return None, True
        if args.n_trials is None or finished + counts[TrialState.RUNNING] < args.n_trials:
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
    from kd_optuna.run.storage import DEFAULT_MAX_RETRY

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
