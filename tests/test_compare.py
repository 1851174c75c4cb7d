"""`kd-optuna compare`: methods x seeds on the full recipe, stored runs, paired statistics."""

import dataclasses
import json

import optuna
import pytest
from scipy import stats

from kd_optuna.run import compare
from kd_optuna.distill.classics import CLASSICS
from kd_optuna.errors import KdOptunaError
from kd_optuna.export.training import METHODS

KD = CLASSICS["kd"][0].to_params()


def _run(method, seed, top1):
    return compare.Run(method, seed, top1, top1, 1, method, 0.0)


def test_paired_gain_is_the_t_interval_of_the_seedwise_differences():
    searched = [91.0, 93.5, 90.2, 94.0, 92.1]
    kd = [90.3, 93.0, 91.6, 92.5, 93.3]
    runs = [_run("searched", s, v) for s, v in enumerate(searched)] + [_run("kd", s, v) for s, v in enumerate(kd)]
    summaries, gains = compare.summarise(runs)
    reference = stats.ttest_rel(searched, kd).confidence_interval(0.95)
    (gain,) = gains
    assert gain.method == "kd" and gain.n == 5 and gain.wins == 3
    assert gain.mean == pytest.approx(sum(searched) / 5 - sum(kd) / 5)
    assert (gain.low, gain.high) == pytest.approx((reference.low, reference.high))
    by_name = {s.method: s for s in summaries}
    assert by_name["kd"].std == pytest.approx(stats.tstd(kd))


def test_only_shared_seeds_are_paired():
    runs = [_run("searched", 0, 90.0), _run("searched", 1, 92.0), _run("dkd", 1, 91.0), _run("dkd", 2, 80.0)]
    summaries, gains = compare.summarise(runs)
    (gain,) = gains
    assert gain.n == 1 and gain.mean == pytest.approx(1.0)
    # one shared seed has no interval: the table says so rather than printing [-inf, +inf]
    assert "| dkd | 2 | 85.50 +- 7.78 | +1.00 (one seed: no interval) | 1/1 |" in compare.format_table(summaries, gains)


def test_a_diverged_run_counts_in_no_mean_and_its_seed_is_named():
    nan = compare.Run("dkd", 1, None, None, 1, "dkd", 0.0, diverged="the loss became nan in epoch 2")
    runs = [_run("searched", 0, 90.0), _run("searched", 1, 92.0), _run("dkd", 0, 89.0), nan,
            compare.Run("crd", 0, None, None, 1, "crd", 0.0, diverged="the loss became inf in epoch 1")]
    summaries, gains = compare.summarise(runs)
    by_name = {s.method: s for s in summaries}
    assert by_name["dkd"].n == 1 and by_name["dkd"].mean == 89.0 and by_name["dkd"].diverged == (1,)
    assert by_name["crd"].n == 0 and by_name["crd"].diverged == (0,)
    assert [(g.method, g.n, g.mean) for g in gains] == [("dkd", 1, 1.0)]
    table = compare.format_table(summaries, gains)
    assert "| dkd | 1 | 89.00 +- 0.00; diverged on seed 1 | +1.00 (one seed: no interval) | 1/1 |" in table
    assert "| crd | 0 | diverged on seed 0 |  |  |" in table
    as_json = compare.as_json(runs, summaries, gains)
    assert as_json["methods"]["crd"] == {"n": 0, "mean": None, "std": None, "diverged_seeds": [0]}
    assert as_json["runs"][3]["diverged"] == "the loss became nan in epoch 2" and as_json["runs"][3]["top1"] is None


def test_a_run_that_diverges_is_recorded_as_diverged_not_raised(tmp_path):
    """A method that the study's lr makes diverge is an outcome of the comparison: the other
    runs go on, and the stored record keeps a repeated compare from training it again."""
    from kd_optuna.export.script import script_defaults
    from kd_optuna.run.config import load_config

    recipe = {**script_defaults(load_config("digits")), "epochs": 1, "milestones": [], "lr": 1e12, "num_workers": 0,
              "output_dir": str(tmp_path / "runs")}
    run = compare._run_job(compare.Job("dml", 0, KD, recipe), "cpu", 1)  # dml: no teacher to train
    assert run.top1 is None and run.val_top1 is None and run.method == "dml" and run.epochs == 1
    assert run.diverged.startswith("the loss became ") and run.diverged.endswith(" in epoch 1")
    assert compare._as_run(dataclasses.asdict(run)) == run
    # at a sane lr one epoch trains, and its 17 steps leave the BatchNorm statistics stale: the run says so
    trained = compare._run_job(compare.Job("dml", 0, KD, {**recipe, "lr": 0.05}), "cpu", 1)
    assert trained.diverged is None and 0 <= trained.top1 <= 100
    assert trained.stale_batch_norm.startswith("after 17 steps the student's BatchNorm running statistics")


def test_unknown_methods_are_refused_with_the_list():
    assert compare.parse_methods("searched, kd,kd") == ["searched", "kd"]
    with pytest.raises(KdOptunaError, match="unknown method nope; choose from: searched, kd"):
        compare.parse_methods("searched,nope")


def test_the_digest_names_what_decides_a_run():
    recipe = {"epochs": 2, "lr": 0.05, "device": "cpu", "output_dir": "a"}
    base = compare.Job("searched", 0, KD, recipe)
    assert base.digest() == compare.Job("searched", 0, KD, {**recipe, "device": "cuda:1", "output_dir": "b"}).digest()
    assert base.digest() != compare.Job("searched", 1, KD, recipe).digest()
    assert base.digest() != compare.Job("searched", 0, KD, {**recipe, "epochs": 3}).digest()
    assert base.digest() != compare.Job("kd", 0, KD, recipe).digest()
    other = dict(KD, temperature=8)
    assert base.digest() != compare.Job("searched", 0, other, recipe).digest()
    assert compare.Job("kd", 0, KD, recipe).digest() == compare.Job("kd", 0, other, recipe).digest()


def test_a_setting_added_later_keeps_the_digest_of_runs_stored_before_it_at_its_old_value():
    recipe = {"epochs": 2, "lr": 0.05, "dataset": "imagefolder"}  # stored before [data] image_size and val_fraction
    before = compare.Job("searched", 0, KD, recipe).digest()
    assert compare.Job("searched", 0, KD, {**recipe, "image_size": None, "val_fraction": None}).digest() == before
    assert compare.Job("searched", 0, KD, {**recipe, "image_size": 64}).digest() != before
    assert compare.Job("searched", 0, KD, {**recipe, "val_fraction": 0.2}).digest() != before


@pytest.mark.slow
def test_compare_from_the_cli_stores_runs_and_reuses_them(tmp_path, capsys, monkeypatch):
    from conftest import create_kd_study, invoke_cli

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url, "s", "digits")
    from kd_optuna.space import suggest_distiller

    study.enqueue_trial(KD)
    study.optimize(lambda trial: suggest_distiller(trial).magnitude, n_trials=1)
    args = ("compare", "--storage", url, "--methods", "searched,kd", "--seeds", "2", "--epochs", "1",
            "--no-progress", "-f", "json")
    code, out, err = invoke_cli(capsys, *args)
    assert code == 0, err
    result = json.loads(out)
    assert sorted((r["method"], r["seed"]) for r in result["runs"]) == [("kd", 0), ("kd", 1), ("searched", 0), ("searched", 1)]
    by = {(r["method"], r["seed"]): r["top1"] for r in result["runs"]}
    assert by[("searched", 0)] == by[("kd", 0)] and 0 <= by[("kd", 1)] <= 100  # searched is vanilla KD here
    stored = compare.recorded_runs(optuna.load_study(study_name="s", storage=url).user_attrs)
    assert len(stored) == 4

    def no_training(*a, **k):
        raise AssertionError("a stored run was trained again")

    monkeypatch.setattr(compare, "_run_job", no_training)
    code, again, err = invoke_cli(capsys, *args)
    assert code == 0, err
    assert json.loads(again)["runs"] == result["runs"]
    from optuna_dashboard import get_note

    assert "kd-optuna compare" in get_note(optuna.load_study(study_name="s", storage=url))


def test_baselines_compare_on_a_study_without_a_completed_trial(tmp_path, capsys, monkeypatch):
    """Only `searched` needs the search's best trial: `--methods kd` runs before any trial
    completed (here its run is stored already, so nothing trains)."""
    from dataclasses import asdict

    from conftest import create_kd_study, invoke_cli
    from kd_optuna.export.script import script_defaults
    from kd_optuna.run.storage import study_config

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url, "s", "digits")
    recipe = {**script_defaults(study_config(study)), "epochs": 1, "milestones": []}
    digest = compare.Job("kd", 0, KD, recipe).digest()
    study.set_user_attr(compare.RUN_ATTR_PREFIX + digest, asdict(compare.Run("kd", 0, 51.5, 50.0, 1, "kd", 1.0)))
    code, out, err = invoke_cli(capsys, "compare", "--storage", url, "--methods", "kd", "--seeds", "1",
                                "--epochs", "1", "--no-progress", "-f", "json")
    assert code == 0, err
    assert json.loads(out)["runs"] == [{"method": "kd", "seed": 0, "top1": 51.5, "val_top1": 50.0, "epochs": 1,
                                        "distiller": "kd", "diverged": None, "stale_batch_norm": None}]
    code, _, err = invoke_cli(capsys, "compare", "--storage", url, "--methods", "searched,kd", "--seeds", "1")
    assert code == 2 and "no completed trial" in err


@pytest.mark.parametrize("name", ["/tmp/escaped", "../../up", "..", ".", "", "a/b", "a\\b", "my study ü"])
def test_the_default_runs_folder_is_one_folder_below_compare_whatever_the_study_name(name):
    from pathlib import Path

    folder = compare.default_output_dir(name)
    assert folder.parent == Path("kd_optuna_runs") / "compare"
    assert folder.name not in ("", ".", "..") and "/" not in folder.name and "\\" not in folder.name
    assert folder != compare.default_output_dir(name + "x")


def test_a_plain_study_name_is_its_runs_folder():
    assert str(compare.default_output_dir("digits-2.b_c")) == "kd_optuna_runs/compare/digits-2.b_c"


def test_compare_help_lists_every_method_and_bad_methods_exit_2(capsys):
    from conftest import invoke_cli

    code, out, _ = invoke_cli(capsys, "compare", "--help")
    assert code == 0 and all(name in out for name in METHODS)
    code, _, err = invoke_cli(capsys, "compare", "--storage", "sqlite:///:memory:", "--methods", "kd,bogus")
    assert code == 2 and "bogus" in err and len(err.strip().splitlines()) == 1


def _strict_json(text):
    """json.loads as JSON (RFC 8259) reads it: NaN, Infinity and -Infinity are no numbers."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_compare_json_of_one_seed_is_strict_json(tmp_path, capsys, monkeypatch):
    """`compare --seeds 1 -f json` printed "low": -Infinity, "high": Infinity (one seed has no
    interval), which JavaScript's, Go's and Rust's JSON readers refuse; it is null now."""
    from conftest import create_kd_study, invoke_cli
    from kd_optuna.run import cli

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = create_kd_study(url, "s", "digits")
    from kd_optuna.space import suggest_distiller

    study.enqueue_trial(KD)
    study.optimize(lambda trial: suggest_distiller(trial).magnitude, n_trials=1)
    monkeypatch.setattr(cli, "_train_missing_teacher", lambda *a: None)
    monkeypatch.setattr(compare, "run_compare", lambda study, jobs, **k: [_run("searched", 0, 90.0), _run("kd", 0, 89.5)])
    code, out, err = invoke_cli(capsys, "compare", "--storage", url, "--methods", "searched,kd", "--seeds", "1",
                                "--no-progress", "-f", "json")
    assert code == 0, err
    assert _strict_json(out)["searched_minus"]["kd"] == {"n": 1, "mean": 0.5, "low": None, "high": None, "wins": 1}


def _compare_without_training(tmp_path, monkeypatch, runs):
    """A digits study in ``tmp_path`` whose ``compare`` trains nothing: it returns ``runs`` and
    appends the jobs it was given to the list returned with the study's URL."""
    from conftest import create_kd_study
    from kd_optuna.run import cli

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 's.db'}"
    create_kd_study(url, "s", "digits")
    monkeypatch.setattr(cli, "_train_missing_teacher", lambda *a: None)
    given = []

    def record(study, jobs, **kwargs):
        given.extend(jobs)
        return runs

    monkeypatch.setattr(compare, "run_compare", record)
    return url, given


def test_compare_spec_takes_a_file_or_json_and_names_a_missing_file(tmp_path, capsys, monkeypatch):
    """`--spec best.json` with no such file read "not a distiller spec (Expecting value: line 1
    column 1 (char 0))": the message now says the file does not exist; a binary file given by
    mistake was a UnicodeDecodeError traceback."""
    from conftest import invoke_cli

    url, jobs = _compare_without_training(tmp_path, monkeypatch, [_run("searched", 0, 90.0)])
    args = ("compare", "--storage", url, "--methods", "searched", "--seeds", "1", "--no-progress")
    code, _, err = invoke_cli(capsys, *args, "--spec", "best.json")
    assert code == 2 and len(err.splitlines()) == 1 and "--spec 'best.json': no such file" in err, err
    (tmp_path / "teacher.pt").write_bytes(b"PK\x03\x04\xff\xfe")
    code, _, err = invoke_cli(capsys, *args, "--spec", "teacher.pt")
    assert code == 2 and len(err.splitlines()) == 1 and "--spec: not a distiller spec" in err, err
    (tmp_path / "best.json").write_text(json.dumps(KD))
    for given in ("best.json", json.dumps(KD)):
        code, out, err = invoke_cli(capsys, *args, "--spec", given)
        assert code == 0, err
    assert [dict(job.spec_params) for job in jobs] == [KD, KD]


def test_compare_lr_overrides_the_study_recipe_and_prints_each_diverged_run(tmp_path, capsys, monkeypatch):
    from conftest import invoke_cli

    diverged = compare.Run("kd", 0, None, None, 1, "kd", 0.0, diverged="the loss became nan in epoch 3")
    short = compare.Run("kd", 1, 50.0, 50.0, 1, "kd", 0.0, stale_batch_norm="after 3 steps the student's BatchNorm …")
    url, jobs = _compare_without_training(tmp_path, monkeypatch, [diverged, short])
    args = ("compare", "--storage", url, "--methods", "kd", "--seeds", "1", "--no-progress")
    code, out, err = invoke_cli(capsys, *args, "--lr", "0.001")
    assert code == 0, err
    assert jobs[0].recipe["lr"] == 0.001
    last = optuna.load_study(study_name="s", storage=url).user_attrs[compare.LAST_ATTR]
    assert last["overrides"] == {"lr": 0.001} and len(last["digests"]) == 1  # what the study's story shows
    assert "| kd | 1 | 50.00 +- 0.00; diverged on seed 0 |  |  |" in out
    assert "kd seed 0: the loss became nan in epoch 3; recorded as diverged (a lower --lr may train it)" in out
    assert "note: 1 of the 2 runs, for example kd seed 1: after 3 steps the student's BatchNorm … (--epochs)" in out
    code, _, err = invoke_cli(capsys, *args, "--lr", "0")
    assert code == 2 and "--lr" in err
