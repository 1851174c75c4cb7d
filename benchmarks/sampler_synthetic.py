"""The search logic alone: EvolutionSampler against Optuna's samplers on synthetic objectives.

Nothing is trained or rejected, so a study takes seconds. The objective's seed is the sampler's
seed. Two families of landscapes, lower is better:

``kd`` (the default): the KD space. Each gene option of the canonical spec has an N(0, 1)
effect (the three transform slots separately), plus ``interaction`` x N(0, 1) for each
(knowledge, distance) pair. Prints the median best value over the seeds per budget and
interaction, for Evolution, Evolution held to Algorithm 1 (``screen=1``), Random and TPE.

Generic landscapes (``--landscapes categorical,mixed,interactions``), each reported as the
*regret* ``f(x) - min f`` (0 at the optimum), for Evolution, Random, TPE and NSGA-II with a
population of 20:

- ``categorical``: 10 params x 16 options, ``f = sum_i e_i[x_i]``, ``e_i ~ N(0, 1)``.
- ``mixed``: 4 floats in [-5, 5] (``((x - c) / 5)^2`` each), a log float in [1e-5, 1]
  (``(log10 lr - log10 lr*)^2 / 4``), 2 ints in [0, 50] (``((n - c) / 25)^2``), 3
  categoricals x 8 options (``N(0, 1)`` effects), and a conditional branch: ``block`` among
  4 options (``N(0, 1)`` offsets), each with its own float ``w_<block>`` in [0, 1]
  (``4 (w - c_block)^2``).
- ``interactions``: 8 params x 8 options on a chain,
  ``f = sum_i a_i[x_i] + sum_i b_i[x_i, x_{i+1}]``, all ``N(0, 1)``; ``min f`` by dynamic
  programming.

::

    python benchmarks/sampler_synthetic.py                      # kd: 10 seeds; 60 and 150 trials
    python benchmarks/sampler_synthetic.py --seeds 3 --budgets 30
    python benchmarks/sampler_synthetic.py --landscapes categorical,mixed,interactions --budgets 100,300

Each (sampler, seed) runs one study of the largest budget; a smaller budget reads its first
trials (a sampler does not know the study's length, so this equals a shorter study).
EvolutionSampler runs with its defaults (P = 20, tournament of 10 keeping 2, the classic
distillers first on the KD space, a random rival E, rho screening 8 children).
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Callable

import numpy as np
import optuna

from kd_optuna.search.sampler import EvolutionSampler
from kd_optuna.space import GENES, SearchSpace, suggest_distiller

Factory = Callable[[int], optuna.samplers.BaseSampler]

SAMPLERS: dict[str, Factory] = {
    "Evolution": lambda seed: EvolutionSampler(seed=seed),
    "Evolution (Algorithm 1)": lambda seed: EvolutionSampler(seed=seed, screen=1),
    "Random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "TPE": lambda seed: optuna.samplers.TPESampler(seed=seed),
}

GENERIC_SAMPLERS: dict[str, Factory] = {
    "Evolution": lambda seed: EvolutionSampler(seed=seed),
    "Random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "TPE": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "NSGA-II (P=20)": lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=20),
}


def synthetic_objective(seed: int, interaction: float) -> Callable[[optuna.Trial], float]:
    """sum_g effect[g][option] + interaction * pair[knowledge, distance], on the canonical spec."""
    space = SearchSpace()
    rng = np.random.RandomState(1000 + seed)
    effect = {g: {o: rng.randn() for o in space[g]} for g in GENES}
    pair = {(k, d): rng.randn() for k in space["knowledge"] for d in space["distance"]}

    def objective(trial: optuna.Trial) -> float:
        spec = suggest_distiller(trial).canonical()
        value = sum(effect[g][getattr(spec, g)] for g in GENES)
        return value + interaction * pair[spec.knowledge, spec.distance]

    return objective


def categorical_landscape(seed: int) -> Callable[[optuna.Trial], float]:
    """10 x 16 additive categorical effects; regret."""
    rng = np.random.RandomState(2000 + seed)
    effect = rng.randn(10, 16)
    best = effect.min(axis=1).sum()

    def objective(trial: optuna.Trial) -> float:
        picks = [trial.suggest_categorical(f"c{i}", list(range(16))) for i in range(10)]
        return float(sum(effect[i, p] for i, p in enumerate(picks)) - best)

    return objective


def mixed_landscape(seed: int) -> Callable[[optuna.Trial], float]:
    """Floats, a log float, ints, categoricals and a conditional branch; regret."""
    rng = np.random.RandomState(3000 + seed)
    centres = rng.uniform(-4, 4, size=4)
    log_lr = rng.uniform(-4.5, -0.5)
    ints = rng.randint(5, 46, size=2)
    effect = rng.randn(3, 8)
    blocks = ["conv", "mlp", "attn", "skip"]
    offset = dict(zip(blocks, rng.randn(4)))
    w_best = dict(zip(blocks, rng.uniform(0.1, 0.9, size=4)))
    best = effect.min(axis=1).sum() + min(offset.values())

    def objective(trial: optuna.Trial) -> float:
        value = sum(((trial.suggest_float(f"x{i}", -5, 5) - c) / 5) ** 2 for i, c in enumerate(centres))
        value += (math.log10(trial.suggest_float("lr", 1e-5, 1.0, log=True)) - log_lr) ** 2 / 4
        value += sum(((trial.suggest_int(f"n{i}", 0, 50) - c) / 25) ** 2 for i, c in enumerate(ints))
        value += sum(effect[i, trial.suggest_categorical(f"k{i}", list(range(8)))] for i in range(3))
        block = trial.suggest_categorical("block", blocks)
        value += offset[block] + 4 * (trial.suggest_float(f"w_{block}", 0, 1) - w_best[block]) ** 2
        return float(value - best)

    return objective


def interactions_landscape(seed: int) -> Callable[[optuna.Trial], float]:
    """8 x 8 options on a chain with N(0, 1) pairwise terms; regret against the DP optimum."""
    rng = np.random.RandomState(4000 + seed)
    unary = rng.randn(8, 8)
    pair = rng.randn(7, 8, 8)
    cost = unary[-1].copy()
    for i in range(6, -1, -1):
        cost = unary[i] + (pair[i] + cost[None, :]).min(axis=1)
    best = cost.min()

    def objective(trial: optuna.Trial) -> float:
        x = [trial.suggest_categorical(f"c{i}", list(range(8))) for i in range(8)]
        value = sum(unary[i, x[i]] for i in range(8)) + sum(pair[i, x[i], x[i + 1]] for i in range(7))
        return float(value - best)

    return objective


LANDSCAPES = {
    "categorical": categorical_landscape,
    "mixed": mixed_landscape,
    "interactions": interactions_landscape,
}


def best_curve(sampler: optuna.samplers.BaseSampler, objective, budget: int) -> list[float]:
    """Best value after each trial of one study of ``budget`` trials."""
    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=budget)
    return list(np.minimum.accumulate([t.value for t in study.trials]))


def run_kd(args, budgets: list[int]) -> None:
    interactions = [float(i) for i in args.interactions.split(",")]
    print(f"# KD-space synthetic objective, median best over seeds 0-{args.seeds - 1}; lower is better")
    print("| trials | interaction | " + " | ".join(SAMPLERS) + " |")
    print("|---:|---:|" + "---:|" * len(SAMPLERS))
    for interaction in interactions:
        curves = {
            name: [best_curve(make(seed), synthetic_objective(seed, interaction), max(budgets))
                   for seed in range(args.seeds)]
            for name, make in SAMPLERS.items()
        }
        for budget in budgets:
            medians = [statistics.median(c[budget - 1] for c in curves[n]) for n in SAMPLERS]
            print(f"| {budget} | {interaction:g} | " + " | ".join(f"{m:.2f}" for m in medians) + " |")


def run_generic(args, budgets: list[int], landscapes: list[str]) -> None:
    names = list(GENERIC_SAMPLERS)
    print(f"# generic landscapes, median regret over seeds 0-{args.seeds - 1} (0 = optimum); lower is better")
    print("| landscape | trials | " + " | ".join(names)
          + " | Random / Evolution | seeds Evolution <= NSGA-II |")
    print("|---|---:|" + "---:|" * (len(names) + 2))
    for landscape in landscapes:
        make_objective = LANDSCAPES[landscape]
        curves = {
            name: [best_curve(make(seed), make_objective(seed), max(budgets)) for seed in range(args.seeds)]
            for name, make in GENERIC_SAMPLERS.items()
        }
        for budget in budgets:
            at = {n: [c[budget - 1] for c in curves[n]] for n in names}
            medians = {n: statistics.median(v) for n, v in at.items()}
            ratio = medians["Random"] / medians["Evolution"] if medians["Evolution"] > 0 else math.inf
            wins = sum(e <= g for e, g in zip(at["Evolution"], at["NSGA-II (P=20)"]))
            print(f"| {landscape} | {budget} | " + " | ".join(f"{medians[n]:.3f}" for n in names)
                  + f" | {ratio:.2f} | {wins}/{args.seeds} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 per cell")
    parser.add_argument("--budgets", default="60,150", help="comma list of trials per study")
    parser.add_argument("--interactions", default="0,2", help="kd: comma list of interaction strengths")
    parser.add_argument("--landscapes", default="kd",
                        help="comma list of kd, " + ", ".join(LANDSCAPES))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budgets = sorted(int(b) for b in args.budgets.split(","))
    landscapes = args.landscapes.split(",")
    unknown = set(landscapes) - {"kd", *LANDSCAPES}
    if unknown:
        parser.error(f"unknown landscapes {sorted(unknown)}")
    if "kd" in landscapes:
        run_kd(args, budgets)
    generic = [name for name in landscapes if name != "kd"]
    if generic:
        run_generic(args, budgets, generic)


if __name__ == "__main__":
    main()
