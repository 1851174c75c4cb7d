"""`kd-optuna optimize`: N worker processes on one study, a progress bar, a clean Ctrl-C.

This module is the parent: it starts the workers (``kd_optuna.run.trial_loop`` is what each one
runs; ``kd_optuna.train.devices`` picks its device and threads), shows the progress bar, refreshes
the dashboard story, and returns the study's summary (``kd_optuna.run.summary``).

Ctrl-C (SIGINT) or SIGTERM: each worker fails its running trial, queues a copy with the same
params and stops (see ``kd_optuna.run.trial_loop``); the parent waits for them, then fails and
queues again any trial its workers left RUNNING. SIGTERM to the parent alone (``kill PID``,
``timeout``, a container or job scheduler stopping it) stops the workers the same way.

A worker that dies (a signal such as SIGKILL from the OOM killer, or an unexpected exit code)
is reported on stderr and in the summary with its index, pid and how it ended; its running
trial is failed and queued again at once, and the worker is restarted in its slot, at most
MAX_RESTARTS times per slot. A worker that stops for a reason it said itself (exit 1 or 2: a
broken setup, the database unreachable) is not restarted; its own message is shown.

A SQLite file deleted, moved or replaced while the workers run (they would go on writing into
the unlinked file without an error) stops them, and optimize raises StorageError saying so.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import TrialState

from kd_optuna import optuna_private
from kd_optuna.run.config import StudyConfig
from kd_optuna.train.devices import WorkerContext
from kd_optuna.errors import KdOptunaError
from kd_optuna.run.storage import (
    DATABASE_ERRORS,
    SqliteFileWatch,
    StorageError,
    describe_error,
    load_study,
    open_storage,
    study_config,
)
from kd_optuna.run.summary import (  # noqa: F401 - Summary, REASON_ATTR: imported from here by callers
    FAIL_REASON_ATTR,
    INTERRUPTED,
    REASON_ATTR,
    WORKER_ATTR,
    Summary,
    count_states,
    summarize,
)
from kd_optuna.run.trial_loop import (  # noqa: F401 - task_objective, ObjectiveFactory: the defaults callers name
    POLL_S,
    ObjectiveFactory,
    WorkerArgs,
    queue_again,
    task_objective,
    worker_main,
)

MAX_RESTARTS = 3
#: Exit codes of a worker that ended on its own terms: done, stopped with its message (1, 2), interrupted.
_OWN_EXITS = (0, 1, 2, 130)


def optimize(
    storage_url: str,
    study_name: str,
    n_trials: int | None,
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
    ``timeout`` seconds pass, or Ctrl-C; returns the study's summary. ``n_trials`` None: no
    target, as in ``optuna.Study.optimize`` (a ``timeout`` is then needed). ``threads``: torch CPU
    threads per worker (None: the cores split evenly). ``before_workers(config)`` runs once
    here when there are trials to run, before any worker starts (the CLI trains a missing
    teacher there, with a progress bar); ``timeout`` counts from its end."""
    if (n_trials is not None and n_trials < 1) or n_workers < 1 or (threads is not None and threads < 1):
        raise KdOptunaError("--n-trials, --n-workers and --threads must be at least 1")
    if timeout is not None and not timeout > 0:  # NaN too: no deadline would ever pass
        raise KdOptunaError("--timeout must be a positive number of seconds")
    if n_trials is None and timeout is None:
        raise KdOptunaError("give --n-trials N (finished trials the study should hold), --timeout SECONDS "
                            "(how long to search), or both")
    storage = open_storage(storage_url, heartbeat_interval, grace_period, must_exist=True, writable=True)
    database_file = SqliteFileWatch(storage_url)
    study = load_study(storage, study_name, storage_url)
    config = study_config(study)
    config.check_files()
    if n_trials is not None and _finished(storage, study) >= n_trials:
        summary = summarize(study)
        summary.target_met_before = True
        storage.engine.dispose()
        return summary
    if before_workers is not None:
        before_workers(config)
    deadline = None if timeout is None else time.time() + timeout

    def worker_args(index: int) -> WorkerArgs:
        context = WorkerContext(index, n_workers, device, threads)
        return WorkerArgs(storage_url, study_name, n_trials, deadline, context, heartbeat_interval,
                          grace_period, objective_factory, os.getpid())

    pool = _Pool(worker_args, n_workers)
    if on_start is not None:
        on_start([p.pid for p in pool.slots])
    bar = _progress_bar(n_trials, progress)
    interrupted = False
    with _terminate_as_interrupt():
        try:
            _watch(pool, study, storage, deadline, n_trials, bar, database_file)
        except KeyboardInterrupt:
            interrupted = True
            _stop_workers(pool.processes)
        finally:
            _wind_down(pool, study, storage, storage_url, bar)
        pool.close(report_late_deaths=not interrupted)
    summary = summarize(study)
    summary.interrupted = interrupted or any(p.exitcode == 130 for p in pool.slots)
    summary.worker_errors = pool.errors
    summary.worker_deaths = pool.deaths
    storage.engine.dispose()
    return summary


class _Pool:
    """The spawned worker processes of one optimize, one per slot: started, restarted in their
    slot when they die (``restarts`` per slot), their messages (``errors``) and deaths
    (``deaths``, one line each) kept for the summary."""

    def __init__(self, worker_args: Callable[[int], WorkerArgs], n_workers: int) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        handle, self._host_lock = tempfile.mkstemp(prefix="kd_optuna_host_", suffix=".lock")
        os.close(handle)
        self._messages = self._ctx.Queue()
        self._worker_args = worker_args
        self.slots = [self._start(index) for index in range(n_workers)]
        self.processes = list(self.slots)  # every process started, replacements included
        self.restarts = [0] * n_workers
        self.errors: list[str] = []
        self.deaths: list[str] = []
        self._reported: set[int] = set()

    def _start(self, index: int):
        process = self._ctx.Process(target=worker_main, name=f"kd-optuna-worker-{index}",
                                    args=(self._worker_args(index), self._host_lock, self._messages))
        process.start()
        return process

    def newly_dead(self) -> list[tuple[int, Any]]:
        """(slot, process) of each worker that died (not an exit of its own) since the last call."""
        dead = [(index, p) for index, p in enumerate(self.slots)
                if not p.is_alive() and p.exitcode not in _OWN_EXITS and p.pid not in self._reported]
        self._reported.update(p.pid for _, p in dead)
        return dead

    def restart(self, index: int):
        self.restarts[index] += 1
        self.slots[index] = self._start(index)
        self.processes.append(self.slots[index])
        return self.slots[index]

    def report_death(self, index: int, process, replacement, bar) -> None:
        self.deaths.append(_death_line(index, process, replacement, self.restarts[index]))
        _say(f"kd-optuna: {self.deaths[-1]}", bar)

    def any_alive(self) -> bool:
        return any(p.is_alive() for p in self.slots)

    def drain(self, bar) -> None:
        """Show the workers' messages on stderr (above the bar) and keep their errors."""
        while True:
            try:
                _, text_, kind = self._messages.get_nowait()
            except Exception:
                return
            if kind == "error":
                self.errors.append(text_)
            _say(text_, bar)

    def close(self, report_late_deaths: bool) -> None:
        """Close the message queue; report a worker that died after the last look (and was
        not stopped by us: ``report_late_deaths`` is False after Ctrl-C)."""
        self._messages.close()
        self._messages.join_thread()
        with contextlib.suppress(OSError):
            os.unlink(self._host_lock)
        if report_late_deaths:
            for index, process in self.newly_dead():
                self.report_death(index, process, None, None)


def _watch(pool: _Pool, study, storage, deadline: float | None, n_trials: int | None, bar,
           database_file: SqliteFileWatch) -> None:
    """Until no worker is alive: show their messages and the progress, refresh the dashboard
    story, and fail the trial of a dead worker and restart it (see :func:`_may_restart`). A lost
    database file stops the workers and raises StorageError."""
    refresh_story = _story_refresher(study, bar)
    while True:
        lost = database_file.lost()
        if lost is not None:
            _stop_workers(pool.processes)
            raise StorageError(
                f"{lost} while optimize ran, and the trials written since went with it; the workers were "
                "stopped: restore the file (or create the study again) and run optimize again"
            )
        pool.drain(bar)
        for index, process in pool.newly_dead():
            replacement = None
            if _may_restart(index, process, pool.restarts, study, storage, deadline, n_trials):
                replacement = pool.restart(index)
            pool.report_death(index, process, replacement, bar)
        if not pool.any_alive():
            return
        _update_bar(bar, study)
        refresh_story()
        time.sleep(POLL_S)


def _wind_down(pool: _Pool, study, storage, storage_url: str, bar) -> None:
    """After the workers stopped (or were stopped): last messages, join them all, fail and queue
    again any trial they left RUNNING, last progress, close the bar."""
    pool.drain(bar)
    for process in pool.processes:
        process.join(timeout=30)
    try:
        _fail_orphans(study, storage, pool.processes)
    except DATABASE_ERRORS as exc:
        pool.errors.append(f"could not fail the trials of ended workers ({describe_error(exc, storage_url)}); "
                           "the next worker's heartbeat check fails them")
    _update_bar(bar, study)
    if bar is not None:
        bar.close()


def _finished(storage, study: optuna.Study) -> int:
    counts = count_states(storage, optuna_private.study_id(study))
    return counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]


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


def _may_restart(index, process, restarts, study, storage, deadline, n_trials) -> bool:
    """A worker died: fail and queue again its running trial now (not a grace period later);
    whether to start a replacement in its slot: not when the slot used its MAX_RESTARTS, the
    deadline passed or the target (if any) is met."""
    try:
        _fail_orphans(study, storage, [process], reason=f"its worker {how_it_ended(process.exitcode)}")
        finished = _finished(storage, study)
    except DATABASE_ERRORS:  # the heartbeat fails its trial; the count is checked by the workers
        finished = None
    if restarts[index] >= MAX_RESTARTS or (deadline is not None and time.time() >= deadline):
        return False
    return finished is None or n_trials is None or finished < n_trials


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
    from kd_optuna.run.config import CONFIG_ATTR

    if CONFIG_ATTR not in study.user_attrs:
        return lambda: False
    from kd_optuna.run.story import PeriodicRefresh

    return PeriodicRefresh(study, on_error=lambda message: _say(f"kd-optuna: {message}", bar))


def _progress_bar(total: int | None, enabled: bool):
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
    shown = (summary.finished if bar.total is None else min(summary.finished, bar.total), postfix)
    last = getattr(bar, "_kd_shown", (None, None, 0.0))
    if shown != last[:2] or time.time() - last[2] > 10:
        bar.n = shown[0]
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()
        bar._kd_shown = (*shown, time.time())


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Within: the first SIGTERM raises KeyboardInterrupt, as Ctrl-C does, and later ones are
    ignored; the previous handler is back afterwards. Python takes signals in the main thread
    only, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def interrupt(signum: int, frame: Any) -> None:
        if not received:
            received.append(signum)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_workers(processes, wait_s: float = 20.0) -> None:
    """SIGINT each live worker (a second Ctrl-C meanwhile is ignored), then SIGTERM, then
    SIGKILL; the caller's SIGINT handler is back afterwards, whatever happened."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
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
    finally:
        signal.signal(signal.SIGINT, previous)


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
