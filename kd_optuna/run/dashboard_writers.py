"""optuna-dashboard's writers of notes and figures, loaded without its web application.

``import optuna_dashboard`` runs the package's ``__init__``, which imports its server and,
through ``optuna.importance``, scikit-learn and SciPy: 2.5 s of every worker's start
(BENCHMARKS.md "Worker start") for two functions that need only Optuna. :func:`writer` loads
the one file of the installed package that holds the function (``_note.py``,
``_custom_plot_data.py``) under a name of its own, so what is stored is exactly what
optuna-dashboard writes and reads. Where the package is already imported, or its file is
missing or no longer loads alone (another optuna-dashboard version), the package's own
export is used.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

#: The function names this module gives out, and the file of optuna_dashboard that holds each.
_FILES = {"save_note": "_note", "save_plotly_graph_object": "_custom_plot_data"}


@functools.cache
def writer(name: str) -> Callable[..., Any]:
    """optuna_dashboard's ``name`` (``save_note`` or ``save_plotly_graph_object``)."""
    if "optuna_dashboard" not in sys.modules:
        found = _standalone(_FILES[name], name)
        if found is not None:
            return found
    import optuna_dashboard

    return getattr(optuna_dashboard, name)


def _standalone(module: str, name: str) -> Callable[..., Any] | None:
    package = importlib.util.find_spec("optuna_dashboard")
    if package is None or not package.submodule_search_locations:
        return None
    path = Path(list(package.submodule_search_locations)[0]) / f"{module}.py"
    spec = importlib.util.spec_from_file_location(f"kd_optuna.run._optuna_dashboard{module}", path)
    if spec is None or spec.loader is None:
        return None
    loaded = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(loaded)
    except Exception:  # the file is gone or imports its package now: the package's own import follows
        return None
    return getattr(loaded, name, None)


def save_note(target, body: str) -> None:
    """``optuna_dashboard.save_note``: ``body`` (Markdown) as the note of a study or trial."""
    writer("save_note")(target, body)


def save_plotly_graph_object(study, figure, *, graph_object_id: str | None = None) -> str:
    """``optuna_dashboard.save_plotly_graph_object``: ``figure`` shown on the study's page."""
    return writer("save_plotly_graph_object")(study, figure, graph_object_id=graph_object_id)
