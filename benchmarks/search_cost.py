"""Table 2 of the seed, ours: the wall time of whole digits searches and where a trial's time goes.

    python benchmarks/search_cost.py            # ~10 min on 2 CPU cores
    python benchmarks/search_cost.py --quick    # ~1 min: tiny proxy, two small searches
    python benchmarks/search_cost.py --gpu-step-seconds 0.012   # projection from a measured GPU step

Three parts, each printed as a Markdown table:

1. **Searches.** For each (trials, population) setting and each worker count, a fresh SQLite
   study is created from ``studies/digits.toml`` (population_size replaced) by
   ``kd-optuna create-study`` and searched by ``kd_optuna.run.workers.optimize`` -- the worker
   processes, Task, Objective and EvolutionSampler of a real run. The only addition is a
   timing wrapper installed in each worker (``TimedObjectiveFactory``): it times the
   rejection protocol (``Task.reject``), every call into the sampler (its own reads and
   lineage writes included) and every other storage call of the worker's main thread
   (ask/tell, params, user attrs, dashboard notes, stale-trial checks; the heartbeat thread
   is left out), and writes one JSON line per trial. Training and scoring seconds are the
   user attrs the objective records. A trial's cycle is the worker's wall time from the end
   of one tell to the end of the next; ``other`` is the cycle minus the named parts (model
   construction, Python, waiting on the host lock).
   Also from the studies: the rejection rate by reason, and the duplicate proposals avoided
   (``sampler_note`` "yielded N key(s)": a worker saw that another had claimed the key it
   chose and chose again), plus a check that no canonical key was trained twice.
2. **Teacher cache.** The digits proxy trial with the teacher-output cache and with the live
   teacher, side by side on one Task (same views, same spec): the share of proxy time the
   cache saves, and its one-time build.
3. **Projection of the seed's reference search** (ResNet-56 -> ResNet-20 on CIFAR-100, seed
   Table 2: 21 h on one RTX 3090 Ti at 100 iterations x population 20). A resnet56 ->
   resnet20 proxy trial on CIFAR-shaped random data is measured here on the CPU with a few
   steps, split into per-step, validation-pass, rejection and scoring times, and scaled to the
   ``cifar100_resnet56_resnet20`` study's proxy settings (steps, report_every, 5,000 val
   images). The GPU figure is a PROJECTION: the CPU per-trial time times the ratio of the
   seed's KD batch time on a 3090 Ti (Table 3, 0.219 s, batch 64) to a KD batch timed here the
   same way -- unless ``--gpu-step-seconds`` gives a cached proxy step measured on a GPU
   (``benchmarks/gpu_check.sh``). The seed's times fit ``iterations x population``
   evaluations of about 38 s each (e.g. 100 x 20 = 2,000 in 21 h); our sampler trains one
   child per iteration, so both readings are shown: trials = T x P, and trials = P + T.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

#: Seed Table 2: search time in hours on one RTX 3090 Ti, (iterations, population) -> hours.
SEED_HOURS = {(50, 20): 10, (100, 20): 21, (300, 20): 63, (100, 10): 11, (100, 30): 30}
#: Seed Table 3: KD batch time of resnet56 -> resnet20 on one RTX 3090 Ti, seconds.
SEED_KD_BATCH_S = 0.219
#: Validation images of CIFAR-100's val split (10% of the training set, kd_optuna.data).
CIFAR_VAL = 5000
#: Rejection rates of 2,000 random specs on a prototype (DESIGN.md): a fallback when a run
#: rejects nothing.
SPLIT_PARTS = ("rejection", "training", "scoring", "sampler", "storage", "other")


# -- the timing wrapper installed in each worker process ---------------------------------------


class _Clock:
    """Outermost-wins timers of the main thread: a storage call made by the sampler counts as
    sampler time, not twice."""

    def __init__(self) -> None:
        self.totals = {"sampler": 0.0, "storage": 0.0, "rejection": 0.0}
        self.active: str | None = None
        self.main = threading.main_thread()

    def wrap(self, bucket: str, function: Callable) -> Callable:
        clock = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            if clock.active is not None or threading.current_thread() is not clock.main:
                return function(*args, **kwargs)
            clock.active = bucket
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                clock.totals[bucket] += time.perf_counter() - start
                clock.active = None

        timed.__wrapped__ = function  # type: ignore[attr-defined]
        return timed

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)


def _patch_methods(cls: type, names, clock: _Clock, bucket: str) -> None:
    for name in names:
        function = getattr(cls, name, None)
        if callable(function) and not hasattr(function, "__wrapped__"):
            setattr(cls, name, clock.wrap(bucket, function))


def install_timers(clock: _Clock) -> None:
    """Wrap the sampler's entry points and the storages' methods (in this process only)."""
    import optuna
    from optuna.storages import BaseStorage, RDBStorage

    import kd_optuna.run.trial_loop as trial_loop
    import kd_optuna.run.workers as workers
    from kd_optuna.optuna_private import cached_storage_class
    from kd_optuna.search.sampler import EvolutionSampler

    _patch_methods(EvolutionSampler, ("infer_relative_search_space", "sample_relative", "sample_independent",
                                      "before_trial", "after_trial"), clock, "sampler")
    storage_methods = [n for n, v in vars(BaseStorage).items() if callable(v) and not n.startswith("_")]
    storage_methods += ["_get_stale_trial_ids", "get_heartbeat_interval", "record_heartbeat"]
    for cls in (RDBStorage, cached_storage_class()):
        _patch_methods(cls, storage_methods, clock, "storage")
    for module in (workers, trial_loop):  # the parent's counts and each worker's
        module.count_states = clock.wrap("storage", module.count_states)
    del optuna


@dataclasses.dataclass(frozen=True)
class TimedObjectiveFactory:
    """The real objective factory (``kd_optuna.run.workers.task_objective``) plus timers; each
    worker appends one JSON line per told trial to ``out_dir/worker-<pid>.jsonl``."""

    out_dir: str
    threads: int | None = None

    def __call__(self, config, worker):
        import optuna

        from kd_optuna.run.workers import task_objective

        clock = _Clock()
        install_timers(clock)
        objective = task_objective(config, worker)
        if self.threads is not None:
            objective.threads = self.threads
        task = objective.task
        task.reject = clock.wrap("rejection", task.reject)
        path = Path(self.out_dir) / f"worker-{os.getpid()}.jsonl"
        state = {"cycle_start": time.perf_counter(), "since": clock.snapshot(), "objective": 0.0}
        tell = optuna.study.Study.tell

        def timed_tell(study, trial, *args, **kwargs):
            try:
                return tell(study, trial, *args, **kwargs)
            finally:
                now, totals = time.perf_counter(), clock.snapshot()
                number = trial.number if hasattr(trial, "number") else int(trial)
                record = {k: totals[k] - state["since"][k] for k in totals}
                record.update(number=number, cycle=now - state["cycle_start"], objective=state["objective"],
                              worker=worker.index)
                with open(path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                state.update(cycle_start=now, since=totals, objective=0.0)

        optuna.study.Study.tell = timed_tell

        def timed_objective(trial):
            start = time.perf_counter()
            try:
                return objective(trial)
            finally:
                state["objective"] += time.perf_counter() - start

        return timed_objective


# -- one search --------------------------------------------------------------------------------


def study_toml(population: int, proxy: dict[str, Any]) -> str:
    """studies/digits.toml with ``population_size`` and extra [proxy] keys replaced."""
    text = (REPO / "studies" / "digits.toml").read_text()
    text, n = re.subn(r"(?m)^population_size = \d+$", f"population_size = {population}", text)
    if n != 1:
        raise RuntimeError("studies/digits.toml has no `population_size = N` line to replace")
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in proxy.items())
    text, n = re.subn(r"(?m)^\[proxy\]\n", "[proxy]\n" + lines, text)
    if n != 1:
        raise RuntimeError("studies/digits.toml has no [proxy] table")
    return text


def create_study(url: str, name: str, toml: Path) -> None:
    from kd_optuna.run import cli

    with contextlib.redirect_stdout(io.StringIO()):
        cli.main(["create-study", str(toml), "--study-name", name, "--storage", url])


@dataclasses.dataclass
class SearchRun:
    trials: int
    population: int
    workers: int
    wall: float
    search_wall: float
    records: list[dict[str, Any]]
    attrs: list[dict[str, Any]]
    states: list[str]
    backend: str = "sqlite"

    @property
    def finished(self) -> int:
        return sum(s in ("COMPLETE", "PRUNED") for s in self.states)

    def per_trial(self) -> dict[str, float]:
        """Mean seconds per told trial, each worker's first trial left out (it also loads the
        teacher outputs and computes the teacher reference): the named parts and the whole
        cycle; ``first_cycle`` is the mean of the first trials' cycles."""
        attrs = {a["number"]: a for a in self.attrs}
        parts = {p: [] for p in SPLIT_PARTS}
        cycles = []
        firsts = [r["cycle"] for r in self.records if r.get("first")]
        for r in self.records:
            if r.get("first") and len(self.records) > len(firsts):
                continue
            a = attrs.get(r["number"], {})
            named = {
                "rejection": r["rejection"],
                "training": a.get("training_seconds", 0.0),
                "scoring": a.get("scoring_seconds", 0.0),
                "sampler": r["sampler"],
                "storage": r["storage"],
            }
            named["other"] = r["cycle"] - sum(named.values())
            for p in SPLIT_PARTS:
                parts[p].append(named[p])
            cycles.append(r["cycle"])
        out = {p: statistics.fmean(v) if v else float("nan") for p, v in parts.items()}
        out["cycle"] = statistics.fmean(cycles) if cycles else float("nan")
        out["first_cycle"] = statistics.fmean(firsts) if firsts else float("nan")
        out["rejection_attr"] = statistics.fmean(
            [a["rejection_seconds"] for a in self.attrs if "rejection_seconds" in a] or [float("nan")])
        return out

    def rejections(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.attrs:
            if a.get("reject_reason"):
                counts[a["reject_reason"]] = counts.get(a["reject_reason"], 0) + 1
        return counts

    def duplicates(self) -> tuple[int, int]:
        """(claims yielded to another trial, canonical keys trained more than once)."""
        from kd_optuna.search.lineage import read_lineage

        yielded = 0
        for a in self.attrs:
            m = re.search(r"yielded (\d+) key", str(read_lineage(a).get("sampler_note", "")))
            yielded += int(m.group(1)) if m else 0
        keys = [a["spec"] for a in self.attrs if "spec" in a]
        return yielded, len(keys) - len(set(keys))


def run_search(trials: int, population: int, workers: int, proxy: dict[str, Any],
               url: str | None = None, backend: str = "sqlite", threads: int | None = None) -> SearchRun:
    """Create a study (SQLite in a temporary folder unless ``url``) and search it; the timing
    records come back with the trials' user attrs."""
    from kd_optuna.run.storage import open_storage
    from kd_optuna.run.workers import optimize

    with tempfile.TemporaryDirectory(prefix="kd_search_cost_") as tmp:
        toml = Path(tmp) / "digits.toml"
        toml.write_text(study_toml(population, proxy))
        url = url or f"sqlite:///{tmp}/study.db"
        name = f"digits_t{trials}_p{population}_w{workers}"
        create_study(url, name, toml)
        start = time.perf_counter()
        summary = optimize(url, name, trials, n_workers=workers, progress=False,
                           objective_factory=TimedObjectiveFactory(tmp, threads))
        wall = time.perf_counter() - start
        if summary.worker_errors:
            print(f"  worker messages: {summary.worker_errors[-3:]}", file=sys.stderr)
        records = []
        for path in sorted(Path(tmp).glob("worker-*.jsonl")):
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            records += [{**r, "first": i == 0} for i, r in enumerate(lines)]
        storage = open_storage(url, heartbeat_interval=None)
        import optuna

        study = optuna.load_study(study_name=name, storage=storage)
        frozen = study.get_trials(deepcopy=False)
        storage.engine.dispose()
    attrs = [{"number": t.number, **t.user_attrs} for t in frozen]
    starts = [t.datetime_start for t in frozen if t.datetime_start]
    ends = [t.datetime_complete for t in frozen if t.datetime_complete]
    search_wall = (max(ends) - min(starts)).total_seconds() if starts and ends else float("nan")
    return SearchRun(trials, population, workers, wall, search_wall, records, attrs,
                     [t.state.name for t in frozen], backend)


# -- the teacher cache -------------------------------------------------------------------------


def cache_saving(spec_names: list[str], proxy: dict[str, Any], threads: int) -> dict[str, float]:
    """Proxy seconds (training + scoring) per trial with the live teacher and with the cache."""
    from kd_optuna.distill.classics import CLASSICS
    from kd_optuna.run.config import load_config
    from kd_optuna.proxy.settings import ProxySettings
    from kd_optuna.proxy.task import Task

    torch.set_num_threads(threads)
    config = load_config("digits")
    settings = dataclasses.replace(config.proxy, **proxy) if proxy else config.proxy
    base = Task.from_config(config, device="cpu", cache_dir=REPO / ".kd_optuna_cache")
    live = Task(base.data, base.teacher, base.new_student, settings, use_cache=False)
    cached = Task(base.data, base.teacher, base.new_student, settings, cache_dir=None)
    start = time.perf_counter()
    cached.teacher_outputs
    build = time.perf_counter() - start
    live.reference, cached.reference = base.reference, base.reference
    times = {"live": [], "cached": []}
    for name in spec_names:
        spec = CLASSICS[name][0]
        for label, task in (("live", live), ("cached", cached)):
            result = task.run(spec)
            times[label].append(result.train_seconds + result.score_seconds)
    assert isinstance(settings, ProxySettings)
    live_s, cached_s = statistics.median(times["live"]), statistics.median(times["cached"])
    return {"live": live_s, "cached": cached_s, "saved": 1 - cached_s / live_s, "build": build,
            "steps": settings.steps, "specs": len(spec_names)}


# -- the projection ----------------------------------------------------------------------------


def cifar_trial_parts(steps: int, train_size: int, val_size: int, threads: int) -> dict[str, float]:
    """Seconds of a resnet56 -> resnet20 proxy trial on CIFAR-shaped random data, by part:
    step (one cached training step), val_pass (one validation pass over ``val_size`` images),
    rejection, score_fixed (scoring minus its validation pass), and kd_batch (one KD training
    step with the live teacher, batch 64, SGD: the seed's Table 3 measurement)."""
    from kd_optuna.distill.classics import CLASSICS
    from kd_optuna.run.config import load_config
    from kd_optuna.models import build_model, tap_model
    from kd_optuna.proxy.views import ProxyData
    from kd_optuna.proxy.training import predict
    from kd_optuna.proxy.task import Task

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    study = load_config("cifar100_resnet56_resnet20").proxy
    settings = dataclasses.replace(study, steps=steps, epochs=0.0, report_every=steps)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(train_size, 3, 32, 32, generator=g), torch.arange(train_size) % 100
    vx, vy = torch.randn(val_size, 3, 32, 32, generator=g), torch.arange(val_size) % 100
    data = ProxyData.build(x, y, vx, vy, settings, device, num_classes=100)
    torch.manual_seed(0)
    teacher = tap_model(build_model("resnet56", 100), "resnet56")

    def new_student():
        return tap_model(build_model("resnet20", 100), "resnet20").to(device)

    task = Task(data, teacher, new_student, settings, cache_dir=None)
    task.teacher_outputs, task.reference, task.rejection_batch
    spec = CLASSICS["kd"][0]
    task.run(spec, dataclasses.replace(settings, steps=1, report_every=1))  # warm-up
    start = time.perf_counter()
    task.reject(spec)
    rejection = time.perf_counter() - start
    result = task.run(spec)
    student = new_student()
    start = time.perf_counter()
    predict(student, data.val_x, settings.eval_batch_size)
    val_pass = time.perf_counter() - start
    step = (result.train_seconds - val_pass) / steps
    kd_batch = _kd_batch_seconds(teacher, new_student, task, spec)
    return {"step": step, "val_pass": val_pass, "rejection": rejection,
            "score_fixed": max(0.0, result.score_seconds - val_pass), "kd_batch": kd_batch,
            "study_steps": study.steps, "study_report_every": study.report_every,
            "study_seeds": len(study.seeds), "val_size": val_size}


def _kd_batch_seconds(teacher, new_student, task, spec, repeats: int = 3) -> float:
    """Median of one vanilla-KD step at batch 64 with the live teacher (forward, backward, SGD)."""
    import torch.nn.functional as F

    student = new_student()
    distiller = task.make_distiller(spec)
    optimizer = torch.optim.SGD(list(student.parameters()) + list(distiller.parameters()), lr=0.05, momentum=0.9)
    x = torch.randn(64, 3, 32, 32)
    y = torch.arange(64) % 100
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = F.cross_entropy(s["logit"], y) + distiller(s, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def projected_trial(parts: dict[str, float], scale: float, reject_rate: float,
                    sampler_storage: float, gpu_step: float | None = None) -> dict[str, float]:
    """Seconds per trial at the study's settings: a trained trial is rejection + steps x step +
    reports x val pass + scoring, per proxy seed; a rejected one only its rejection.
    ``scale`` multiplies every measured CPU time (1 here, the GPU ratio for the projection);
    ``gpu_step`` replaces ``scale x step`` by a measured GPU step."""
    val_factor = CIFAR_VAL / parts["val_size"]
    steps, reports = parts["study_steps"], -(-parts["study_steps"] // parts["study_report_every"])
    step = gpu_step if gpu_step is not None else scale * parts["step"]
    step_scale = step / parts["step"]
    per_seed = (steps * step + reports * step_scale * parts["val_pass"] * val_factor
                + step_scale * (parts["score_fixed"] + parts["val_pass"] * val_factor))
    trained = step_scale * parts["rejection"] + parts["study_seeds"] * per_seed
    rejected = step_scale * parts["rejection"]
    return {"trained": trained, "rejected": rejected,
            "mean": (1 - reject_rate) * trained + reject_rate * rejected + sampler_storage}


# -- output ------------------------------------------------------------------------------------


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {cores} cores, load average {load}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def print_searches(runs: list[SearchRun]) -> None:
    print("| trials | population | workers | wall s (spawn + task build + search) | search s (first start to last end) "
          "| trials/min | rejected | yielded claims | keys trained twice |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        rejected = sum(r.rejections().values())
        yielded, twice = r.duplicates()
        rate = 60 * r.finished / r.search_wall if r.search_wall > 0 else float("nan")
        print(f"| {r.trials} | {r.population} | {r.workers} | {r.wall:.1f} | {r.search_wall:.1f} | {rate:.1f} "
              f"| {rejected}/{r.finished} | {yielded} | {twice} |")


def print_split(runs: list[SearchRun]) -> None:
    print("| trials | population | workers | rejection | training | scoring | sampler | storage | other "
          "| cycle s | (rejection_seconds attr) | first trial's cycle s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        p = r.per_trial()
        share = " | ".join(f"{p[k]:.3f} ({p[k] / p['cycle']:.0%})" for k in SPLIT_PARTS)
        print(f"| {r.trials} | {r.population} | {r.workers} | {share} | {p['cycle']:.3f} | {p['rejection_attr']:.3f} | {p['first_cycle']:.3f} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1 minute: tiny proxy, two small searches")
    parser.add_argument("--settings", default=None, help="trials x population list, e.g. 20x6,40x6,40x12")
    parser.add_argument("--workers", default="1,2", help="worker counts, e.g. 1,2")
    parser.add_argument("--cifar-steps", type=int, default=None, help="steps of the measured CIFAR trial")
    parser.add_argument("--gpu-step-seconds", type=float, default=None,
                        help="a cached resnet56->resnet20 proxy step measured on a GPU (gpu_check.sh)")
    parser.add_argument("--worker-threads", type=int, default=None,
                        help="hold every worker to this many torch threads (default: the workers' own "
                             "max(1, cores // N))")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the in-process measurements (cache, CIFAR trial); the workers "
                             "keep their own split")
    parser.add_argument("--json", default=None, help="also write every figure to this file")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # the workers keep the teacher and its outputs under ./.kd_optuna_cache
    if args.quick:
        settings = args.settings or "4x2"
        proxy = {"steps": 10, "report_every": 10, "val_size": 120, "sharpness_size": 64, "confirm_seeds": []}
        cifar = dict(steps=args.cifar_steps or 1, train_size=128, val_size=64)
        cache_specs = ["kd"]
    else:
        settings = args.settings or "20x6,40x6,40x12"
        proxy = {}
        cifar = dict(steps=args.cifar_steps or 10, train_size=2000, val_size=500)
        cache_specs = ["kd", "fitnets", "at"]
    grid = [tuple(int(v) for v in s.split("x")) for s in settings.split(",")]
    worker_counts = [int(w) for w in args.workers.split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"search cost; {date}; {machine()}")
    print(f"digits study (studies/digits.toml), proxy overrides: {proxy or 'none'}; SQLite in a temporary folder; "
          + (f"every worker held to {args.worker_threads} torch thread(s)\n" if args.worker_threads else
             f"worker i of N uses max(1, {cores} // N) torch threads\n"))

    runs = []
    for trials, population in grid:
        for workers in worker_counts:
            runs.append(run_search(trials, population, workers, proxy, threads=args.worker_threads))
            print(f"  done: {trials} trials, population {population}, {workers} worker(s): "
                  f"{runs[-1].wall:.1f} s; load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    print("### Whole searches\n")
    print_searches(runs)
    print("\n### Seconds per trial, mean over told trials but each worker's first (share of the worker's cycle)\n")
    print_split(runs)
    reasons: dict[str, int] = {}
    for r in runs:
        for k, v in r.rejections().items():
            reasons[k] = reasons.get(k, 0) + v
    finished = sum(r.finished for r in runs)
    reject_rate = sum(reasons.values()) / finished if finished else 0.0
    print(f"\nrejection rate over all searches: {sum(reasons.values())}/{finished} = {reject_rate:.1%} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(reasons.items())) or 'none'})")
    yielded = sum(r.duplicates()[0] for r in runs)
    twice = sum(r.duplicates()[1] for r in runs)
    print(f"duplicate proposals avoided (claims yielded to another worker's trial): {yielded}; "
          f"canonical keys trained twice: {twice}")

    torch_threads = args.threads
    saving = cache_saving(cache_specs, proxy, torch_threads)
    print(f"\n### Teacher-output cache, digits proxy ({saving['steps']} steps, {torch_threads} threads, "
          f"median over {saving['specs']} classic specs)\n")
    print("| live teacher s/trial | cached s/trial | proxy time saved | one-time cache build s |")
    print("|---:|---:|---:|---:|")
    print(f"| {saving['live']:.3f} | {saving['cached']:.3f} | {saving['saved']:.0%} | {saving['build']:.2f} |")

    parts = cifar_trial_parts(threads=torch_threads, **cifar)
    one = next((r for r in runs if r.workers == 1), runs[0]).per_trial()
    overhead = one["sampler"] + one["storage"]
    cpu = projected_trial(parts, 1.0, reject_rate, overhead)
    ratio = SEED_KD_BATCH_S / parts["kd_batch"]
    gpu = projected_trial(parts, ratio, reject_rate, overhead, args.gpu_step_seconds)
    source = (f"measured GPU step {args.gpu_step_seconds} s" if args.gpu_step_seconds is not None else
              f"CPU times x {ratio:.3f} = seed KD batch {SEED_KD_BATCH_S} s (3090 Ti) / ours {parts['kd_batch']:.3f} s")
    print(f"\n### resnet56 -> resnet20 proxy trial, CIFAR-shaped data, measured on this CPU ({torch_threads} threads, "
          f"{cifar['steps']} steps, {cifar['val_size']} val images)\n")
    print("| cached step s | val pass s (per 1,000 images) | rejection s | scoring s without val pass "
          "| KD batch s (live teacher, batch 64) |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {parts['step']:.3f} | {parts['val_pass'] * 1000 / parts['val_size']:.3f} | {parts['rejection']:.3f} "
          f"| {parts['score_fixed']:.3f} | {parts['kd_batch']:.3f} |")
    print(f"\nAt the study's proxy settings ({parts['study_steps']} steps, validation every "
          f"{parts['study_report_every']} steps on {CIFAR_VAL} images, {parts['study_seeds']} seed(s)), rejection rate "
          f"{reject_rate:.0%} (digits), sampler + storage {overhead:.3f} s: a trial takes {cpu['mean']:.0f} s on this CPU; "
          f"PROJECTED on one GPU ({source}): {gpu['mean']:.1f} s.\n")
    print("| seed setting (iterations, population) | seed, 3090 Ti | projection, trials = T x P | "
          "projection, trials = P + T | this CPU, trials = P + T |")
    print("|---|---:|---:|---:|---:|")
    for (t, p), hours in SEED_HOURS.items():
        print(f"| ({t}, {p}) | {hours} h | {t * p * gpu['mean'] / 3600:.1f} h | {(t + p) * gpu['mean'] / 3600:.2f} h "
              f"| {(t + p) * cpu['mean'] / 3600:.1f} h |")
    result = {
        "date": date, "machine": machine(), "proxy": proxy,
        "searches": [{"trials": r.trials, "population": r.population, "workers": r.workers, "wall": r.wall,
                      "search_wall": r.search_wall, "finished": r.finished, "rejections": r.rejections(),
                      "duplicates": r.duplicates(), "per_trial": r.per_trial()} for r in runs],
        "reject_rate": reject_rate, "cache": saving, "cifar": parts, "cpu_trial": cpu, "gpu_trial": gpu,
        "gpu_source": source,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
