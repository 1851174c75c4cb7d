"""README's own sequence, as a user runs it on a fresh clone: `make demo`, then "Using it" in order.

The demo runs on a tiny copy of the digits config (a few trials); README's `--n-trials 100
--n-workers 4` become the demo's count + 2 and 2 workers, `compare --seeds 5` trains one seed, and
`dashboard` (a server) and `correlate digits` (hours of final training) are left out; everything
else is README's line.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import invoke_cli, tiny_digits_toml

REPO = Path(__file__).resolve().parent.parent


def readme_commands(section: str = "## Using it") -> list[str]:
    """The command lines of the first bash block under ``section`` of README.md, comments cut."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    body = text.split(section, 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith(".")]


def _finished(url: str) -> int:
    study = optuna.load_study(study_name="digits", storage=url)
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


@pytest.mark.slow
def test_readme_steps_run_in_order_after_make_demo(tmp_path, monkeypatch, capsys):
    from kd_optuna.run import demo

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KD_OPTUNA_STORAGE", raising=False)
    url = "sqlite:///kd_optuna.db"  # README's default storage, in the clone's folder
    tiny = tmp_path / "digits_tiny.toml"
    tiny.write_text(tiny_digits_toml())

    # make demo (python -m kd_optuna.run.demo), on the tiny config
    assert demo.run(n_trials=3, timeout=600, config=str(tiny)) == 0
    out, err = capsys.readouterr()
    assert "4/4 best distiller" in out
    assert "teacher digits_teacher" in err and "epoch" in err  # the teacher's progress bar
    held = _finished(url)
    assert held >= 3

    commands = readme_commands()
    assert commands[0] == "kd-optuna create-study digits --skip-if-exists"
    ran = []
    for line in commands:
        args = shlex.split(line)
        if args[0] == "python":
            result = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, timeout=120)
            assert result.returncode == 0 and "usage" in result.stdout.lower(), result.stderr
            ran.append(args[1])
            continue
        assert args[0] == "kd-optuna"
        if args[1] in ("dashboard", "correlate"):
            continue
        if args[1] == "optimize":
            args[args.index("--n-trials") + 1] = str(held + 2)
            args[args.index("--n-workers") + 1] = "2"
        if args[1] == "compare":
            args[args.index("--seeds") + 1] = "1"
        code, out, err = invoke_cli(capsys, *args[1:])
        assert code == 0, f"{line}: {err}"
        ran.append(args[1])
        if args[1] == "create-study":
            assert f"study 'digits' exists with {held} finished trials; kept it" in out
        if args[1] == "optimize":
            assert _finished(url) == held + 2 and f"{held + 2} finished" in out
        if args[1] == "trials":
            assert "canonical_form" in out.splitlines()[0]
        if args[1] == "compare":
            assert "searched" in out and "kd+ls" in out
    assert ran == ["create-study", "optimize", "trials", "best", "space", "compare", "export", "train_best.py"]
    assert Path("train_best.py").is_file()

    # the path: create-study without --skip-if-exists, then an --n-trials the study already holds
    code, _, err = invoke_cli(capsys, "create-study", "digits")
    assert code == 2 and err.count("\n") == 1
    assert f"study 'digits' already exists with {held + 2} finished trials" in err
    assert "kd-optuna optimize --study-name digits --n-trials N` (N counts the study's total)" in err
    code, out, err = invoke_cli(capsys, "optimize", "--study-name", "digits", "--n-trials", "2", "--no-progress")
    assert code == 0 and out.startswith(f"{held + 2} finished")
    assert (f"the study already holds {held + 2} finished trials >= --n-trials 2; --n-trials counts the study's "
            f"total, so give a larger one to add trials (e.g. --n-trials {held + 4} adds 2)") in err
    assert _finished(url) == held + 2



def _demo_ended_by(optimize_end, tmp_path, monkeypatch, capsys) -> tuple[int, str, str]:
    """``demo.run`` on the tiny config, a random teacher checkpoint and ``optimize`` replaced
    by one KD trial, then the Summary that ``optimize_end`` makes of it; (code, out, err)."""
    import torch

    from conftest import tiny_digits_toml
    from kd_optuna.distill.classics import CLASSICS
    from kd_optuna.models import build_model
    from kd_optuna.run import demo, workers

    monkeypatch.chdir(tmp_path)
    torch.save(build_model("digits_teacher", 10).state_dict(), tmp_path / "teacher.pt")
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_digits_toml().replace('model = "digits_teacher"\n',
                                                 f'model = "digits_teacher"\ncheckpoint = "{tmp_path / "teacher.pt"}"\n'))
    kd = CLASSICS["kd"][0].to_params()

    def one_trial(storage, study_name, n_trials, **kwargs):
        study = optuna.load_study(study_name=study_name, storage=storage)
        study.add_trial(optuna.trial.create_trial(
            params=kd, value=0.5, user_attrs={"formula": "kd"},
            distributions={k: optuna.distributions.CategoricalDistribution([v]) for k, v in kd.items()}))
        return optimize_end(workers.summarize(study))

    monkeypatch.setattr(workers, "optimize", one_trial)
    code = demo.run(storage=f"sqlite:///{tmp_path / 'kd.db'}", n_trials=40, config=str(config))
    return (code, *capsys.readouterr())


def test_the_demos_next_command_adds_100_trials_to_what_the_study_holds(tmp_path, monkeypatch, capsys):
    """The demo ended by its time limit after 1 of its 40 trials printed `--n-trials 140`
    (its target + 100), which would run 139 trials, not the 100 more it offers."""
    code, out, err = _demo_ended_by(lambda summary: summary, tmp_path, monkeypatch, capsys)
    assert code == 0 and "--study-name digits --n-trials 101 --n-workers 2" in out, out


def test_a_demo_stopped_by_ctrl_c_says_so_and_how_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C printed the same lines as a finished demo (best distillers, next steps) and
    nothing of the interruption; `kd-optuna optimize` says it and how to resume."""
    import dataclasses

    code, out, err = _demo_ended_by(lambda summary: dataclasses.replace(summary, interrupted=True, waiting=2),
                                    tmp_path, monkeypatch, capsys)
    assert code == 130 and "interrupted; run `make demo` again to resume (its 2 queued trials run first)" in err, err


def test_the_in_python_example_runs_as_pasted_with_fewer_steps(monkeypatch, tmp_path):
    """README "In Python" runs as it stands (it once used names it never defined); here with 3
    teacher steps, 2 per candidate and 3 trials instead of 100, 40 and 12."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text.split("## In Python", 1)[1], re.S).group(1)
    for full, short in (("steps=100", "steps=3"), ("range(40)", "range(2)"), ("n_trials=12", "n_trials=3")):
        assert block.count(full) == 1, full
        block = block.replace(full, short)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md:In Python", "exec"), namespace)
    study = namespace["study"]
    assert len(study.trials) == 3 and study.best_trial.params["knowledge"] in ("logit", "emb")
    assert 0.0 <= study.best_value <= 1.0
