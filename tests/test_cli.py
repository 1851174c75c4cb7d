"""The `kd-optuna` command line: exit codes, formats, one-line errors, masked passwords."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.distributions import CategoricalDistribution

from conftest import default_sigint, invoke_cli, tiny_digits_toml
from kd_optuna.distill.classics import CLASSICS
from kd_optuna.space import FULL_OPTIONS, GENES

REPO = Path(__file__).resolve().parent.parent


run = invoke_cli


def add_trials(url: str, study_name: str) -> None:
    """Two completed classic distillers and one rejected trial, as the objective records them."""
    study = optuna.load_study(study_name=study_name, storage=url)
    distributions = {g: CategoricalDistribution(list(FULL_OPTIONS[g])) for g in GENES}
    for value, name in ((0.5, "kd"), (0.3, "at")):
        spec = CLASSICS[name][0]
        study.add_trial(optuna.trial.create_trial(
            params=spec.to_params(), distributions=distributions, value=value,
            user_attrs={"formula": spec.formula(), "spec": spec.key, "val_acc": 0.9, "val_ce": value},
        ))
    spec = CLASSICS["sp"][0]
    study.add_trial(optuna.trial.create_trial(
        params=spec.to_params(), distributions=distributions, state=optuna.trial.TrialState.PRUNED,
        user_attrs={"formula": spec.formula(), "spec": spec.key, "reject_reason": "exploding"},
    ))


@pytest.fixture
def study_url(tmp_path, tiny_config_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    code, out, err = run(capsys, "create-study", str(tiny_config_path), "--storage", url)
    assert code == 0, err
    return url


def test_create_study_stores_the_config_and_refuses_a_duplicate(study_url, tiny_config_path, capsys):
    study = optuna.load_study(study_name="digits_tiny", storage=study_url)
    stored = json.loads(study.user_attrs["kd_optuna_config"])
    assert stored["proxy"]["steps"] == 4 and stored["study"]["name"] == "digits_tiny"
    code, _, err = run(capsys, "create-study", str(tiny_config_path), "--storage", study_url)
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    code, out, _ = run(capsys, "create-study", str(tiny_config_path), "--storage", study_url, "--skip-if-exists")
    assert code == 0 and "kept" in out
    code, out, _ = run(capsys, "create-study", str(tiny_config_path), "--storage", study_url, "--study-name", "other")
    assert code == 0 and len(optuna.get_all_study_names(study_url)) == 2


def test_a_blank_study_name_exits_2_and_writes_nothing(tmp_path, capsys):
    db = tmp_path / "never.db"
    blank_in_config = tmp_path / "blank.toml"
    blank_in_config.write_text(tiny_digits_toml(name=""))
    for args in (("--study-name", ""), ("--study-name", "  ")):
        code, _, err = run(capsys, "create-study", str(blank_in_config), "--storage", f"sqlite:///{db}", *args)
        assert code == 2 and err.count("\n") == 1 and "blank" in err and "Traceback" not in err
    code, _, err = run(capsys, "create-study", str(blank_in_config), "--storage", f"sqlite:///{db}")
    assert code == 2 and "[study] name" in err and "blank" in err
    assert not db.exists()


def test_invalid_config_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(tiny_digits_toml().replace('model = "digits_student"', 'model = "digits_studnet"'))
    db = tmp_path / "never.db"
    code, out, err = run(capsys, "create-study", str(bad), "--storage", f"sqlite:///{db}")
    assert code == 2 and err.count("\n") == 1 and "student.model" in err and "digits_studnet" in err
    assert "Traceback" not in err and not db.exists()


def test_missing_data_root_exits_2_and_writes_nothing(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(
        '[data]\ndataset = "cifar100"\nroot = "no_such_dir"\n[teacher]\nmodel = "resnet56"\n[student]\nmodel = "resnet20"\n'
    )
    db = tmp_path / "never.db"
    code, _, err = run(capsys, "create-study", str(config), "--storage", f"sqlite:///{db}")
    assert code == 2 and "data.root" in err and not db.exists()


def test_trials_best_and_space_in_every_format(study_url, capsys):
    add_trials(study_url, "digits_tiny")
    code, out, _ = run(capsys, "trials", "--storage", study_url)
    assert code == 0 and CLASSICS["at"][0].formula() in out and "exploding" in out
    code, out, _ = run(capsys, "trials", "--storage", study_url, "-f", "json")
    records = json.loads(out)
    assert [r["state"] for r in records] == ["COMPLETE", "COMPLETE", "PRUNED"]
    code, out, _ = run(capsys, "trials", "--storage", study_url, "-f", "yaml", "--state", "pruned")
    assert [r["number"] for r in yaml.safe_load(out)] == [2]
    code, out, _ = run(capsys, "best", "--storage", study_url, "-f", "json")
    best = json.loads(out)
    assert best["number"] == 1 and best["value"] == 0.3
    code, out, _ = run(capsys, "best", "--storage", study_url)
    assert code == 0 and CLASSICS["at"][0].formula() in out
    code, out, _ = run(capsys, "space", "--storage", study_url, "-f", "json")
    weights = json.loads(out)
    assert set(weights) == set(GENES) and weights["distance"]["kl"] == 1.0


def test_space_wraps_a_genes_options_to_the_terminal_under_their_column(study_url, capsys, monkeypatch):
    """A transform gene's 41 options were one line of 450 characters."""
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, "space", "--storage", study_url)
    lines = out.splitlines()
    assert code == 0 and max(map(len, lines)) <= 80, out
    column = lines[0].index("options")
    at = next(i for i, line in enumerate(lines) if line.startswith("transform1"))
    end = next(i for i, line in enumerate(lines) if line.startswith("transform2"))
    assert end > at + 1 and all(line[:column].strip() == "" and line[column] != " " for line in lines[at + 1 : end]), out
    listed = " ".join(line[column:] for line in lines[at:end]).split()
    assert listed == [f"{o}:1.00" for o in FULL_OPTIONS["transform1"]], out


def test_space_and_trials_read_a_study_without_importing_torch(study_url):
    """Reading a study's config needs no torch: `space` took 1.9 s, 1.0 s of it importing torch."""
    code = (
        "import sys\n"
        "from kd_optuna.run.cli import main\n"
        f"for command in ('space', 'trials'):\n"
        f"    try:\n        main([command, '--storage', {study_url!r}])\n"
        "    except SystemExit as exit:\n        assert exit.code in (0, None), exit.code\n"
        "print('loaded:', sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "loaded: []", done.stdout
    assert "transform1" in done.stdout


def test_best_without_completed_trials_and_unknown_or_foreign_studies(study_url, capsys):
    code, _, err = run(capsys, "best", "--storage", study_url)
    assert code == 2 and "no completed trial" in err
    code, _, err = run(capsys, "trials", "--storage", study_url, "--study-name", "nope")
    assert code == 2 and "'digits_tiny'" in err
    optuna.create_study(storage=study_url, study_name="plain")
    code, _, err = run(capsys, "trials", "--storage", study_url, "--study-name", "plain")
    assert code == 2 and "plain Optuna" in err
    code, _, err = run(capsys, "trials", "--storage", study_url)
    assert code == 2 and "--study-name" in err


def test_trials_and_best_read_a_study_whose_stored_config_this_version_cannot(study_url, capsys):
    """A study made by another kd-optuna version (a config key this one does not know): its
    trials are plain Optuna trials and are listed; what needs the config says so in one line."""
    from kd_optuna.run.config import CONFIG_ATTR

    add_trials(study_url, "digits_tiny")
    study = optuna.load_study(study_name="digits_tiny", storage=study_url)
    stored = json.loads(study.user_attrs[CONFIG_ATTR])
    stored["proxy"]["a_setting_from_the_future"] = 1
    study.set_user_attr(CONFIG_ATTR, json.dumps(stored))
    code, out, err = run(capsys, "trials", "--storage", study_url, "-f", "json")
    assert code == 0 and [r["state"] for r in json.loads(out)] == ["COMPLETE", "COMPLETE", "PRUNED"], err
    code, out, err = run(capsys, "best", "--storage", study_url)
    assert code == 0 and CLASSICS["at"][0].formula() in out, err
    code, _, err = run(capsys, "space", "--storage", study_url)
    assert code == 2 and err.count("\n") == 1 and "a_setting_from_the_future" in err, err


def test_trials_of_a_python_objective_show_the_formula_the_report_shows(study_url, capsys):
    """A user's own objective (README "In Python") records no formula or spec attrs: trials
    and best still show the distiller's formula and key, as the report and dashboard do."""
    study = optuna.load_study(study_name="digits_tiny", storage=study_url)
    spec = CLASSICS["at"][0]
    study.add_trial(optuna.trial.create_trial(
        params=spec.to_params(), distributions={g: CategoricalDistribution(list(FULL_OPTIONS[g])) for g in GENES},
        value=0.25))
    code, out, err = run(capsys, "trials", "--storage", study_url)
    assert code == 0 and spec.formula() in out, err
    code, out, err = run(capsys, "best", "--storage", study_url)
    rows = dict(line.split(None, 1) for line in out.splitlines()[2:] if " " in line)
    assert code == 0 and rows["formula"].strip() == spec.formula() and rows["spec"].strip() == spec.key, err


def test_a_storage_without_studies_says_to_create_one_not_to_name_one(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(storage=url, study_name="gone")
    optuna.delete_study(study_name="gone", storage=url)
    for command in ("best", "trials", "optimize"):
        args = [command, "--storage", url] + (["--n-trials", "2"] if command == "optimize" else [])
        code, _, err = run(capsys, *args)
        assert code == 2 and "no study in" in err and "create-study" in err and "--study-name" not in err, err


def test_best_and_export_of_a_study_whose_trials_were_all_rejected_say_so(study_url, capsys):
    study = optuna.load_study(study_name="digits_tiny", storage=study_url)
    spec = CLASSICS["sp"][0]
    study.add_trial(optuna.trial.create_trial(
        params=spec.to_params(), distributions={g: CategoricalDistribution(list(FULL_OPTIONS[g])) for g in GENES},
        state=optuna.trial.TrialState.PRUNED, user_attrs={"reject_reason": "exploding"}))
    for command in ("best", "export"):
        code, _, err = run(capsys, command, "--storage", study_url)
        assert code == 2 and err.count("\n") == 1 and "1 finished trial(s) were rejected" in err and "--state pruned" in err
    assert not Path("train_best.py").exists()


def test_a_plain_optuna_study_of_the_same_name_is_named_as_such(study_url, tiny_config_path, capsys):
    plain = optuna.create_study(storage=study_url, study_name="plain")
    plain.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    for extra in ((), ("--skip-if-exists",)):
        code, _, err = run(capsys, "create-study", str(tiny_config_path), "--storage", study_url,
                           "--study-name", "plain", *extra)
        assert code == 2 and err.count("\n") == 1 and "already exists" in err and "another --study-name" in err
    add_trials(study_url, "digits_tiny")
    code, _, err = run(capsys, "compare", "--storage", study_url, "--study-name", "digits_tiny",
                       "--from-study", "plain", "--methods", "searched", "--seeds", "1")
    assert code == 2 and "'plain'" in err and "plain Optuna" in err


@pytest.mark.parametrize(
    "args, words",
    [
        (["optimize", "--n-trials", "0"], ["--n-trials", "at least 1"]),
        (["optimize"], ["give --n-trials N", "--timeout SECONDS", "or both"]),
        (["optimize", "--n-trials", "3", "--n-workers", "-2"], ["--n-workers"]),
        (["optimize", "--n-trials", "3", "--threads", "0"], ["--threads", "at least 1"]),
        (["optimize", "--n-trials", "3", "--n-workers", "2", "--workers-per-gpu", "2"], ["--n-workers", "not both"]),
        (["optimize", "--n-trials", "3", "--workers-per-gpu", "zero"], ["--workers-per-gpu", "'zero'"]),
        (["optimize", "--n-trials", "many"], ["many"]),
        (["optimize", "--n-trials", "3", "--timeout", "nan"], ["--timeout", "positive"]),
        (["optimize", "--n-trials", "3", "--timeout", "-5"], ["--timeout", "positive"]),
        (["trials", "-f", "xml"], ["xml"]),
        (["export", "--trial", "seven"], ["--trial"]),
        (["report", "-o", ""], ["-o ''", "no file"]),
        (["export", "-o", ""], ["-o ''", "no file"]),
        (["report", "-o", "/dev/null/report.html"], ["'/dev/null' is a file"]),
        (["trials", "--storage", "mysql+nodriver://x"], ["storage"]),
        (["trials", "--storage", "sqlite:///no_such_dir/x.db"], ["no_such_dir"]),
    ],
)
def test_bad_input_exits_2_with_one_line(study_url, capsys, args, words):
    if "--storage" not in args:
        args = args + ["--storage", study_url]
    if args[0] == "export":
        add_trials(study_url, "digits_tiny")
    code, out, err = run(capsys, *args)
    assert code == 2, (out, err)
    assert err.strip().count("\n") == 0 or err.startswith("Usage")
    for word in words:
        assert word in err


def test_passwords_never_appear_in_errors(capsys):
    url = "postgresql://kd:Sup3rSecret@127.0.0.1:1/kd"
    for args in (["trials", "--storage", url], ["create-study", "digits", "--storage", url], ["dashboard", "--storage", url]):
        code, out, err = run(capsys, *args)
        assert code == 2 and "Sup3rSecret" not in out + err and "***" in err


def test_help_of_every_command(capsys):
    for command in ("create-study", "optimize", "trials", "best", "space", "train-teacher", "correlate", "dashboard", "export"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0 and "Usage" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_on_a_port_in_use_says_so_before_it_claims_to_listen(study_url, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run(capsys, "dashboard", "--storage", study_url, "--port", str(port))
    assert code == 2 and err.count("\n") == 1 and f"port {port} on 127.0.0.1 is in use" in err and "--port" in err
    assert "http://" not in out
    for args, words in ((["--port", "99999"], ["--port", "99999"]), (["--host", "192.0.2.1"], ["192.0.2.1", "--host"])):
        code, out, err = run(capsys, "dashboard", "--storage", study_url, *args)
        assert code == 2 and err.count("\n") == 1 and "http://" not in out and all(w in err for w in words)


def test_dashboard_on_ipv6_loopback_prints_a_url_a_browser_opens(study_url, capsys, monkeypatch):
    import optuna_dashboard

    served = []
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, host, port, **kw: served.append((host, port)))
    with socket.socket(socket.AF_INET6) as free:
        free.bind(("::1", 0))
        port = free.getsockname()[1]
    code, out, err = run(capsys, "dashboard", "--storage", study_url, "--host", "::1", "--port", str(port))
    assert code == 0 and served == [("::1", port)], err
    assert f"http://[::1]:{port}/" in out


@pytest.mark.slow
def test_dashboard_serves_the_study_on_loopback(study_url, tmp_path):
    add_trials(study_url, "digits_tiny")
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "kd_optuna.run.cli", "dashboard", "--storage", study_url, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO,
    )
    try:
        body = None
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    body = json.loads(response.read())
                    break
            except OSError:
                if process.poll() is not None:
                    break
                time.sleep(0.5)
        assert body is not None, process.stdout.read().decode() if process.poll() is not None else "no answer"
        summaries = body["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["digits_tiny"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summaries[0]['study_id']}", timeout=10) as response:
            detail = json.loads(response.read())
        formulas = {a["value"] for t in detail["trials"] for a in t["user_attrs"] if a["key"] == "formula"}
        assert CLASSICS["at"][0].formula() in formulas
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1", "127.0.1.1"}
        for address in addresses:  # not reachable from the machine's other addresses
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=1).close()
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_optimize_with_the_real_objective_then_export(study_url, tmp_path, capsys):
    code, out, err = run(capsys, "optimize", "--storage", study_url, "--n-trials", "2", "--no-progress")
    assert code == 0, err
    assert "2 finished" in out
    study = optuna.load_study(study_name="digits_tiny", storage=study_url)
    finished = [t for t in study.get_trials() if t.state.is_finished()]
    for trial in finished:
        assert "formula" in trial.user_attrs and "spec" in trial.user_attrs
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in finished):
        assert {"val_ce", "val_acc", "proxy_seconds"} <= set(study.best_trial.user_attrs)
        code, out, err = run(capsys, "export", "--storage", study_url, "-o", str(tmp_path / "train.py"))
        assert code == 0 and (tmp_path / "train.py").is_file()


def test_optimize_confirms_the_first_trial_on_the_recipes_confirm_seeds(tmp_path, capsys):
    """A study config that leaves confirm_seeds out gets the recipe's three; the first trial of
    a study has no best to lose to, so it runs them all and its value is their mean."""
    config = tmp_path / "confirmed.toml"
    config.write_text(tiny_digits_toml().replace("confirm_seeds = []\n", ""))
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    assert run(capsys, "create-study", str(config), "--storage", url)[0] == 0
    code, out, err = run(capsys, "optimize", "--storage", url, "--n-trials", "1", "--no-progress")
    assert code == 0, err
    (trial,) = optuna.load_study(study_name="digits_tiny", storage=url).get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs
    assert trial.user_attrs["proxy_seeds"] == [0, 1, 2, 3]
    scores = trial.user_attrs["seed_scores"]
    assert len(set(scores)) == 4 and trial.value == pytest.approx(sum(scores) / 4)


@pytest.mark.slow
def test_train_teacher_writes_a_checkpoint_that_loads(tmp_path, tiny_config_path, capsys, monkeypatch):
    from kd_optuna.train.checkpoints import load_model

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "teacher.pt"
    code, stdout, err = run(capsys, "train-teacher", str(tiny_config_path), "-o", str(out), "--epochs", "1", "--device", "cpu")
    assert code == 0, err
    assert "test top-1" in stdout and str(out) in stdout
    assert "note: after " in stdout and "steps (--epochs)" in stdout  # one epoch leaves the BatchNorm statistics stale
    model, meta = load_model(out)
    assert meta["model_name"] == "digits_teacher" and meta["epochs"] == 1


_fuzz_lines = st.sampled_from([
    '[data]\ndataset = "digits"', '[teacher]\nmodel = "digits_teacher"', '[student]\nmodel = "digits_student"',
    "[proxy]\nsteps = -1", '[proxy]\nseeds = "x"', "[space]\ntemperature = [3]", "[search]\ntop_k = 1.5",
    '[train]\nmilestones = ["a"]', "[train]\nepochs = 1e400", "[data]\ndataset = 7", "[[data]]", "x = ", '"', "[study]\nname = 1",
])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_fuzz_lines, min_size=1, max_size=5), noise=st.text(max_size=20))
def test_fuzzed_configs_exit_0_or_2_with_one_line_and_no_storage_on_error(tmp_path, capsys, parts, noise):
    config = tmp_path / "fuzz.toml"
    config.write_text("\n".join(parts) + "\n" + noise, encoding="utf-8")
    db = tmp_path / "fuzz.db"
    if db.exists():
        db.unlink()
    code, out, err = run(capsys, "create-study", str(config), "--storage", f"sqlite:///{db}", "--study-name", "f")
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("kd-optuna: error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert not db.exists()


def test_trials_and_best_say_why_the_canonical_form_drops_a_transform(study_url, capsys):
    """Issue 11.9: params showing satt on logits (a rank no-op) say so in every listing."""
    from kd_optuna.space import DistillerSpec

    spec = DistillerSpec("logit", "satt", "no", "no", "l2", "no", 1, 1)
    notes = spec.canonical_notes()
    assert notes and "satt" in notes[0]
    distributions = {g: CategoricalDistribution(list(FULL_OPTIONS[g])) for g in GENES}
    study = optuna.load_study(study_name="digits_tiny", storage=study_url)
    study.add_trial(optuna.trial.create_trial(params=spec.to_params(), distributions=distributions, value=0.2,
                                              user_attrs={"formula": spec.formula(), "spec": spec.key}))
    code, out, _ = run(capsys, "trials", "--storage", study_url)
    assert code == 0 and "canonical_form" in out.splitlines()[0] and notes[0] in out
    code, out, _ = run(capsys, "trials", "--storage", study_url, "-f", "json")
    assert json.loads(out)[0]["canonical_notes"] == notes
    code, out, _ = run(capsys, "best", "--storage", study_url)
    assert code == 0 and any(line.startswith("canonical form") and notes[0] in line for line in out.splitlines())
    code, out, _ = run(capsys, "best", "--storage", study_url, "-f", "json")
    assert json.loads(out)["canonical_notes"] == notes


@pytest.mark.slow
def test_correlate_from_a_study_shows_a_progress_bar_per_candidate(study_url, capsys):
    """Issue 11.9: `kd-optuna correlate` shows a tqdm bar over its candidates on stderr."""
    study = optuna.load_study(study_name="digits_tiny", storage=study_url)
    distributions = {g: CategoricalDistribution(list(FULL_OPTIONS[g])) for g in GENES}
    for value, name in ((0.4, "kd"), (0.45, "fitnets"), (0.5, "at")):
        spec = CLASSICS[name][0]
        study.add_trial(optuna.trial.create_trial(
            params=spec.to_params(), distributions=distributions, value=value,
            user_attrs={"formula": spec.formula(), "spec": spec.key, "val_ce": value, "val_acc": 0.9,
                        "sharpness_gap": value / 10, "cka_gap": value / 5, "val_ce_raw": value}))
    code, out, err = run(capsys, "correlate", "--from-study", "digits_tiny", "--storage", study_url,
                         "--final-seeds", "1", "--epochs", "1", "--threads", "1", "-f", "json")
    assert code == 0, err
    assert len(json.loads(out)["candidates"]) == 3
    assert "correlate:" in err and "3/3" in err and "candidate" in err
    kept = [key for key in optuna.load_study(study_name="digits_tiny", storage=study_url).user_attrs
            if key.startswith("kd_optuna:compare:")]
    assert len(kept) == 3  # one final training per candidate, kept for a repeated correlate and for compare


@pytest.mark.slow
def test_ctrl_c_on_optimize_then_the_same_command_reruns_the_interrupted_trials(tmp_path):
    """Issue 11.6 as a user meets it: `kd-optuna optimize --n-workers 2`, Ctrl-C while trials
    train, then the same command: the interrupted trials' params are trained again first."""
    from optuna.trial import TrialState

    config = tmp_path / "slow_tiny.toml"
    config.write_text(tiny_digits_toml().replace("\nsteps = 4\n", "\nsteps = 200\n"))
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    kd = [sys.executable, "-m", "kd_optuna.run.cli"]
    assert subprocess.run([*kd, "create-study", str(config), "--storage", url], cwd=tmp_path, timeout=120).returncode == 0
    # two trials, both running at the Ctrl-C: the same command then trains just the interrupted ones
    command = [*kd, "optimize", "--storage", url, "--n-trials", "2", "--n-workers", "2", "--no-progress"]
    process = subprocess.Popen(default_sigint(command), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    study = optuna.load_study(study_name="digits_tiny", storage=url)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if len(t.params) == len(GENES)]
        if len(running) == 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, "optimize ended before two trials ran"
    process.send_signal(2)  # SIGINT to the parent, as a terminal's Ctrl-C reaches it first
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    interrupted = [t for t in study.get_trials(deepcopy=False)
                   if t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") == "interrupted"]
    assert interrupted, out + err  # a trial may have finished between the look and the signal
    assert f"({len(interrupted)} interrupted), {len(interrupted)} queued to run again" in out
    assert f"run the same command to resume (its {len(interrupted)} queued trials run first)" in err

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    complete = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(complete) == 2
    for trial in interrupted:
        reruns = [t for t in complete if t.system_attrs.get("failed_trial") == trial.number]
        assert len(reruns) == 1 and reruns[0].params == trial.params
    assert not [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.RUNNING, TrialState.WAITING)]


def test_json_output_is_strict_json_when_a_metric_is_not_finite(tmp_path, capsys):
    """A trial attr that is NaN or infinite (a sharpness gap that overflowed, say) came out of
    `trials -f json` and `best -f json` as NaN / Infinity, which is no JSON; it is null now."""
    from conftest import create_kd_study

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url, "s", "digits")

    def objective(trial):
        from kd_optuna.space import suggest_distiller

        suggest_distiller(trial)
        trial.set_user_attr("sharpness_gap", float("nan"))
        trial.set_user_attr("cka_gap", float("inf"))
        return 0.5

    study.optimize(objective, n_trials=1)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    for command in ("trials", "best"):
        code, out, err = invoke_cli(capsys, command, "--storage", url, "-f", "json")
        assert code == 0, err
        record = json.loads(out, parse_constant=refuse)
        attrs = (record[0] if command == "trials" else record)["user_attrs"]
        assert attrs["sharpness_gap"] is None and attrs["cka_gap"] is None
