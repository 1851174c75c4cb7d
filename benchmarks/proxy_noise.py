"""How much of a proxy score is its seed: each distiller's score over several proxy seeds.

    python benchmarks/proxy_noise.py --config digits_hard --seeds 0,1,2,3,4
    python benchmarks/proxy_noise.py --config digits_hard --specs picks.json --json noise.json

For each distiller (the classics, or a JSON file holding a list of 8-gene objects, or an
object of name -> 8-gene object), the study config's proxy trial is run once per seed, seeded
as the Objective seeds it (``seeds = [s]``, no confirmation), on one CPU thread. Printed: each
distiller's mean, sample standard deviation and per-seed scores, then the pooled within-
distiller standard deviation (``sigma`` of ``kd_optuna.proxy.confirmation``) against the
standard deviation of the distillers' means, and the seed at which each distiller would rank
first on that seed alone. A ratio near 1 says one seed's score ranks distillers by luck about
as much as by merit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from kd_optuna.distill.classics import CLASSICS  # noqa: E402
from kd_optuna.proxy.confirmation import pooled_std  # noqa: E402
from kd_optuna.proxy.task import Task  # noqa: E402
from kd_optuna.run.config import load_config  # noqa: E402
from kd_optuna.space import DistillerSpec  # noqa: E402


def load_specs(path: str | None, space) -> dict[str, DistillerSpec]:
    """``path``'s distillers by name (a list is named by each spec's key); the classics in
    ``space`` when ``path`` is None."""
    if path is None:
        return {name: specs[0] for name, specs in CLASSICS.items() if space.contains(specs[0])}
    data = json.loads(Path(path).read_text())
    items = data.items() if isinstance(data, dict) else ((None, params) for params in data)
    specs = {}
    for name, params in items:
        spec = DistillerSpec.from_params(params)
        specs[name or spec.key] = spec
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="digits_hard", help="the study config (a name or a TOML path)")
    parser.add_argument("--specs", default=None, help="JSON file of distillers (default: the classics)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma list of proxy seeds")
    parser.add_argument("--json", default=None, help="also write the per-seed scores here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2:
        parser.error("give at least two seeds: a spread needs two")

    torch.set_num_threads(1)
    config = load_config(args.config)
    task = Task.from_config(config, device="cpu")
    specs = load_specs(args.specs, config.space)
    scores: dict[str, list[float]] = {}
    print(f"# {args.config}: proxy score (lower is better) of {len(specs)} distillers over seeds {seeds}")
    print("| distiller | mean | std | " + " | ".join(f"seed {s}" for s in seeds) + " |")
    print("|---|---:|---:|" + "---:|" * len(seeds))
    for name, spec in specs.items():
        if task.reject(spec) is not None:
            print(f"| {name} | rejected | | " + " | " * len(seeds))
            continue
        runs = [task.run(spec, dataclasses.replace(task.proxy, seeds=(s,), confirm_seeds=())).score for s in seeds]
        scores[name] = runs
        print(f"| {name} | {statistics.mean(runs):.4f} | {statistics.stdev(runs):.4f} | "
              + " | ".join(f"{v:.4f}" for v in runs) + " |", flush=True)
    if len(scores) < 2:
        return
    within = pooled_std(scores.values())
    between = statistics.stdev(statistics.mean(v) for v in scores.values())
    firsts = [min(scores, key=lambda n: scores[n][i]) for i in range(len(seeds))]
    best_mean = min(scores, key=lambda n: statistics.mean(scores[n]))
    print(f"\npooled within-distiller std {within:.4f}; std of the distillers' means {between:.4f}; "
          f"ratio {within / between:.2f}")
    print(f"first on one seed: {', '.join(f'seed {s}: {n}' for s, n in zip(seeds, firsts))}; "
          f"first on the mean: {best_mean} ({sum(n == best_mean for n in firsts)} of {len(seeds)} seeds agree)")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": args.config, "seeds": seeds, "scores": scores}, indent=1))


if __name__ == "__main__":
    main()
