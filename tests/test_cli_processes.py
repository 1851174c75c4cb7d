"""Issue 11, the user's path: `kd-optuna optimize` and `correlate` run as subprocesses, as a
user runs them: the teacher-reuse line once per command, Ctrl-C to the whole process group,
a worker SIGKILLed from outside.

Each study's teacher is put in the cache first (random weights: these tests need a teacher, not
a good one), so no test spends half a minute training one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from conftest import default_sigint, process_group_left, tiny_digits_toml
from kd_optuna.distill.classics import CLASSICS
from kd_optuna.space import FULL_OPTIONS, GENES

KD = [sys.executable, "-m", "kd_optuna.run.cli"]
STUDY = "digits_tiny"


def _cached_teacher(cwd: Path) -> Path:
    """A digits teacher where `kd-optuna optimize` run in ``cwd`` looks for it (relative path)."""
    import torch

    from kd_optuna.models import build_model
    from kd_optuna.train.checkpoints import save_checkpoint
    from kd_optuna.train.teachers import teacher_identity, teacher_key

    key = teacher_key(teacher_identity("digits", "digits_teacher"))
    path = Path(".kd_optuna_cache") / f"teacher-digits-digits_teacher-{key[:16]}.pt"
    (cwd / path).parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_checkpoint(cwd / path, build_model("digits_teacher", 10), model_name="digits_teacher", num_classes=10,
                        dataset="digits", accuracy=0.1, extra={"cache_key": key})
    return path


def _study(tmp_path: Path, steps: int = 4) -> str:
    """`kd-optuna create-study` of the tiny digits config (``steps`` proxy steps a trial) in
    ``tmp_path``, with its teacher cached there; the storage URL."""
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_digits_toml().replace("\nsteps = 4\n", f"\nsteps = {steps}\n"))
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    created = subprocess.run([*KD, "create-study", str(config), "--storage", url], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    _cached_teacher(tmp_path)
    return url


def _optimize(url: str, n_trials: int) -> list[str]:
    return [*KD, "optimize", "--storage", url, "--n-trials", str(n_trials), "--n-workers", "2", "--no-progress"]


def _teacher_lines(err: str) -> list[str]:
    """The lines that say where the teacher came from (reused, trained, or not reused)."""
    return [line for line in err.splitlines() if re.search(r"cached teacher|teacher checkpoint|training \S+ on ", line)]


@pytest.mark.slow
def test_the_teacher_reuse_line_is_said_once_by_optimize_with_two_workers_and_once_by_correlate(tmp_path):
    """Issue 11: the cached teacher is named once per command: by `optimize`'s and `compare`'s
    parent, not again by each worker; by `correlate`'s first load, not again per candidate and seed."""
    url = _study(tmp_path)
    said = f"reusing the cached teacher digits_teacher, trained on digits (embedded data) with seed 0: " \
           f"{_cached_teacher(tmp_path)}"
    run = subprocess.run(_optimize(url, 4), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("4 finished"), run.stdout
    assert _teacher_lines(run.stderr) == [said], run.stderr

    study = optuna.load_study(study_name=STUDY, storage=url)
    distributions = {g: CategoricalDistribution(list(FULL_OPTIONS[g])) for g in GENES}
    for value, name in ((0.004, "kd"), (0.0045, "fitnets"), (0.0046, "at")):  # the best three: correlate's candidates
        spec = CLASSICS[name][0]
        study.add_trial(optuna.trial.create_trial(
            params=spec.to_params(), distributions=distributions, value=value,
            user_attrs={"formula": spec.formula(), "spec": spec.key, "val_ce": value, "val_acc": 0.9,
                        "sharpness_gap": value / 10, "cka_gap": value / 5, "val_ce_raw": value}))
    run = subprocess.run([*KD, "correlate", "--from-study", STUDY, "--storage", url, "--n-candidates", "3",
                          "--final-seeds", "1", "--epochs", "1", "--threads", "1", "-f", "json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert '"candidates"' in run.stdout and "correlate:" in run.stderr
    assert _teacher_lines(run.stderr) == [said], run.stderr  # the 3 candidates' runs each load it

    run = subprocess.run([*KD, "compare", "--study-name", STUDY, "--storage", url, "--methods", "kd,dkd", "--seeds", "1",
                          "--epochs", "1", "--n-workers", "2", "--threads", "1", "-f", "json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert _teacher_lines(run.stderr) == [said], run.stderr  # said by the parent, not by each of 2 workers


def _wait_for_running(study, process, count: int, timeout: float = 300.0) -> list:
    """The RUNNING trials, once ``count`` of them hold their params (the distiller trains)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if len(t.params) == len(GENES)]
        if len(running) >= count:
            return running
        time.sleep(0.2)
    out, err = process.communicate(timeout=60) if process.poll() is not None else ("", "")
    raise AssertionError(f"optimize never ran {count} trials at once: {out}{err}")


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_optimize_and_the_same_command_reruns_the_interrupted_trials(tmp_path):
    """Issue 11.6 as a terminal's Ctrl-C does it: SIGINT to the parent and both workers at once
    (`optimize --n-workers 2` in its own session, os.killpg): exit 130, no process left, the
    running trials failed as interrupted and queued; the same command trains their params first."""
    url = _study(tmp_path, steps=200)
    command = _optimize(url, 4)
    process = subprocess.Popen(default_sigint(command), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    study = optuna.load_study(study_name=STUDY, storage=url)
    running = _wait_for_running(study, process, 2)
    os.killpg(process.pid, signal.SIGINT)  # the whole foreground group, as a terminal's Ctrl-C
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert process_group_left(process.pid) == b""
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    trials = study.get_trials(deepcopy=False)
    interrupted = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") == "interrupted"]
    assert interrupted and {t.number for t in interrupted} <= {t.number for t in running}, out + err
    assert not [t for t in trials if t.state == TrialState.FAIL and t not in interrupted]  # no other failure
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == sorted(t.number for t in interrupted)
    assert f"({len(interrupted)} interrupted), {len(interrupted)} queued to run again" in out
    assert f"run the same command to resume (its {len(interrupted)} queued trials run first)" in err

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4
    for trial in interrupted:
        reruns = [t for t in finished if t.system_attrs.get("failed_trial") == trial.number]
        assert len(reruns) == 1 and reruns[0].params == trial.params
        assert reruns[0].system_attrs["interrupted_trials"] == [trial.number]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def _children(pid: int) -> set[int]:
    """The pids of ``pid``'s child processes (Linux /proc, else pgrep -P)."""
    found: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.update(int(p) for p in (task / "children").read_text().split())
        return found
    except OSError:
        listed = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return {int(p) for p in listed.split()}


@pytest.mark.slow
def test_a_worker_sigkilled_under_optimize_is_reported_replaced_and_the_study_reaches_n_trials(tmp_path):
    """Issue 11.7 from outside: SIGKILL one worker child of `kd-optuna optimize --n-workers 2`
    mid-trial (as the OOM killer would); the command says which worker died and how, starts
    a replacement, fails the dead worker's trial, runs its params again and reaches --n-trials."""
    url = _study(tmp_path, steps=100)
    process = subprocess.Popen(_optimize(url, 4), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    seen: set[int] = set()  # every child the command had, polled until it ends

    def watch() -> None:
        while process.returncode is None:
            seen.update(_children(process.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        study = optuna.load_study(study_name=STUDY, storage=url)
        victim = number = None
        deadline = time.time() + 300
        while victim is None and time.time() < deadline and process.poll() is None:
            children = _children(process.pid)
            for trial in _wait_for_running(study, process, 1):
                pid = int(trial.user_attrs.get("worker", ":0").rsplit(":", 1)[-1])
                if pid in children:
                    victim, number = pid, trial.number
                    break
            time.sleep(0.1)
        assert victim is not None, "no worker child of optimize ran a trial"
        os.kill(victim, signal.SIGKILL)
        out, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    watcher.join(timeout=5)
    assert process.returncode == 0, err
    deaths = [line for line in err.splitlines() if line.startswith("kd-optuna: worker ")]
    assert len(deaths) == 1, err
    said = re.fullmatch(r"kd-optuna: (worker ([01]) \(pid (\d+)\) killed by SIGKILL; restarted \(1 of 3\), now pid (\d+))",
                        deaths[0])
    assert said and int(said[3]) == victim, deaths[0]
    replacement = int(said[4])
    assert replacement != victim and replacement in seen  # a new worker process of the command
    assert out.startswith("4 finished") and said[1] in out, out  # the summary line names the death too
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[number].state == TrialState.FAIL
    assert trials[number].user_attrs["fail_reason"] == "its worker killed by SIGKILL"
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == number]
    assert len(retry) == 1 and retry[0].params == trials[number].params
    assert retry[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert not [t for t in trials.values() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
