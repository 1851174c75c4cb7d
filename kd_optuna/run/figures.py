"""The study's figures, as plotly figures (one function each, trials in, figure out): the best
score so far against the classics', the score by option of each gene with the shrinkage
weights, the lineage of the best distillers, the outcomes over trials, compare's top-1.

Each is titled to fit a half-width optuna-dashboard card (:func:`_title`); what each shows is
listed in ``kd_optuna.run.story``'s docstring, which saves them into the study.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from kd_optuna.run.study_view import (
    TOP, as_int, best_distinct, classic_scores, fmt, formula_of, is_scored, mutated_of, outcome_of,
)
from kd_optuna.search.lineage import read_lineage
from kd_optuna.space import GENES

_LINEAGE_MAX_NODES = 80
_PALETTE = {
    "classic": "#1f77b4", "warm_start": "#17becf", "random": "#7f7f7f", "mutation": "#2ca02c",
    "crossover": "#ff7f0e", "llm": "#9467bd",
}


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
    scored = sorted((t for t in trials if is_scored(t)), key=lambda t: t.number)
    figure = go.Figure()
    numbers = [t.number for t in scored]
    best, running = [], math.inf
    for trial in scored:
        running = min(running, trial.value)
        best.append(running)
    figure.add_trace(go.Scatter(
        x=numbers, y=[t.value for t in scored], mode="markers", name="trial score",
        marker={"color": "#bbbbbb", "size": 6}, text=[formula_of(t) for t in scored],
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
            "text": "<br>".join(f"{'↑' if score > focus[1] else '↓'} {label} {fmt(score, 3)} (off scale)"
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
                                       f"(drawn at its top), highest {fmt(out[-1])}"})
    return view, notes


def genes_figure(trials: Sequence[Any], weights: Mapping[str, Mapping[Any, float]], source: str = ""):
    """Per gene (a menu picks the gene): completed scores by option (box and points) and the
    option's shrinkage weight (bars, right axis); opens on the most shrunk gene. Each gene has
    its own y range (:func:`_gene_view`): every box in view; scores above it are drawn at its
    top edge (hover: the score), counted by a "▲ k" label over the option."""
    import plotly.graph_objects as go

    scored = [t for t in trials if is_scored(t)]
    rejected = [t for t in trials if outcome_of(t).startswith("rejected")]
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
    parts = [f"{name} {fmt(value)}" for name, value in rho.items()] if isinstance(rho, Mapping) else []
    return f"rho's contest: {contest.get('winner', '?')} won" + (f" ({', '.join(parts)})" if parts else "")


def lineage(trials: Sequence[Any], top: int = TOP, max_nodes: int = _LINEAGE_MAX_NODES) -> tuple[list[Any], list[Any]]:
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
            parent = as_int(origin.get(attr))
            if parent is not None and parent not in family and parent != number:
                queue.append(parent)
    return leaders, sorted(family.values(), key=lambda t: t.number)


def lineage_figure(trials: Sequence[Any], top: int = TOP):
    """The family tree of the top distillers at (trial number, score)."""
    import plotly.graph_objects as go

    leaders, family = lineage(trials, top)
    rank = {t.number: i + 1 for i, t in enumerate(leaders)}
    where = {t.number: (t.number, t.value if is_scored(t) else None) for t in family}
    origins = {t.number: read_lineage(t) for t in family}
    figure = go.Figure()
    for attr, name, dash in (("parent", "parent → child", "solid"), ("crossover_parent", "crossover's second parent", "dot")):
        xs, ys, mid_x, mid_y, mid_text = [], [], [], [], []
        for trial in family:
            parent = as_int(origins[trial.number].get(attr))
            if parent not in where or where[parent][1] is None or where[trial.number][1] is None:
                continue
            (x0, y0), (x1, y1) = where[parent], where[trial.number]
            xs += [x0, x1, None]
            ys += [y0, y1, None]
            if attr == "parent" and mutated_of(trial):
                mid_x.append((x0 + x1) / 2)
                mid_y.append((y0 + y1) / 2)
                mid_text.append(", ".join(mutated_of(trial)))
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
        members = [t for t in family if proposer_of[t.number] == proposer and is_scored(t)]
        if not members:
            continue
        hover = []
        for t in members:
            lines = [f"trial {t.number} ({proposer})" + (f", #{rank[t.number]} best" if t.number in rank else ""),
                     f"score {fmt(t.value)}", formula_of(t)]
            parent = as_int(origins[t.number].get("parent"))
            second = origins[t.number].get("crossover_parent")
            if parent is not None:
                lines.append(f"parent {parent}" + (f", crossover with {second}" if second is not None else ""))
            if mutated_of(t):
                lines.append("mutated: " + ", ".join(mutated_of(t)))
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
    named = f"Lineage of the {len(leaders)} best distillers" if leaders else "Lineage: no trial scored yet"
    focus, above = _focus([t.value for t in family if is_scored(t)])
    notes = ["#rank of the best; line: parent to child; dotted: crossover's second parent; "
             "hover a node for its trial, a ◆ mid-edge for the mutated genes"]
    if above:
        notes.append(f"{above} high score{'s' if above > 1 else ''} above the range")
    title, annotations, top = _title(named, *notes)
    figure.update_layout(title=title, annotations=annotations, xaxis_title="trial", yaxis_title="score",
                         template="plotly_white", legend={"font": {"size": 10}}, yaxis={"range": focus} if focus else {},
                         margin={"t": top, "r": 10, "l": 60, "b": 50})
    return figure


def _rank_label_positions(leaders: Sequence[Any], family: Sequence[Any]) -> dict[int, str]:
    """trial number -> "bottom center" for each leader whose "#rank" label, above its node,
    would touch the label of a leader close by (within 8% of the x and 8% of the y span)
    that is already above its own; the others stay "top center"."""
    xs = [t.number for t in family]
    ys = [t.value for t in family if is_scored(t)]
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
    outcomes = sorted({outcome_of(t) for t in ordered}, key=lambda o: (o != "completed", o))
    figure = go.Figure()
    colours = {"completed": "#2ca02c", "failed": "#000000", "running": "#cccccc", "waiting": "#eeeeee"}
    for outcome in outcomes:
        counts = [sum(1 for t in ordered if t.number // width * width == s and outcome_of(t) == outcome) for s in starts]
        labels = [f"{s}-{s + width - 1}" if width > 1 else str(s) for s in starts]
        figure.add_trace(go.Bar(x=labels, y=counts, name=f"{outcome} ({sum(counts)})",
                                marker={"color": colours[outcome]} if outcome in colours else {},
                                hovertemplate=f"trials %{{x}}: %{{y}} {outcome}<extra></extra>"))
    rejected = sum(1 for t in ordered if outcome_of(t).startswith("rejected"))
    title, annotations, top = _title("Outcome of the trials",
                                     f"{rejected} of {len(ordered)} rejected by the loss check before training")
    figure.update_layout(barmode="stack", template="plotly_white", xaxis_title="trials", yaxis_title="trials",
                         xaxis={"type": "category"}, title=title, annotations=annotations, legend={"font": {"size": 10}},
                         margin={"t": top, "r": 10, "l": 60, "b": 50})
    return figure


def compare_figure(runs: Sequence[Any], summaries: Sequence[Any]):
    """kd-optuna compare's runs: last-epoch test top-1 per method, each point a seed (a diverged
    run has no top-1 and no point)."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for s in summaries:
        figure.add_trace(go.Box(y=[r.top1 for r in runs if r.method == s.method and r.top1 is not None], name=s.method,
                                boxpoints="all", jitter=0.3))
    notes = ["test top-1 at the last epoch; each point a seed"]
    diverged = [f"{s.method} (seed{'s' if len(s.diverged) > 1 else ''} {', '.join(map(str, s.diverged))})"
                for s in summaries if s.diverged]
    if diverged:
        notes.append("diverged, no top-1: " + ", ".join(diverged))
    title, annotations, top = _title("kd-optuna compare: top-1 per method", *notes)
    figure.update_layout(title=title, annotations=annotations, yaxis_title="top-1 (%)", template="plotly_white",
                         margin={"t": top, "r": 10, "l": 60, "b": 50})
    return figure
