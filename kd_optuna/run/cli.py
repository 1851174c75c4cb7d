"""The `kd-optuna` command line (click), following the `optuna` CLI's conventions.

    kd-optuna create-study CONFIG [--study-name NAME] [--storage URL] [--skip-if-exists]
    kd-optuna optimize [--study-name] [--storage] --n-trials N [--timeout S] [--n-workers N | --workers-per-gpu K] [--device]
    kd-optuna trials | best | space [--study-name] [--storage] [-f table|json|yaml]
    kd-optuna train-teacher CONFIG [-o PATH] [--epochs N] [--device]
    kd-optuna correlate CONFIG [--n-candidates N] [-f]
    kd-optuna dashboard [--storage] [--host 127.0.0.1] [--port 8080] [--artifact-dir DIR]
    kd-optuna report [--study-name] [--storage] [-o report.html]
    kd-optuna export [--study-name] [--storage] [--trial best|N] [-o train_best.py]
    kd-optuna compare [--study-name] [--storage] --methods searched,kd,... --seeds N [--epochs E] [-f]

The default storage is ``sqlite:///kd_optuna.db``; ``--study-name`` may be left out when the
storage holds one study. Every error a user can cause prints one line on stderr and exits
with code 2; passwords in storage URLs are masked in every message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

import click

from kd_optuna.errors import KdOptunaError, error_message
from kd_optuna.run.storage import DEFAULT_STORAGE, describe_error, mask_secrets

FORMATS = click.Choice(["table", "json", "yaml"])


def _storage_option(func):
    return click.option(
        "--storage", default=DEFAULT_STORAGE, show_default=True, envvar="KD_OPTUNA_STORAGE",
        help="SQLAlchemy URL of the study database (env KD_OPTUNA_STORAGE).",
    )(func)


def _study_option(func):
    return click.option("--study-name", default=None, help="Study name; optional when the storage holds one study.")(func)


def _format_option(func):
    return click.option("-f", "--format", "fmt", type=FORMATS, default="table", show_default=True, help="Output format.")(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kd-optuna", prog_name="kd-optuna")
def cli() -> None:
    """Search the best knowledge-distillation loss for a teacher/student pair (KD-Zero on Optuna)."""


def _open(storage_url: str, study_name: str | None, heartbeat: int | None = None, writable: bool = False,
          read_config: bool = True):
    """(storage, study, config) for a kd-optuna study; ``writable`` for a command that writes it.
    Without ``read_config`` the config is None and only said to exist: a command that reads the
    trials alone (trials, best) also serves a study whose stored config this version cannot read."""
    from kd_optuna.run.storage import (
        StorageError, load_study, mask_url, open_storage, stored_config_text, study_config, study_names,
    )

    storage = open_storage(storage_url, heartbeat_interval=heartbeat, must_exist=True, writable=writable)
    if study_name is None:
        names = study_names(storage)
        if not names:
            raise StorageError(f"no study in {mask_url(storage_url)}; create one with `kd-optuna create-study CONFIG`")
        if len(names) != 1:
            raise StorageError(f"give --study-name (studies in the storage: {', '.join(repr(n) for n in names)})")
        study_name = names[0]
    study = load_study(storage, study_name, storage_url)
    if not read_config:
        stored_config_text(study)
        return storage, study, None
    return storage, study, study_config(study)


@cli.command("create-study")
@click.argument("config")
@_study_option
@_storage_option
@click.option("--skip-if-exists", is_flag=True, help="Keep an existing study of that name instead of failing.")
def create_study(config: str, study_name: str | None, storage: str, skip_if_exists: bool) -> None:
    """Validate CONFIG (a TOML file or a shipped name such as `digits`) and create its study."""
    import optuna

    from kd_optuna.run.config import CONFIG_ATTR, StudySection, load_config
    from kd_optuna.run.storage import StorageError, load_study, mask_url, open_storage, study_config, study_names

    if study_name is not None and not study_name.strip():
        raise KdOptunaError(f"--study-name {study_name!r} is blank; give a name, or leave the option out for the config's")
    loaded = load_config(config)
    loaded.check_files()
    name = study_name or loaded.name
    loaded = dataclasses.replace(loaded, study=StudySection(name=name))
    rdb = open_storage(storage, heartbeat_interval=None, writable=True)
    if name in study_names(rdb):
        from kd_optuna.run.summary import summarize

        existing = load_study(rdb, name, storage)
        if CONFIG_ATTR not in existing.user_attrs:
            raise StorageError(
                f"study {name!r} already exists in {mask_url(storage)} without a kd-optuna config (made by plain "
                "Optuna?); give another --study-name"
            )
        study_config(existing)
        held = f"{summarize(existing).finished} finished trials"
        if not skip_if_exists:
            raise StorageError(
                f"study {name!r} already exists with {held}; continue it with "
                f"`kd-optuna optimize --study-name {shlex.quote(name)} --n-trials N` (N counts the study's total), "
                "or pass --skip-if-exists to keep it, or give another --study-name"
            )
        click.echo(f"study {name!r} exists with {held}; kept it and its stored config")
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=rdb, study_name=name, direction="minimize")
    try:
        study.set_user_attr(CONFIG_ATTR, loaded.to_json())
        from kd_optuna.run.story import name_objective

        name_objective(study)
    except BaseException:
        optuna.delete_study(study_name=name, storage=rdb)
        raise
    click.echo(f"created study {name!r}: {loaded.teacher.model} -> {loaded.student.model} on {loaded.data.dataset}")


@cli.command()
@_study_option
@_storage_option
@click.option("--n-trials", type=int, default=None,
              help="Finished trials the study should hold (all workers together) [default: no target, search until --timeout].")
@click.option("--timeout", type=float, default=None, help="Stop starting trials after this many seconds of search (a teacher trained first is not counted).")
@click.option("--n-workers", type=int, default=None, help="Worker processes on this machine [default: 1].")
@click.option("--workers-per-gpu", default=None, metavar="K|auto",
              help="K worker processes on each visible GPU (auto: as many as its free memory and the cores allow); instead of --n-workers.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, or a device such as cuda:1.")
@click.option("--threads", type=int, default=None, help="CPU threads per worker [default: the cores split evenly].")
@click.option("--heartbeat", type=int, default=20, show_default=True, help="Heartbeat interval in seconds; a trial silent for twice that is failed and retried.")
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
def optimize(study_name, storage, n_trials, timeout, n_workers, workers_per_gpu, device, threads, heartbeat, progress) -> None:
    """Run N worker processes on the study until it holds --n-trials finished trials, or --timeout seconds pass."""
    from kd_optuna.run.workers import check_counts, optimize as run
    from kd_optuna.train.devices import check_device, resolve_workers

    check_counts({"--n-trials": n_trials, "--n-workers": n_workers, "--threads": threads, "--heartbeat": heartbeat})
    check_device(device)
    n_workers, line = resolve_workers(n_workers, workers_per_gpu, device)
    if line is not None:
        click.echo(f"kd-optuna: {line}", err=True)
    _, study, _ = _open(storage, study_name, writable=True)
    summary = run(
        storage, study.study_name, n_trials, n_workers=n_workers, timeout=timeout, device=device, threads=threads,
        heartbeat_interval=heartbeat, progress=progress,
        before_workers=lambda config: _train_missing_teacher(config, device, threads, progress),
    )
    _refresh_story(study)
    best = "none yet" if summary.best_value is None else f"trial {summary.best_number}, score {summary.best_value:.5g}: {summary.best_formula}"
    click.echo(f"{summary.describe()}; best: {best}")
    if summary.target_met_before:
        click.echo(
            f"nothing to run: the study already holds {summary.finished} finished trials >= --n-trials {n_trials}; "
            f"--n-trials counts the study's total, so give a larger one to add trials "
            f"(e.g. --n-trials {summary.finished + n_trials} adds {n_trials})", err=True,
        )
    if summary.interrupted:
        queued = f" (its {summary.waiting} queued trials run first)" if summary.waiting else ""
        click.echo(f"interrupted; run the same command to resume{queued}", err=True)
        sys.exit(130)
    short = n_trials is None or summary.finished < n_trials
    if summary.worker_errors and short:
        raise KdOptunaError(f"workers stopped early: {summary.worker_errors[-1]}")
    if summary.worker_deaths and short and "its slot was restarted" in summary.worker_deaths[-1]:
        end = "the timeout" if n_trials is None else "the target"
        raise KdOptunaError(f"workers died before {end}: {summary.worker_deaths[-1]}")


def _refresh_story(study, config=None) -> None:
    """The study's figures, note and best script in optuna-dashboard (kd_optuna.run.story); a
    failure is a warning, never the command's error: the trials are stored either way."""
    from kd_optuna.run.story import refresh

    try:
        refresh(study, config)
    except Exception as exc:  # noqa: BLE001 - the story is a view of the study, not the study
        click.echo(f"warning: the dashboard story was not refreshed: {exc.__class__.__name__}: {exc}", err=True)


def _trial_row(trial) -> dict[str, Any]:
    from kd_optuna.run.study_view import formula_of

    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "formula": formula_of(trial),
        "val_acc": attrs.get("val_acc"),
        "val_ce": attrs.get("val_ce"),
        "reject_reason": attrs.get("reject_reason") or attrs.get("fail_reason"),
        "seconds": trial.duration.total_seconds() if trial.duration else None,
        "canonical_form": "; ".join(_canonical_notes(trial)),
    }


def _canonical_notes(trial) -> list[str]:
    """Why the trial's params show a transform or T/lambda its canonical spec does not compute."""
    from kd_optuna.run.story import canonical_notes

    return canonical_notes(trial.params)


def _trial_record(trial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "params": dict(trial.params),
        "canonical_notes": _canonical_notes(trial),
        "user_attrs": dict(trial.user_attrs),
        "datetime_start": str(trial.datetime_start) if trial.datetime_start else None,
        "datetime_complete": str(trial.datetime_complete) if trial.datetime_complete else None,
    }


def _finite_or_none(data: Any) -> Any:
    """``data`` with each NaN or infinite float as None: JSON (RFC 8259) has no NaN or Infinity,
    and the JSON readers of JavaScript, Go or Rust refuse Python's spelling of them."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite_or_none(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_or_none(value) for value in data]
    return data


def _emit(data: Any, fmt: str, table_rows: Sequence[dict[str, Any]] | None = None) -> None:
    if fmt == "json":
        click.echo(json.dumps(_finite_or_none(data), indent=2, default=str, allow_nan=False))
    elif fmt == "yaml":
        import yaml

        click.echo(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False).rstrip())
    else:
        click.echo(_table(table_rows if table_rows is not None else data))


class _Lines(tuple):
    """A table cell's text already cut into lines (``_table`` writes them under each other)."""


def _cell(value: Any) -> list[str]:
    """A value's lines in a table cell: one line, whitespace runs made one space, but for _Lines."""
    if value is None:
        return [""]
    if isinstance(value, float):
        return ["nan" if math.isnan(value) else f"{value:.5g}"]
    if isinstance(value, _Lines):
        return list(value) or [""]
    return [" ".join(str(value).split())]


def _table(rows: Sequence[dict[str, Any]]) -> str:
    """Left-aligned columns under a header; a cell of several _Lines makes its row that tall."""
    if not rows:
        return "(none)"
    columns = list(rows[0])
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line) for r in cells for line in r[i])) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    lines = [line(columns), line(["-" * w for w in widths])]
    for row in cells:
        height = max(map(len, row))
        lines += [line([c[i] if i < len(c) else "" for c in row]) for i in range(height)]
    return "\n".join(lines)


@cli.command()
@_study_option
@_storage_option
@_format_option
@click.option("--state", "states", multiple=True, type=click.Choice(["COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"], case_sensitive=False), help="Only trials in these states.")
def trials(study_name, storage, fmt, states) -> None:
    """List the study's trials: state, score, formula, accuracy, rejection reason."""
    _, study, _ = _open(storage, study_name, read_config=False)
    chosen = [t for t in study.get_trials(deepcopy=False) if not states or t.state.name in {s.upper() for s in states}]
    _emit([_trial_record(t) for t in chosen], fmt, [_trial_row(t) for t in chosen])


def best_trial(study, trial: str = "best"):
    """The trial ``best`` (lowest COMPLETE value) or number ``trial`` of ``study``."""
    from optuna.trial import TrialState

    if trial == "best":
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
        if not complete:
            rejected = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
            if rejected:
                raise KdOptunaError(
                    f"study {study.study_name!r} has no completed trial: its {rejected} finished trial(s) were rejected "
                    "(why: `kd-optuna trials --state pruned`); run `kd-optuna optimize` with a larger --n-trials"
                )
            raise KdOptunaError(f"study {study.study_name!r} has no completed trial yet; run `kd-optuna optimize` first")
        return min(complete, key=lambda t: t.value)
    try:
        number = int(trial)
    except ValueError:
        raise KdOptunaError(f"--trial must be 'best' or a trial number, got {trial!r}") from None
    found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not found:
        raise KdOptunaError(f"study {study.study_name!r} has no trial {number}; see `kd-optuna trials`")
    if found[0].state != TrialState.COMPLETE:
        raise KdOptunaError(f"trial {number} is {found[0].state.name}, not COMPLETE; pick a completed trial")
    return found[0]


@cli.command()
@_study_option
@_storage_option
@_format_option
def best(study_name, storage, fmt) -> None:
    """Show the best distiller found so far."""
    _, study, _ = _open(storage, study_name, read_config=False)
    trial = best_trial(study)
    record = _trial_record(trial)
    if fmt == "table":
        from kd_optuna.run.study_view import formula_of, key_of

        attrs = trial.user_attrs
        rows = [{"key": "trial", "value": trial.number}, {"key": "score", "value": trial.value},
                {"key": "formula", "value": formula_of(trial)}, {"key": "spec", "value": key_of(trial)}]
        rows += [{"key": k, "value": attrs[k]} for k in ("val_acc", "val_ce", "sharpness_gap", "cka_gap", "proxy_seconds") if k in attrs]
        rows += [{"key": k, "value": v} for k, v in trial.params.items()]
        rows += [{"key": "canonical form", "value": note} for note in record["canonical_notes"]]
        _emit(None, fmt, rows)
    else:
        _emit(record, fmt)


@cli.command()
@_study_option
@_storage_option
@_format_option
def space(study_name, storage, fmt) -> None:
    """The search space with the shrinkage weights in force (0 = dropped, 1 = full)."""
    _, study, config = _open(storage, study_name)
    weights = config.make_sampler(with_llm=False).space_weights(study)
    data = {gene: {str(option): weight for option, weight in options.items()} for gene, options in weights.items()}
    gene_width = max(len("gene"), *map(len, data))
    width = max(40, shutil.get_terminal_size().columns - gene_width - 2)
    rows = [
        {"gene": gene, "options": _Lines(textwrap.wrap(" ".join(f"{o}:{w:.2f}" for o, w in options.items()), width))}
        for gene, options in data.items()
    ]
    _emit(data, fmt, rows)


@cli.command("train-teacher")
@click.argument("config")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint to write (default: the cache the search reads, .kd_optuna_cache/).")
@click.option("--epochs", type=int, default=None, help="Override the recipe's epochs.")
@click.option("--device", default="auto", show_default=True)
def train_teacher(config: str, output: str | None, epochs: int | None, device: str) -> None:
    """Train the teacher of CONFIG with its dataset's recipe and save the checkpoint."""
    from kd_optuna.proxy.task import unkeyed_teacher_path
    from kd_optuna.run.config import load_config
    from kd_optuna.train.devices import WorkerContext
    from kd_optuna.train.teachers import RECIPES, train_teacher as train
    from kd_optuna.run.workers import check_counts

    check_counts({"--epochs": epochs})
    loaded = load_config(config)
    loaded.check_data()  # not the teacher checkpoint: -o may be the one to (re)make
    if output is None and loaded.teacher.checkpoint is not None:
        raise KdOptunaError(
            f"{config}: teacher.checkpoint = {loaded.teacher.checkpoint!r} is what the search reads, never the cache; "
            "to train another teacher give -o PATH and set checkpoint = PATH"
        )
    path = Path(output) if output else unkeyed_teacher_path(Path(".kd_optuna_cache"), loaded.data.dataset,
                                                            loaded.teacher.model)
    overrides = {"epochs": epochs} if epochs else {}
    report = train(
        loaded.data.dataset, loaded.teacher.model, path, root=loaded.data.root, download=loaded.data.download,
        image_size=loaded.data.image_size, val_fraction=loaded.data.val_fraction,
        device=WorkerContext(0, 1, device).torch_device(), **overrides,
    )
    click.echo(f"teacher {loaded.teacher.model} saved to {report.path}: test top-1 {report.test_accuracy:.2%}")
    if report.stale_batch_norm is not None:
        click.echo(f"note: {report.stale_batch_norm} (--epochs)")
    recipe_epochs = RECIPES[loaded.data.dataset]["epochs"]
    if output:
        click.echo(f"use it with `checkpoint = {str(report.path)!r}` under [teacher]")
    elif epochs not in (None, recipe_epochs):
        click.echo(f"note: the search reuses a cached teacher only when it was trained for the recipe's "
                   f"{recipe_epochs} epochs; to search with this one, set `checkpoint = {str(report.path)!r}` "
                   "under [teacher]")


@cli.command()
@click.argument("config", required=False)
@click.option("--from-study", default=None, help="Correlate this study's best distinct trials (in --storage), on its config.")
@_storage_option
@click.option("--n-candidates", type=click.IntRange(min=3), default=10, show_default=True,  # correlate.MIN_CANDIDATES
              help="Distillers to compare.")
@click.option("--final-seeds", type=click.IntRange(min=1), default=2, show_default=True, help="Seeds of each final training.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the [train] epochs of the final training.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Override the [train] lr of the final training (for a recipe under which a method diverges).")
@click.option("--top-margin", type=float, default=2.0, show_default=True, help="Top candidates: final top-1 within this many points of vanilla KD's.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (1 is fastest on a busy machine).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random candidates.")
@click.option("--device", default="auto", show_default=True)
@_format_option
def correlate(config, from_study, storage, n_candidates, final_seeds, epochs, lr, top_margin, threads, seed, device,
              fmt) -> None:
    """Reproduce Table 1: rank correlation of each proxy metric with the real final training.

    The final training is the exported script's (the [train] recipe, last-epoch test top-1),
    so the table says how well the proxy ranks what a user gets; its rows for the top
    candidates say how well it orders the head of the list. Each final training is kept as it
    finishes (in the study with --from-study, else in .kd_optuna_cache/correlate-runs.json):
    an interrupted or repeated correlate trains only what it lacks.
    """
    from kd_optuna.run.compare import FileRuns, StudyRuns, override_recipe
    from kd_optuna.run.config import load_config
    from kd_optuna.run.correlate import correlate as run, exported_training, format_table, with_vanilla_kd
    from kd_optuna.train.devices import WorkerContext
    from kd_optuna.export.script import script_defaults
    from kd_optuna.proxy.task import Task

    if (config is None) == (from_study is None):
        raise KdOptunaError("give a CONFIG or --from-study NAME (one of them)")
    candidates = None
    if from_study is not None:
        _, study, loaded = _open(storage, from_study, writable=True)
        candidates = _best_distinct(study, n_candidates)
        runs = StudyRuns(study)
    else:
        loaded = load_config(config)
        runs = FileRuns(Path(".kd_optuna_cache") / "correlate-runs.json")
    loaded.check_files()
    _train_missing_teacher(loaded, device, threads, progress=True)
    target = WorkerContext(0, 1, device).torch_device()
    task = Task.from_config(loaded, device=target)
    recipe = {**script_defaults(loaded), "device": str(target)}
    override_recipe(recipe, epochs, lr)
    from tqdm.auto import tqdm

    # one step per candidate; vanilla KD is added to a study's candidates when they lack it
    total = n_candidates if candidates is None else len(with_vanilla_kd(candidates))
    bar = tqdm(total=total, desc="correlate", unit="candidate", file=sys.stderr, dynamic_ncols=True)

    def on_candidate(line: str) -> None:
        bar.write(line, file=sys.stderr)
        if bar.n >= bar.total:  # never shown past 100%
            bar.total = bar.n + 1
        bar.update(1)

    try:
        result = run(task, exported_training(recipe, threads, runs), n_candidates=n_candidates,
                     final_seeds=tuple(range(final_seeds)), seed=seed, threads=threads, candidates=candidates,
                     top_margin=top_margin, progress=on_candidate,
                     final_name=f"exported training, {recipe['epochs']} epoch{'s' if recipe['epochs'] != 1 else ''}")
    finally:
        bar.close()
    if fmt == "table":
        click.echo(format_table(result))
    else:
        _emit(dataclasses.asdict(result), fmt)


def _best_distinct(study, n: int):
    """[(name, spec, proxy metrics)] of the ``n`` best COMPLETE trials with distinct canonical keys."""
    from optuna.trial import TrialState

    from kd_optuna.run.correlate import METRICS, MIN_CANDIDATES, with_vanilla_kd
    from kd_optuna.space import DistillerSpec

    chosen, keys = [], set()
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    for trial in sorted(trials, key=lambda t: t.value):
        spec = DistillerSpec.from_params(trial.params)
        metrics = {k: trial.user_attrs.get(k) for k in (*METRICS, "val_ce_raw", "val_acc")}
        if spec.key in keys or any(not isinstance(v, (int, float)) for v in metrics.values()):
            continue
        keys.add(spec.key)
        chosen.append((f"trial{trial.number}", spec, metrics))
        if len(chosen) == n:
            break
    if len(with_vanilla_kd(chosen)) < MIN_CANDIDATES:
        raise KdOptunaError(f"study {study.study_name!r} has {len(chosen)} scored distinct trial(s) and correlate needs "
                            f"{MIN_CANDIDATES} distillers with vanilla KD; run optimize for more")
    return chosen


@cli.command()
@_storage_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; the dashboard has no login.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--artifact-dir", default=None, envvar="KD_OPTUNA_ARTIFACT_DIR",
              help="Artifact store of the studies' exported scripts [default: DB.artifacts/ beside a sqlite:///DB; "
                   "env KD_OPTUNA_ARTIFACT_DIR].")
def dashboard(storage: str, host: str, port: int, artifact_dir: str | None) -> None:
    """Start optuna-dashboard on the storage: figures, study note, best script, a note per trial."""
    from optuna_dashboard import run_server

    from kd_optuna.run.storage import mask_url, open_storage
    from kd_optuna.run.artifacts import artifact_dir as default_artifact_dir, artifact_store

    rdb = open_storage(storage, heartbeat_interval=None, must_exist=True)
    _check_listen_address(host, port)
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: the dashboard on {host} is open to the network without a login", err=True)
    store = artifact_store(default_artifact_dir(storage, artifact_dir), create=True)
    if store is None:
        click.echo("note: no artifact store (give --artifact-dir); exported scripts are not downloadable", err=True)
    shown_host = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    click.echo(f"dashboard of {mask_url(storage)} on http://{shown_host}:{port}/ (Ctrl-C to stop)")
    run_server(rdb, host=host, port=port, artifact_store=store)


def _check_listen_address(host: str, port: int) -> None:
    """Bind ``host:port`` once as the dashboard's server will (bottle's WSGIRefServer: IPv6 for
    a host with a colon, address reuse on); a port in use or an address this machine does not
    have raises KdOptunaError, before the dashboard says where it listens."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror:
            raise KdOptunaError(f"--host {host!r} is not an address of this machine; give one such as 127.0.0.1") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise KdOptunaError(f"port {port} on {host} is in use (another dashboard?); give another --port") from None
            raise KdOptunaError(f"cannot listen on {host}:{port} ({exc.strerror}); give an address of this machine "
                                "with --host, or another --port") from None


def _output_file(output: str) -> Path:
    """``-o OUTPUT`` as the path of a file in a folder that exists; a blank name, a missing
    folder or a file where the folder should be raise KdOptunaError before anything is read."""
    path = Path(output)
    if not output.strip() or path.name in ("", ".", ".."):
        raise KdOptunaError(f"-o {output!r} names no file; give a file name")
    folder = path.parent
    if not folder.exists():
        raise KdOptunaError(f"directory {str(folder)!r} does not exist; create it or choose another -o")
    if not folder.is_dir():
        raise KdOptunaError(f"{str(folder)!r} is a file, not a directory; choose another -o")
    return path


@cli.command()
@_study_option
@_storage_option
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="report.html", show_default=True)
def report(study_name, storage, output) -> None:
    """Write the study's figures and tables as one self-contained HTML page (no network needed)."""
    from kd_optuna.run.report import write_report

    target = _output_file(output)
    _, study, config = _open(storage, study_name)
    path = write_report(target, study, config)
    click.echo(f"wrote {path}: open it in a browser")


@cli.command()
@_study_option
@_storage_option
@click.option("--trial", "trial_choice", default="best", show_default=True, help="'best' or a trial number.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="train_best.py", show_default=True)
def export(study_name, storage, trial_choice, output) -> None:
    """Write a script that trains the student with the trial's distiller on the full data.

    A config without a teacher checkpoint searched with the teacher kd-optuna trained into
    .kd_optuna_cache here: the script is given its absolute path, so that it distils from the
    same teacher wherever it is run, instead of training another."""
    from kd_optuna.export.script import write_script
    from kd_optuna.proxy.task import find_config_teacher

    target = _output_file(output)
    _, study, config = _open(storage, study_name)
    trial = best_trial(study, trial_choice)
    cached = find_config_teacher(config, Path(".kd_optuna_cache")) if config.teacher.checkpoint is None else None
    teacher = str(cached.resolve()) if cached is not None else None
    path = write_script(target, study.study_name, trial, config, teacher)
    click.echo(f"wrote {path}: run `python {path} --help`")
    if teacher is not None:
        click.echo(f"it distils from the search's teacher {teacher}")


class _CompareCommand(click.Command):
    """`compare`'s help ends with the methods, one line each (read when --help asks for them)."""

    def format_epilog(self, ctx, formatter) -> None:
        from kd_optuna.export.training import METHODS

        with formatter.section("Methods"):
            formatter.write_dl(list(METHODS.items()))


@cli.command(cls=_CompareCommand)
@_study_option
@_storage_option
@click.option("--methods", default="searched,kd,dkd,kd+ls,dkd+ls", show_default=True,
              help="Comma-separated methods (listed below).")
@click.option("--seeds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Seeds 0..N-1, the same for every method.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the study's [train] epochs.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Override the study's [train] lr (for a recipe under which a method diverges).")
@click.option("--n-workers", type=click.IntRange(min=1), default=1, show_default=True, help="Runs trained at once.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, or a device such as cuda:1.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads per worker [default: the cores split evenly].")
@click.option("--trial", "trial_choice", default="best", show_default=True, help="The study's trial whose distiller is `searched`.")
@click.option("--from-study", default=None, help="Take `searched` from this study's best trial (same storage) instead.")
@click.option("--spec", "spec_text", default=None, help="Take `searched` from a spec: a JSON object of the 8 genes, or a file holding one.")
@click.option("--output-dir", default=None, help="Where runs keep checkpoints [default: kd_optuna_runs/compare/STUDY].")
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
def compare(study_name, storage, methods, seeds, epochs, lr, n_workers, device, threads, trial_choice, from_study,
            spec_text, output_dir, fmt, progress) -> None:
    """Train each method x seed with the study's full recipe; paired gains of the searched distiller.

    Every run is recorded in the study as it finishes: a repeated or interrupted compare
    trains only the runs it lacks. Prints, per method, the mean and std of the last-epoch
    test top-1, and the searched distiller's paired gain over each method with its 95% interval.
    """
    from tqdm.auto import tqdm

    from kd_optuna.distill.classics import CLASSICS
    from kd_optuna.run import compare as comparing
    from kd_optuna.train.devices import check_device
    from kd_optuna.export.script import script_defaults

    chosen = comparing.parse_methods(methods)
    check_device(device)
    storage_obj, study, config = _open(storage, study_name, writable=True)
    spec = None
    if "searched" in chosen or from_study is not None or spec_text is not None or trial_choice != "best":
        spec = _searched_spec(storage_obj, storage, study, trial_choice, from_study, spec_text)
    # the baselines ignore the spec (train_with_distiller keeps it in the checkpoints): a study
    # without a completed trial can train them before its search has found a distiller
    spec_params = (spec or CLASSICS["kd"][0]).to_params()
    recipe = {**script_defaults(config), "num_workers": 0,
              "output_dir": output_dir or str(comparing.default_output_dir(study.study_name))}
    overrides = comparing.override_recipe(recipe, epochs, lr)
    jobs = [comparing.Job(method, seed, spec_params, recipe) for method in chosen for seed in range(seeds)]
    recorded = comparing.recorded_runs(study.user_attrs)
    if any(job.digest() not in recorded for job in jobs):
        _train_missing_teacher(config, device, threads, progress and fmt != "json")
    bar = tqdm(total=len(jobs), desc="compare", unit="run", disable=not progress or fmt == "json")

    def on_run(run, reused) -> None:
        bar.update(1)
        outcome = "diverged" if run.top1 is None else f"{run.top1:.2f}%"
        bar.set_postfix_str(f"{run.method} seed {run.seed}: {outcome}{' (stored)' if reused else ''}")

    try:
        runs = comparing.run_compare(study, jobs, n_workers=n_workers, device=device, threads=threads, on_run=on_run)
    finally:
        bar.close()
    summaries, gains = comparing.summarise(runs)
    comparing.remember_last(study, jobs, overrides)
    _refresh_story(study, config)
    if fmt == "json":
        _emit(comparing.as_json(runs, summaries, gains), "json")
    else:
        if "searched" in chosen:
            click.echo(f"searched: {spec.formula()}")
        click.echo(comparing.format_table(summaries, gains))
        for run in runs:
            if run.diverged is not None:
                click.echo(f"{run.method} seed {run.seed}: {run.diverged}; recorded as diverged (a lower --lr may "
                           "train it)")
        stale = [run for run in runs if run.stale_batch_norm is not None]
        if stale:
            click.echo(f"note: {len(stale)} of the {len(runs)} runs, for example {stale[0].method} seed "
                       f"{stale[0].seed}: {stale[0].stale_batch_norm} (--epochs)")


def _train_missing_teacher(config, device: str, threads: int | None, progress: bool) -> None:
    """Train the study's teacher here, once, with its bar, when it has no checkpoint: the
    worker processes started afterwards read the cache (and say nothing about it)."""
    from kd_optuna.proxy.task import config_teacher_checkpoint
    from kd_optuna.train.devices import WorkerContext

    if config.teacher.checkpoint is None:
        config_teacher_checkpoint(config, Path(".kd_optuna_cache"),
                                  str(WorkerContext(0, 1, device, threads).torch_device()),  # alone: every core
                                  progress=progress)


def _searched_spec(storage_obj, storage_url, study, trial_choice, from_study, spec_text):
    """The DistillerSpec that `compare` trains as `searched`."""
    from kd_optuna.space import DistillerSpec
    from kd_optuna.run.storage import load_study, study_config

    if from_study is not None and spec_text is not None:
        raise KdOptunaError("give --from-study or --spec, not both")
    if spec_text is not None:
        is_file = Path(spec_text).is_file()
        if not is_file and not spec_text.lstrip().startswith("{"):
            raise KdOptunaError(f"--spec {spec_text!r}: no such file, nor a JSON object; give a file holding the "
                                "spec or the object itself, e.g. --spec '{\"knowledge\": \"logit\", ...}'")
        try:
            text = Path(spec_text).read_text(encoding="utf-8") if is_file else spec_text
            return DistillerSpec.from_params(json.loads(text))
        except (json.JSONDecodeError, TypeError, ValueError, KeyError) as exc:
            raise KdOptunaError(f"--spec: not a distiller spec ({' '.join(str(exc).split())[:120]}); "
                                "give a JSON object of knowledge, transform1-3, distance, calibration, temperature, magnitude") from None
    source = study
    if from_study is not None:
        source = load_study(storage_obj, from_study, storage_url)
        study_config(source)  # a study of plain Optuna has no distillers: say so, not that its params lack genes
    return DistillerSpec.from_params(best_trial(source, trial_choice).params)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: one masked line on stderr and exit code 2 for every user error."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="kd-optuna", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("kd-optuna: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), args, exc.exit_code if exc.exit_code else 2)
    except KdOptunaError as exc:
        _fail(error_message(exc), args, 2)
    except KeyboardInterrupt:
        click.echo("kd-optuna: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a database or library error: one masked line, no traceback
        from kd_optuna.run.storage import DATABASE_ERRORS

        if isinstance(exc, (*DATABASE_ERRORS, OSError)):
            _fail(f"{exc.__class__.__name__}: {describe_error(exc, '')}", args, 1)
        import traceback

        click.echo(mask_secrets("".join(traceback.format_exception(exc)), *args), err=True)
        sys.exit(1)


def _fail(message: str, args: Sequence[str], code: int) -> None:
    text = mask_secrets(" ".join(str(message).split()), *args)
    click.echo(f"kd-optuna: error: {text}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
