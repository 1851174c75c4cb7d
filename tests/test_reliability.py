"""Faults and hostile input that other test files leave out (RELIABILITY.md maps them all).

- A NaN, a CUDA OOM or a CPU allocation failure injected into the student's forward pass in
  the middle of proxy training, with the real worker loop: that trial ends pruned or failed
  with its reason, and the worker goes on to finish the study.
- A checkpoint or teacher-output cache truncated at any length: refused with a one-line
  message or rebuilt, never used.
- Code in a study (its stored config, its name, trial attrs) is shown, never run.
- The package source evaluates nothing and unpickles nothing.
- A language-model key never reaches a stored attr, a worker message, the CLI's output or an
  exported script, even when the endpoint fails; a key put in the config's URL is refused
  without being echoed.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import TrivialObjective, create_kd_study, invoke_cli, run_worker_in_process
from kd_optuna import optuna_private
from kd_optuna.proxy.cache import load_or_build
from kd_optuna.train.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from kd_optuna.run.config import CONFIG_ATTR, load_config
from kd_optuna.data import load_dataset
from kd_optuna.models import build_model, tap_model
from kd_optuna.models.digits import DigitsCNN
from kd_optuna.proxy.objective import Objective
from kd_optuna.proxy.settings import ProxySettings
from kd_optuna.proxy.views import ProxyData
from kd_optuna.run.storage import StorageError, open_storage, study_config
from kd_optuna.proxy.task import Task

PACKAGE = Path(__file__).resolve().parent.parent / "kd_optuna"
SENTINEL = "KD_OPTUNA_PWNED"
HOSTILE = f"\"'); __import__('os').system('touch {SENTINEL}') #\n{{{{x}}}} $(touch {SENTINEL}) `touch {SENTINEL}`"
LLM_KEY = "sk-reliability-5ecret-key-0123456789"


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """(exit code, stdout + stderr) of ``kd-optuna ARGS``."""
    code, out, err = invoke_cli(capsys, *args)
    return code, out + err


# -- faults injected in the middle of proxy training ------------------------------------------

TRAIN_BATCH = 24 + 6  # settings.batch_size + label_batch_size below, unlike the rejection batch (8)
SETTINGS = ProxySettings(labels_per_class=2, steps=6, batch_size=24, label_batch_size=6, report_every=2,
                         val_size=30, sharpness_size=16, reject_batch_size=8, reject_steps=1)


class StudentFault:
    """Armed with a kind, corrupts the student's 3rd training forward pass of one trial:
    ``nan`` multiplies the logits by NaN, ``cuda_oom`` and ``cpu_oom`` raise what PyTorch raises
    when memory runs out. ``fired_in`` records the trial the fault hit."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.forwards = 0
        self.fired_in: list[int] = []
        self.trial: int | None = None

    def hook(self, module, inputs, output):
        if self.kind is None or not module.training or inputs[0].shape[0] != TRAIN_BATCH:
            return output
        self.forwards += 1
        if self.forwards < 3:
            return output
        kind, self.kind = self.kind, None
        self.fired_in.append(self.trial)
        if kind == "cuda_oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if kind == "cpu_oom":
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return {**output, "logit": output["logit"] * float("nan")}


class FaultyObjectiveFactory:
    """A real Objective over a tiny digits task whose students carry ``fault``'s hook; the
    fault is armed for the study's first trial."""

    def __init__(self, kind: str, task_parts):
        self.fault = StudentFault()
        self.kind = kind
        self.task_parts = task_parts

    def __call__(self, config, worker):
        data, teacher = self.task_parts
        fault = self.fault

        def new_student():
            student = tap_model(DigitsCNN((4, 8, 8)))
            student.register_forward_hook(fault.hook)
            return student

        objective = Objective(Task(data, teacher, new_student, SETTINGS, config.space), threads=1)

        def run(trial):
            fault.trial, fault.forwards = trial.number, 0
            if trial.number == 0:
                fault.kind = self.kind
            return objective(trial)

        return run


@pytest.fixture(scope="module")
def task_parts():
    splits = load_dataset("digits")
    x, y = splits.tensors("train", torch.arange(120))
    vx, vy = splits.tensors("val", torch.arange(30))
    torch.manual_seed(0)
    return ProxyData.build(x, y, vx, vy, SETTINGS, num_classes=10), tap_model(DigitsCNN((8, 8, 16)))


@pytest.mark.parametrize("kind, state, attr, reason", [
    ("nan", TrialState.PRUNED, "reject_reason", "non_finite"),
    ("cuda_oom", TrialState.FAIL, "fail_reason", "CUDA out of memory"),
    ("cpu_oom", TrialState.FAIL, "fail_reason", "can't allocate memory"),
])
def test_a_fault_mid_training_ends_that_trial_with_its_reason_and_the_worker_goes_on(
    tmp_path, task_parts, kind, state, attr, reason
):
    threads = torch.get_num_threads()
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    factory = FaultyObjectiveFactory(kind, task_parts)
    try:
        code, messages = run_worker_in_process(url, 3, factory)
    finally:
        torch.set_num_threads(threads)
    assert factory.fault.fired_in == [0], "the fault was not injected in trial 0's training"
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == state and reason in trials[0].user_attrs[attr]
    assert code == 0
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and all(t.state != TrialState.RUNNING for t in trials)
    assert any(t.state == TrialState.COMPLETE for t in trials[1:])
    if state == TrialState.FAIL:
        assert len(messages) == 1 and "trial 0 failed" in messages[0][1] and reason in messages[0][1]


# -- corrupt files ------------------------------------------------------------------------------

def _lengths(size: int) -> list[int]:
    return sorted({0, 1, 10, 64, size // 4, size // 2, size - 100, size - 1})


def test_a_truncated_checkpoint_is_refused_with_one_line_naming_it(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", build_model("digits_student", 10), model_name="digits_student",
                           num_classes=10, dataset="digits", accuracy=0.5)
    data = Path(good).read_bytes()
    for length in _lengths(len(data)):
        path = tmp_path / f"cut{length}.pt"
        path.write_bytes(data[:length])
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message, (length, message)


def test_a_truncated_teacher_cache_is_rebuilt_never_used(tmp_path):
    path = tmp_path / "teacher-outputs.pt"
    expected = {"logit": torch.arange(600.0).reshape(60, 10), "emb": torch.ones(60, 8, dtype=torch.float16)}
    builds = []

    def build():
        builds.append(1)
        return {k: v.clone() for k, v in expected.items()}

    load_or_build(path, "key", build)
    data = path.read_bytes()
    for length in _lengths(len(data)):
        path.write_bytes(data[:length])
        before = len(builds)
        with pytest.warns(RuntimeWarning):
            found = load_or_build(path, "key", build)
        assert len(builds) == before + 1, length
        assert all(torch.equal(found[k], expected[k]) for k in expected)
    assert torch.equal(load_or_build(path, "key", build)["logit"], expected["logit"])


# -- nothing read is evaluated ------------------------------------------------------------------

def test_code_in_a_study_is_shown_never_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    storage = open_storage(url, heartbeat_interval=None)
    as_code = optuna.create_study(storage=storage, study_name="as_code")
    as_code.set_user_attr(CONFIG_ATTR, f"__import__('os').system('touch {SENTINEL}')")
    as_pickle = optuna.create_study(storage=storage, study_name="as_pickle")
    as_pickle.set_user_attr(CONFIG_ATTR, "cos\nsystem\n(S'touch " + SENTINEL + "'\ntR.")
    hostile = create_kd_study(url, name=HOSTILE)
    hostile.set_user_attr("note", HOSTILE)
    spec_trial = optuna.trial.create_trial(
        params={"knowledge": "logit"}, distributions={"knowledge": optuna.distributions.CategoricalDistribution(
            ["logit", "emb", "feat"])}, value=0.5, user_attrs={"formula": HOSTILE, "spec": HOSTILE})
    hostile.add_trial(spec_trial)
    for study in (as_code, as_pickle):
        with pytest.raises(StorageError) as info:
            study_config(study)
        assert "\n" not in str(info.value)
    outputs = []
    for args in (
        ["space", "--study-name", "as_code"],
        ["optimize", "--study-name", "as_pickle", "--n-trials", "1", "--no-progress"],
        ["trials", "--study-name", HOSTILE, "-f", "json"],
        ["best", "--study-name", HOSTILE],
        ["trials", "--study-name", "as_code", "-f", "json"],  # lists the trials without reading the config
    ):
        outputs.append(run_cli(capsys, *args, "--storage", url))
    assert [code for code, _ in outputs[:2]] == [2, 2]
    assert all(text.strip().count("\n") == 0 for _, text in outputs[:2])
    assert json.loads(outputs[2][1])[0]["user_attrs"]["formula"] == HOSTILE
    assert outputs[4][0] == 0 and json.loads(outputs[4][1]) == []
    assert not list(tmp_path.rglob(SENTINEL))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_the_package_evaluates_nothing_and_unpickles_nothing():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node, name in _calls(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}"
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                found.append(where)
            elif name == "__import__" and not (node.args and isinstance(node.args[0], ast.Constant)):
                found.append(where + " of a computed name")
            elif name.split(".")[-1] in ("loads", "load", "Unpickler") and name.split(".")[0] in (
                "pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"
            ):
                found.append(where)
            elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                found.append(where)
            elif name == "torch.load":
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                if not (weights_only and isinstance(weights_only[0].value, ast.Constant)
                        and weights_only[0].value.value is True):
                    found.append(where + " without weights_only=True")
            elif name.endswith("subprocess.run") or name.endswith("Popen") or name == "os.system":
                shell = [k for k in node.keywords if k.arg == "shell"]
                if name == "os.system" or (shell and not (isinstance(shell[0].value, ast.Constant)
                                                          and shell[0].value.value is False)):
                    found.append(where + " through a shell")
    assert found == []


# -- secrets ------------------------------------------------------------------------------------

def test_a_key_in_the_llm_url_is_refused_without_echoing_it(tmp_path, capsys):
    from conftest import tiny_digits_toml

    config = tmp_path / "c.toml"
    text = tiny_digits_toml("llm_study").replace(
        "[search]\n", f'[search]\nproposer = "llm"\nllm_model = "m"\nllm_url = "https://me:{LLM_KEY}@llm.example/v1"\n'
    )
    config.write_text(text)
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    code, output = run_cli(capsys, "create-study", str(config), "--storage", url)
    assert code == 2 and "KD_OPTUNA_LLM_API_KEY" in output
    assert LLM_KEY not in output and LLM_KEY[3:12] not in output
    assert not (tmp_path / "kd.db").exists() or "llm_study" not in optuna.get_all_study_names(url)


def test_the_llm_key_never_reaches_attrs_messages_output_or_the_exported_script(tmp_path, capsys, monkeypatch):
    from test_proposers import ChatServer

    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KD_OPTUNA_LLM_API_KEY", LLM_KEY)
    monkeypatch.chdir(tmp_path)
    chat = ChatServer()
    try:
        chat.mode = "500"
        url = f"sqlite:///{tmp_path / 'kd.db'}"
        config = load_config("digits").to_dict()
        config["search"].update(proposer="llm", llm_url=chat.url, llm_model="m", population_size=2, llm_timeout=2.0)
        from kd_optuna.run.config import StudyConfig

        study = optuna.create_study(storage=open_storage(url, heartbeat_interval=None), study_name="s")
        study.set_user_attr(CONFIG_ATTR, StudyConfig.from_dict(config).to_json())
        code, messages = run_worker_in_process(url, 6, TrivialObjective())
        assert code == 0
        assert chat.requests and all(r["headers"]["Authorization"] == f"Bearer {LLM_KEY}" for r in chat.requests)
        outputs = [repr(messages)]
        for args in (["trials", "-f", "json"], ["best"], ["export", "-o", str(tmp_path / "train_best.py")]):
            code, text = run_cli(capsys, *args, "--storage", url)
            assert code == 0, text
            outputs.append(text)
        outputs.append((tmp_path / "train_best.py").read_text())
        storage = open_storage(url, heartbeat_interval=None)
        trials = storage.get_all_trials(optuna_private.study_id(study))
        outputs.append(repr([(t.user_attrs, t.system_attrs) for t in trials]))
        outputs.append(repr((storage.get_study_user_attrs(optuna_private.study_id(study)),
                             storage.get_study_system_attrs(optuna_private.study_id(study)))))
        assert len(trials) == 6
        for text in outputs:
            assert LLM_KEY not in text and LLM_KEY[3:15] not in text
    finally:
        chat.close()


@pytest.mark.postgres
def test_outputs_and_the_exported_script_of_a_postgres_study_never_hold_its_password(
    pg_server, pg_url, tiny_config_path, tmp_path, capsys, monkeypatch
):
    from test_cli import add_trials

    from kd_optuna.run.storage import resolve_url

    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train_best.py"
    outputs = [run_cli(capsys, "create-study", str(tiny_config_path), "--storage", pg_url)]
    add_trials(resolve_url(pg_url), "digits_tiny")
    for args in (["trials", "-f", "json"], ["best"], ["space"], ["export", "-o", str(script)]):
        outputs.append(run_cli(capsys, *args, "--storage", pg_url))
    assert [code for code, _ in outputs] == [0] * 5, outputs
    texts = [text for _, text in outputs] + [script.read_text()]
    for text in texts:
        assert pg_server.password not in text


@pytest.mark.slow
def test_a_trial_left_running_before_its_first_heartbeat_does_not_block_the_target(tmp_path):
    import time

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    study.ask()  # what a worker SIGKILLed right after ask leaves: RUNNING, no heartbeat, no worker attr
    time.sleep(3)
    run_worker_in_process(url, 3, TrivialObjective(), deadline=time.time() + 15, heartbeat=1, grace=2)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.COMPLETE) == 3 and TrialState.RUNNING not in states


def test_a_database_error_inside_an_optuna_call_is_waited_out_not_fatal(tmp_path, monkeypatch):
    """RDBStorage wraps driver errors in StorageInternalError: a worker must treat it as an outage."""
    import sqlalchemy.exc

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url)
    real = optuna.storages.RDBStorage._create_new_trial
    calls = []

    def create_trial_row(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            cause = sqlalchemy.exc.OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from cause
        return real(self, *args, **kwargs)

    monkeypatch.setattr(optuna.storages.RDBStorage, "_create_new_trial", create_trial_row)
    code, messages = run_worker_in_process(url, 3, TrivialObjective())
    assert code == 0
    assert [t.state for t in study.get_trials(deepcopy=False)] == [TrialState.COMPLETE] * 3
    ((_, said, kind),) = messages
    assert kind == "error" and "database error, retrying: server closed the connection unexpectedly" in said
