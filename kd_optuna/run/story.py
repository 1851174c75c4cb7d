"""What the study shows a person: figures, the study note and the best script, in optuna-dashboard.

A user who comes back to a study wants to see, without writing code, how the best score moved
against the classic distillers', which options of each gene the search favours and which it
shrank away, the family tree of the best distillers, why trials were rejected, and what
``kd-optuna compare`` measured. :func:`refresh` writes all of it into the study:

- figures (drawn by ``kd_optuna.run.figures``, saved with
  ``optuna_dashboard.save_plotly_graph_object``, ids in :data:`FIGURE_IDS`), shown on the
  study's page of optuna-dashboard:

  - ``kd_optuna_progress``: best score so far over the trials, every completed score, and
    one line per classic distiller at its score (the trial whose ``spec`` is the classic's
    canonical key); the y range is the completed scores' spread, a classic outside it is
    noted "off scale";
  - ``kd_optuna_genes``: per gene (a menu picks it), the completed scores for each option
    (box and points) and the shrinkage weight in force (bars, right axis, the sampler's
    ``space_weights``, as ``kd-optuna space`` prints them; where those cannot be computed,
    the options the latest ``space_state`` dropped are at 0); each box in view, scores above
    the gene's range drawn at its top edge and counted over their option;
  - ``kd_optuna_lineage``: the best distinct distillers and their ancestors (the lineage
    attrs ``parent``, ``crossover_parent``, read with ``kd_optuna.search.lineage.read_lineage``), each
    trial placed at (number, score), the mutated genes on hover of a mark mid-edge, hover with
    the proposer and rho's contest (``predictor``);
  - ``kd_optuna_rejections``: trials per outcome (completed, each ``reject_reason``,
    failed) in bins of consecutive trial numbers;
  - ``kd_optuna_compare``: top-1 per method and seed of the last ``kd-optuna compare``
    (``kd_optuna.run.compare.last_compare``), when the study holds compare runs;

  each titled to fit a half-width dashboard card;

- the objective named ``score (lower is better)`` (``set_objective_names``, i.e. ``study.set_metric_names``);
- the study note (markdown): the task, teacher and student, the best distillers with formula
  and metrics, the classics' scores, the last compare's table and recipe, and the commands
  that export, compare and report;
- the best trial's exported script as an artifact of that trial (``kd_optuna.run.artifacts``;
  optuna's ``FileSystemArtifactStore`` in :func:`artifact_dir`: ``x.db.artifacts/`` beside
  ``sqlite:///x.db``, else ``--artifact-dir`` / ``KD_OPTUNA_ARTIFACT_DIR``), so it is
  downloadable from the trial's page of ``kd-optuna dashboard``; uploaded once per best trial,
  and when the best changes the former best's script is deleted (:func:`remove_former_scripts`),
  so the study holds exactly one script, on the current best trial.

Everything is read from the trials' user attrs (``kd_optuna.run.study_view``; names in
``kd_optuna.proxy.objective`` and ``kd_optuna.search.lineage``), defensively: a trial without lineage or metrics is drawn with what it
has. Only one process should call :func:`refresh` at a time (the optimize parent, compare),
never the workers; :class:`PeriodicRefresh` is the call for the supervising loop (every N
finished trials). :func:`build` computes the same content without writing, for the report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
from typing import Any, Mapping, Sequence

from kd_optuna import optuna_private
from kd_optuna.run.artifacts import artifact_dir, artifact_store, remove_former_scripts, upload_best_script
from kd_optuna.run.figures import compare_figure, genes_figure, lineage_figure, progress_figure, rejection_figure
from kd_optuna.run.study_view import (
    TOP, as_int, best_distinct, classic_scores, fmt, formula_of, gene_weights, key_of, outcome_of,
)
from kd_optuna.search.lineage import read_lineage
from kd_optuna.space import GENES

#: The objective's name in the dashboard.
OBJECTIVE_NAME = "score (lower is better)"

#: figure -> graph_object_id in the study (optuna-dashboard shows them on the study page).
FIGURE_IDS = {
    "progress": "kd_optuna_progress",
    "genes": "kd_optuna_genes",
    "lineage": "kd_optuna_lineage",
    "rejections": "kd_optuna_rejections",
    "compare": "kd_optuna_compare",
}

#: Metrics the trials table shows as sortable columns (numeric user attrs of every scored trial).
METRIC_COLUMNS = ("val_ce", "cka_gap", "val_acc", "sharpness_gap", "proxy_seconds")


# -- the story as data ------------------------------------------------------------------------


@dataclasses.dataclass
class Story:
    """What the note and the report say, and the figures they show."""

    study_name: str
    storage: str
    task: list[tuple[str, str]]
    counts: dict[str, int]
    best: list[dict[str, Any]]
    classics: list[dict[str, Any]]
    commands: list[tuple[str, str]]
    compare_table: str | None
    compare_formula: str | None
    weights_source: str
    figures: dict[str, Any]
    artifact: dict[str, Any] | None = None
    compare_recipe: str = "the study's [train] recipe"


def storage_url(study) -> str:
    """The study's storage URL, password masked."""
    from kd_optuna.run.storage import mask_url

    storage = optuna_private.backend(optuna_private.study_storage(study))
    engine = getattr(storage, "engine", None)
    if engine is None:
        return "(in-memory storage)"
    return mask_url(engine.url.render_as_string(hide_password=True))


def _task(config) -> list[tuple[str, str]]:
    if config is None:
        return []
    teacher = config.teacher.model + (f" (checkpoint {config.teacher.checkpoint})" if config.teacher.checkpoint
                                      else " (trained on first use, cached in .kd_optuna_cache/)")
    rows = [("dataset", f"{config.data.dataset} ({config.num_classes} classes)"),
            ("teacher", teacher), ("student", config.student.model)]
    try:
        w = config.proxy.score_weights()
        parts = [f"{getattr(w, n)} x {label}" for n, label in (("ce", "calibrated val CE"), ("sharpness", "|sharpness gap|"),
                                                                ("cka", "CKA gap")) if getattr(w, n, 0)]
        if parts:
            rows.append(("score", " + ".join(parts) + " on the proxy student (lower is better)"))
    except Exception:
        pass
    narrowed = [g for g in GENES if config.space is not None and len(config.space.options[g]) < _full_count(g)]
    if narrowed:
        rows.append(("space", "narrowed: " + ", ".join(f"{g} = {list(config.space.options[g])}" for g in narrowed)))
    return rows


def _full_count(gene: str) -> int:
    from kd_optuna.space import FULL_OPTIONS

    return len(FULL_OPTIONS[gene])


def _best_row(rank: int, trial) -> dict[str, Any]:
    attrs = trial.user_attrs
    row = {"rank": rank, "trial": trial.number, "score": trial.value, "formula": formula_of(trial)}
    row.update({name: attrs.get(name) for name in ("val_ce", "cka_gap", "val_acc", "sharpness_gap")})
    origin = read_lineage(attrs)
    proposer, parent = origin.get("proposer"), as_int(origin.get("parent"))
    row["origin"] = "" if proposer is None else str(proposer) + (f" of {parent}" if parent is not None else "")
    return row


def _compare(study, trials) -> tuple[str | None, str | None, Any, dict[str, Any] | None]:
    """The last compare's table, searched formula, figure and recipe overrides
    (:func:`kd_optuna.run.compare.last_compare`); for a study compared before that was
    recorded, every stored run, overrides unknown (None)."""
    from kd_optuna.run import compare

    last = compare.last_compare(study.user_attrs)
    runs, overrides = last if last is not None else (list(compare.recorded_runs(study.user_attrs).values()), None)
    if not runs:
        return None, None, None, None
    runs.sort(key=lambda r: (r.method != "searched", r.method, r.seed))
    summaries, gains = compare.summarise(runs)
    keys = {r.distiller for r in runs if r.method == "searched"}
    formula = None
    if keys:
        key = sorted(keys)[0]
        trial = next((t for t in trials if key_of(t) == key), None)
        formula = formula_of(trial) if trial is not None else _formula_of_key(key)
    return compare.format_table(summaries, gains), formula, compare_figure(runs, summaries), overrides


def _recipe_words(overrides: Mapping[str, Any] | None) -> str:
    """How the compare runs were trained: ``the study's [train] recipe`` and the flags that
    changed it (``with --epochs 1 --lr 0.005``); for runs without that record, the recipe
    of each run as stored."""
    if overrides is None:
        return "the [train] recipe each run was stored with"
    given = " ".join(f"--{name} {value:g}" if isinstance(value, float) else f"--{name} {value}"
                     for name, value in sorted(overrides.items()))
    return "the study's [train] recipe" + (f" with {given}" if given else "")


def _formula_of_key(key: str) -> str:
    """The formula of a distiller that ``compare --spec`` trained and no trial holds; the key
    itself where it is none that this version reads."""
    from kd_optuna.errors import InvalidSpace
    from kd_optuna.space import DistillerSpec

    try:
        return DistillerSpec.from_key(key).formula()
    except InvalidSpace:
        return key


def build(study, config=None, trials: Sequence[Any] | None = None) -> Story:
    """The story of ``study`` (figures and tables), computed and not written anywhere."""
    if config is None:
        from kd_optuna.run.storage import study_config

        try:
            config = study_config(study)
        except Exception:
            config = None
    trials = list(study.get_trials(deepcopy=False)) if trials is None else list(trials)
    counts: dict[str, int] = {"trials": len(trials)}
    for trial in trials:
        outcome = outcome_of(trial)
        outcome = "rejected" if outcome.startswith("rejected") else outcome
        counts[outcome] = counts.get(outcome, 0) + 1
    leaders = best_distinct(trials, TOP)
    classics = classic_scores(trials)
    weights, source = gene_weights(study, config, trials)
    table, compare_formula, compare_fig, compare_overrides = _compare(study, trials)
    figures = {
        "progress": progress_figure(trials, classics),
        "genes": genes_figure(trials, weights, source),
        "lineage": lineage_figure(trials),
        "rejections": rejection_figure(trials),
    }
    if compare_fig is not None:
        figures["compare"] = compare_fig
    url = storage_url(study)
    flags = f"--study-name {shlex.quote(study.study_name)} --storage {shlex.quote(url)}"
    best_number = leaders[0].number if leaders else "best"
    finished = sum(counts.get(k, 0) for k in ("completed", "rejected", "pruned"))  # what --n-trials counts
    commands = [
        ("export the best distiller to a training script", f"kd-optuna export {flags} --trial {best_number} -o train_best.py"),
        ("train it against the baselines over seeds", f"kd-optuna compare {flags} --methods searched,kd,dkd,kd+ls,dkd+ls --seeds 5"),
        ("this page as one HTML file", f"kd-optuna report {flags} -o report.html"),
        ("the shrinkage weights in force", f"kd-optuna space {flags}"),
        ("100 more trials", f"kd-optuna optimize {flags} --n-trials {finished + 100}"),
    ]
    return Story(
        study_name=study.study_name, storage=url, task=_task(config), counts=counts,
        best=[_best_row(i + 1, t) for i, t in enumerate(leaders)], classics=classics, commands=commands,
        compare_table=table, compare_formula=compare_formula, weights_source=source, figures=figures,
        compare_recipe=_recipe_words(compare_overrides),
    )


def trials_line(counts: Mapping[str, int]) -> str:
    """The study's trials by outcome (:attr:`Story.counts`), parts that add up to the total, e.g.
    ``12: 8 completed, 2 rejected by the loss check, 1 failed, 1 waiting``; pruned (without a
    rejection), running and waiting only when there are some."""
    text = (f"{counts.get('trials', 0)}: {counts.get('completed', 0)} completed, {counts.get('rejected', 0)} rejected "
            f"by the loss check, {counts.get('failed', 0)} failed")
    return text + "".join(f", {counts[k]} {k}" for k in ("pruned", "running", "waiting") if counts.get(k))


def _md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


def note_text(story: Story) -> str:
    """The study note (markdown) of ``story``."""
    lines = [f"# kd-optuna study `{story.study_name}`", ""]
    for name, value in story.task:
        lines.append(f"- **{name}**: {value}")
    lines.append(f"- **trials**: {trials_line(story.counts)}")
    lines += ["", "## Best distillers", ""]
    if story.best:
        lines += ["| # | trial | score | formula | val_ce | cka_gap | val_acc | origin |", "|---:|---:|---:|---|---:|---:|---:|---|"]
        for row in story.best:
            lines.append(f"| {row['rank']} | {row['trial']} | {fmt(row['score'], 5)} | `{_md_cell(row['formula'])}` | "
                         f"{_md_cell(row['val_ce'])} | {_md_cell(row['cka_gap'])} | {_md_cell(row['val_acc'])} | {row['origin']} |")
    else:
        lines.append("No completed trial yet.")
    if story.artifact:
        a = story.artifact
        lines += ["", f"Exported script of trial {a['trial']}: [{a['filename']}]({a['url']}) "
                      "(also under Artifacts on the trial's page)."]
    scored = [r for r in story.classics if r["trial"] is not None]
    if scored:
        best = story.best[0]["score"] if story.best else None
        lines += ["", "## Classic distillers in this study", "", "| classic | trial | score | best - classic (< 0: beaten) |",
                  "|---|---:|---:|---:|"]
        for row in scored:
            score = _md_cell(row["score"]) if row["score"] is not None else row["outcome"]
            gap = f"{best - row['score']:+.4g}" if best is not None and row["score"] is not None else ""
            lines.append(f"| {row['name']} | {row['trial']} | {score} | {gap} |")
    if story.compare_table:
        lines += ["", "## kd-optuna compare", ""]
        if story.compare_formula:
            lines += [f"searched distiller: `{story.compare_formula}`", ""]
        lines += [story.compare_table, "",
                  f"Each run: {story.compare_recipe}, one seed, the same for every method."]
    lines += ["", "## Commands", ""]
    for what, command in story.commands:
        lines += [f"{what}:", "", f"    {command}", ""]
    lines += [f"Figures on the study's main page: best so far against the classics, score by option with the "
              f"{story.weights_source}, the lineage of the best, the outcome of the trials"
              + (", the compare runs" if "compare" in story.figures else "") + ". "
              f"Sort the trials table by the {', '.join(METRIC_COLUMNS[:3])} columns.", ""]
    return "\n".join(lines)


# -- writing it into the study ----------------------------------------------------------------


def name_objective(study) -> None:
    """The dashboard calls the objective :data:`OBJECTIVE_NAME` instead of "Objective 0".

    ``study.set_metric_names`` is what optuna-dashboard's ``set_objective_names`` calls (that
    function is deprecated in 0.21); the dashboard reads the names from it.
    """
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([OBJECTIVE_NAME])


def write_note(study, config=None, story: Story | None = None) -> str:
    """Save the study note (with the compare table when the study holds runs); return it."""
    from kd_optuna.run.dashboard_writers import save_note

    story = build(study, config) if story is None else story
    if story.artifact is None:
        story.artifact = _recorded_artifact(study)
    text = note_text(story)
    save_note(study, text)
    return text


_ARTIFACT_ATTR = "kd_optuna:story:best_script"


def _recorded_artifact(study) -> dict[str, Any] | None:
    value = optuna_private.study_system_attrs(study).get(_ARTIFACT_ATTR)
    return dict(value) if isinstance(value, Mapping) else None


@dataclasses.dataclass(frozen=True)
class Refreshed:
    figures: tuple[str, ...]
    artifact: dict[str, Any] | None
    note: str


def refresh(study, config=None, *, artifact_dir_path: str | os.PathLike | None = None) -> Refreshed:
    """Write the study's story into it: figures, objective name, note, best script artifact.

    Call it from one process (the parent of the workers, every N trials and at the end), not
    from the workers. ``artifact_dir_path`` overrides :func:`artifact_dir`; a storage without
    one (PostgreSQL without ``KD_OPTUNA_ARTIFACT_DIR``) gets no artifact.
    """
    from kd_optuna.run.dashboard_writers import save_plotly_graph_object

    story = build(study, config)
    if config is None:
        from kd_optuna.run.storage import study_config

        try:
            config = study_config(study)
        except Exception:
            config = None
    name_objective(study)
    saved = []
    for name, figure in story.figures.items():
        saved.append(save_plotly_graph_object(study, figure, graph_object_id=FIGURE_IDS[name]))
    store = artifact_store(artifact_dir(study, artifact_dir_path), create=True)
    artifact = None
    if store is not None:
        from kd_optuna.errors import KdOptunaError

        try:
            artifact = upload_best_script(study, config, store)
        except KdOptunaError as error:  # an export that cannot be written: say so in the note
            artifact = None
            story.commands.insert(0, ("the best script could not be exported", str(error)))
            remove_former_scripts(study, store)  # a former best's script is not the best's
            optuna_private.set_study_system_attr(study, _ARTIFACT_ATTR, None)
        if artifact is not None:
            optuna_private.set_study_system_attr(study, _ARTIFACT_ATTR, artifact)
    story.artifact = artifact or _recorded_artifact(study)
    note = write_note(study, config, story)
    return Refreshed(tuple(saved), artifact, note)


#: Default of :class:`PeriodicRefresh`: refresh once this many more trials have finished.
REFRESH_EVERY = 20


class PeriodicRefresh:
    """:func:`refresh` as the search goes, for the loop of the process that supervises workers.

    Call the instance on each turn of the loop: at most every ``check_s`` seconds it counts
    the study's finished trials, and when ``every`` more have finished since the last refresh
    it refreshes (one process, so figures and note never race between workers). A failing
    refresh is reported once through ``on_error(message)`` and never raised: the story is a
    view of the study, the search goes on. Returns whether it refreshed.
    """

    def __init__(self, study, config=None, every: int = REFRESH_EVERY, check_s: float = 10.0, on_error=None):
        if every < 1:
            raise ValueError("every must be at least 1")
        self.study, self.config, self.every, self.check_s, self.on_error = study, config, every, check_s, on_error
        self._done = self._finished()
        self._checked = -math.inf
        self._reported = False

    def _finished(self) -> int:
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return len(self.study.get_trials(deepcopy=False, states=states))

    def __call__(self) -> bool:
        import time

        now = time.monotonic()
        if now - self._checked < self.check_s:
            return False
        self._checked = now
        try:
            finished = self._finished()
            if finished < self._done + self.every:
                return False
            refresh(self.study, self.config)
            self._done = finished
            return True
        except Exception as exc:  # noqa: BLE001 - a view of the study must not stop the search
            if self.on_error is not None and not self._reported:
                self._reported = True
                self.on_error(f"the dashboard story was not refreshed: {exc.__class__.__name__}: {exc}")
            return False


# -- one trial's dashboard note -------------------------------------------------------------


def trial_note(trial, state, value: float | None) -> str:
    """Markdown note for the dashboard: formula, score or rejection, metrics, lineage."""
    attrs = trial.user_attrs
    lines = [f"### Trial {trial.number}: {state.name.lower()}", ""]
    if "formula" in attrs:
        lines += [f"`{attrs['formula']}`", ""]
    if value is not None:
        lines.append(f"- score: {value:.6g}")
    seeds, scores = attrs.get("proxy_seeds"), attrs.get("seed_scores")
    if isinstance(seeds, list) and isinstance(scores, list) and len(scores) == len(seeds) > 1:
        each = ", ".join(f"{seed}: {score:.4g}" for seed, score in zip(seeds, scores))
        lines.append(f"- the mean over proxy seeds {each}")
    attrs = {**attrs, **read_lineage(trial)}
    for key in ("reject_reason", "val_ce", "val_acc", "sharpness_gap", "cka_gap", "proxy_seconds", "proposer", "parent", "spec"):
        if key in attrs:
            shown = f"{attrs[key]:.6g}" if isinstance(attrs[key], float) else str(attrs[key])
            lines.append(f"- {key}: {shown}")
    lines += [f"- canonical form: {note}" for note in canonical_notes(trial.params)]
    return "\n".join(lines) + "\n"


def canonical_notes(params: Mapping[str, Any]) -> list[str]:
    """``DistillerSpec.canonical_notes()`` of a trial's params: why a transform or a T/lambda
    pair shown in the params is not what the canonical spec computes ([] for other params)."""
    from kd_optuna.space import DistillerSpec

    try:
        return DistillerSpec.from_params(params).canonical_notes()
    except Exception:  # not a distiller's params (a user's own study), or an invalid one
        return []
