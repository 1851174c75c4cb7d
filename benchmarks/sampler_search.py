"""Does EvolutionSampler search well? Best digits score after a fixed budget, against Optuna's samplers.

For each sampler and seed, one in-memory study runs ``budget`` trials of the real objective of
a study config (``Objective(Task.from_config(load_config(config)))``, digits unless
``--config`` names another; one CPU thread, the same code for every sampler); the script
prints the median best score (lower is better), how many seeds improved on vanilla KD's
score, and the median best-so-far curve at a few budgets::

    python benchmarks/sampler_search.py                         # 60 trials x 5 seeds x 3 samplers
    python benchmarks/sampler_search.py --config digits_hard --samplers evolution --budget 110
    python benchmarks/sampler_search.py --samplers evolution,random --seeds 0 --budget 10   # smoke
    python benchmarks/sampler_search.py --combine seed_0.json seed_1.json   # one report from runs of one seed each

EvolutionSampler is built from the study config's [search] table, as `kd-optuna optimize` builds
it. Studies are independent: ``--processes N`` runs N of them at once, each in its own process
with one thread, and gives the same values as running them in turn (only s/study changes with
the load). The teacher is trained once, before any study starts, and shared through the cache.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from functools import lru_cache
from pathlib import Path

import optuna
import torch

from kd_optuna.distill.classics import CLASSICS
from kd_optuna.proxy.objective import Objective
from kd_optuna.proxy.task import Task
from kd_optuna.run.config import load_config

SAMPLERS = {
    "evolution": lambda config, seed: config.make_sampler(seed=seed),
    "random": lambda config, seed: optuna.samplers.RandomSampler(seed=seed),
    "tpe": lambda config, seed: optuna.samplers.TPESampler(seed=seed),
    "nsga2": lambda config, seed: optuna.samplers.NSGAIISampler(seed=seed),
    # NSGA-II with EvolutionSampler's population size: its default 50 is all random at 60 trials
    "nsga2_p": lambda config, seed: optuna.samplers.NSGAIISampler(
        seed=seed, population_size=config.make_sampler(seed=seed, with_llm=False).population_size),
}


def best_so_far(values: list[float | None]) -> list[float]:
    """Running minimum over completed trials (inf until the first completes)."""
    best, curve = float("inf"), []
    for value in values:
        if value is not None:
            best = min(best, value)
        curve.append(best)
    return curve


PRUNERS = {"median": optuna.pruners.MedianPruner, "none": optuna.pruners.NopPruner}


def run(sampler_name: str, config, objective, seed: int, budget: int, pruner: str = "median",
        warm_start: bool = False) -> dict:
    """One study; ``warm_start``: Optuna's samplers first run, as enqueued trials, the classic
    distillers EvolutionSampler starts from (EvolutionSampler always does)."""
    study = optuna.create_study(sampler=SAMPLERS[sampler_name](config, seed), pruner=PRUNERS[pruner]())
    if warm_start and sampler_name != "evolution":
        for spec in config.make_sampler(seed=seed, with_llm=False).warm_start:
            study.enqueue_trial(spec.to_params())
    start = time.perf_counter()
    study.optimize(objective, n_trials=budget)
    values = [t.value if t.state == optuna.trial.TrialState.COMPLETE else None for t in study.trials]
    best = study.best_trial if any(v is not None for v in values) else None
    return {
        "values": values,
        "best_spec": best.user_attrs.get("spec") if best else None,
        "best_params": best.params if best else None,
        "curve": best_so_far(values),
        "rejected": sum("reject_reason" in t.user_attrs for t in study.trials),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED and "reject_reason" not in t.user_attrs
                      for t in study.trials),
        "seconds": time.perf_counter() - start,
        "proxy_runs": sum(len(t.user_attrs.get("proxy_seeds", ())) for t in study.trials),
    }


@lru_cache(maxsize=1)
def _task(name: str):
    """The study config ``name`` and its objective, built once per process."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    config = load_config(name)
    task = Task.from_config(config, device="cpu")
    return config, Objective(task, threads=1)


def _run_one(job: tuple[str, int, int, str, bool, str]) -> dict:
    name, seed, budget, pruner, warm_start, config_name = job
    config, objective = _task(config_name)
    return run(name, config, objective, seed, budget, pruner, warm_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="digits", help="the study config searched (a name or a TOML path)")
    parser.add_argument("--samplers", default="evolution,random,tpe", help=f"comma list of {', '.join(SAMPLERS)}")
    parser.add_argument("--budget", type=int, default=60, help="trials per study")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma list of sampler seeds")
    parser.add_argument("--pruner", choices=sorted(PRUNERS), default="none",
                        help="Optuna pruner of every study (none: kd-optuna's default; median: Optuna's)")
    parser.add_argument("--warm-start", action="store_true",
                        help="Optuna's samplers also start from the classic distillers EvolutionSampler starts from")
    parser.add_argument("--processes", type=int, default=1, help="studies run at once, one process each")
    parser.add_argument("--json", default=None, help="also write every trial's value here")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="report on --json files instead of running")
    args = parser.parse_args()
    if args.combine:
        combine(args.combine)
        return
    names = args.samplers.split(",")
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        parser.error(f"unknown samplers {unknown}; choose from {', '.join(SAMPLERS)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    config, objective = _task(args.config)
    kd_score = _score_of(objective, CLASSICS["kd"][0])
    jobs = [(name, seed, args.budget, args.pruner, args.warm_start, args.config) for name in names for seed in seeds]
    if args.processes > 1:
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            done = pool.map(_run_one, jobs, chunksize=1)
    else:
        done = [_run_one(job) for job in jobs]
    results = {name: [r for (n, *_), r in zip(jobs, done) if n == name] for name in names}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"config": args.config, "kd_score": kd_score, "seeds": seeds, "budget": args.budget, "pruner": args.pruner,
                       "warm_start": args.warm_start, "results": results}, handle)
    start = "every sampler starts from the classic distillers" if args.warm_start else "only evolution starts from the classic distillers"
    print(f"# {args.config}, {args.budget} trials, seeds {seeds}, pruner {args.pruner}, {start}; vanilla KD scores {kd_score:.4f};"
          " lower is better")
    report(results, kd_score, args.budget)


def report(results: dict[str, list[dict]], kd_score: float, budget: int) -> None:
    """The table of best scores per sampler, then each sampler against the first (paired by
    seed: run i of every sampler has the same seed)."""
    checkpoints = sorted({c for c in (10, 20, 30, 45, 60, budget) if c <= budget})
    print("| sampler | median best | min-max best | seeds beating KD | rejected/trial | pruned/trial | "
          + " | ".join(f"best@{c}" for c in checkpoints) + " | s/study |")
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(checkpoints) + "---:|")
    for name, runs in results.items():
        bests = [r["curve"][-1] for r in runs]
        curves = " | ".join(f"{statistics.median(r['curve'][c - 1] for r in runs):.4f}" for c in checkpoints)
        print(f"| {name} | {statistics.median(bests):.4f} | {min(bests):.4f}-{max(bests):.4f} | "
              f"{sum(b < kd_score for b in bests)}/{len(bests)} | "
              f"{statistics.mean(r['rejected'] for r in runs) / budget:.2f} | "
              f"{statistics.mean(r['pruned'] for r in runs) / budget:.2f} | {curves} | "
              f"{statistics.median(r['seconds'] for r in runs):.0f} |")
    first, *others = list(results)
    if not others:
        return
    print(f"\n| paired by seed | at trial | median {first} - other | quartiles | min-max | seeds {first} lower |")
    print("|---|---:|---:|---:|---:|---:|")
    for other in others:
        for c in sorted({min(60, budget), budget}):
            diffs = sorted(a["curve"][c - 1] - b["curve"][c - 1] for a, b in zip(results[first], results[other]))
            q = statistics.quantiles(diffs, n=4, method="inclusive") if len(diffs) > 1 else [diffs[0]] * 3
            print(f"| {first} vs {other} | {c} | {statistics.median(diffs):+.4f} | {q[0]:+.4f} to {q[2]:+.4f} | "
                  f"{diffs[0]:+.4f} to {diffs[-1]:+.4f} | {sum(d < 0 for d in diffs)}/{len(diffs)} |")


def combine(paths: list[str]) -> None:
    """One report from several ``--json`` files of the same budget (one seed each, say, run
    at different times or on different machines): runs are concatenated per sampler in file
    order, which keeps the pairing by seed."""
    loaded = [json.load(open(path)) for path in paths]
    budgets = {len(runs[0]["curve"]) for data in loaded for runs in data["results"].values()}
    if len(budgets) != 1:
        raise SystemExit(f"sampler_search.py: the files hold different budgets {sorted(budgets)}; combine one budget")
    names = list(loaded[0]["results"])
    results = {name: [run for data in loaded for run in data["results"][name]] for name in names}
    seeds = [s for data, path in zip(loaded, paths) for s in data.get("seeds", [Path(path).stem])]
    print(f"# {loaded[0].get('config', 'digits')}, {budgets.pop()} trials, seeds {seeds} from {len(paths)} files; vanilla KD scores "
          f"{loaded[0]['kd_score']:.4f}; lower is better")
    report(results, loaded[0]["kd_score"], len(results[names[0]][0]["curve"]))


def _score_of(objective: Objective, spec) -> float:
    """The objective's score of one spec, through an enqueued trial of a throwaway study."""
    study = optuna.create_study()
    study.enqueue_trial(spec.to_params())
    study.optimize(objective, n_trials=1)
    return study.trials[0].value


if __name__ == "__main__":
    main()
