"""Which proxy regime and which score predict the exported full training? (issue 16)

For a fixed set of candidate distillers (the classics, one-gene neighbours of vanilla KD and
seeded random specs that pass the rejection protocol), this trains each one with the study's
exported recipe (``kd_optuna.export.training.train_with_distiller``: the study's ``[train]`` settings,
last-epoch top-1 on the test split, several seeds), and runs each proxy regime on it:

    few_labels    the first version's proxy: Adam 1e-2 cosine, 5 labels per class, 200 steps
    recipe_1/6    the [train] recipe shrunk to 1/6 of its epochs (SGD, same lr, all labels)
    recipe_1/3    ... 1/3 of its epochs (the new default)
    recipe_full   the whole recipe in the proxy loop, scored on the val split

and prints, per regime and metric, Spearman's rho with the final accuracy over all candidates
and over the top ones (final accuracy within ``--top-margin`` points of vanilla KD's).
Proxy metrics are read on the validation split only; the test split is the final's.

    python benchmarks/proxy_fidelity.py --config digits_hard --final-seeds 0 1 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch
from scipy import stats

from kd_optuna.distill.classics import CLASSICS
from kd_optuna.run.config import load_config
from kd_optuna.export.training import train_with_distiller
from kd_optuna.export.script import script_defaults
from kd_optuna.proxy.settings import ProxySettings
from kd_optuna.space import GENES, DistillerSpec
from kd_optuna.proxy.task import Task

ALL_REGIMES = {
    "few_labels": None,
    "recipe_1/6": 1 / 6,
    "recipe_1/3": 1 / 3,
    "recipe_full": 1.0,
}
REGIMES = dict(ALL_REGIMES)
METRICS = ("val_ce", "val_acc", "cka_gap", "ce+2cka")


def regime_settings(config, name: str) -> ProxySettings:
    fraction = REGIMES[name]
    if fraction is None:
        return ProxySettings()
    return ProxySettings.from_recipe(config.train, {}, epochs_fraction=fraction)


def kd_neighbours() -> list[tuple[str, DistillerSpec]]:
    kd = CLASSICS["kd"][0]
    changes = [("temperature", 1), ("temperature", 8), ("temperature", 16), ("magnitude", 0.1),
               ("magnitude", 5), ("magnitude", 10), ("calibration", "focal"), ("calibration", "entropy"),
               ("calibration", "sim"), ("distance", "pear"), ("transform1", "softmax_C")]
    return [(f"kd:{gene}={value}", dataclasses.replace(kd, **{gene: value})) for gene, value in changes]


def candidates(task: Task, n_random: int, seed: int) -> list[tuple[str, DistillerSpec]]:
    chosen = [(name, spec) for name, (spec, _) in CLASSICS.items()] + kd_neighbours()
    keys = {spec.key for _, spec in chosen}
    rng = random.Random(seed)
    found = 0
    while found < n_random:
        spec = DistillerSpec(**{g: rng.choice(task.space[g]) for g in GENES})
        if spec.key in keys or task.reject(spec) is not None:
            continue
        keys.add(spec.key)
        chosen.append((f"random{found + 1}", spec))
        found += 1
    return [(name, spec) for name, spec in chosen if task.reject(spec) is None]


def spearman(xs, ys) -> float:
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return float("nan")
    return float(stats.spearmanr(xs, ys).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits_hard")
    parser.add_argument("--n-random", type=int, default=6)
    parser.add_argument("--final-seeds", type=int, nargs="*", default=[0, 1], help="none: proxies only")
    parser.add_argument("--specs", default=None,
                        help="JSON file of [name, params] pairs to use instead of the default candidates")
    parser.add_argument("--proxy-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--top-margin", type=float, default=2.0, help="points below vanilla KD's final accuracy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file of every figure (written as it goes)")
    parser.add_argument("--regimes", nargs="+", default=list(ALL_REGIMES), choices=list(ALL_REGIMES))
    args = parser.parse_args()
    for name in set(ALL_REGIMES) - set(args.regimes):
        del REGIMES[name]
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    tasks = {}
    for name in REGIMES:
        settings = dataclasses.replace(regime_settings(config, name), seeds=tuple(args.proxy_seeds))
        tasks[name] = Task.from_config(dataclasses.replace(config, proxy=settings), device="cpu")
    if args.specs:
        chosen = [(name, DistillerSpec.from_params(params)) for name, params in json.loads(Path(args.specs).read_text())]
    else:
        chosen = candidates(tasks[next(iter(REGIMES))], args.n_random, args.seed)
    recipe = {**script_defaults(config), "device": "cpu", "num_workers": 0}
    rows = []
    for name, spec in chosen:
        row = {"name": name, "key": spec.key, "formula": spec.formula(), "final": [], "proxy": {}}
        t0 = time.perf_counter()
        for seed in args.final_seeds:
            result = train_with_distiller(spec.to_params(), **{**recipe, "seed": seed, "output_dir": f"/tmp/kd_fidelity/{seed}"},
                                          progress=False)
            row["final"].append(100 * result["final_top1"])
        row["final_seconds"] = time.perf_counter() - t0
        for regime, task in tasks.items():
            t1 = time.perf_counter()
            try:
                metrics = task.run(spec).metrics()
                metrics["ce+2cka"] = metrics["val_ce"] + 2 * metrics["cka_gap"]
            except Exception as error:  # a proxy that diverges on a candidate is a finding, not a crash
                metrics = {"error": str(error)[:120]}
            metrics["seconds"] = time.perf_counter() - t1
            row["proxy"][regime] = metrics
        row["final_mean"] = sum(row["final"]) / len(row["final"]) if row["final"] else float("nan")
        rows.append(row)
        print(f"{name:28s} final {row['final_mean']:6.2f}  " + "  ".join(
            f"{r}: acc {m.get('val_acc', float('nan')):.3f} ce {m.get('val_ce', float('nan')):.3f}"
            + (f" {m['error']}" if "error" in m else "") for r, m in row["proxy"].items()),
            flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=1))
    if args.final_seeds:
        report(rows, args.top_margin)


def report(rows, margin: float) -> None:
    kd = next(r["final_mean"] for r in rows if r["name"] == "kd")
    top = [r for r in rows if r["final_mean"] >= kd - margin]
    print(f"\n{len(rows)} candidates, {len(top)} within {margin} points of vanilla KD ({kd:.2f}%)")
    print("| regime | metric | Spearman (all) | Spearman (top) | proxy s/trial |")
    print("|---|---|---:|---:|---:|")
    for regime in REGIMES:
        for metric in METRICS:
            def pairs(subset):
                ok = [r for r in subset if metric in r["proxy"][regime]]
                sign = 1 if metric == "val_acc" else -1
                return [sign * r["proxy"][regime][metric] for r in ok], [r["final_mean"] for r in ok]
            seconds = sum(r["proxy"][regime]["seconds"] for r in rows) / len(rows)
            print(f"| {regime} | {metric} | {spearman(*pairs(rows)):.3f} | {spearman(*pairs(top)):.3f} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
