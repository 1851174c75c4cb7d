"""A worker's start: what it imports before its first trial (BENCHMARKS.md "Worker start")."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna

from kd_optuna.data import digits_arrays
from kd_optuna.run import dashboard_writers

REPO = Path(__file__).resolve().parent.parent


def test_the_digits_read_from_the_data_file_are_scikit_learns():
    from sklearn.datasets import load_digits

    images, labels = digits_arrays()
    expected = load_digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.dtype == expected.images.dtype and labels.dtype == expected.target.dtype
    assert np.array_equal(images, expected.images) and np.array_equal(labels, expected.target)


def test_a_worker_start_imports_neither_scikit_learn_nor_the_dashboard_app(tmp_path):
    """A spawned worker's imports, its note writer and the digits splits: 2.6 s less a worker
    without scikit-learn, SciPy and optuna-dashboard's server (which optuna.importance brings)."""
    code = (
        "import json, sys\n"
        "import kd_optuna.run.trial_loop, kd_optuna.proxy.objective\n"
        "from kd_optuna.run.dashboard_writers import writer\n"
        "writer('save_note'); writer('save_plotly_graph_object')\n"
        "from kd_optuna.data import load_dataset\n"
        "splits = load_dataset('digits')\n"
        "print(json.dumps({'train': len(splits.train), 'loaded': sorted(m for m in ('sklearn', 'scipy', 'optuna_dashboard',"
        " 'optuna.importance') if m in sys.modules)}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"train": 1079, "loaded": []}


def test_notes_and_figures_written_without_the_package_read_back_with_it():
    import plotly.graph_objects as go
    from optuna_dashboard import get_note
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects
    from optuna_dashboard._note import get_note_from_system_attrs

    from kd_optuna.optuna_private import study_system_attrs

    save_note = dashboard_writers._standalone("_note", "save_note")
    save_figure = dashboard_writers._standalone("_custom_plot_data", "save_plotly_graph_object")
    assert save_note.__module__.startswith("kd_optuna.run.") and save_figure.__module__.startswith("kd_optuna.run.")
    study = optuna.create_study()
    save_note(study, "# the study\n" + "x" * 5000)  # longer than one system attr holds
    trial = study.ask()
    save_note(trial, "the trial")
    study.tell(trial, 0.5)
    save_figure(study, go.Figure(go.Bar(y=[1, 2])), graph_object_id="bars")
    attrs = study_system_attrs(study)
    assert get_note(study) == "# the study\n" + "x" * 5000
    assert get_note_from_system_attrs(attrs, trial._trial_id)["body"] == "the trial"
    assert json.loads(get_plotly_graph_objects(attrs)["bars"])["data"][0]["y"] == [1, 2]


def test_the_package_is_used_where_it_is_imported_or_its_file_does_not_load(monkeypatch):
    import optuna_dashboard

    dashboard_writers.writer.cache_clear()
    try:
        assert dashboard_writers.writer("save_note") is optuna_dashboard.save_note  # imported by this test
    finally:
        dashboard_writers.writer.cache_clear()
    assert dashboard_writers._standalone("_no_such_file", "save_note") is None
