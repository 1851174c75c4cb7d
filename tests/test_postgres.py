"""PostgreSQL storages on a private server: 4 workers, SIGKILL, a server restart, masked passwords."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import TrivialObjective, create_kd_study
from kd_optuna.run.cli import main
from kd_optuna.optuna_private import study_system_attrs, trial_id
from kd_optuna.run.storage import open_storage
from kd_optuna.run.workers import optimize
from test_workers import run_interrupt_scenario, run_sigkill_scenario

pytestmark = pytest.mark.postgres


def _check_recorded_once(study, n_trials):
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(trials)))
    assert len({trial_id(t) for t in trials}) == len(trials)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.slow
def test_four_workers_record_every_trial_exactly_once(pg_server, pg_url, capfd):
    study = create_kd_study(pg_url)
    summary = optimize(pg_url, "s", 40, n_workers=4, objective_factory=TrivialObjective(sleep_s=0.05), progress=True)
    assert summary.finished == 40 and summary.failed == 0
    _check_recorded_once(study, 40)
    trials = study.get_trials(deepcopy=False)
    assert len({t.user_attrs["worker"] for t in trials}) == 4
    out, err = capfd.readouterr()
    stored = repr([(t.user_attrs, t.system_attrs) for t in trials]) + repr(study.user_attrs)
    stored += repr(study_system_attrs(study))
    assert "40/40" in err
    assert pg_server.password not in out + err + stored


@pytest.mark.slow
def test_sigkilled_worker_trial_is_failed_and_retried_postgres(pg_url):
    run_sigkill_scenario(pg_url)


@pytest.mark.slow
def test_ctrl_c_stops_all_workers_and_the_same_command_resumes_postgres(pg_url, tmp_path):
    run_interrupt_scenario(pg_url, tmp_path)


@pytest.mark.slow
def test_server_restart_mid_study_then_resume(pg_server, pg_url):
    study = create_kd_study(pg_url)
    restarted = threading.Event()

    def restart_when_busy():
        deadline = time.time() + 120
        while time.time() < deadline:
            if len([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]) >= 3:
                pg_server.restart()
                restarted.set()
                return
            time.sleep(0.2)

    thread = threading.Thread(target=restart_when_busy, daemon=True)
    thread.start()
    summary = optimize(pg_url, "s", 16, n_workers=2, objective_factory=TrivialObjective(sleep_s=0.3), progress=False,
                       heartbeat_interval=2)
    thread.join(timeout=120)
    assert restarted.is_set()
    for message in summary.worker_errors:
        assert pg_server.password not in message
    if summary.finished < 16:  # the same command resumes what a lost connection cut short
        summary = optimize(pg_url, "s", 16, n_workers=2, objective_factory=TrivialObjective(), progress=False,
                           heartbeat_interval=2)
    study = optuna.load_study(study_name="s", storage=open_storage(pg_url, heartbeat_interval=None))
    _check_recorded_once(study, 16)


def test_cli_on_postgres_never_shows_the_password(pg_server, pg_url, tiny_config_path, capsys):
    outputs = []
    for args in (
        ["create-study", str(tiny_config_path), "--storage", pg_url],
        ["trials", "--storage", pg_url, "-f", "json"],
        ["best", "--storage", pg_url],
        ["trials", "--storage", pg_url.replace(pg_server.password, "wrong" + pg_server.password[:4])],
    ):
        try:
            main(args)
        except SystemExit:
            pass
        out, err = capsys.readouterr()
        outputs.append(out + err)
    assert "created study" in outputs[0]
    assert "no completed trial" in outputs[2]
    assert "password authentication failed" in outputs[3]
    for text in outputs:
        assert pg_server.password not in text and pg_server.password[:4] not in text.replace("pw_", "")
