"""The search logic alone: EvolutionSampler, Random and TPE on a synthetic objective over the KD space.

Each gene option of the canonical spec has an N(0, 1) effect (the three transform slots
separately), plus ``interaction`` x N(0, 1) for each (knowledge, distance) pair; lower is
better and nothing is rejected or trained, so a run takes seconds. The objective's seed is the
sampler's seed. Prints the median best value over the seeds for each budget and interaction::

    python benchmarks/sampler_synthetic.py                      # 10 seeds; 60 and 150 trials
    python benchmarks/sampler_synthetic.py --seeds 3 --budgets 30

EvolutionSampler runs with its defaults (P = 20, r = 0.25, k = 5, the classic distillers first,
a random rival E, rho screening 8 children); "Evolution (Algorithm 1)" is the same sampler held
to Algorithm 1 as written: one mutated child (``screen=1``) against one random E.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import numpy as np
import optuna

from kd_optuna.sampler import EvolutionSampler
from kd_optuna.space import GENES, SearchSpace, suggest_distiller

SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "Evolution": lambda seed: EvolutionSampler(seed=seed),
    "Evolution (Algorithm 1)": lambda seed: EvolutionSampler(seed=seed, screen=1),
    "Random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "TPE": lambda seed: optuna.samplers.TPESampler(seed=seed),
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


def best_value(name: str, seed: int, budget: int, interaction: float) -> float:
    study = optuna.create_study(sampler=SAMPLERS[name](seed))
    study.optimize(synthetic_objective(seed, interaction), n_trials=budget)
    return study.best_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 per cell")
    parser.add_argument("--budgets", default="60,150", help="comma list of trials per study")
    parser.add_argument("--interactions", default="0,2", help="comma list of interaction strengths")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budgets = [int(b) for b in args.budgets.split(",")]
    interactions = [float(i) for i in args.interactions.split(",")]
    print(f"# synthetic objective, median best over seeds 0-{args.seeds - 1}; lower is better")
    print("| trials | interaction | " + " | ".join(SAMPLERS) + " |")
    print("|---:|---:|" + "---:|" * len(SAMPLERS))
    for budget in budgets:
        for interaction in interactions:
            medians = [
                statistics.median(best_value(name, seed, budget, interaction) for seed in range(args.seeds))
                for name in SAMPLERS
            ]
            print(f"| {budget} | {interaction:g} | " + " | ".join(f"{m:.2f}" for m in medians) + " |")


if __name__ == "__main__":
    main()
