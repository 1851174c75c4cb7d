"""The study's story as a user sees it: optuna-dashboard's API (the browser's requests) on a
study after refresh, and the self-contained report page.

Trials are written with optuna.trial.create_trial (no training): a few classics, mutation and
crossover children with lineage attrs, rejected candidates, and compare runs.
"""

from __future__ import annotations

import functools
import io
import json
import re
import socket
from dataclasses import asdict
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from conftest import create_kd_study, invoke_cli
from kd_optuna.run import artifacts as story_artifacts, compare, figures as story_figures, story, study_view
from kd_optuna.distill.classics import CLASSICS
from kd_optuna.search.lineage import NAMES, attr_name
from kd_optuna.space import GENES, DistillerSpec
from kd_optuna.run.storage import study_config

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _distributions(config):
    return {gene: CategoricalDistribution(list(config.space.options[gene])) for gene in GENES}


def _trial_of(config, spec: DistillerSpec, value=None, state=TrialState.COMPLETE, old_names=False, **attrs):
    """A trial with ``attrs``; lineage ones under their prefix, or as earlier versions wrote them."""
    attrs = {(k if old_names or k not in NAMES else attr_name(k)): v for k, v in attrs.items()}
    user_attrs = {"spec": spec.key, "formula": spec.formula(), **attrs}
    if state == TrialState.COMPLETE:
        user_attrs.update(val_ce=value * 0.8, cka_gap=value * 0.1, val_acc=1 - value, sharpness_gap=0.01,
                          proxy_seconds=1.5)
    return create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                        params=spec.to_params(), distributions=_distributions(config), user_attrs=user_attrs)


_trial = _trial_of


def _vary(spec: DistillerSpec, **genes) -> DistillerSpec:
    return DistillerSpec.from_params({**spec.to_params(), **genes})


def story_study(url: str, with_compare: bool = True, name: str = "s", old_names: bool = False) -> optuna.Study:
    """Trials 0-3 classics (sp rejected), 4-5 mutations, 6 a crossover, 7 rejected random;
    ``old_names``: lineage attrs without their prefix, as kd-optuna wrote them before it."""
    study = create_kd_study(url, name=name)
    config = study_config(study)
    _trial = functools.partial(_trial_of, old_names=old_names)
    kd, kd_ls, fitnets, sp = (CLASSICS[n][0] for n in ("kd", "kd_ls", "fitnets", "sp"))
    study.add_trial(_trial(config, kd, 0.30, proposer="classic", parent=None, mutated=[]))
    study.add_trial(_trial(config, kd_ls, 0.26, proposer="classic", parent=None, mutated=[]))
    study.add_trial(_trial(config, fitnets, 0.40, proposer="classic", parent=None, mutated=[]))
    study.add_trial(_trial(config, sp, state=TrialState.PRUNED, proposer="classic", parent=None, mutated=[],
                           reject_reason="not_decreasing"))
    child = _vary(kd_ls, temperature=8)
    study.add_trial(_trial(config, child, 0.22, proposer="mutation", parent=1, mutated=["temperature"],
                           space_state={"basis": 4, "dropped": {"distance": ["l1"]}, "damped": {}},
                           predictor={"winner": "mutation", "rho": {"mutation": 0.25, "random": 0.31}}))
    grandchild = _vary(child, magnitude=25)
    study.add_trial(_trial(config, grandchild, 0.21, proposer="mutation", parent=4, mutated=["magnitude"]))
    cross = _vary(grandchild, knowledge="emb")
    study.add_trial(_trial(config, cross, 0.25, proposer="crossover", parent=5, crossover_parent=2,
                           mutated=["knowledge"]))
    study.add_trial(_trial(config, _vary(kd, distance="l1"), state=TrialState.PRUNED, proposer="random",
                           parent=None, mutated=[], reject_reason="nan_loss"))
    if with_compare:
        for method, base in (("searched", 75.0), ("kd", 73.0)):
            for seed in range(3):
                run = compare.Run(method, seed, base + seed * 0.5, base, 1,
                                  grandchild.key if method == "searched" else method, 1.0)
                study.set_user_attr(f"{compare.RUN_ATTR_PREFIX}{method}{seed}", asdict(run))
        diverged = compare.Run("dkd", 0, None, None, 1, "dkd", 1.0, diverged="the loss became nan in epoch 1")
        study.set_user_attr(f"{compare.RUN_ATTR_PREFIX}dkd0", asdict(diverged))
    return study


def _get(app, path: str) -> tuple[str, bytes, dict]:
    """GET ``path`` from the WSGI ``app`` as a browser would: (status, body, headers)."""
    from wsgiref.util import setup_testing_defaults

    environ: dict = {"PATH_INFO": path.split("?")[0], "QUERY_STRING": path.partition("?")[2],
                     "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    answer: dict = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response))
    return answer["status"], body, answer["headers"]


def _json(app, path: str):
    status, body, _ = _get(app, path)
    assert status.startswith("200"), (path, status, body[:300])
    return json.loads(body)


def _subtitle(figure: dict) -> str:
    """The small lines under a figure's title (the annotation story_figures._title names "subtitle")."""
    return next(a["text"] for a in figure["layout"].get("annotations", ()) if a.get("name") == "subtitle")


def test_dashboard_shows_the_story(tmp_path, monkeypatch):
    """After refresh, the study page's API has the figures, the named objective, the note with
    the best distillers, classics, compare table and commands, the metric columns, and the
    best trial's script listed and downloadable."""
    from optuna_dashboard import wsgi

    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    db = tmp_path / "s.db"
    url = f"sqlite:///{db}"
    study = story_study(url)
    refreshed = story.refresh(study)
    assert refreshed.artifact is not None and refreshed.artifact["trial"] == 5
    store_dir = tmp_path / "s.db.artifacts"
    assert (store_dir / refreshed.artifact["artifact_id"]).is_file()

    # what `kd-optuna dashboard` serves: the storage with the artifact store beside it
    app = wsgi(url, artifact_store=story_artifacts.artifact_store(story_artifacts.artifact_dir(url)))
    assert _json(app, "/api/meta")["artifact_is_available"] is True
    studies = _json(app, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["s"]
    detail = _json(app, f"/api/studies/{studies[0]['study_id']}")

    figures = {g["id"]: json.loads(g["graph_object"]) for g in detail["plotly_graph_objects"]}
    assert set(figures) == set(story.FIGURE_IDS.values())
    progress = figures["kd_optuna_progress"]
    names = [t.get("name", "") for t in progress["data"]]
    assert "best so far" in names and any(n.startswith("vanilla KD (trial 0): 0.3") for n in names)
    best_line = next(t for t in progress["data"] if t.get("name") == "best so far")
    assert best_line["y"] == [0.30, 0.26, 0.26, 0.22, 0.21, 0.21]
    assert "sp (rejected: not_decreasing)" in _subtitle(progress)
    genes = figures["kd_optuna_genes"]
    bars = {t["meta"]: t for t in genes["data"] if t["type"] == "bar"}
    assert list(bars) == list(GENES) and [b["label"] for b in genes["layout"]["updatemenus"][0]["buttons"]] == list(GENES)
    assert all(0 <= w <= 1 for bar in bars.values() for w in bar["y"])
    assert bars["distance"]["x"] == [str(o) for o in study_config(study).space.options["distance"]]
    assert len([t for t in genes["data"] if t.get("visible") is True]) == 2  # one gene at a time: weights and scores
    knowledge = next(t for t in genes["data"] if t["type"] == "box" and t["meta"] == "knowledge")
    assert sorted(zip(knowledge["x"], knowledge["y"])) == sorted(
        (t.params["knowledge"], t.value) for t in study.trials if t.state == TrialState.COMPLETE)
    lineage = figures["kd_optuna_lineage"]
    edges = next(t for t in lineage["data"] if t.get("name") == "parent → child")
    assert [edges["x"][i:i + 2] for i in range(0, len(edges["x"]), 3)] == [[1, 4], [4, 5], [5, 6]]
    crossover_edges = next(t for t in lineage["data"] if t.get("name") == "crossover's second parent")
    assert crossover_edges["x"][:2] == [2, 6]
    labels = next(t for t in lineage["data"] if t.get("name") == "mutated genes")["text"]
    assert labels == ["temperature", "magnitude", "knowledge"]
    rejections = figures["kd_optuna_rejections"]
    assert {t["name"] for t in rejections["data"]} == {"completed (6)", "rejected: nan_loss (1)",
                                                        "rejected: not_decreasing (1)"}
    compare_box = figures["kd_optuna_compare"]
    assert {t["name"]: len(t["y"]) for t in compare_box["data"]} == {"searched": 3, "kd": 3, "dkd": 0}
    assert "diverged, no top-1: dkd (seed 0)" in _subtitle(compare_box)  # an empty box has no legend entry

    assert detail["objective_names"] == [story.OBJECTIVE_NAME]
    columns = {a["key"]: a["sortable"] for a in detail["union_user_attrs"]}
    assert all(columns[name] for name in ("val_ce", "cka_gap", "val_acc"))

    note = detail["note"]["body"]
    assert "digits_teacher" in note and "digits_student" in note
    assert "| 1 | 5 | 0.21 |" in note
    # a formula's "||" is escaped inside the table, so the row keeps its columns
    assert DistillerSpec.from_params(study.trials[5].params).formula().replace("|", "\\|") in note
    assert "| kd | 0 | 0.3 | -0.09 |" in note and "| sp | 3 | rejected: not_decreasing |" in note
    assert "## kd-optuna compare" in note and "| searched | 3 | 75.50 +- 0.50 |  |  |" in note
    assert "| kd | 3 | 73.50 +- 0.50 | +2.00 [+2.00, +2.00] | 3/3 |" in note
    assert "| dkd | 0 | diverged on seed 0 |  |  |" in note
    assert f"kd-optuna export --study-name s --storage {url} --trial 5 -o train_best.py" in note
    assert "kd-optuna compare --study-name s" in note and "kd-optuna report --study-name s" in note
    assert refreshed.artifact["url"] in note

    best_trial = next(t for t in detail["trials"] if t["number"] == 5)
    assert [a["filename"] for a in best_trial["artifacts"]] == ["train_trial5.py"]
    assert all(not t["artifacts"] for t in detail["trials"] if t["number"] != 5)
    status, body, _ = _get(app, refreshed.artifact["url"])
    assert status.startswith("200")
    assert "kd-optuna" in body.decode() and DistillerSpec.from_params(study.trials[5].params).key in body.decode()
    compile(body.decode(), "train_trial5.py", "exec")

    # a second refresh with the same best trial uploads nothing new
    again = story.refresh(study)
    assert again.artifact["artifact_id"] == refreshed.artifact["artifact_id"]
    assert sorted(p.name for p in store_dir.iterdir()) == [refreshed.artifact["artifact_id"]]


def test_a_study_written_before_the_lineage_prefix_tells_the_same_story(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    new, old = story_study(url, name="new"), story_study(url, name="old", old_names=True)
    assert any(k.startswith("lineage:") for t in new.trials for k in t.user_attrs)
    assert not any(k.startswith("lineage:") for t in old.trials for k in t.user_attrs)
    built = {s.study_name: story.build(s) for s in (new, old)}
    assert story.note_text(built["old"]).replace("old", "new") == story.note_text(built["new"])
    for name in ("lineage", "genes"):
        figures = [json.loads(b.figures[name].to_json()) for b in built.values()]
        assert figures[0] == figures[1]
    assert study_view.latest_space_state(old.trials)["dropped"] == {"distance": ["l1"]}
    assert [t.number for t in story_figures.lineage(old.trials)[1]] == [t.number for t in story_figures.lineage(new.trials)[1]]


def test_note_follows_a_new_best_and_compare_writes_it(tmp_path, monkeypatch):
    """A new best trial gets its own script; compare's runs appear in the story's note, with the
    formula of a distiller that no trial holds (``compare --spec``)."""
    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = story_study(url, with_compare=False)
    first = story.refresh(study)
    assert "## kd-optuna compare" not in first.note and "kd_optuna_compare" not in first.figures
    config = study_config(study)
    better = _vary(DistillerSpec.from_params(study.trials[5].params), transform1="zscore")
    study.add_trial(_trial(config, better, 0.10, proposer="mutation", parent=5, mutated=["transform1"]))
    second = story.refresh(study)
    assert second.artifact["trial"] == 8 and second.artifact["artifact_id"] != first.artifact["artifact_id"]
    assert "| 1 | 8 | 0.1 |" in second.note

    runs = [compare.Run("searched", 0, 70.0, 70.0, 1, better.key, 1.0), compare.Run("kd", 0, 69.0, 69.0, 1, "kd", 1.0)]
    for i, run in enumerate(runs):
        study.set_user_attr(f"{compare.RUN_ATTR_PREFIX}r{i}", asdict(run))
    third = story.refresh(study)
    from optuna_dashboard import get_note

    note = get_note(study)
    assert note == third.note and "kd_optuna_compare" in third.figures
    assert note.startswith("# kd-optuna study `s`") and "## Best distillers" in note
    assert f"searched distiller: `{better.formula()}`" in note and "| kd | 1 | 69.00 +- 0.00 |" in note
    assert second.artifact["url"] in note

    elsewhere = _vary(better, magnitude=0.01)
    assert all(t.user_attrs.get("spec") != elsewhere.key for t in study.trials)
    study.set_user_attr(f"{compare.RUN_ATTR_PREFIX}r0", asdict(compare.Run("searched", 0, 71.0, 71.0, 1, elsewhere.key, 1.0)))
    assert f"searched distiller: `{elsewhere.formula()}`" in story.refresh(study).note


def test_the_story_shows_the_last_compare_not_a_mix_of_every_stored_run(tmp_path, monkeypatch):
    """The study keeps the runs of every compare (other --epochs, other --lr, other searched
    distillers) and of correlate --from-study, all under one prefix. The note's table pooled
    them: a "searched" row of several distillers, seeds of two recipes paired. It now shows the
    runs the last compare was made of, and says how they were trained."""
    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = story_study(url, with_compare=False)
    best = DistillerSpec.from_params(study.trials[5].params)
    other = _vary(best, magnitude=0.01)
    recipe = {"epochs": 30, "lr": 0.05}
    shorter = {"epochs": 1, "lr": 0.001}
    jobs = {}
    for method, spec, top1, seed, rec in (("searched", best, 80.0, 0, recipe), ("kd", best, 78.0, 0, recipe),
                                         ("searched", best, 40.0, 0, shorter), ("kd", best, 45.0, 0, shorter),
                                         ("searched", other, 10.0, 1, recipe)):  # correlate's
        job = compare.Job(method, seed, spec.to_params(), rec)
        jobs[(method, spec.key, seed, top1)] = job
        run = compare.Run(method, seed, top1, top1, rec["epochs"], job.distiller, 1.0)
        study.set_user_attr(compare.RUN_ATTR_PREFIX + job.digest(), asdict(run))
    last = [job for (method, key, seed, top1), job in jobs.items() if top1 in (40.0, 45.0)]
    compare.remember_last(study, last, {"epochs": 1, "lr": 0.001})
    note = story.refresh(study).note
    assert "| searched | 1 | 40.00 +- 0.00 |  |  |" in note and "| kd | 1 | 45.00 +- 0.00 | -5.00" in note
    assert "80.00" not in note and "10.00" not in note and other.formula() not in note
    assert "Each run: the study's [train] recipe with --epochs 1 --lr 0.001, one seed" in note
    compare.remember_last(study, [job for job in jobs.values() if job.recipe is recipe and job.spec_params == best.to_params()], {})
    refreshed = story.refresh(study)
    assert "| kd | 1 | 78.00 +- 0.00 | +2.00" in refreshed.note and "40.00" not in refreshed.note
    assert "Each run: the study's [train] recipe, one seed" in refreshed.note
    figure = json.loads(story.build(study).figures["compare"].to_json())
    assert {t["name"]: t["y"] for t in figure["data"]} == {"searched": [80.0], "kd": [78.0]}


def test_postgres_like_storage_without_artifact_dir_gets_none(tmp_path, monkeypatch):
    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    assert story_artifacts.artifact_dir("postgresql://u:p@h/db") is None
    assert story_artifacts.artifact_dir("postgresql://u:p@h/db", tmp_path / "a") == tmp_path / "a"
    monkeypatch.setenv(story_artifacts.ARTIFACT_DIR_ENV, str(tmp_path / "b"))
    assert story_artifacts.artifact_dir("postgresql://u:p@h/db") == tmp_path / "b"
    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV)
    assert story_artifacts.artifact_dir("sqlite:///x/y.db") == Path("x/y.db.artifacts")


def test_report_is_one_self_contained_page(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = story_study(url)
    out = tmp_path / "report.html"
    code, stdout, stderr = invoke_cli(capsys, "report", "--storage", url, "-o", str(out))
    assert code == 0, stderr
    assert str(out) in stdout
    html = out.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src\s*=", html, re.I)
    assert not re.search(r"<link[^>]+href\s*=\s*[\"']?https?:", html, re.I)
    assert not re.search(r"<img[^>]+src\s*=\s*[\"']?https?:", html, re.I)
    assert html.count("Plotly.newPlot") == len(story.FIGURE_IDS)
    for graph_id in story.FIGURE_IDS.values():
        assert f'id="{graph_id}"' in html
    assert "plotly.js v" in html  # the library itself is inline
    formula = DistillerSpec.from_params(study.trials[5].params).formula()
    assert formula.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in html
    assert '<td class="num">75.50 +- 0.50</td>' in html and "<td>searched</td>" in html
    assert "kd-optuna export --study-name s" in html


def test_kd_optuna_dashboard_serves_the_best_script(tmp_path, monkeypatch):
    """`kd-optuna dashboard` (a real server process) finds the artifact store beside the
    SQLite file, so the best trial's script downloads from the URL in the study note."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = story_study(url, with_compare=False)
    refreshed = story.refresh(study)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "kd_optuna.run.cli", "dashboard", "--storage", url, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        meta = None
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/meta", timeout=2) as response:
                    meta = json.loads(response.read())
                    break
            except OSError:
                if process.poll() is not None:
                    break
                time.sleep(0.5)
        assert meta is not None, process.stdout.read().decode() if process.poll() is not None else "no answer"
        assert meta["artifact_is_available"] is True
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{refreshed.artifact['url']}", timeout=10) as response:
            script = response.read().decode()
        assert script == (tmp_path / "s.db.artifacts" / refreshed.artifact["artifact_id"]).read_text()
        assert DistillerSpec.from_params(study.trials[5].params).key in script
    finally:
        process.terminate()
        process.wait(timeout=30)


def _study_page(url: str) -> dict:
    """GET /api/studies/<id> of the storage's only study, through optuna-dashboard's app."""
    from optuna_dashboard import wsgi

    app = wsgi(url, artifact_store=story_artifacts.artifact_store(story_artifacts.artifact_dir(url)))
    studies = _json(app, "/api/studies")["study_summaries"]
    assert len(studies) == 1
    return _json(app, f"/api/studies/{studies[0]['study_id']}")


@pytest.mark.slow
def test_create_study_then_optimize_leaves_the_story(tmp_path, tiny_config_path, capsys, monkeypatch):
    """The real commands: create-study names the objective; optimize (real tiny trials) ends
    with the figures, the note and the best script in the study."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    code, _, err = invoke_cli(capsys, "create-study", str(tiny_config_path), "--storage", url)
    assert code == 0, err
    assert _study_page(url)["objective_names"] == [story.OBJECTIVE_NAME]
    code, out, err = invoke_cli(capsys, "optimize", "--storage", url, "--n-trials", "3", "--no-progress", "--threads", "1")
    assert code == 0, err
    assert "not refreshed" not in err
    detail = _study_page(url)
    ids = {g["id"] for g in detail["plotly_graph_objects"]}
    assert {"kd_optuna_progress", "kd_optuna_genes", "kd_optuna_lineage", "kd_optuna_rejections"} <= ids
    assert "kd_optuna_compare" not in ids
    note = detail["note"]["body"]
    assert note.startswith("# kd-optuna study `digits_tiny`") and "trials**: 3:" in note
    complete = [t for t in detail["trials"] if t["state"] == "Complete"]
    if complete:  # rejection may refuse all three; then there is no best script to store
        with_script = [t for t in detail["trials"] if t["artifacts"]]
        assert len(with_script) == 1 and with_script[0]["artifacts"][0]["filename"] == f"train_trial{with_script[0]['number']}.py"
        assert "## Best distillers" in note and "kd-optuna export --study-name digits_tiny" in note


def test_compare_command_refreshes_the_story(tmp_path, capsys, monkeypatch):
    """`kd-optuna compare` with every run already stored (nothing trained) saves its figure and
    the story's note with the compare table."""
    from kd_optuna.export.script import script_defaults

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = story_study(url, with_compare=False)
    config = study_config(study)
    spec = DistillerSpec.from_params(study.trials[5].params)
    recipe = {**script_defaults(config), "num_workers": 0, "output_dir": "unused"}
    for method, base in (("searched", 80.0), ("kd", 78.0)):
        for seed in range(2):
            job = compare.Job(method, seed, spec.to_params(), recipe)
            run = compare.Run(method, seed, base + seed, base, int(recipe["epochs"]), job.distiller, 1.0)
            study.set_user_attr(compare.RUN_ATTR_PREFIX + job.digest(), asdict(run))

    def no_training(*args, **kwargs):
        raise AssertionError("a stored run was trained")

    monkeypatch.setattr(compare, "_run_job", no_training)
    code, out, err = invoke_cli(capsys, "compare", "--storage", url, "--methods", "searched,kd", "--seeds", "2",
                                "--no-progress")
    assert code == 0, err
    assert "not refreshed" not in err
    detail = _study_page(url)
    assert set(story.FIGURE_IDS.values()) == {g["id"] for g in detail["plotly_graph_objects"]}
    note = detail["note"]["body"]
    assert "## kd-optuna compare" in note and f"searched distiller: `{spec.formula()}`" in note
    assert "| searched | 2 | 80.50 +- 0.71 |" in note and "| kd | 2 | 78.50 +- 0.71 | +2.00" in note


def test_periodic_refresh_every_n_finished_trials(tmp_path, monkeypatch):
    """What the optimize parent calls on each turn of its loop: a refresh once `every` more
    trials finished, errors reported once and not raised."""
    from optuna_dashboard import get_note

    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    study = story_study(f"sqlite:///{tmp_path / 's.db'}", with_compare=False)
    config = study_config(study)
    periodic = story.PeriodicRefresh(study, config, every=2, check_s=0)
    assert periodic() is False and get_note(study) == ""  # nothing new since it started
    base = DistillerSpec.from_params(study.trials[5].params)
    study.add_trial(_trial(config, _vary(base, transform1="zscore"), 0.5, proposer="mutation", parent=5))
    assert periodic() is False
    study.add_trial(_trial(config, _vary(base, transform1="exp"), 0.6, proposer="mutation", parent=5))
    assert periodic() is True and "**trials**: 10:" in get_note(study)
    assert periodic() is False

    errors = []
    failing = story.PeriodicRefresh(study, config, every=1, check_s=0, on_error=errors.append)
    monkeypatch.setattr(story, "refresh", lambda *a, **k: 1 / 0)
    for name in ("mish", "relu"):
        study.add_trial(_trial(config, _vary(base, transform1=name), 0.7, proposer="mutation", parent=5))
        assert failing() is False
    assert len(errors) == 1 and "ZeroDivisionError" in errors[0]
    with pytest.raises(ValueError):
        story.PeriodicRefresh(study, every=0)


def test_only_the_best_trial_keeps_a_script_when_the_best_changes_twice(tmp_path, monkeypatch):
    """Two new bests after the first refresh: the study's page lists one script, the current
    best's; the former bests' files are gone from the store; an artifact a user attached to a
    former best by hand (another filename) stays."""
    import uuid

    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = story_study(url, with_compare=False)
    config = study_config(study)
    store_dir = tmp_path / "s.db.artifacts"
    first = story.refresh(study)
    assert first.artifact["trial"] == 5

    own = str(uuid.uuid4())  # what a user's upload through optuna-dashboard leaves on trial 5
    (store_dir / own).write_text("notes")
    meta = {"artifact_id": own, "filename": "notes.txt", "mimetype": "text/plain", "encoding": None}
    from kd_optuna import optuna_private

    optuna_private.set_study_system_attr(
        study, f"{story_artifacts.DASHBOARD_TRIAL_ARTIFACT_PREFIX}{optuna_private.trial_id(study.trials[5])}:{own}", json.dumps(meta))

    base = DistillerSpec.from_params(study.trials[5].params)
    artifacts = [first.artifact]
    for value, transform in ((0.15, "zscore"), (0.10, "exp")):
        study.add_trial(_trial(config, _vary(base, transform1=transform), value, proposer="mutation", parent=5))
        artifacts.append(story.refresh(study).artifact)
    assert [a["trial"] for a in artifacts] == [5, 8, 9]
    assert len({a["artifact_id"] for a in artifacts}) == 3

    detail = _study_page(url)
    listed = {t["number"]: [a["filename"] for a in t["artifacts"]] for t in detail["trials"] if t["artifacts"]}
    assert listed == {5: ["notes.txt"], 9: ["train_trial9.py"]}
    assert sorted(p.name for p in store_dir.iterdir()) == sorted([own, artifacts[-1]["artifact_id"]])
    assert [s["trial"] for s in story_artifacts.story_scripts(study)] == [9]
    note = _study_page(url)["note"]["body"]
    assert artifacts[-1]["url"] in note and all(a["url"] not in note for a in artifacts[:2])

    # a refresh with the same best keeps the one script; a study written before this cleanup
    # (a script left on a former best) is cleaned by the next refresh
    assert story.refresh(study).artifact["artifact_id"] == artifacts[-1]["artifact_id"]
    with monkeypatch.context() as m:
        m.setattr(story_artifacts, "remove_former_scripts", lambda *a, **k: [])
        stale = story_artifacts.upload_best_script(study, config, story_artifacts.artifact_store(store_dir), trial=study.trials[8])
    assert [s["trial"] for s in story_artifacts.story_scripts(study)] == [8, 9]
    story.refresh(study)
    assert [s["trial"] for s in story_artifacts.story_scripts(study)] == [9]
    assert not (store_dir / stale["artifact_id"]).exists()


def _spread_study(url: str, name: str = "spread") -> optuna.Study:
    """kd_ls first (0.26), vanilla KD far worse (3.2), 20 mutations of kd_ls scoring 0.20-0.29,
    three with distance pear scoring 0.45-0.5 (worse, not diverging) and one with distance l2
    that diverged (50)."""
    study = create_kd_study(url, name=name)
    config = study_config(study)
    kd, kd_ls = CLASSICS["kd"][0], CLASSICS["kd_ls"][0]
    study.add_trial(_trial(config, kd_ls, 0.26, proposer="classic", parent=None, mutated=[]))
    study.add_trial(_trial(config, kd, 3.2, proposer="classic", parent=None, mutated=[]))
    temperatures, magnitudes = list(config.space.options["temperature"]), list(config.space.options["magnitude"])
    for i in range(20):
        spec = _vary(kd_ls, temperature=temperatures[i % len(temperatures)], magnitude=magnitudes[i % len(magnitudes)])
        study.add_trial(_trial(config, spec, 0.29 - 0.0045 * i, proposer="mutation", parent=0, mutated=["temperature"]))
    for i, value in enumerate((0.45, 0.48, 0.5)):
        spec = _vary(kd_ls, distance="pear", temperature=temperatures[i])
        study.add_trial(_trial(config, spec, value, proposer="mutation", parent=0, mutated=["distance"]))
    study.add_trial(_trial(config, _vary(kd_ls, distance="l2"), 50.0, proposer="mutation", parent=0, mutated=["distance"]))
    return study


def _layouts(figure: dict) -> dict[str, dict]:
    """The genes figure's layout per gene, as its menu's buttons set it."""
    return {b["label"]: b["args"][1] for b in figure["layout"]["updatemenus"][0]["buttons"]}


def test_progress_range_holds_the_best_so_far_and_marks_a_classic_off_scale(tmp_path):
    """A classic far worse than the rest no longer stretches the y axis: the range holds every
    best-so-far value and the completed scores' spread, and says where vanilla KD is."""
    study = _spread_study(f"sqlite:///{tmp_path / 's.db'}")
    figure = json.loads(story.build(study).figures["progress"].to_json())
    low, high = figure["layout"]["yaxis"]["range"]
    best = next(t for t in figure["data"] if t["name"] == "best so far")["y"]
    assert all(low <= v <= high for v in best)
    assert high < 0.6 and 3.2 > high  # the spread of the completed scores, not vanilla KD's 3.2
    assert 0.5 <= high  # pear's 0.5 is among the scores the range shows
    off = next(a for a in figure["layout"]["annotations"] if a.get("name") == "off scale")
    assert off["text"] == "↑ vanilla KD 3.2 (off scale)"
    assert 0 <= off["y"] <= 1 and off["yref"] == "paper"
    assert "kd_ls" not in off["text"]
    assert "2 high scores above the range" in _subtitle(figure)  # vanilla KD and the diverged one
    assert any(t["name"].startswith("vanilla KD (trial 1): 3.2") for t in figure["data"])  # its legend entry stays


def test_lineage_range_leaves_out_a_diverged_ancestor_and_says_so(tmp_path):
    """A proxy student that diverged scored 2.3e13 in a study of scores near 0.5; as the parent
    of the best distillers it sat in their lineage and flattened every other node onto 0."""
    study = story_study(f"sqlite:///{tmp_path / 's.db'}", with_compare=False)
    config = study_config(study)
    kd_ls = CLASSICS["kd_ls"][0]
    wild = _vary(kd_ls, distance="l2")
    study.add_trial(_trial(config, wild, 2.3e13, proposer="mutation", parent=0, mutated=["distance"]))
    parent = study.trials[-1].number
    temperatures = list(config.space.options["temperature"])
    for i in range(4):
        study.add_trial(_trial(config, _vary(wild, temperature=temperatures[i]), 0.1 + 0.01 * i, proposer="mutation",
                               parent=parent, mutated=["temperature"]))
    figure = json.loads(story.build(study).figures["lineage"].to_json())
    low, high = figure["layout"]["yaxis"]["range"]
    nodes = [y for t in figure["data"] if t.get("mode") == "markers+text" for y in t["y"]]
    assert 2.3e13 in nodes and high < 10 and all(low <= y <= high for y in nodes if y != 2.3e13)
    assert "1 high score above the range" in _subtitle(figure)


def test_gene_figure_keeps_every_box_and_label_in_view(tmp_path):
    """Per gene: pear's worse box lies inside the y range; the diverged score is drawn at the
    top edge of distance's range, and a "▲ 1" label inside the plot marks l2; every drawn score
    and every label is within the axis range."""
    study = _spread_study(f"sqlite:///{tmp_path / 's.db'}")
    figure = json.loads(story.build(study).figures["genes"].to_json())
    layouts = _layouts(figure)
    boxes = {t["meta"]: t for t in figure["data"] if t["type"] == "box"}
    for gene, layout in layouts.items():
        box, view = boxes[gene], layout["yaxis.range"]
        assert view is not None, gene  # 3.2 and 50 are out of every gene's view
        assert all(view[0] <= y <= view[1] for y in box["y"]), gene
        assert sorted(box["customdata"]) == sorted(t.value for t in study.trials if t.state == TrialState.COMPLETE)
        categories = layout["xaxis.categoryarray"]
        labels = [a for a in layout["annotations"] if a.get("name", "").startswith("above: ")]
        assert all(0 <= a["y"] <= 1 and a["yref"] == "paper" and a["yanchor"] == "top" for a in labels), gene
        above = {x for x, y in zip(box["x"], box["customdata"]) if y > view[1]}
        assert {categories[a["x"]] for a in labels} == above, gene
        assert sum(int(a["text"].split()[-1]) for a in labels) == 2, gene  # 3.2 and 50
    distance = layouts["distance"]
    pear = [y for x, y in zip(boxes["distance"]["x"], boxes["distance"]["customdata"]) if x == "pear"]
    assert pear and max(pear) <= distance["yaxis.range"][1]
    label = next(a for a in distance["annotations"] if a.get("name") == "above: l2")
    assert label["text"] == "▲ 1" and distance["xaxis.categoryarray"][label["x"]] == "l2" and "50" in label["hovertext"]
    drawn = [y for x, y in zip(boxes["distance"]["x"], boxes["distance"]["y"]) if x == "l2"]
    assert max(drawn) == distance["yaxis.range"][1]  # at the top edge, not off it
    first = figure["layout"]
    menu_gene = first["updatemenus"][0]["buttons"][first["updatemenus"][0]["active"]]["label"]
    assert first["yaxis"]["range"] == layouts[menu_gene]["yaxis.range"]
    assert first["annotations"] == layouts[menu_gene]["annotations"]


def test_titles_fit_a_half_width_dashboard_card_and_lineage_labels_leave_nodes_clear(tmp_path):
    """Each figure's title and subtitle lines are short enough for a ~450 px card; the lineage's
    mutated genes are hover text on a mark mid-edge, not printed over the nodes."""
    study = story_study(f"sqlite:///{tmp_path / 's.db'}")
    study.add_trial(_trial(study_config(study), _vary(CLASSICS["kd"][0], distance="pear"), 0.5, proposer="random",
                           parent=None, mutated=[], reject_reason=None))
    figures = {n: json.loads(f.to_json()) for n, f in story.build(study).figures.items()}
    assert set(figures) == set(story.FIGURE_IDS)
    for name, figure in figures.items():
        titles = [figure["layout"]["title"]["text"]] + [l["title.text"] for l in _layouts(figure).values()] \
            if name == "genes" else [figure["layout"]["title"]["text"]]
        assert all("<br>" not in t and len(t) <= story_figures._TITLE_CHARS for t in titles), (name, titles)
        lines = _subtitle(figure).split("<br>")
        assert lines and all(len(line) <= story_figures._SUB_CHARS for line in lines), (name, lines)
        assert figure["layout"]["margin"]["t"] >= 30 + 24 + 14 * len(lines)
    lineage = figures["lineage"]
    marks = next(t for t in lineage["data"] if t.get("name") == "mutated genes")
    assert marks["mode"] == "markers" and "mutated: %{text}" in marks["hovertemplate"]
    nodes = [t for t in lineage["data"] if t.get("mode") == "markers+text"]
    assert {text for t in nodes for text in t["text"]} <= {"", *(f"#{i}" for i in range(1, 7))}


def test_commands_shown_for_a_study_name_with_spaces_run_as_pasted(tmp_path, capsys, monkeypatch):
    """The note's and the report's commands, pasted into a shell, name the study and storage
    they were written for, whatever spaces, slashes or quotes those hold."""
    import shlex

    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    folder = tmp_path / "my runs"
    folder.mkdir()
    url = f"sqlite:///{folder / 'a b.db'}"
    name = "kd search/ü 'v2'"
    story_study(url, with_compare=False, name=name)
    told = story.build(optuna.load_study(study_name=name, storage=url))
    for _, command in told.commands:
        args = shlex.split(command)
        assert args[args.index("--study-name") + 1] == name and args[args.index("--storage") + 1] == url
    space = next(command for _, command in told.commands if command.startswith("kd-optuna space"))
    code, _, stderr = invoke_cli(capsys, *shlex.split(space)[1:])
    assert code == 0, stderr
    code, _, stderr = invoke_cli(capsys, "create-study", "digits", "--study-name", name, "--storage", url)
    assert code == 2
    suggested = re.search(r"`(kd-optuna optimize [^`]*)`", stderr).group(1)
    assert shlex.split(suggested)[3] == name


def test_note_and_report_count_every_trial_the_same_way(tmp_path, capsys, monkeypatch):
    """A study with running, queued and plainly pruned trials beside completed, rejected and
    failed ones: the note's and the report's trial counts add up to the total and agree."""
    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = story_study(url, with_compare=False)
    config = study_config(study)
    study.add_trial(_trial_of(config, _vary(CLASSICS["kd"][0], magnitude=5), state=TrialState.FAIL))
    study.add_trial(_trial_of(config, _vary(CLASSICS["kd"][0], magnitude=50), state=TrialState.PRUNED))
    study.enqueue_trial(CLASSICS["kd"][0].to_params())
    study.ask()
    study.enqueue_trial(_vary(CLASSICS["kd"][0], temperature=1).to_params())
    line = "12: 6 completed, 2 rejected by the loss check, 1 failed, 1 pruned, 1 running, 1 waiting"
    note = story.refresh(study).note
    assert f"- **trials**: {line}" in note, note.splitlines()[:8]
    out = tmp_path / "report.html"
    assert invoke_cli(capsys, "report", "--storage", url, "-o", str(out))[0] == 0
    assert f"<td>trials</td><td>{line}</td>" in out.read_text(encoding="utf-8")


def test_more_trials_command_adds_a_hundred_finished_trials(tmp_path):
    """--n-trials counts the study's finished trials (completed and pruned), so the command
    the story shows for more trials asks for 100 more of those, whatever failed or waits."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = story_study(url, with_compare=False)  # 8 finished
    study.add_trial(_trial_of(study_config(study), _vary(CLASSICS["kd"][0], magnitude=5), state=TrialState.FAIL))
    study.enqueue_trial(CLASSICS["kd"][0].to_params())
    command = next(c for _, c in story.build(study).commands if c.startswith("kd-optuna optimize"))
    assert command.endswith("--n-trials 108")


def test_an_artifact_dir_that_is_a_file_is_named_with_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    story_study(url, with_compare=False)
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    for where in ("notes.txt", "notes.txt/scripts"):
        code, out, err = invoke_cli(capsys, "dashboard", "--storage", url, "--port", port,
                                    "--artifact-dir", str(tmp_path / where))
        assert code == 2 and err.count("\n") == 1 and repr(str(tmp_path / where)) in err and "--artifact-dir" in err
        assert "http://" not in out
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_report_does_not_call_a_former_best_s_script_the_best_s(tmp_path, capsys, monkeypatch):
    """Trials finished since the last refresh (a Python objective, an interrupted optimize):
    the report names the stored script for what it is, not as the best trial's."""
    monkeypatch.delenv(story_artifacts.ARTIFACT_DIR_ENV, raising=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = story_study(url, with_compare=False)
    assert story.refresh(study).artifact["trial"] == 5
    out = tmp_path / "report.html"
    assert invoke_cli(capsys, "report", "--storage", url, "-o", str(out))[0] == 0
    assert "The best trial's script is stored with the study: <code>train_trial5.py</code>" in out.read_text(encoding="utf-8")
    study.add_trial(_trial_of(study_config(study), _vary(CLASSICS["kd"][0], magnitude=5), 0.05))
    assert invoke_cli(capsys, "report", "--storage", url, "-o", str(out))[0] == 0
    page = out.read_text(encoding="utf-8")
    assert '<td class="num">8</td>' in page and "The best trial's script" not in page and "train_trial5.py" in page


def test_two_reports_into_one_file_at_once_both_write_a_whole_page(tmp_path, monkeypatch):
    """A second `kd-optuna report` into the same file finishes while the first is about to
    put its page in place: both succeed, the file is one whole page, no partial file is left."""
    import os

    from kd_optuna.run import report

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = story_study(url, with_compare=False)
    out = tmp_path / "report.html"
    real_replace = os.replace

    def replace_after_another_report(src, dst):
        monkeypatch.setattr(os, "replace", real_replace)
        report.write_report(out, study)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_another_report)
    report.write_report(out, study)
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>") and page.count("<html") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("report")] == ["report.html"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes, not mkstemp's 0600


def test_report_into_a_folder_it_cannot_write_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    url = f"sqlite:///{tmp_path / 's.db'}"
    story_study(url, with_compare=False)

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "report.html.x.partial"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    code, _, err = invoke_cli(capsys, "report", "--storage", url, "-o", str(tmp_path / "report.html"))
    assert code == 2 and err.count("\n") == 1 and repr(str(tmp_path / "report.html")) in err and "-o" in err
    assert ".partial" not in err and not list(tmp_path.glob("report*"))


def test_the_lineage_follows_the_best_the_tables_list_and_says_when_none_is_scored():
    import optuna

    from kd_optuna.run import figures as story_figures
    from kd_optuna.run.study_view import TOP, best_distinct

    study = optuna.create_study()
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=12)
    leaders, _ = story_figures.lineage(study.trials)
    assert [t.number for t in leaders] == [t.number for t in best_distinct(study.trials, TOP)]
    empty = story_figures.lineage_figure([])
    assert "no trial scored yet" in empty.layout.title.text
