"""How long it takes to propose one distiller as a study grows: Evolution vs TPE vs Random.

For each study size N (completed trials with random distiller params and scores, 5% of them
rejected), each storage (in memory; a SQLite file opened as the project opens it, WAL
journal and synchronous=NORMAL, no heartbeat) and each sampler, it times ``repeats``
proposals after one untimed warm-up proposal:

- ``sampler``: time spent inside the sampler's own methods (``infer_relative_search_space``,
  ``sample_relative``, ``sample_independent``), lineage writes included;
- ``ask+suggest``: ``study.ask()`` plus the eight ``suggest_categorical`` calls, which is
  what a worker waits for before training starts (storage writes included);
- ``first``: the warm-up proposal, where EvolutionSampler reads every trial once;
- ``(read)`` rows: listing the trials without copying them, which every sampler that looks
  at the history pays at least once per proposal.

Each proposal is then told a score, so the study grows by ``repeats`` trials per sampler.

    .venv/bin/python benchmarks/sampler_cost.py                     # 100, 1000, 5000
    .venv/bin/python benchmarks/sampler_cost.py --sizes 100 --repeats 10 --storages memory
    .venv/bin/python benchmarks/sampler_cost.py --storages memory --spaces kd kd+hp   # generic too

``--interleaved`` (in memory) builds a study of every size first and takes proposals from
them in turn, so a change of load hits all sizes alike: the fair test of growth with N.
``--clock cpu`` times with this thread's CPU time instead of the wall clock, so that other
processes on a shared machine do not count (cache contention still does).
``--spaces kd+hp`` adds three hyperparameters of the user's (a log-float learning rate, a
stepped int width, a categorical optimizer) to the genes, so EvolutionSampler's generic
evolution (per-type mutation, crossover, rho cells of the other params) is timed too.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
import zlib
from typing import Any, Callable

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler, TPESampler
from optuna.trial import TrialState

from kd_optuna.search.sampler import EvolutionSampler
from kd_optuna.space import GENES, DistillerSpec, SearchSpace, suggest_distiller
from kd_optuna.run.storage import open_storage

SPACE = SearchSpace()
DISTRIBUTIONS = {g: CategoricalDistribution(list(SPACE[g])) for g in GENES}
#: The user's own hyperparameters of the ``kd+hp`` space, beside the eight genes.
HYPERPARAMETERS = {
    "lr": FloatDistribution(1e-4, 1.0, log=True),
    "width": IntDistribution(16, 256, step=16),
    "optimizer": CategoricalDistribution(["sgd", "adam", "adamw"]),
}
SPACES = {"kd": {}, "kd+hp": HYPERPARAMETERS}


def score(spec: DistillerSpec, extra: dict[str, Any] | None = None) -> float:
    """A deterministic stand-in for the combined score."""
    value = (spec.knowledge != "feat") + 0.3 * (spec.distance != "l2") + (
        zlib.crc32(spec.key.encode()) % 1000
    ) / 2000
    if extra:
        value += abs(np.log10(extra["lr"]) + 2) / 10 + extra["width"] / 2560
        value += 0.1 * (extra["optimizer"] != "sgd")
    return float(value)


def random_trials(n: int, seed: int = 0, space: str = "kd") -> list[optuna.trial.FrozenTrial]:
    rng = np.random.RandomState(seed)
    extra_dists = SPACES[space]
    distributions = {**DISTRIBUTIONS, **extra_dists}
    trials = []
    for _ in range(n):
        spec = DistillerSpec.from_params(
            {g: SPACE[g][rng.randint(len(SPACE[g]))] for g in GENES}
        )
        extra = {}
        if extra_dists:
            extra = {
                "lr": float(10 ** rng.uniform(-4, 0)),
                "width": int(16 * rng.randint(1, 17)),
                "optimizer": ["sgd", "adam", "adamw"][rng.randint(3)],
            }
        params = {**spec.to_params(), **extra}
        if rng.random_sample() < 0.05:
            trial = optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                state=TrialState.PRUNED,
                user_attrs={"reject_reason": "non-finite loss"},
            )
        else:
            trial = optuna.trial.create_trial(
                params=params, distributions=distributions, value=score(spec, extra)
            )
        trials.append(trial)
    return trials


def suggest(trial: optuna.Trial, space: str) -> float:
    """Suggest the space's params as an objective does; the score it would be told."""
    spec = suggest_distiller(trial, SPACE)
    if space == "kd":
        return score(spec)
    extra = {
        "lr": trial.suggest_float("lr", 1e-4, 1.0, log=True),
        "width": trial.suggest_int("width", 16, 256, step=16),
        "optimizer": trial.suggest_categorical("optimizer", ["sgd", "adam", "adamw"]),
    }
    return score(spec, extra)


class TimedSampler(BaseSampler):
    """Delegates to ``inner`` and adds up the seconds spent in its sampling methods."""

    def __init__(self, inner: BaseSampler, clock: Callable[[], float] = time.perf_counter) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.clock = clock

    def _timed(self, method: Callable[..., Any], *args: Any) -> Any:
        start = self.clock()
        try:
            return method(*args)
        finally:
            self.seconds += self.clock() - start

    def infer_relative_search_space(self, study, trial):
        return self._timed(self.inner.infer_relative_search_space, study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._timed(self.inner.sample_relative, study, trial, search_space)

    def sample_independent(self, study, trial, name, distribution):
        return self._timed(self.inner.sample_independent, study, trial, name, distribution)

    def before_trial(self, study, trial):
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.inner.after_trial(study, trial, state, values)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}

SAMPLERS: dict[str, Callable[[], BaseSampler]] = {
    "Evolution": lambda: EvolutionSampler(seed=0),
    "TPE": lambda: TPESampler(seed=0),
    "Random": lambda: RandomSampler(seed=0),
}


def propose(study: optuna.Study, timed: TimedSampler, space: str = "kd") -> tuple[float, float]:
    """One proposal, told its score: (seconds in the sampler, seconds of ask + suggest)."""
    timed.seconds = 0.0
    start = timed.clock()
    trial = study.ask()
    value = suggest(trial, space)
    wall = timed.clock() - start
    study.tell(trial, value)
    return timed.seconds, wall


def summary(first: float, runs: list[tuple[float, float]]) -> dict[str, float]:
    return {
        "sampler": statistics.median(r[0] for r in runs) * 1e3,
        "ask+suggest": statistics.median(r[1] for r in runs) * 1e3,
        "first": first * 1e3,
    }


def measure(study: optuna.Study, timed: TimedSampler, repeats: int, space: str = "kd") -> dict[str, float]:
    first = propose(study, timed, space)[1]
    return summary(first, [propose(study, timed, space) for _ in range(repeats)])


def measure_interleaved(
    make: Callable[[], BaseSampler], sizes: list[int], repeats: int, space: str, clock
) -> dict[int, dict[str, float]]:
    """In-memory studies of every size, proposals taken from them in turn, so that a change
    of load on a shared machine hits every size alike."""
    studies = {}
    for n in sizes:
        timed = TimedSampler(make(), clock)
        studies[n] = (memory_study(random_trials(n, space=space), timed), timed)
    firsts = {n: propose(study, timed, space)[1] for n, (study, timed) in studies.items()}
    runs: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
    for _ in range(repeats):
        for n, (study, timed) in studies.items():
            runs[n].append(propose(study, timed, space))
    return {n: summary(firsts[n], runs[n]) for n in sizes}


def read_cost(study: optuna.Study, repeats: int) -> float:
    """Median ms to list the study's trials as samplers do (no copy): the floor of any
    sampler that looks at the history."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        study.get_trials(deepcopy=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def memory_study(trials, sampler):
    study = optuna.create_study(sampler=sampler)
    study.add_trials(trials)
    return study


def sqlite_storage(path: str) -> optuna.storages.BaseStorage:
    """The project's SQLite storage (WAL, synchronous=NORMAL), without a heartbeat."""
    return open_storage(f"sqlite:///{path}", heartbeat_interval=None)


def sqlite_template(trials, directory: str, name: str) -> str:
    path = os.path.join(directory, f"template-{name}.db")
    storage = sqlite_storage(path)
    optuna.create_study(study_name="bench", storage=storage).add_trials(trials)
    storage.engine.dispose()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--storages", nargs="+", default=["memory", "sqlite"])
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall: perf_counter; cpu: this thread's CPU time (steadier on a shared machine)")
    parser.add_argument("--interleaved", action="store_true",
                        help="in memory only: one study per size, proposals taken from them in turn")
    parser.add_argument("--spaces", nargs="+", default=["kd"], choices=list(SPACES),
                        help="kd: the eight genes; kd+hp: the genes plus lr, width, optimizer")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(f"# {platform.node()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs | Python {platform.python_version()} | "
          f"optuna {optuna.__version__} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# median over {args.repeats} proposals, milliseconds ({args.clock} clock); load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    header = f"| {'storage':7} | {'space':5} | {'N':>5} | {'sampler':9} | {'sampler ms':>10} | " \
             f"{'ask+suggest ms':>14} | {'first ms':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    if args.interleaved:
        for space in args.spaces:
            for name, make in SAMPLERS.items():
                results = measure_interleaved(make, args.sizes, args.repeats, space, CLOCKS[args.clock])
                for n, result in results.items():
                    print(f"| {'memory':7} | {space:5} | {n:5d} | {name:9} | {result['sampler']:10.2f} | "
                          f"{result['ask+suggest']:14.2f} | {result['first']:8.1f} |", flush=True)
        return
    with tempfile.TemporaryDirectory() as directory:
        for storage in args.storages:
            for space in args.spaces:
                for n in args.sizes:
                    trials = random_trials(n, space=space)
                    template = sqlite_template(trials, directory, f"{space}-{n}") if storage == "sqlite" else ""
                    for name, make in SAMPLERS.items():
                        timed = TimedSampler(make(), CLOCKS[args.clock])
                        if storage == "memory":
                            study = memory_study(trials, timed)
                        else:
                            path = os.path.join(directory, f"{name}-{space}-{n}.db")
                            for suffix in ("", "-wal", "-shm"):
                                if os.path.exists(template + suffix):
                                    shutil.copy(template + suffix, path + suffix)
                            study = optuna.load_study(
                                study_name="bench", storage=sqlite_storage(path), sampler=timed
                            )
                        result = measure(study, timed, args.repeats, space)
                        print(f"| {storage:7} | {space:5} | {n:5d} | {name:9} | {result['sampler']:10.2f} | "
                              f"{result['ask+suggest']:14.2f} | {result['first']:8.1f} |",
                              flush=True)
                    read = read_cost(study, args.repeats)
                    print(f"| {storage:7} | {space:5} | {n:5d} | {'(read)':9} | {read:10.2f} | "
                          f"{'':14} | {'':8} |", flush=True)


if __name__ == "__main__":
    main()
