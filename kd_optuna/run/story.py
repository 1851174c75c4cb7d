"""What the study shows a person: figures, the study note and the best script, in optuna-dashboard.

A user who comes back to a study wants to see, without writing code, how the best score moved
against the classic distillers', which options of each gene the search favours and which it
shrank away, the family tree of the best distillers, why trials were rejected, and what
``kd-optuna compare`` measured. :func:`refresh` writes all of it into the study:

- figures (``optuna_dashboard.save_plotly_graph_object``, ids in :data:`FIGURE_IDS`), shown
  on the study's page of optuna-dashboard:

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
  - ``kd_optuna_compare``: top-1 per method and seed, when the study holds compare runs;

  each titled to fit a half-width dashboard card (:func:`_title`);

- the objective named ``score (lower is better)`` (``set_objective_names``, i.e. ``study.set_metric_names``);
- the study note (markdown): the task, teacher and student, the best distillers with formula
  and metrics, the classics' scores, the compare table when there are runs, and the commands
  that export, compare and report;
- the best trial's exported script as an artifact of that trial (optuna's
  ``FileSystemArtifactStore`` in :func:`artifact_dir`: ``x.db.artifacts/`` beside
  ``sqlite:///x.db``, else ``--artifact-dir`` / ``KD_OPTUNA_ARTIFACT_DIR``), so it is
  downloadable from the trial's page of ``kd-optuna dashboard``; uploaded once per best trial,
  and when the best changes the former best's script is deleted (:func:`remove_former_scripts`),
  so the study holds exactly one script, on the current best trial.

Everything is read from the trials' user attrs (names in ``kd_optuna.proxy.objective`` and
``kd_optuna.search.sampler``), defensively: a trial without lineage or metrics is drawn with what it
has. Only one process should call :func:`refresh` at a time (the optimize parent, compare),
never the workers; :class:`PeriodicRefresh` is the call for the supervising loop (every N
finished trials). :func:`build` computes the same content without writing, for the report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from kd_optuna import optuna_private
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

#: Where the artifact directory comes from when no storage-side default applies.
ARTIFACT_DIR_ENV = "KD_OPTUNA_ARTIFACT_DIR"

#: Filename of the exported script stored as trial ``n``'s artifact.
SCRIPT_NAME = "train_trial{number}.py"

_TOP = 5
_LINEAGE_TOP = 6
_LINEAGE_MAX_NODES = 80
_PALETTE = {
    "classic": "#1f77b4", "warm_start": "#17becf", "random": "#7f7f7f", "mutation": "#2ca02c",
    "crossover": "#ff7f0e", "llm": "#9467bd",
}


# -- reading trials ---------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _fmt(value: Any, digits: int = 4) -> str:
    number = _number(value)
    if number is None:
        return "" if value is None else str(value)
    if math.isnan(number):
        return "nan"
    return f"{number:.{digits}g}"


def _scored(trial) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE and _number(trial.value) is not None and math.isfinite(trial.value)


def _key(trial) -> str | None:
    key = trial.user_attrs.get("spec")
    if isinstance(key, str):
        return key
    try:
        from kd_optuna.space import DistillerSpec

        return DistillerSpec.from_params(trial.params).key
    except Exception:  # a trial without the genes
        return None


def _formula(trial) -> str:
    formula = trial.user_attrs.get("formula")
    if isinstance(formula, str):
        return formula
    try:
        from kd_optuna.space import DistillerSpec

        return DistillerSpec.from_params(trial.params).formula()
    except Exception:  # a study of other params: show them
        return ", ".join(f"{name}={value}" for name, value in trial.params.items())


def _mutated(trial) -> list[str]:
    value = read_lineage(trial).get("mutated")
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return []


def _outcome(trial) -> str:
    """completed, the reject reason, pruned, failed, running or waiting."""
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        return "completed"
    if trial.state == TrialState.PRUNED:
        reason = trial.user_attrs.get("reject_reason")
        return f"rejected: {reason}" if isinstance(reason, str) and reason else "pruned"
    if trial.state == TrialState.FAIL:
        return "failed"
    return trial.state.name.lower()


def best_distinct(trials: Sequence[Any], n: int = _TOP) -> list[Any]:
    """The ``n`` best scored trials with distinct canonical keys, best first."""
    chosen, keys = [], set()
    for trial in sorted((t for t in trials if _scored(t)), key=lambda t: (t.value, t.number)):
        key = _key(trial)
        if key is not None and key in keys:
            continue
        keys.add(key)
        chosen.append(trial)
        if len(chosen) == n:
            break
    return chosen


def classic_scores(trials: Sequence[Any]) -> list[dict[str, Any]]:
    """Per classic distiller: its trial (the first whose spec is the classic's key), state, score."""
    from kd_optuna.distill.classics import CLASSICS

    by_key: dict[str, Any] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        key = _key(trial)
        if key is None:
            continue
        held = by_key.get(key)
        if held is None or (not _scored(held) and _scored(trial)):
            by_key[key] = trial
    rows = []
    for name, (spec, _description) in CLASSICS.items():
        trial = by_key.get(spec.key)
        rows.append({
            "name": name,
            "formula": spec.formula(),
            "trial": None if trial is None else trial.number,
            "outcome": "not tried" if trial is None else _outcome(trial),
            "score": trial.value if trial is not None and _scored(trial) else None,
        })
    return rows


def latest_space_state(trials: Sequence[Any]) -> Mapping[str, Any] | None:
    """The ``space_state`` lineage attr of the highest-numbered trial that has one."""
    for trial in sorted(trials, key=lambda t: t.number, reverse=True):
        state = read_lineage(trial).get("space_state")
        if isinstance(state, Mapping):
            return state
    return None


def gene_weights(study, config, trials: Sequence[Any]) -> tuple[dict[str, dict[Any, float]], str]:
    """(gene -> option -> weight in force, where the weights come from).

    The sampler's ``space_weights`` (a pure function of the trial list, as ``kd-optuna space``
    shows them); where that cannot be computed, every option of the config's space at 1 except
    those the latest ``space_state`` dropped, at 0.
    """
    options = {gene: list(config.space.options[gene]) for gene in GENES} if config is not None else {}
    state = latest_space_state(trials)
    basis = f" (after {state.get('basis')} evaluated trials)" if state and "basis" in state else ""
    if config is not None:
        try:
            weights = config.make_sampler(with_llm=False).space_weights(study)
            return {g: dict(weights.get(g, {})) for g in GENES}, "shrinkage weights in force" + basis
        except Exception:  # the sampler's API moved: fall back on the recorded state
            pass
    dropped = state.get("dropped", {}) if state else {}
    weights = {}
    for gene in GENES:
        gone = dropped.get(gene, []) if isinstance(dropped, Mapping) else []
        if gene not in options:
            options[gene] = sorted({t.params[gene] for t in trials if gene in t.params}, key=str)
        weights[gene] = {o: (0.0 if o in gone or str(o) in map(str, gone) else 1.0) for o in options[gene]}
    return weights, ("dropped options of the latest space_state at 0" if state else "no shrinkage yet") + basis


# -- figures ----------------------------------------------------------------------------------


#: A figure's title and subtitle lines fit a half-width dashboard card (about 450 px wide):
#: the title at most this many characters, each small subtitle line at most :data:`_SUB_CHARS`.
_TITLE_CHARS = 42
_SUB_CHARS = 60


def _wrap(text: str, width: int = _SUB_CHARS) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken after "; " or ", " where it
    can (so "sp (rejected: not_decreasing)" stays on one line), else between words."""
    import re

    lines: list[str] = []
    for piece in re.split(r"(?<=[;,]) ", text):
        words = piece.split(" ") if len(piece) > width else [piece]
        for word in words:
            if lines and len(lines[-1]) + 1 + len(word) <= width:
                lines[-1] += " " + word
            else:
                lines.append(word)
    return lines


def _title(text: str, *notes: str, gap: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """(plotly title of ``text``, the annotation with ``notes`` in small wrapped lines under it,
    the top margin in px that holds both and ``gap`` px more between them and the plot).

    The title sits below the mode bar (which covers the figure's top right corner); the notes
    are an annotation (named "subtitle") so their lines are spaced by their own size; it is
    shifted left to the title's edge from the plot's, which is 60 px in (the figures' margin).
    """
    lines = [line for note in notes if note for line in _wrap(note)]
    title = {"text": text, "x": 0.02, "xanchor": "left", "xref": "container", "y": 1, "yanchor": "top",
             "yref": "container", "pad": {"t": 30}, "font": {"size": 16}}
    top = 30 + 24 + 14 * len(lines) + gap + 8
    subtitle = [{"text": "<br>".join(lines), "name": "subtitle", "xref": "paper", "yref": "paper", "x": 0, "y": 1,
                 "xanchor": "left", "yanchor": "bottom", "xshift": -50, "yshift": gap + 4, "align": "left", "showarrow": False,
                 "font": {"size": 11, "color": "#555555"}}] if lines else []
    return title, subtitle, top


def progress_figure(trials: Sequence[Any], classics: Sequence[Mapping[str, Any]] | None = None):
    """Best score so far against the classic distillers' scores.

    The y range spans the completed scores (up to their 90th percentile when a few diverging
    ones would flatten the rest, :func:`_focus`) and every best-so-far value; a classic whose
    score lies outside it keeps its legend entry and gets an "off scale" note in the plot.
    """
    import plotly.graph_objects as go

    classics = classic_scores(trials) if classics is None else classics
    scored = sorted((t for t in trials if _scored(t)), key=lambda t: t.number)
    figure = go.Figure()
    numbers = [t.number for t in scored]
    best, running = [], math.inf
    for trial in scored:
        running = min(running, trial.value)
        best.append(running)
    figure.add_trace(go.Scatter(
        x=numbers, y=[t.value for t in scored], mode="markers", name="trial score",
        marker={"color": "#bbbbbb", "size": 6}, text=[_formula(t) for t in scored],
        hovertemplate="trial %{x}<br>score %{y:.4g}<br>%{text}<extra></extra>",
    ))
    figure.add_trace(go.Scatter(
        x=numbers, y=best, mode="lines", name="best so far", line={"shape": "hv", "width": 3, "color": "#d62728"},
        hovertemplate="after trial %{x}: best %{y:.4g}<extra></extra>",
    ))
    last = max((t.number for t in trials), default=0)
    dashes = ["dash", "dot", "dashdot", "longdash", "longdashdot"]
    unscored, drawn = [], []
    for i, row in enumerate(classics):
        if row["score"] is None:
            if row["trial"] is not None:
                unscored.append(f"{row['name']} ({row['outcome']})")
            continue
        label = "vanilla KD" if row["name"] == "kd" else row["name"]
        drawn.append((label, row["score"]))
        figure.add_trace(go.Scatter(
            x=[0, last], y=[row["score"], row["score"]], mode="lines",
            name=f"{label} (trial {row['trial']}): {row['score']:.4g}",
            line={"dash": dashes[i % len(dashes)], "width": 3 if row["name"] == "kd" else 1.5},
            hovertemplate=f"{label}, trial {row['trial']}: %{{y:.4g}}<br>{row['formula']}<extra></extra>",
        ))
    focus, above = _focus([t.value for t in scored], best)
    off = [(label, score) for label, score in drawn if focus and not focus[0] <= score <= focus[1]]
    notes = ["lower is better; lines: the classic distillers"]
    if unscored:
        notes.append("not scored: " + ", ".join(unscored))
    if above:
        notes.append(f"{above} high score{'s' if above > 1 else ''} above the range")
    title, annotations, top = _title("Best score so far vs the classics", *notes)
    if off:
        annotations.append({
            "text": "<br>".join(f"{'↑' if score > focus[1] else '↓'} {label} {_fmt(score, 3)} (off scale)"
                                for label, score in off),
            "name": "off scale", "xref": "paper", "yref": "paper", "x": 0.99, "y": 0.98, "xanchor": "right",
            "yanchor": "top", "showarrow": False, "align": "right", "font": {"size": 10, "color": "#444444"},
            "bgcolor": "rgba(255,255,255,0.85)"})
    figure.update_layout(title=title, annotations=annotations, xaxis_title="trial", yaxis_title="score",
                         template="plotly_white", legend={"font": {"size": 10}}, yaxis={"range": focus} if focus else {},
                         margin={"t": top, "r": 10, "l": 60, "b": 50})
    return figure


def _spread(values: Sequence[float], keep: Sequence[float] = ()) -> tuple[float, float, float] | None:
    """(low, high, margin) of the scores in view, or None with fewer than 5 scores.

    They span every value of ``keep`` and the scores up to their 90th percentile; a few
    diverging trials (a score of 1,000 beside 3) would otherwise flatten the rest.
    """
    finite = sorted(v for v in values if math.isfinite(v))
    keep = [v for v in keep if v is not None and math.isfinite(v)]
    if len(finite) < 5:
        return None
    low = min(finite + keep)
    high = max([finite[int(0.9 * (len(finite) - 1))]] + keep)
    pad = 0.08 * (high - low) if high > low else 0.05 * abs(high) or 0.05
    return low, high, pad


def _focus(values: Sequence[float], keep: Sequence[float] = ()) -> tuple[list[float] | None, int]:
    """(a y range that leaves out outlying high scores, how many it leaves out), or (None, 0)
    when none is left out (plotly's own range then shows everything). See :func:`_spread`."""
    spread = _spread(values, keep)
    if spread is None:
        return None, 0
    low, high, pad = spread
    above = sum(1 for v in values if math.isfinite(v) and v > high + pad)
    if not above:
        return None, 0
    return [low - pad, high + pad], above


def _quantile(ordered: Sequence[float], p: float) -> float:
    """plotly.js's box quartiles (``quartilemethod="linear"``: position p * n - 0.5)."""
    at = p * len(ordered) - 0.5
    if at < 0:
        return ordered[0]
    if at > len(ordered) - 1:
        return ordered[-1]
    frac = at % 1
    return frac * ordered[math.ceil(at)] + (1 - frac) * ordered[math.floor(at)]


def _box_top(values: Sequence[float]) -> float:
    """Where plotly draws the top of a box of ``values``: the end of its upper whisker (the
    largest value within 1.5 IQR above the third quartile, at least the third quartile)."""
    ordered = sorted(values)
    q1, q3 = _quantile(ordered, 0.25), _quantile(ordered, 0.75)
    return max([q3] + [v for v in ordered if v <= q3 + 1.5 * (q3 - q1)])


def _gene_view(values: Mapping[str, Sequence[float]], spread: tuple[float, float, float] | None
               ) -> tuple[list[float] | None, list[dict[str, Any]]]:
    """(y range, annotations) of one gene's scores by option (``values``: option -> scores, in
    the order of the x axis).

    None when no score is out of view (plotly's range shows everything). Else the range of
    :func:`_spread`, raised to hold every option's whole box (whiskers included) as long as
    that stays within three times the spread; an option with scores above the range gets a
    "▲ k" label at the top of its column, inside the plot (hover: how many, the highest).
    """
    if spread is None:
        return None, []
    low, high, pad = spread
    cap = high + 2 * (high - low)
    tops = [_box_top(v) for v in values.values() if v]
    top = max([high] + [t for t in tops if t <= cap])
    if top == high and not any(v > high + pad for vs in values.values() for v in vs):
        return None, []
    view = [low - pad, top + pad]
    notes = []
    for index, (option, scores) in enumerate(values.items()):
        out = sorted(v for v in scores if v > view[1])
        if out:  # x: the category's index (a category named "16" would be read as the number)
            notes.append({"text": f"▲ {len(out)}", "name": f"above: {option}", "x": index, "xref": "x", "y": 1,
                          "yref": "paper", "yanchor": "top", "yshift": -6, "showarrow": False,
                          "font": {"size": 10, "color": "#d62728"},
                          "bgcolor": "rgba(255,255,255,0.85)",
                          "hovertext": f"{option}: {len(out)} score{'s' if len(out) > 1 else ''} above the range "
                                       f"(drawn at its top), highest {_fmt(out[-1])}"})
    return view, notes


def genes_figure(trials: Sequence[Any], weights: Mapping[str, Mapping[Any, float]], source: str = ""):
    """Per gene (a menu picks the gene): completed scores by option (box and points) and the
    option's shrinkage weight (bars, right axis); opens on the most shrunk gene. Each gene has
    its own y range (:func:`_gene_view`): every box in view; scores above it are drawn at its
    top edge (hover: the score), counted by a "▲ k" label over the option."""
    import plotly.graph_objects as go

    scored = [t for t in trials if _scored(t)]
    rejected = [t for t in trials if _outcome(t).startswith("rejected")]
    spread = _spread([t.value for t in scored])
    figure = go.Figure()
    genes, categories, views = [], [], []
    for gene in GENES:
        labels, view = _add_gene_traces(figure, gene, weights.get(gene, {}), scored, rejected, spread)
        if labels:
            genes.append(gene)
            categories.append(labels)
            views.append(view)
    if not genes:
        return figure

    def shrunk(gene: str) -> float:
        ws = list(weights.get(gene, {}).values())
        return sum(ws) / len(ws) if ws else 1.0

    first = min(range(len(genes)), key=lambda i: (shrunk(genes[i]), i))
    notes = ["points: completed trials' scores; bars (right axis): " + (source or "the weights")]
    if any(labels for _, labels in views):
        notes.append("▲ k: k scores above the range, drawn at its top")
    titles = [_title(f"Score by option of {gene}", *notes, gap=34) for gene in genes]
    for j, trace in enumerate(figure.data):
        trace.visible = j // 2 == first
        trace.showlegend = j // 2 == first
    buttons = []
    for i, gene in enumerate(genes):
        shown = [j // 2 == i for j in range(len(figure.data))]
        view, labels = views[i]
        buttons.append({"label": gene, "method": "update", "args": [
            {"visible": shown, "showlegend": shown},
            {"xaxis.categoryarray": categories[i], "title.text": titles[i][0]["text"], "yaxis.range": view,
             "yaxis.autorange": view is None, "annotations": titles[i][1] + labels}]})
    view, labels = views[first]
    title, subtitle, top = titles[first]
    figure.update_layout(
        title=title, annotations=subtitle + labels, template="plotly_white", boxmode="overlay",
        xaxis={"type": "category", "categoryorder": "array", "categoryarray": categories[first], "tickfont": {"size": 9}},
        yaxis={"title": "score", **({"range": view} if view else {})},
        yaxis2={"title": "weight", "overlaying": "y", "side": "right", "range": [0, 1.05], "showgrid": False,
                "tickvals": [0, 0.25, 0.5, 0.75, 1]},
        updatemenus=[{"buttons": buttons, "active": first, "direction": "down", "x": 0, "xanchor": "left",
                      "y": 1.0, "yanchor": "bottom", "pad": {"b": 4}}],
        legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.0, "yanchor": "bottom", "font": {"size": 10}},
        margin={"t": top, "r": 50, "l": 60, "b": 50},
    )
    return figure


def _add_gene_traces(figure, gene: str, weights: Mapping[Any, float], scored: Sequence[Any],
                     rejected: Sequence[Any], spread: tuple[float, float, float] | None = None
                     ) -> tuple[list[str], tuple[list[float] | None, list[dict[str, Any]]]]:
    """Add ``gene``'s two traces to ``figure``: its options' shrinkage ``weights`` (bars, right
    axis, 1 for an option without one, hover: completed and rejected trials with the option) and
    the ``scored`` trials' scores by option (box and points, a score above the gene's y range
    drawn at its top, hover: the score); return (the option labels, in order: the weighted
    options, then the others trials used, sorted; the gene's :func:`_gene_view`), or
    ([], (None, [])) and add nothing if there are no options."""
    import plotly.graph_objects as go

    options = list(weights)
    seen = {str(o) for o in options}
    options += sorted({t.params[gene] for t in scored + rejected
                       if gene in t.params and str(t.params[gene]) not in seen}, key=str)
    if not options:
        return [], (None, [])
    labels = [str(o) for o in options]
    counts = {o: sum(1 for t in scored if str(t.params.get(gene)) == o) for o in labels}
    rejects = {o: sum(1 for t in rejected if str(t.params.get(gene)) == o) for o in labels}
    values = [(str(t.params[gene]), t.value) for t in scored if gene in t.params]
    by_option: dict[str, list[float]] = {o: [] for o in labels}
    for option, value in values:
        by_option.setdefault(option, []).append(value)
    view, notes = _gene_view(by_option, spread)
    figure.add_trace(go.Bar(
        x=labels, y=[weights.get(o, 1.0) for o in options], name="shrinkage weight", meta=gene,
        marker={"color": "#1f77b4"}, opacity=0.3, yaxis="y2", legendgroup="weight",
        customdata=[[counts[o], rejects[o]] for o in labels],
        hovertemplate="%{x}: weight %{y:.2f}<br>%{customdata[0]} completed, %{customdata[1]} rejected<extra></extra>",
    ))
    edge = view[1] if view else math.inf
    figure.add_trace(go.Box(
        x=[o for o, _ in values], y=[min(v, edge) for _, v in values], customdata=[v for _, v in values], name="score",
        meta=gene, boxpoints="all", jitter=0.3, pointpos=0, marker={"color": "#d62728", "size": 5}, line={"width": 1},
        legendgroup="score", hovertemplate="%{x}: %{customdata:.4g}<extra></extra>",
    ))
    return labels, (view, notes)


def _rho_text(trial) -> str:
    contest = read_lineage(trial).get("predictor")
    if not isinstance(contest, Mapping):
        return ""
    rho = contest.get("rho")
    parts = [f"{name} {_fmt(value)}" for name, value in rho.items()] if isinstance(rho, Mapping) else []
    return f"rho's contest: {contest.get('winner', '?')} won" + (f" ({', '.join(parts)})" if parts else "")


def lineage(trials: Sequence[Any], top: int = _LINEAGE_TOP, max_nodes: int = _LINEAGE_MAX_NODES) -> tuple[list[Any], list[Any]]:
    """(top distillers, every trial of their family tree: them and their ancestors)."""
    by_number = {t.number: t for t in trials}
    leaders = best_distinct(trials, top)
    family: dict[int, Any] = {}
    queue = [t.number for t in leaders]
    while queue and len(family) < max_nodes:
        number = queue.pop(0)
        if number in family or number not in by_number:
            continue
        trial = by_number[number]
        family[number] = trial
        origin = read_lineage(trial)
        for attr in ("parent", "crossover_parent"):
            parent = _int(origin.get(attr))
            if parent is not None and parent not in family and parent != number:
                queue.append(parent)
    return leaders, sorted(family.values(), key=lambda t: t.number)


def lineage_figure(trials: Sequence[Any], top: int = _LINEAGE_TOP):
    """The family tree of the top distillers at (trial number, score)."""
    import plotly.graph_objects as go

    leaders, family = lineage(trials, top)
    rank = {t.number: i + 1 for i, t in enumerate(leaders)}
    where = {t.number: (t.number, t.value if _scored(t) else None) for t in family}
    origins = {t.number: read_lineage(t) for t in family}
    figure = go.Figure()
    for attr, name, dash in (("parent", "parent → child", "solid"), ("crossover_parent", "crossover's second parent", "dot")):
        xs, ys, mid_x, mid_y, mid_text = [], [], [], [], []
        for trial in family:
            parent = _int(origins[trial.number].get(attr))
            if parent not in where or where[parent][1] is None or where[trial.number][1] is None:
                continue
            (x0, y0), (x1, y1) = where[parent], where[trial.number]
            xs += [x0, x1, None]
            ys += [y0, y1, None]
            if attr == "parent" and _mutated(trial):
                mid_x.append((x0 + x1) / 2)
                mid_y.append((y0 + y1) / 2)
                mid_text.append(", ".join(_mutated(trial)))
        if xs:
            figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=name, hoverinfo="skip",
                                        line={"color": "#888888", "dash": dash, "width": 1.5}))
        if mid_text:  # hover text on a small mark mid-edge: a printed label would cover close nodes
            figure.add_trace(go.Scatter(x=mid_x, y=mid_y, mode="markers", text=mid_text, name="mutated genes",
                                        marker={"symbol": "diamond", "size": 6, "color": "#999999"},
                                        hovertemplate="mutated: %{text}<extra></extra>"))
    proposer_of = {t.number: str(origins[t.number].get("proposer", "unknown")) for t in family}
    below = _rank_label_positions(leaders, family)
    for proposer in sorted(set(proposer_of.values())):
        members = [t for t in family if proposer_of[t.number] == proposer and _scored(t)]
        if not members:
            continue
        hover = []
        for t in members:
            lines = [f"trial {t.number} ({proposer})" + (f", #{rank[t.number]} best" if t.number in rank else ""),
                     f"score {_fmt(t.value)}", _formula(t)]
            parent = _int(origins[t.number].get("parent"))
            second = origins[t.number].get("crossover_parent")
            if parent is not None:
                lines.append(f"parent {parent}" + (f", crossover with {second}" if second is not None else ""))
            if _mutated(t):
                lines.append("mutated: " + ", ".join(_mutated(t)))
            if _rho_text(t):
                lines.append(_rho_text(t))
            hover.append("<br>".join(lines))
        figure.add_trace(go.Scatter(
            x=[t.number for t in members], y=[t.value for t in members], mode="markers+text", name=proposer,
            text=[f"#{rank[t.number]}" if t.number in rank else "" for t in members],
            textposition=[below.get(t.number, "top center") for t in members], textfont={"size": 10},
            marker={"size": [16 if t.number in rank else 9 for t in members], "color": _PALETTE.get(proposer, "#8c564b"),
                    "line": {"width": [2 if t.number in rank else 0 for t in members], "color": "#000000"}},
            hovertext=hover, hoverinfo="text",
        ))
    title, annotations, top = _title(f"Lineage of the {len(leaders)} best distillers",
                                     "#rank of the best; line: parent to child; dotted: crossover's second parent; "
                                     "hover a node for its trial, a ◆ mid-edge for the mutated genes")
    figure.update_layout(title=title, annotations=annotations, xaxis_title="trial", yaxis_title="score",
                         template="plotly_white", legend={"font": {"size": 10}}, margin={"t": top, "r": 10, "l": 60, "b": 50})
    return figure


def _rank_label_positions(leaders: Sequence[Any], family: Sequence[Any]) -> dict[int, str]:
    """trial number -> "bottom center" for each leader whose "#rank" label, above its node,
    would touch the label of a leader close by (within 8% of the x and 8% of the y span)
    that is already above its own; the others stay "top center"."""
    xs = [t.number for t in family]
    ys = [t.value for t in family if _scored(t)]
    dx = 0.08 * max(1, max(xs, default=0) - min(xs, default=0))
    dy = 0.08 * ((max(ys) - min(ys)) if len(ys) > 1 and max(ys) > min(ys) else 1.0)
    above: list[Any] = []
    positions = {}
    for trial in sorted(leaders, key=lambda t: t.number):
        if any(abs(trial.number - o.number) <= dx and abs(trial.value - o.value) <= dy for o in above):
            positions[trial.number] = "bottom center"
        else:
            above.append(trial)
    return positions


def rejection_figure(trials: Sequence[Any], bins: int = 25):
    """Trials per outcome (completed, each rejection reason, failed) over the trial numbers."""
    import plotly.graph_objects as go

    ordered = sorted(trials, key=lambda t: t.number)
    width = max(1, math.ceil(len(ordered) / bins))
    starts = sorted({t.number // width * width for t in ordered})
    outcomes = sorted({_outcome(t) for t in ordered}, key=lambda o: (o != "completed", o))
    figure = go.Figure()
    colours = {"completed": "#2ca02c", "failed": "#000000", "running": "#cccccc", "waiting": "#eeeeee"}
    for outcome in outcomes:
        counts = [sum(1 for t in ordered if t.number // width * width == s and _outcome(t) == outcome) for s in starts]
        labels = [f"{s}-{s + width - 1}" if width > 1 else str(s) for s in starts]
        figure.add_trace(go.Bar(x=labels, y=counts, name=f"{outcome} ({sum(counts)})",
                                marker={"color": colours[outcome]} if outcome in colours else {},
                                hovertemplate=f"trials %{{x}}: %{{y}} {outcome}<extra></extra>"))
    rejected = sum(1 for t in ordered if _outcome(t).startswith("rejected"))
    title, annotations, top = _title("Outcome of the trials",
                                     f"{rejected} of {len(ordered)} rejected by the loss check before training")
    figure.update_layout(barmode="stack", template="plotly_white", xaxis_title="trials", yaxis_title="trials",
                         xaxis={"type": "category"}, title=title, annotations=annotations, legend={"font": {"size": 10}},
                         margin={"t": top, "r": 10, "l": 60, "b": 50})
    return figure


def compare_figure(runs: Sequence[Any], summaries: Sequence[Any]):
    """kd-optuna compare's runs: last-epoch test top-1 per method, each point a seed."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for s in summaries:
        figure.add_trace(go.Box(y=[r.top1 for r in runs if r.method == s.method], name=s.method,
                                boxpoints="all", jitter=0.3))
    title, annotations, top = _title("kd-optuna compare: top-1 per method", "test top-1 at the last epoch; each point a seed")
    figure.update_layout(title=title, annotations=annotations, yaxis_title="top-1 (%)", template="plotly_white",
                         margin={"t": top, "r": 10, "l": 60, "b": 50})
    return figure


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
    row = {"rank": rank, "trial": trial.number, "score": trial.value, "formula": _formula(trial)}
    row.update({name: attrs.get(name) for name in ("val_ce", "cka_gap", "val_acc", "sharpness_gap")})
    origin = read_lineage(attrs)
    proposer, parent = origin.get("proposer"), _int(origin.get("parent"))
    row["origin"] = "" if proposer is None else str(proposer) + (f" of {parent}" if parent is not None else "")
    return row


def _compare(study, trials) -> tuple[str | None, str | None, Any]:
    from kd_optuna.run import compare

    runs = list(compare.recorded_runs(study.user_attrs).values())
    if not runs:
        return None, None, None
    runs.sort(key=lambda r: (r.method != "searched", r.method, r.seed))
    summaries, gains = compare.summarise(runs)
    keys = {r.distiller for r in runs if r.method == "searched"}
    formula = None
    if keys:
        key = sorted(keys)[0]
        trial = next((t for t in trials if _key(t) == key), None)
        formula = _formula(trial) if trial is not None else key
    return compare.format_table(summaries, gains), formula, compare_figure(runs, summaries)


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
        outcome = _outcome(trial)
        outcome = "rejected" if outcome.startswith("rejected") else outcome
        counts[outcome] = counts.get(outcome, 0) + 1
    leaders = best_distinct(trials, _TOP)
    classics = classic_scores(trials)
    weights, source = gene_weights(study, config, trials)
    table, compare_formula, compare_fig = _compare(study, trials)
    figures = {
        "progress": progress_figure(trials, classics),
        "genes": genes_figure(trials, weights, source),
        "lineage": lineage_figure(trials),
        "rejections": rejection_figure(trials),
    }
    if compare_fig is not None:
        figures["compare"] = compare_fig
    url = storage_url(study)
    flags = f"--study-name {study.study_name} --storage {url}"
    best_number = leaders[0].number if leaders else "best"
    commands = [
        ("export the best distiller to a training script", f"kd-optuna export {flags} --trial {best_number} -o train_best.py"),
        ("train it against the baselines over seeds", f"kd-optuna compare {flags} --methods searched,kd,dkd,kd+ls,dkd+ls --seeds 5"),
        ("this page as one HTML file", f"kd-optuna report {flags} -o report.html"),
        ("the shrinkage weights in force", f"kd-optuna space {flags}"),
        ("more trials", f"kd-optuna optimize {flags} --n-trials {len(trials) + 100}"),
    ]
    return Story(
        study_name=study.study_name, storage=url, task=_task(config), counts=counts,
        best=[_best_row(i + 1, t) for i, t in enumerate(leaders)], classics=classics, commands=commands,
        compare_table=table, compare_formula=compare_formula, weights_source=source, figures=figures,
    )


def _md_cell(value: Any) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def note_text(story: Story) -> str:
    """The study note (markdown) of ``story``."""
    lines = [f"# kd-optuna study `{story.study_name}`", ""]
    for name, value in story.task:
        lines.append(f"- **{name}**: {value}")
    c = story.counts
    lines.append(f"- **trials**: {c.get('trials', 0)}: {c.get('completed', 0)} completed, {c.get('rejected', 0)} rejected "
                 f"by the loss check, {c.get('failed', 0)} failed" +
                 (f", {c['running']} running" if c.get("running") else ""))
    lines += ["", "## Best distillers", ""]
    if story.best:
        lines += ["| # | trial | score | formula | val_ce | cka_gap | val_acc | origin |", "|---:|---:|---:|---|---:|---:|---:|---|"]
        for row in story.best:
            lines.append(f"| {row['rank']} | {row['trial']} | {_fmt(row['score'], 5)} | `{_md_cell(row['formula'])}` | "
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
                  "Each run: the study's [train] recipe, one seed, the same for every method."]
    lines += ["", "## Commands", ""]
    for what, command in story.commands:
        lines += [f"{what}:", "", f"    {command}", ""]
    lines += [f"Figures on the study's main page: best so far against the classics, score by option with the "
              f"{story.weights_source}, the lineage of the best, the outcome of the trials"
              + (", the compare runs" if "compare" in story.figures else "") + ". "
              f"Sort the trials table by the {', '.join(METRIC_COLUMNS[:3])} columns.", ""]
    return "\n".join(lines)


# -- artifacts --------------------------------------------------------------------------------


def artifact_dir(storage: Any, explicit: str | os.PathLike | None = None) -> Path | None:
    """Where the study's artifacts live: ``explicit``, else ``$KD_OPTUNA_ARTIFACT_DIR``, else
    ``<database>.artifacts`` beside a SQLite file; None for other storages without either.
    ``storage`` is a URL or a study."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ARTIFACT_DIR_ENV):
        return Path(os.environ[ARTIFACT_DIR_ENV])
    if not isinstance(storage, str):
        backend = optuna_private.backend(optuna_private.study_storage(storage))
        engine = getattr(backend, "engine", None)
        if engine is None:
            return None
        url = engine.url
    else:
        from sqlalchemy.engine import make_url

        url = make_url(storage)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).expanduser().with_name(Path(url.database).name + ".artifacts")
    return None


def artifact_store(directory: Path | None, create: bool = False):
    """optuna's FileSystemArtifactStore on ``directory`` (made when ``create``), or None."""
    from optuna.artifacts import FileSystemArtifactStore

    if directory is None:
        return None
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    elif not directory.is_dir():
        return None
    return FileSystemArtifactStore(str(directory))


#: Study system attr prefix under which optuna-dashboard lists a trial's artifacts (its own
#: route for them; a finished trial's system attrs cannot be written, so optuna's
#: ``upload_artifact`` refuses finished trials), followed by ``<trial_id>:<artifact_id>``.
DASHBOARD_TRIAL_ARTIFACT_PREFIX = "dashboard:artifacts:"


def _existing_artifact(study, trial, filename: str, store) -> str | None:
    import json

    from optuna.artifacts.exceptions import ArtifactNotFound

    prefix = f"{DASHBOARD_TRIAL_ARTIFACT_PREFIX}{optuna_private.trial_id(trial)}:"
    attrs = {k: v for k, v in optuna_private.study_system_attrs(study).items() if k.startswith(prefix)}
    attrs.update({k: v for k, v in optuna_private.trial_system_attrs(study, trial).items() if k.startswith("artifacts:")})
    for key, value in attrs.items():
        if not isinstance(value, str):
            continue
        try:
            meta = json.loads(value)
        except ValueError:
            continue
        if isinstance(meta, Mapping) and meta.get("filename") == filename:
            try:
                store.open_reader(meta["artifact_id"]).close()
                return meta["artifact_id"]
            except (ArtifactNotFound, KeyError, OSError):
                continue
    return None


def upload_best_script(study, config, store, trial=None) -> dict[str, Any] | None:
    """The exported script of the best trial (or ``trial``) as that trial's artifact in ``store``,
    uploaded unless it is there already; {trial, filename, artifact_id, url} or None.

    The file goes to ``store`` under a new uuid and its metadata to the study system attr
    ``dashboard:artifacts:<trial_id>:<artifact_id>``, which optuna-dashboard lists on the
    trial's page and serves at ``url``. Every other script this function stored (a former
    best trial's) is then deleted (:func:`remove_former_scripts`): one script, the best's.
    """
    import json
    import uuid

    from kd_optuna.export.script import write_script

    if store is None or config is None:
        return None
    if trial is None:
        leaders = best_distinct(study.get_trials(deepcopy=False), 1)
        if not leaders:
            return None
        trial = leaders[0]
    filename = SCRIPT_NAME.format(number=trial.number)
    artifact_id = _existing_artifact(study, trial, filename, store)
    if artifact_id is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_script(Path(tmp) / filename, study.study_name, trial, config)
            artifact_id = str(uuid.uuid4())
            with open(path, "rb") as handle:
                store.write(artifact_id, handle)
        meta = {"artifact_id": artifact_id, "filename": filename, "mimetype": "text/x-python", "encoding": None}
        optuna_private.set_study_system_attr(
            study, f"{DASHBOARD_TRIAL_ARTIFACT_PREFIX}{optuna_private.trial_id(trial)}:{artifact_id}", json.dumps(meta))
    remove_former_scripts(study, store, keep=artifact_id)
    ids = f"{optuna_private.study_id(study)}/{optuna_private.trial_id(trial)}"
    return {"trial": trial.number, "filename": filename, "artifact_id": artifact_id, "url": f"/artifacts/{ids}/{artifact_id}"}


def story_scripts(study) -> list[dict[str, Any]]:
    """The exported scripts :func:`upload_best_script` stored in ``study``, oldest trial first:
    {trial, filename, artifact_id, key} per script still listed on a trial's page.

    A script is one of ours when its metadata sits under :data:`DASHBOARD_TRIAL_ARTIFACT_PREFIX`
    and names ``train_trial<n>.py`` (``text/x-python``) for that trial's own number ``n``.
    """
    import json

    numbers = {optuna_private.trial_id(t): t.number for t in study.get_trials(deepcopy=False)}
    found = []
    for key, value in optuna_private.study_system_attrs(study).items():
        if not key.startswith(DASHBOARD_TRIAL_ARTIFACT_PREFIX) or not isinstance(value, str):
            continue
        trial_part, _, artifact_id = key[len(DASHBOARD_TRIAL_ARTIFACT_PREFIX):].partition(":")
        number = numbers.get(_int(trial_part))
        try:
            meta = json.loads(value)
        except ValueError:
            continue
        if (number is None or not isinstance(meta, Mapping) or meta.get("artifact_id") != artifact_id
                or meta.get("filename") != SCRIPT_NAME.format(number=number) or meta.get("mimetype") != "text/x-python"):
            continue
        found.append({"trial": number, "filename": meta["filename"], "artifact_id": artifact_id, "key": key})
    return sorted(found, key=lambda a: a["trial"])


def remove_former_scripts(study, store, keep: str | None = None) -> list[int]:
    """Delete every script of :func:`story_scripts` except the artifact ``keep`` (the best
    trial's), so the study holds one; return the trials whose script went.

    As optuna-dashboard's own delete button does it: the file leaves ``store``
    (``ArtifactStore.remove``) and the metadata attr is set to JSON ``null``, which the
    dashboard skips (an optuna storage cannot delete a system attr).
    """
    import json

    from optuna.artifacts.exceptions import ArtifactNotFound

    removed = []
    for script in story_scripts(study):
        if script["artifact_id"] == keep:
            continue
        try:
            store.remove(script["artifact_id"])
        except (ArtifactNotFound, FileNotFoundError):
            pass  # the file is gone already; drop the listing all the same
        optuna_private.set_study_system_attr(study, script["key"], json.dumps(None))
        removed.append(script["trial"])
    return removed


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
    from optuna_dashboard import save_note

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
    from optuna_dashboard import save_plotly_graph_object

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
