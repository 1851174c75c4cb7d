"""Shared fixtures: tiny study configs, kd-optuna studies, trivial objectives, a PostgreSQL server.

Worker processes are spawned, so the objective factories live here at module level (a spawned
child imports ``conftest`` by name, the tests directory being on ``sys.path``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
import zlib
from pathlib import Path

import optuna
import pytest
import torch

import pg
from kd_optuna.run.config import CONFIG_ATTR, load_config


def default_sigint(argv: list[str]) -> list[str]:
    """``argv`` run with SIGINT handled as in a terminal's foreground job, for a process a test
    sends Ctrl-C. A suite started in the background (``make test &``) runs with SIGINT ignored,
    which every child inherits and Python then leaves ignored; a handler reset to the default
    survives ``exec``."""
    reset = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    return [sys.executable, "-c", reset, *argv]


@pytest.fixture(autouse=True)
def one_thread():
    """Tests run on tiny tensors: one torch thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Proxy settings small enough for a trial in about a second on one CPU thread.
TINY_PROXY = {
    "labels_per_class": 2,
    "steps": 4,
    "batch_size": 32,
    "label_batch_size": 10,
    "val_size": 60,
    "report_every": 4,
    "eval_batch_size": 256,
    "sharpness_size": 32,
    "reject_steps": 1,
    "reject_batch_size": 16,
    # one proxy run per trial: confirmation has its own tests (test_confirmation.py and
    # test_cli.py's recipe-default study), and on here it ran up to 4x the proxy runs of every test
    "confirm_seeds": [],
}


def tiny_digits_toml(name: str = "digits_tiny", extra: str = "") -> str:
    proxy = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in TINY_PROXY.items())
    return (
        f'[study]\nname = "{name}"\n\n[data]\ndataset = "digits"\n\n[teacher]\nmodel = "digits_teacher"\n\n'
        f'[student]\nmodel = "digits_student"\n\n[proxy]\n{proxy}\n\n[search]\npopulation_size = 4\n'
        f"shrink_after = 1000\n\n[train]\nepochs = 1\nbatch_size = 128\nmilestones = [1]\n{extra}"
    )


@pytest.fixture
def tiny_config_path(tmp_path: Path) -> Path:
    path = tmp_path / "digits_tiny.toml"
    path.write_text(tiny_digits_toml())
    return path


def create_kd_study(url: str, name: str = "s", config_name: str = "digits") -> optuna.Study:
    """A study holding the digits config, as create-study makes it (without the CLI)."""
    from kd_optuna.run.storage import open_storage

    config = load_config(config_name)
    storage = open_storage(url, heartbeat_interval=None)
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize")
    study.set_user_attr(CONFIG_ATTR, config.to_json())
    return study


def invoke_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``kd-optuna ARGS`` in this process: (exit code, stdout, stderr)."""
    from kd_optuna.run.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def refused_at_create_study(capsys, config, url: str) -> str:
    """The one error line with which ``kd-optuna create-study CONFIG`` refuses ``config``: exit
    2, no traceback, and no study written to ``url``."""
    code, _, err = invoke_cli(capsys, "create-study", str(config), "--storage", url)
    line = err.strip()
    assert code == 2 and "\n" not in line and line.startswith("kd-optuna: error:"), err
    assert optuna.get_all_study_names(url) == []
    return line


class WorkerMessages(list):
    """Stands for the queue a worker sends its messages to its parent on."""

    put = list.append


def run_worker_in_process(url: str, n_trials: int, factory, deadline: float | None = None,
                          heartbeat: int = 20, grace: int | None = None) -> tuple[int, list]:
    """One worker's loop (kd_optuna.run.workers.worker_main) on study "s" in this process;
    (exit code, messages). The signal handlers it installs are restored."""
    import os
    import signal
    import tempfile

    from kd_optuna.run import workers

    args = workers.WorkerArgs(url, "s", n_trials, deadline, workers.WorkerContext(0, 1, "cpu"), heartbeat, grace,
                              factory, os.getppid())
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    messages = WorkerMessages()
    try:
        with tempfile.TemporaryDirectory() as folder, pytest.raises(SystemExit) as exit_info:
            workers.worker_main(args, os.path.join(folder, "host.lock"), messages)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    return exit_info.value.code, messages


@dataclasses.dataclass(frozen=True)
class TrivialObjective:
    """A factory of objectives that suggest a real distiller and score it by a hash of its key,
    after ``sleep_s`` seconds: the search machinery without any training. With
    ``wait_for_workers`` = k, each worker's first trial waits (at most 60 s) until k workers
    have claimed trials, so a test of parallel workers does not depend on spawn timing."""

    sleep_s: float = 0.0
    wait_for_workers: int = 0
    warn: bool = False  # log a kd_optuna warning in every trial, as the objective's notes do

    def __call__(self, config, worker):
        import logging

        from kd_optuna.space import suggest_distiller

        waited = False

        def objective(trial):
            nonlocal waited
            if not waited:
                waited = True
                _wait_for_workers(trial.study, self.wait_for_workers)
            spec = suggest_distiller(trial, config.space)
            trial.set_user_attr("formula", spec.formula())
            trial.set_user_attr("spec", spec.key)
            if self.sleep_s:
                time.sleep(self.sleep_s)
            if self.warn:
                logging.getLogger("kd_optuna.proxy.objective").warning("trial %d says a word", trial.number)
            return (zlib.crc32(spec.key.encode()) % 10007) / 10007

        return objective


def _wait_for_workers(study, count: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while count and time.time() < deadline:
        claimed = {t.user_attrs.get("worker") for t in study.get_trials(deepcopy=False)} - {None}
        if len(claimed) >= count:
            return
        time.sleep(0.1)


def tiny_digits_task(settings, seed: int):
    """A digits Task on 100 train / 30 val images with small CNNs: an objective in well under a second."""
    from kd_optuna.data import load_dataset
    from kd_optuna.models import tap_model
    from kd_optuna.models.digits import DigitsCNN
    from kd_optuna.proxy.views import ProxyData
    from kd_optuna.proxy.task import Task

    splits = load_dataset("digits")
    x, y = splits.tensors("train", torch.arange(100))
    vx, vy = splits.tensors("val", torch.arange(30))
    data = ProxyData.build(x, y, vx, vy, settings, num_classes=10)
    torch.manual_seed(seed)
    return Task(data, tap_model(DigitsCNN((8, 8, 16))), lambda: tap_model(DigitsCNN((4, 8, 8))), settings)


@pytest.fixture(scope="session")
def pg_server():
    reason = pg.missing_reason()
    if reason is not None:
        pytest.skip(reason)
    server = pg.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the private server for one test."""
    yield pg_server.new_database()


def process_group_left(pgid: int) -> bytes:
    """The pids still in process group ``pgid``, waited for up to 10 s to be empty
    (multiprocessing's resource tracker leaves after the parent)."""
    import subprocess
    import time

    left = b"?"
    for _ in range(50):
        left = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).stdout
        if not left:
            break
        time.sleep(0.2)
    return left
