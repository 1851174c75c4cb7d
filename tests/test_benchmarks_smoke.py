"""Smoke runs of the search-cost, scaling, sampler and GPU-check benchmarks in their quick modes.

Each script runs in a subprocess, as a user runs it, and must exit 0 and print its tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*command: str, timeout: int = 600) -> str:
    # GPU_CHECK_TIMEOUT guards the device's 8-minute budget; on a shared CPU, bf16 alone can take minutes
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable, "GPU_CHECK_TIMEOUT": str(timeout - 10)}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def table_rows(output: str, first_cell: str) -> list[list[str]]:
    """Cells of the Markdown table rows of ``output`` whose first cell is ``first_cell``."""
    rows = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


@pytest.mark.slow
def test_search_cost_quick_prints_searches_split_cache_and_projection(tmp_path):
    out = run(sys.executable, "benchmarks/search_cost.py", "--quick", "--json", str(tmp_path / "cost.json"))
    searches = [row for row in table_rows(out, "4") if len(row) == 9]  # the whole-search table
    splits = [row for row in table_rows(out, "4") if len(row) == 12]  # the per-trial split
    assert [row[2] for row in searches] == ["1", "2"], out
    assert [row[2] for row in splits] == ["1", "2"], out
    assert "proxy time saved" in out and "PROJECTED on one GPU" in out, out
    for setting in ("(50, 20)", "(100, 20)", "(300, 20)", "(100, 10)", "(100, 30)"):
        assert table_rows(out, setting), setting
    import json

    figures = json.loads((tmp_path / "cost.json").read_text())
    for search in figures["searches"]:
        assert search["finished"] == 4
        assert search["duplicates"][1] == 0  # no canonical key trained twice
        split = search["per_trial"]
        assert split["training"] > 0 and split["sampler"] > 0 and split["storage"] > 0


@pytest.mark.slow
def test_scaling_quick_prints_a_row_per_worker_count():
    out = run(sys.executable, "benchmarks/scaling.py", "--quick", "--backends", "sqlite")
    rows = table_rows(out, "sqlite")
    assert [row[1] for row in rows] == ["1", "2"], out
    assert all(row[8] == "6" for row in rows), out  # every run finished its 6 trials
    assert "load average" in out


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_prints_eight_variants():
    out = run("bash", "benchmarks/gpu_check.sh", "--cpu", "--quick")
    variants = [line for line in out.splitlines() if line.startswith("| live teacher") or line.startswith("| cache")]
    assert len(variants) == 8, out
    assert "device: CPU" in out and "fastest:" in out


@pytest.mark.slow
def test_gpu_packing_runs_a_real_optimize_on_cpu_and_reports_vanilla_kd(tmp_path):
    out = run("bash", "benchmarks/gpu_check.sh", "--packing", "--cpu", "--quick", "--variants", "1g",
              "--trials", "3", "--json", str(tmp_path / "packing.json"))
    rows = table_rows(out, "1 worker(s), cuda graph")
    assert len(rows) == 1, out
    assert "eager" in rows[0][7], out  # the CPU ignores cuda_graph
    row = json.loads((tmp_path / "packing.json").read_text())["rows"][0]
    assert row["evaluations"] == 3 and row["completed"] >= 2, out
    assert row["kd_metrics"] is not None and row["evals_per_hour"] > 0, out


@pytest.mark.slow
def test_side_by_side_students_train_as_the_sequential_ones(tmp_path):
    out = run("bash", "benchmarks/gpu_check.sh", "--side-by-side", "--cpu", "--quick", "--json", str(tmp_path / "sbs.json"))
    figures = json.loads((tmp_path / "sbs.json").read_text())
    assert [row["k"] for row in figures["rows"]] == [1, 2], out
    for row in figures["rows"]:
        # the same weights, BatchNorm statistics and validation CE as K sequential trials, up to float sums
        assert row["max_val_ce_diff"] < figures["seed_noise"] / 10, out
        assert row["speedup"] > 0 and row["speedup_contiguous"] > 0, out
    assert len(table_rows(out, "2")) == 1, out


def test_sampler_synthetic_prints_a_median_per_sampler():
    out = run(sys.executable, "benchmarks/sampler_synthetic.py", "--seeds", "2", "--budgets", "12", "--interactions", "1")
    (row,) = table_rows(out, "12")
    assert row[1] == "1" and len(row) == 6, out
    assert all(float(cell) < 0 for cell in row[2:]), out  # the best of 12 draws is below the mean 0


@pytest.mark.slow
def test_sampler_search_runs_studies_in_processes_with_the_values_of_one_process(tmp_path):
    import json

    from conftest import tiny_digits_toml

    (tmp_path / "tiny.toml").write_text(tiny_digits_toml())
    values = []
    for processes in ("1", "2"):
        path = tmp_path / f"search{processes}.json"
        out = run(sys.executable, "benchmarks/sampler_search.py", "--config", str(tmp_path / "tiny.toml"),
                  "--samplers", "evolution,random", "--seeds", "0,1", "--budget", "3", "--processes", processes,
                  "--json", str(path))
        assert [row[0] for row in out_rows(out)] == ["evolution", "random"], out
        values.append(json.loads(path.read_text())["results"])
    strip = [{name: [r["values"] for r in runs] for name, runs in result.items()} for result in values]
    assert strip[0] == strip[1]


def out_rows(output: str) -> list[list[str]]:
    return [row for name in ("evolution", "random") for row in table_rows(output, name)]


@pytest.mark.slow
def test_proxy_noise_prints_each_distillers_spread_and_the_ratio(tmp_path):
    from conftest import tiny_digits_toml

    (tmp_path / "tiny.toml").write_text(tiny_digits_toml())
    specs = {"kd": {"knowledge": "logit", "transform1": "no", "transform2": "no", "transform3": "no",
                    "distance": "kl", "calibration": "no", "temperature": 4, "magnitude": 1},
             "kd_x10": {"knowledge": "logit", "transform1": "no", "transform2": "no", "transform3": "no",
                        "distance": "kl", "calibration": "no", "temperature": 4, "magnitude": 10}}
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/proxy_noise.py"), "--config", "tiny.toml", "--specs", "specs.json",
         "--seeds", "0,1,2", "--json", "noise.json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row[0]: row for row in table_rows(result.stdout, "kd") + table_rows(result.stdout, "kd_x10")}
    assert set(rows) == {"kd", "kd_x10"} and all(len(row) == 6 for row in rows.values()), result.stdout
    saved = json.loads((tmp_path / "noise.json").read_text())["scores"]
    for name, row in rows.items():
        assert float(row[1]) == pytest.approx(sum(saved[name]) / 3, abs=1e-4)
    assert "pooled within-distiller std" in result.stdout and "first on the mean" in result.stdout
