"""`kd-optuna report`: the study's story (kd_optuna.run.story) as one self-contained HTML page.

The same figures and tables as the study's page in optuna-dashboard, for people who will not
run a dashboard: plotly.js is embedded once, inline (no network at viewing time), every figure
is a div drawn by it, and the tables are plain HTML. Nothing is written into the study.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

from kd_optuna.run import story as stories
from kd_optuna.run.study_view import fmt

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1300px;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 13px; }
pre { background: #f5f5f5; padding: 6px 10px; overflow-x: auto; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.figure { margin: 1em 0 2em; }
"""

_FIGURE_ORDER = ("progress", "genes", "lineage", "rejections", "compare")


def _e(value: Any) -> str:
    return html.escape(fmt(value) if not isinstance(value, str) else value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(header)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{_e(v)}</td>' if n else f"<td>{_e(v)}</td>" for v, n in zip(row, numeric))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _markdown_table(text: str) -> str:
    """A markdown pipe table (compare.format_table's) as an HTML table."""
    lines = [line.strip().strip("|") for line in text.strip().splitlines() if line.strip()]
    rows = [[cell.strip() for cell in line.split("|")] for line in lines]
    header, body = rows[0], [r for r in rows[2:]]
    return _table(header, body, [i > 0 for i in range(len(header))])


def html_page(study, config=None) -> str:
    """The report of ``study`` as one HTML document."""
    story = stories.build(study, config)
    story.artifact = stories._recorded_artifact(study)
    parts = [f"<h1>kd-optuna study <code>{html.escape(story.study_name)}</code></h1>",
             f"<p>storage <code>{html.escape(story.storage)}</code></p>"]
    task = list(story.task) + [("trials", stories.trials_line(story.counts))]
    parts.append(_table(["", ""], task))
    parts.append("<h2>Best distillers</h2>")
    if story.best:
        parts.append(_table(
            ["#", "trial", "score", "formula", "val_ce", "cka_gap", "val_acc", "sharpness_gap", "origin"],
            [[r["rank"], r["trial"], fmt(r["score"], 5), r["formula"], r["val_ce"], r["cka_gap"], r["val_acc"],
              r["sharpness_gap"], r["origin"]] for r in story.best],
            [True, True, True, False, True, True, True, True, False],
        ))
    else:
        parts.append("<p>No completed trial yet.</p>")
    if story.artifact:
        a = story.artifact
        stored = (f"<code>{html.escape(str(a.get('filename')))}</code> under trial {html.escape(str(a.get('trial')))}'s "
                  "artifacts in <code>kd-optuna dashboard</code>")
        if story.best and a.get("trial") == story.best[0]["trial"]:
            parts.append(f"<p>The best trial's script is stored with the study: {stored}.</p>")
        else:
            parts.append(f"<p>The study stores the script of its best trial at the last refresh (optimize or compare): "
                         f"{stored}; <code>kd-optuna export</code> writes the current best's.</p>")
    tried = [r for r in story.classics if r["trial"] is not None]
    if tried:
        best = story.best[0]["score"] if story.best else None
        parts.append("<h2>Classic distillers in this study</h2>")
        parts.append(_table(
            ["classic", "trial", "score", "best - classic", "formula"],
            [[r["name"], r["trial"], r["score"] if r["score"] is not None else r["outcome"],
              f"{best - r['score']:+.4g}" if best is not None and r["score"] is not None else "", r["formula"]]
             for r in tried],
            [False, True, True, True, False],
        ))
    if story.compare_table:
        parts.append("<h2>kd-optuna compare</h2>")
        if story.compare_formula:
            parts.append(f"<p>searched distiller: <code>{html.escape(story.compare_formula)}</code></p>")
        parts.append(_markdown_table(story.compare_table))
        parts.append(f"<p>Each run: {html.escape(story.compare_recipe)}, one seed, the same for every method.</p>")
    parts.append("<h2>Figures</h2>")
    first = True
    for name in _FIGURE_ORDER:
        figure = story.figures.get(name)
        if figure is None:
            continue
        div = figure.to_html(full_html=False, include_plotlyjs=True if first else False,
                             div_id=stories.FIGURE_IDS[name], config={"displaylogo": False})
        first = False
        parts.append(f'<div class="figure">{div}</div>')
    parts.append("<h2>Commands</h2>")
    for what, command in story.commands:
        parts.append(f"<p>{html.escape(what)}:</p><pre>{html.escape(command)}</pre>")
    title = html.escape(f"kd-optuna report: {story.study_name}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_report(path, study, config=None):
    """Write :func:`html_page` to ``path`` with :func:`kd_optuna.files.atomic_write_text`: a
    browser, or another ``kd-optuna report`` into the same file at the same moment, never sees
    half a page; a folder that cannot be written raises KdOptunaError naming ``path``."""
    from kd_optuna.errors import KdOptunaError
    from kd_optuna.files import atomic_write_text

    try:
        return atomic_write_text(path, html_page(study, config))
    except OSError as exc:
        raise KdOptunaError(f"cannot write {str(path)!r} ({exc.strerror or exc}); choose another -o") from None
