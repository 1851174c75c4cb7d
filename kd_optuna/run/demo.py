"""`make demo`: the whole path on the embedded digits task, in a few minutes on a laptop CPU.

    create the `digits` study in sqlite:///kd_optuna.db (kept if it exists)
    train the digits teacher once (cached in .kd_optuna_cache/)
    search with 2 worker processes: DEMO_TRIALS finished trials or DEMO_TIMEOUT_S seconds
    print the best distillers, then how to open the dashboard and export the best one

Running it again resumes the same study and adds DEMO_TRIALS more trials.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import optuna

from kd_optuna.run.storage import DEFAULT_STORAGE

DEMO_TRIALS = 40
DEMO_TIMEOUT_S = 180
STUDY = "digits"


def run(storage: str = DEFAULT_STORAGE, n_trials: int = DEMO_TRIALS, timeout: float = DEMO_TIMEOUT_S,
        config: str = "digits") -> int:
    """The demo on study ``digits`` of ``storage``, made from ``config`` (a shipped name or a
    TOML file; tests give a tiny one) unless it exists; 0, or 1 / 130 as the search ended."""
    from kd_optuna.run.cli import best_trial, main as cli_main
    from kd_optuna.run.storage import load_study, open_storage, study_config
    from kd_optuna.proxy.task import config_teacher_checkpoint
    from kd_optuna.run.workers import optimize, summarize

    click.echo("1/4 study: digits (digits_teacher -> digits_student), storage " + storage)
    try:
        cli_main(["create-study", config, "--storage", storage, "--study-name", STUDY, "--skip-if-exists"])
    except SystemExit as exc:  # the CLI has printed its one-line error
        if exc.code:
            return int(exc.code) if isinstance(exc.code, int) else 2
    rdb = open_storage(storage, heartbeat_interval=None)
    study = load_study(rdb, STUDY, storage)
    config = study_config(study)
    if config.teacher.checkpoint is None:
        click.echo("2/4 teacher: trained once, then read from .kd_optuna_cache/")
        path = config_teacher_checkpoint(config, Path(".kd_optuna_cache"), progress=True)
        click.echo(f"    teacher checkpoint: {path}")
    else:
        click.echo(f"2/4 teacher: {config.teacher.checkpoint}")
    already = summarize(study).finished
    target = already + n_trials
    click.echo(f"3/4 search: 2 workers, up to {n_trials} more trials or {timeout:.0f} s (Ctrl-C stops cleanly)")
    summary = optimize(storage, STUDY, target, n_workers=2, timeout=timeout)
    click.echo(f"    {summary.describe()}")
    if summary.complete == 0:
        click.echo("no distiller completed; see `kd-optuna trials` for the reasons", err=True)
        return 1
    trial = best_trial(study)
    attrs = trial.user_attrs
    click.echo("4/4 best distiller:")
    click.echo(f"    trial {trial.number}, score {trial.value:.4f} (lower is better)")
    click.echo(f"    {attrs.get('formula')}")
    if "val_acc" in attrs:
        click.echo(f"    proxy validation accuracy {100 * attrs['val_acc']:.1f}%")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    ranked = sorted(complete, key=lambda t: t.value)[:5]
    for t in ranked:
        click.echo(f"      {t.value:8.4f}  {t.user_attrs.get('formula')}")
    click.echo("")
    click.echo("next:")
    click.echo(f"  kd-optuna dashboard --storage {storage}          # then open http://127.0.0.1:8080/")
    click.echo(f"  kd-optuna export --storage {storage} --study-name {STUDY} -o train_best.py && python train_best.py --help")
    click.echo(f"  kd-optuna optimize --storage {storage} --study-name {STUDY} --n-trials {summary.finished + 100} --n-workers 2")
    if summary.interrupted:
        queued = f" (its {summary.waiting} queued trials run first)" if summary.waiting else ""
        click.echo(f"interrupted; run `make demo` again to resume{queued}", err=True)
        return 130
    return 0


def main() -> None:
    from kd_optuna.errors import KdOptunaError

    try:
        sys.exit(run())
    except KdOptunaError as exc:
        click.echo(f"demo: error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
