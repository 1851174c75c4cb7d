"""Worker processes on one study: trial counts, SQLite under 4 writers, SIGKILL, Ctrl-C."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import TrivialObjective, create_kd_study, default_sigint, process_group_left, run_worker_in_process
from kd_optuna import optuna_private
from kd_optuna.run.storage import open_storage
from kd_optuna.run.story import trial_note
from kd_optuna.run.workers import WorkerContext, optimize

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _states(study):
    counts = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] = counts.get(t.state, 0) + 1
    return counts


def test_one_worker_in_process_reaches_the_target_and_writes_notes(tmp_path):
    from optuna_dashboard._note import get_note_from_system_attrs

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    code, messages = run_worker_in_process(url, 5, TrivialObjective())
    assert code == 0 and messages == []
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    system_attrs = optuna_private.study_system_attrs(study)
    for trial in trials:
        note = get_note_from_system_attrs(system_attrs, optuna_private.trial_id(trial))["body"]
        assert trial.user_attrs["formula"] in note and f"{trial.value:.6g}" in note


def test_a_workers_warnings_go_to_the_parent_as_notes_not_errors(tmp_path, capfd):
    """A worker's kd_optuna warning (a trial at chance, the cached teacher) is sent to the parent,
    which writes it on a line of its own (it broke into the progress bar's line when the worker
    wrote it to stderr), and is not an error: it never becomes "workers stopped early"."""
    import logging

    url = f"sqlite:///{tmp_path / 's.db'}"
    create_kd_study(url)
    handlers = list(logging.getLogger("kd_optuna").handlers)
    code, messages = run_worker_in_process(url, 2, TrivialObjective(warn=True))
    assert code == 0 and messages == [(0, "trial 0 says a word", "note"), (0, "trial 1 says a word", "note")]
    assert logging.getLogger("kd_optuna").handlers == handlers
    summary = optimize(url, "s", 3, n_workers=1, objective_factory=TrivialObjective(warn=True))
    assert summary.finished == 3 and summary.worker_errors == []
    out, err = capfd.readouterr()
    assert "trial 2 says a word" in err.replace("\r", "\n").splitlines() and not out


_ONE_KD = {"knowledge": ["logit"], "transform1": ["no"], "transform2": ["no"], "transform3": ["no"],
           "distance": ["kl"], "calibration": ["no"], "temperature": [4], "magnitude": [1]}


@pytest.mark.parametrize("narrowed, distillers", [(_ONE_KD, 1), ({**_ONE_KD, "temperature": [1, 4]}, 2)])
def test_a_worker_stops_when_its_space_has_no_untried_distiller(tmp_path, narrowed, distillers):
    """The seeded proxy scores a repeat the same: once the space is spent, the worker says so
    and stops instead of filling --n-trials with repeats."""
    from kd_optuna.run.config import CONFIG_ATTR
    from kd_optuna.run.storage import study_config

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    config = study_config(study)
    study.set_user_attr(CONFIG_ATTR, dataclasses.replace(config, space=config.space.narrow(**narrowed)).to_json())
    code, messages = run_worker_in_process(url, 20, TrivialObjective())
    trials = study.get_trials(deepcopy=False)
    assert code == 0 and len(messages) == 1 and "wider [space]" in messages[0][1]
    assert len({t.user_attrs["spec"] for t in trials}) == distillers and len(trials) <= distillers + 2
    assert all(t.state == TrialState.COMPLETE for t in trials)


@pytest.mark.slow
def test_two_workers_stop_exactly_at_n_trials_with_a_note_per_trial(tmp_path):
    from optuna_dashboard._note import get_note_from_system_attrs

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    summary = optimize(url, "s", 12, n_workers=2, objective_factory=TrivialObjective(wait_for_workers=2),
                       progress=False)
    trials = study.get_trials(deepcopy=False)
    assert summary.finished == 12
    assert len(trials) == 12 and {t.state for t in trials} == {TrialState.COMPLETE}
    assert [t.number for t in trials] == list(range(12))
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    system_attrs = optuna_private.study_system_attrs(study)
    for trial in trials:
        note = get_note_from_system_attrs(system_attrs, optuna_private.trial_id(trial))["body"]
        assert trial.user_attrs["formula"] in note and f"{trial.value:.6g}" in note
    # the same command again finds the target reached and adds nothing
    again = optimize(url, "s", 12, n_workers=1, objective_factory=TrivialObjective(), progress=False)
    assert again.finished == 12 and len(study.get_trials(deepcopy=False)) == 12


def test_timeout_counts_the_search_not_the_teacher_trained_before_it(tmp_path, monkeypatch):
    """The workers' deadline is --timeout seconds after the teacher (``before_workers``) is ready."""
    import kd_optuna.run.workers as workers

    class Started(Exception):
        pass

    class RecordingPool:
        def __init__(self, worker_args, n_workers):
            self.deadline = worker_args(0).deadline
            raise Started(self)

    monkeypatch.setattr(workers, "_Pool", RecordingPool)
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_kd_study(url)
    ready = []
    with pytest.raises(Started) as started:
        optimize(url, "s", 3, n_workers=1, timeout=60.0, objective_factory=TrivialObjective(), progress=False,
                 before_workers=lambda config: (time.sleep(0.5), ready.append(time.time())))
    assert started.value.args[0].deadline >= ready[0] + 60.0


def test_without_a_target_a_worker_runs_trials_until_the_deadline(tmp_path):
    """--timeout alone, as ``study.optimize(timeout=...)``: no trial count stops the worker, the deadline does."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    deadline = time.time() + 1.5
    code, _ = run_worker_in_process(url, None, TrivialObjective(sleep_s=0.1), deadline=deadline)
    ended = time.time()
    trials = study.get_trials(deepcopy=False)
    assert code == 0 and ended >= deadline
    assert len(trials) >= 2 and {t.state for t in trials} == {TrialState.COMPLETE}


def test_optimize_without_a_target_runs_its_workers_until_the_timeout(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    with pytest.raises(Exception, match="--n-trials N .*--timeout SECONDS"):
        optimize(url, "s", None, objective_factory=TrivialObjective(), progress=False)
    summary = optimize(url, "s", None, n_workers=2, timeout=8.0, objective_factory=TrivialObjective(sleep_s=0.1),
                       progress=True)
    trials = study.get_trials(deepcopy=False)
    assert not summary.interrupted and not summary.worker_errors and not summary.worker_deaths
    assert summary.finished == len(trials) and {t.state for t in trials} <= {TrialState.COMPLETE}
    assert "trials" in capsys.readouterr().err  # the progress bar, without a total


def test_trial_note_lists_rejection_reason():
    trial = optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={"reject_reason": "nan", "formula": "f(x)"})
    note = trial_note(trial, TrialState.PRUNED, None)
    assert "reject_reason: nan" in note and "`f(x)`" in note


def test_trial_note_shows_each_seed_of_a_confirmed_trial():
    attrs = {"proxy_seeds": [0, 1, 2], "seed_scores": [0.31, 0.35, 0.33]}
    note = trial_note(optuna.trial.create_trial(value=0.33, user_attrs=attrs), TrialState.COMPLETE, 0.33)
    assert "- the mean over proxy seeds 0: 0.31, 1: 0.35, 2: 0.33" in note
    one = {"proxy_seeds": [0], "seed_scores": [0.31]}
    assert "proxy seeds" not in trial_note(optuna.trial.create_trial(value=0.31, user_attrs=one), TrialState.COMPLETE, 0.31)


def test_trial_note_has_a_canonical_form_line_per_change():
    from optuna.distributions import CategoricalDistribution

    from kd_optuna.space import FULL_OPTIONS, GENES, DistillerSpec

    spec = DistillerSpec("logit", "satt", "no", "no", "l2", "no", 1, 1)
    trial = optuna.trial.create_trial(
        value=0.1, params=spec.to_params(), user_attrs={"formula": spec.formula()},
        distributions={g: CategoricalDistribution(list(FULL_OPTIONS[g])) for g in GENES})
    note = trial_note(trial, TrialState.COMPLETE, 0.1)
    assert [line for line in note.splitlines() if line.startswith("- canonical form: ")] == [
        f"- canonical form: {n}" for n in spec.canonical_notes()] != []
    plain = DistillerSpec("logit", "no", "no", "no", "kl", "no", 4, 1)
    assert "canonical form" not in trial_note(optuna.trial.create_trial(value=0.1, params=plain.to_params(), distributions={
        g: CategoricalDistribution(list(FULL_OPTIONS[g])) for g in GENES}), TrialState.COMPLETE, 0.1)


def test_trial_note_shows_the_lineage_of_new_and_old_studies():
    for prefix in ("lineage:", ""):  # "": the names written before the lineage prefix
        trial = optuna.trial.create_trial(value=0.1, user_attrs={f"{prefix}proposer": "mutation", f"{prefix}parent": 4})
        note = trial_note(trial, TrialState.COMPLETE, 0.1)
        assert "- proposer: mutation" in note and "- parent: 4" in note


def test_cpu_threads_are_shared_between_workers():
    import torch

    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        device = WorkerContext(index=1, n_workers=2, device="cpu").torch_device()
        assert device == "cpu"
        assert torch.get_num_threads() == max(1, cores // 2)
    finally:
        torch.set_num_threads(before)


class ThreadsObjective:
    """Records, in each trial, the torch threads its worker process was set to."""

    def __call__(self, config, worker):
        import torch

        worker.torch_device()
        objective = TrivialObjective()(config, worker)

        def recorded(trial):
            trial.set_user_attr("torch_threads", torch.get_num_threads())
            return objective(trial)

        return recorded


@pytest.mark.parametrize("threads", [None, 3])
def test_workers_run_with_the_threads_asked_for_or_an_even_split(tmp_path, threads):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    optimize(url, "s", 4, n_workers=2, device="cpu", threads=threads, objective_factory=ThreadsObjective(),
             progress=False, heartbeat_interval=None)
    expected = threads or max(1, len(os.sched_getaffinity(0)) // 2)
    assert {t.user_attrs["torch_threads"] for t in study.get_trials(deepcopy=False)} == {expected}


@pytest.mark.slow
def test_sqlite_four_workers_200_trials_without_lock_errors(tmp_path, capfd):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    summary = optimize(url, "s", 200, n_workers=4, objective_factory=TrivialObjective(), progress=False, heartbeat_interval=20)
    out, err = capfd.readouterr()
    assert "database is locked" not in out + err + " ".join(summary.worker_errors)
    trials = study.get_trials(deepcopy=False)
    assert summary.finished == 200 and summary.failed == 0
    assert [t.number for t in trials] == list(range(len(trials)))


def _kill_when_running(study_url: str, pids_box: list, killed: list):
    storage = open_storage(study_url, heartbeat_interval=None)
    study = optuna.load_study(study_name="s", storage=storage)
    deadline = time.time() + 60
    while time.time() < deadline:
        if pids_box:
            victim = pids_box[0][0]
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.user_attrs.get("worker", "").endswith(f":{victim}") and len(t.params) == 8:
                    os.kill(victim, signal.SIGKILL)
                    killed.append(t.number)
                    return
        time.sleep(0.1)


def run_sigkill_scenario(url: str):
    """Two workers; one is SIGKILLed mid-trial; the other fails the stale trial, retries it and
    finishes the study. Returns the study."""
    study = create_kd_study(url)
    pids_box: list = []
    killed: list = []
    killer = threading.Thread(target=_kill_when_running, args=(url, pids_box, killed), daemon=True)
    killer.start()
    summary = optimize(
        url, "s", 6, n_workers=2, objective_factory=TrivialObjective(sleep_s=1.0), progress=False,
        heartbeat_interval=1, grace_period=3, on_start=pids_box.append,
    )
    killer.join(timeout=5)
    assert killed, "no trial was running to kill"
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[killed[0]].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed[0]]
    assert any(t.state == TrialState.COMPLETE for t in retries)
    assert retries[0].params == trials[killed[0]].params
    assert summary.finished == 6
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    return study


@pytest.mark.slow
def test_sigkilled_worker_trial_is_failed_and_retried_sqlite(tmp_path):
    run_sigkill_scenario(f"sqlite:///{tmp_path / 's.db'}")


_INTERRUPT_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    from conftest import TrivialObjective
    from kd_optuna.run.workers import optimize
    if __name__ == "__main__":
        s = optimize({url!r}, "s", {n}, n_workers=4, objective_factory=TrivialObjective(sleep_s={sleep}), progress=False)
        sys.exit(130 if s.interrupted else 0)
    """
)


@pytest.mark.slow
def test_ctrl_c_stops_all_workers_and_the_same_command_resumes(tmp_path):
    run_interrupt_scenario(f"sqlite:///{tmp_path / 's.db'}", tmp_path)


def run_interrupt_scenario(url: str, tmp_path: Path) -> None:
    """Ctrl-C with 4 workers busy: exit 130, no process left, 4 trials FAIL, none RUNNING;
    the same command then finishes the 8 trials."""
    study = create_kd_study(url)
    script = tmp_path / "run.py"
    script.write_text(_INTERRUPT_SCRIPT.format(tests=str(TESTS), repo=str(REPO), url=url, n=8, sleep=30.0))
    process = subprocess.Popen(default_sigint([sys.executable, str(script)]), start_new_session=True, cwd=tmp_path)
    deadline = time.time() + 90
    while time.time() < deadline and _states(study).get(TrialState.RUNNING, 0) < 4:
        time.sleep(0.2)
    assert _states(study).get(TrialState.RUNNING, 0) == 4
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert process.wait(timeout=60) == 130
    assert process_group_left(process.pid) == b""
    states = _states(study)
    assert states.get(TrialState.RUNNING, 0) == 0 and states.get(TrialState.FAIL, 0) == 4
    script.write_text(_INTERRUPT_SCRIPT.format(tests=str(TESTS), repo=str(REPO), url=url, n=8, sleep=0.0))
    assert subprocess.run([sys.executable, str(script)], cwd=tmp_path, timeout=300).returncode == 0
    assert _states(study).get(TrialState.COMPLETE, 0) == 8


def test_a_worker_killed_inside_the_host_lock_leaves_it_free(tmp_path, monkeypatch):
    """The kernel drops a killed process's flock: the next worker takes the lock at once."""
    import kd_optuna.run.trial_loop as trial_loop

    monkeypatch.setattr(trial_loop, "LOCK_TIMEOUT_S", 600)
    path = tmp_path / "host.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kd_optuna.files import file_lock\n"
         "with file_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)", str(path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(timeout=30)
    said = []
    with trial_loop._HostLock(str(path), said.append):
        pass
    assert said == []


def test_a_host_lock_held_too_long_by_a_live_worker_is_dropped_with_a_message(tmp_path, monkeypatch):
    import kd_optuna.run.trial_loop as trial_loop
    from kd_optuna.files import file_lock

    monkeypatch.setattr(trial_loop, "LOCK_TIMEOUT_S", 0.1)
    path = str(tmp_path / "host.lock")
    said = []
    host_lock = trial_loop._HostLock(path, said.append)
    with file_lock(path):  # a stuck holder
        with host_lock:
            pass
        with host_lock:
            pass
    assert len(said) == 1 and "without it" in said[0]
    free = trial_loop._HostLock(path, said.append)
    with free:
        pass
    assert len(said) == 1


_RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    from conftest import TrivialObjective
    from kd_optuna.run.workers import optimize
    if __name__ == "__main__":
        s = optimize({url!r}, "s", {n}, n_workers=2, objective_factory=TrivialObjective(sleep_s={sleep}), progress=False)
        print(s.describe())
        sys.exit(130 if s.interrupted else 0)
    """
)


@pytest.mark.slow
def test_ctrl_c_to_the_parent_queues_the_interrupted_trials_and_resume_runs_their_params(tmp_path):
    """Issue 11.6: Ctrl-C while the first classics run; the resumed study runs them again."""
    from kd_optuna.distill.classics import classic_specs
    from kd_optuna.space import DistillerSpec

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    script = tmp_path / "run.py"
    script.write_text(_RESUME_SCRIPT.format(tests=str(TESTS), repo=str(REPO), url=url, n=4, sleep=60.0))
    process = subprocess.Popen(default_sigint([sys.executable, str(script)]), start_new_session=True, cwd=tmp_path,
                               stdout=subprocess.PIPE, text=True)
    running = _two_trials_running(study)
    os.kill(process.pid, signal.SIGINT)  # the parent only; it stops its workers
    out, _ = process.communicate(timeout=90)
    assert process.returncode == 130
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert sorted(t.number for t in failed) == sorted(t.number for t in running)
    assert all(t.user_attrs["fail_reason"] == "interrupted" for t in failed)
    classics = set(classic_specs())
    assert all(DistillerSpec.from_params(t.params) in classics for t in failed)  # the warm start
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == sorted(t.number for t in failed)
    assert "2 failed (2 interrupted), 2 queued to run again" in out

    script.write_text(_RESUME_SCRIPT.format(tests=str(TESTS), repo=str(REPO), url=url, n=4, sleep=0.0))
    assert subprocess.run([sys.executable, str(script)], cwd=tmp_path, timeout=300).returncode == 0
    done = {t.number: t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE}
    assert len(done) == 4
    for original in failed:
        rerun = [t for t in done.values() if t.system_attrs.get("failed_trial") == original.number]
        assert len(rerun) == 1 and rerun[0].params == original.params
        assert "fail_reason" not in rerun[0].user_attrs and rerun[0].system_attrs["interrupted_trials"] == [original.number]
    assert not [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.slow
def test_sigterm_to_the_parent_alone_stops_the_workers_as_ctrl_c_does(tmp_path):
    """``kill PID``, ``timeout`` and container stops send SIGTERM to the parent only: it stops
    its workers, their trials are failed as interrupted and queued again, nothing is left."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    script = tmp_path / "run.py"
    script.write_text(_RESUME_SCRIPT.format(tests=str(TESTS), repo=str(REPO), url=url, n=4, sleep=60.0))
    process = subprocess.Popen([sys.executable, str(script)], start_new_session=True, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    running = _two_trials_running(study)
    process.terminate()
    out, err = process.communicate(timeout=90)
    assert process.returncode == 130, err
    assert "2 failed (2 interrupted), 2 queued to run again" in out
    assert "Traceback" not in err and "leaked" not in err
    assert process_group_left(process.pid) == b""
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert sorted(t.number for t in failed) == sorted(t.number for t in running)
    assert all(t.user_attrs["fail_reason"] == "interrupted" for t in failed)


def _two_trials_running(study) -> list:
    """The two RUNNING trials with all 8 params suggested, waited for up to 120 s."""
    deadline = time.time() + 120
    running = []
    while time.time() < deadline and len(running) < 2:
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if len(t.params) == 8]
        time.sleep(0.2)
    assert len(running) == 2
    return running


def _kill_first_worker_when_both_run(url: str, pids_box: list, killed: list) -> None:
    storage = open_storage(url, heartbeat_interval=None)
    study = optuna.load_study(study_name="s", storage=storage)
    deadline = time.time() + 120
    while time.time() < deadline:
        if pids_box:
            victim, other = pids_box[0][:2]
            owners = {t.user_attrs.get("worker", "").rsplit(":", 1)[-1]: t.number
                      for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
            with_params = {t.user_attrs.get("worker", "").rsplit(":", 1)[-1]
                           for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if len(t.params) == 8}
            if str(victim) in with_params and str(other) in owners:
                os.kill(victim, signal.SIGKILL)
                killed.append((victim, owners[str(victim)]))
                return
        time.sleep(0.1)


@dataclasses.dataclass(frozen=True)
class SuggestThenWait:
    """TrivialObjective whose first trial per worker suggests its params, then waits (at most
    60 s) until ``workers`` workers have claimed trials."""

    workers: int

    def __call__(self, config, worker):
        from conftest import _wait_for_workers

        objective = TrivialObjective(sleep_s=0.2)(config, worker)
        first = [True]

        def run(trial):
            value = objective(trial)
            if first.pop() if first else False:
                _wait_for_workers(trial.study, self.workers)
            return value

        return run


@pytest.mark.slow
def test_a_sigkilled_worker_is_reported_and_replaced_and_the_replacement_runs_its_trial(tmp_path, capfd):
    """Issue 11.7: SIGKILL one of two workers; the parent says which and how, restarts it, and
    the dead worker's trial is failed at once and run again by the replacement."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    pids_box: list = []
    killed: list = []
    killer = threading.Thread(target=_kill_first_worker_when_both_run, args=(url, pids_box, killed), daemon=True)
    killer.start()
    # each worker's first trial waits until 3 workers have claimed trials: the two first and the replacement
    summary = optimize(url, "s", 6, n_workers=2, objective_factory=SuggestThenWait(workers=3),
                       progress=False, heartbeat_interval=20, on_start=pids_box.append)
    killer.join(timeout=5)
    assert killed, "no trial was running to kill"
    victim, number = killed[0]
    _, err = capfd.readouterr()
    assert len(summary.worker_deaths) == 1
    line = summary.worker_deaths[0]
    assert line.startswith(f"worker 0 (pid {victim}) killed by SIGKILL; restarted (1 of 3), now pid ")
    assert line in summary.describe() and f"kd-optuna: {line}" in err
    replacement = line.rsplit(" ", 1)[-1]
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[number].state == TrialState.FAIL
    assert trials[number].user_attrs["fail_reason"] == "its worker killed by SIGKILL"  # the parent's, not the heartbeat's
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == trials[number].params
    assert retry[0].user_attrs["worker"].endswith(f":{replacement}")
    assert summary.finished == 6 and not [t for t in trials.values() if t.state == TrialState.RUNNING]


@dataclasses.dataclass(frozen=True)
class SelfKillingObjective:
    """Every trial SIGKILLs its own worker process, as the OOM killer would."""

    def __call__(self, config, worker):
        from kd_optuna.space import suggest_distiller

        def objective(trial):
            suggest_distiller(trial, config.space)
            os.kill(os.getpid(), signal.SIGKILL)

        return objective


@pytest.mark.slow
def test_a_worker_that_keeps_dying_is_restarted_three_times_and_its_trial_retried_three_times(tmp_path, capfd):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    summary = optimize(url, "s", 3, n_workers=1, objective_factory=SelfKillingObjective(), progress=False)
    _, err = capfd.readouterr()
    assert [d.split(") ", 1)[1] for d in summary.worker_deaths] == [
        *(f"killed by SIGKILL; restarted ({k} of 3), now pid {d.rsplit(' ', 1)[-1]}"
          for k, d in zip((1, 2, 3), summary.worker_deaths)),
        "killed by SIGKILL; not restarted: its slot was restarted 3 times",
    ]
    assert err.count("kd-optuna: worker 0 (pid ") == 4
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL] * 4  # the trial and its 3 retries, then no more
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 1
    assert summary.finished == 0 and "killed by SIGKILL" in summary.describe()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_sqlite_file_deleted_or_replaced_under_running_workers_stops_them_with_one_line(tmp_path, how):
    """Workers keep writing into an unlinked SQLite file without an error: optimize notices
    the file is gone, stops them and says so, instead of reporting trials nobody can read."""
    import shutil

    from kd_optuna.run.storage import StorageError

    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    study = create_kd_study(url)
    pids = []

    def remove_after_a_trial():
        deadline = time.time() + 120
        while time.time() < deadline and not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            time.sleep(0.2)
        if how == "replaced":
            shutil.copy(path, tmp_path / "copy.db")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        if how == "replaced":
            (tmp_path / "copy.db").rename(path)

    remover = threading.Thread(target=remove_after_a_trial, daemon=True)
    remover.start()
    with pytest.raises(StorageError) as info:
        optimize(url, "s", 60, n_workers=1, objective_factory=TrivialObjective(sleep_s=0.2), progress=False,
                 on_start=pids.extend)
    remover.join()
    message = str(info.value)
    assert f"{path}" in message and ("deleted or moved" if how == "deleted" else "replaced") in message
    assert "workers were stopped" in message and "\n" not in message
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert path.exists() == (how == "replaced")
