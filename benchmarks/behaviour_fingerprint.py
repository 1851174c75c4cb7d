"""The seeded behaviour a refactor must keep: run it before and after, and diff the two outputs.

Prints one JSON object:
- ``sampler``: per landscape and seed, the 60 values an ``EvolutionSampler(seed)`` study sees
  on the synthetic objectives of ``sampler_synthetic.py`` (the KD space and two generic ones);
- ``proxy``: the proxy metrics of vanilla KD, FitNets and CE-only on the digits config;
- ``train``: last-epoch test / best val top-1 of the exported training (2 epochs, seed 0) with
  vanilla KD and with DKD.

    python benchmarks/behaviour_fingerprint.py > before.json     # on the old tree
    python benchmarks/behaviour_fingerprint.py > after.json
    diff before.json after.json                                  # empty: the same behaviour

Every figure is seeded; on one machine the two runs agree to the last digit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampler_synthetic import categorical_landscape, mixed_landscape, synthetic_objective  # noqa: E402

from kd_optuna.distill.classics import CLASSICS  # noqa: E402
from kd_optuna.search.sampler import EvolutionSampler  # noqa: E402

TRIALS = 60
SEEDS = (0, 1, 2)


def sampler_values() -> dict[str, dict[str, list[float]]]:
    landscapes = {
        "kd": lambda seed: synthetic_objective(seed, 2.0),
        "categorical": categorical_landscape,
        "mixed": mixed_landscape,
    }
    out: dict[str, dict[str, list[float]]] = {}
    for name, make in landscapes.items():
        out[name] = {}
        for seed in SEEDS:
            study = optuna.create_study(sampler=EvolutionSampler(seed=seed))
            study.optimize(make(seed), n_trials=TRIALS)
            out[name][str(seed)] = [round(t.value, 10) for t in study.trials]
    return out


def proxy_metrics() -> dict[str, dict[str, float]]:
    from kd_optuna.run.config import load_config
    from kd_optuna.proxy.task import Task

    task = Task.from_config(load_config("digits"), device="cpu")
    specs = {"kd": CLASSICS["kd"][0], "fitnets": CLASSICS["fitnets"][0], "ce_only": None}
    return {name: {k: round(float(v), 8) for k, v in sorted(task.run(spec).metrics().items())}
            for name, spec in specs.items()}


def exported_training(tmp: Path) -> dict[str, dict[str, float]]:
    from kd_optuna.run.config import load_config
    from kd_optuna.export.training import train_with_distiller
    from kd_optuna.export.script import script_defaults

    recipe = {**script_defaults(load_config("digits")), "epochs": 2, "milestones": [1], "device": "cpu"}
    out = {}
    for method in ("kd", "dkd"):
        result = train_with_distiller(CLASSICS["kd"][0].to_params(), **{**recipe, "output_dir": str(tmp / method)},
                                      method=method, progress=False)
        out[method] = {k: round(float(result[k]), 8) for k in ("final_top1", "best_val_top1")}
    return out


def main() -> None:
    import tempfile

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"sampler": sampler_values(), "proxy": proxy_metrics(), "train": exported_training(Path(tmp))}
    print(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
