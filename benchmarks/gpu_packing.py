"""Proxy trials per hour on one GPU: workers per GPU x CUDA-graph steps, sampler and storage included.

    bash benchmarks/gpu_check.sh --packing                 # on a GPU machine, < 8 min
    python benchmarks/gpu_packing.py --cpu --quick         # the same logic on the CPU

Each variant is a real ``kd-optuna optimize`` (``kd_optuna.run.workers.optimize``: spawned worker
processes, the study's EvolutionSampler, a SQLite study, heartbeats) on a fresh study of the
``cifar100_resnet56_resnet20`` config with ``[proxy] steps`` and ``cuda_graph`` set, run for
``--window`` seconds (or, with ``--trials N``, for N trials: a check of the logic that a loaded
machine cannot starve of its second trial). Only the data differ from a user's run: CIFAR-shaped random tensors (45,000
train and 5,000 val images, 100 classes) and an untrained resnet56 teacher with the BN
statistics of one batch, built in each worker by the objective factory below, because a
machine without network has no CIFAR-100 (and only the times matter).

Printed per variant, and the ratios to the first (1 worker, eager: today's default):
- trials per hour, steady state: (completions - 1) / (last - first completion), every
  evaluation counted (completed and rejected), and the completed ones alone;
- minutes for the seed's 2,000 evaluations at that rate;
- peak GPU memory of all workers together (nvidia-smi, polled each second) and per worker;
- how the graph variants' steps ran (the trials' ``step_mode``);
- vanilla KD's metrics (the sampler's first trial in every variant, same seed and spec) and
  their largest difference from the first variant's: packing and graphs must not change them
  beyond the GPU's run-to-run noise.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import optuna  # noqa: E402
import torch  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from kd_optuna.distill.classics import CLASSICS  # noqa: E402

CONFIG = """\
[study]
name = "packing"

[data]
dataset = "cifar100"
root = {root!r}
# the trials train on CIFAR-shaped random data (synthetic_objective): create-study must not ask
# for the genuine files' md5 there, and nothing here downloads
download = true

[teacher]
model = "resnet56"

[student]
model = "resnet20"

[proxy]
steps = {steps}
cuda_graph = {graph}
# one proxy run per trial, as the seed's 2,000 evaluations count them
confirm_seeds = []
{quick}
[search]
population_size = 20
shrink_after = 50
proposer = "random"

[train]
epochs = 240
batch_size = 64
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
milestones = [150, 180, 210]
gamma = 0.1
"""


def synthetic_objective(config, worker, train: int, val: int):
    """The objective of one worker on CIFAR-shaped random data (the same in every worker)."""
    from kd_optuna.models import build_model, tap_model
    from kd_optuna.proxy.objective import Objective
    from kd_optuna.proxy.task import Task
    from kd_optuna.proxy.views import ProxyData

    device = torch.device(worker.torch_device())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(train, 3, 32, 32, generator=g), torch.arange(train) % 100
    vx, vy = torch.randn(val, 3, 32, 32, generator=g), torch.arange(val) % 100
    data = ProxyData.build(x, y, vx, vy, config.proxy, device, num_classes=100)
    torch.manual_seed(0)
    teacher = build_model("resnet56", 100).to(device)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        teacher.train()(data.train_x[:256])
    teacher = tap_model(teacher.eval(), "resnet56")

    def new_student():
        return tap_model(build_model("resnet20", 100), "resnet20").to(device)

    return Objective(Task(data, teacher, new_student, config.proxy, config.space, cache_dir=None))


class MemoryPoll:
    """Peak of nvidia-smi's memory.used (MiB, all GPUs summed), polled every second."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._smi = shutil.which("nvidia-smi")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run([self._smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                self.peak = max(self.peak, sum(int(v) for v in out.split()))
            except (OSError, subprocess.SubprocessError, ValueError):
                return

    def __enter__(self):
        if self._smi is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def per_hour(times: list[float]) -> float:
    """Steady-state completions per hour from completion times (s): (n - 1) / span."""
    times = sorted(times)
    if len(times) < 2 or times[-1] <= times[0]:
        return float("nan")
    return 3600 * (len(times) - 1) / (times[-1] - times[0])


def run_variant(workdir: Path, workers: int, graph: bool, args) -> dict:
    from kd_optuna.run.cli import cli
    from kd_optuna.run.workers import optimize

    name = f"k{workers}_{'graph' if graph else 'eager'}"
    folder = workdir / name
    folder.mkdir()
    quick = "sharpness_size = 32\nreport_every = 2\n" if args.quick else ""
    config = folder / "packing.toml"
    config.write_text(CONFIG.format(root=str(workdir), steps=args.steps, graph=str(graph).lower(), quick=quick))
    url = f"sqlite:///{folder / 'study.db'}"
    cli.main(["create-study", str(config), "--storage", url], standalone_mode=False)
    factory = functools.partial(synthetic_objective, train=args.train, val=args.val)
    device = "cpu" if args.cpu else "auto"
    start = time.time()
    with MemoryPoll() as memory:
        summary = optimize(url, "packing", args.trials or 1_000_000, n_workers=workers,
                           timeout=None if args.trials else args.window, device=device,
                           threads=args.threads, objective_factory=factory, progress=False)
    wall = time.time() - start
    for line in summary.worker_errors + summary.worker_deaths:
        print(f"  {name}: {line}", file=sys.stderr)
    trials = optuna.load_study(study_name="packing", storage=url).get_trials(deepcopy=False)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.datetime_complete]
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    stamp = [t.datetime_complete.timestamp() for t in done]
    kd_key = CLASSICS["kd"][0].key
    kd = next((t for t in complete if t.user_attrs.get("spec") == kd_key), None)
    modes: dict[str, int] = {}
    for t in complete:
        mode = t.user_attrs.get("step_mode", "eager")
        mode = mode.split(" (")[0] if "(" not in mode else "capture failed: " + mode.split(": ", 2)[-1][:80]
        key = "graphed" if mode.startswith("cuda graph") else mode
        modes[key] = modes.get(key, 0) + 1
    return {
        "variant": f"{workers} worker(s), {'cuda graph' if graph else 'eager'}", "workers": workers, "graph": graph,
        "wall_s": wall, "evaluations": len(done), "completed": len(complete), "failed": summary.failed,
        "evals_per_hour": per_hour(stamp),
        "completed_per_hour": per_hour([t.datetime_complete.timestamp() for t in complete]),
        "trial_s": statistics.median(t.user_attrs["proxy_seconds"] for t in complete) if complete else float("nan"),
        "peak_mib": memory.peak, "modes": modes,
        "kd_metrics": None if kd is None else {k: kd.user_attrs[k] for k in ("val_ce", "val_acc", "cka_gap")},
    }


VARIANTS = [(1, False), (1, True), (4, False), (4, True), (8, True), (16, True)]
QUICK_VARIANTS = [(1, False), (1, True), (2, False)]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--quick", action="store_true", help="tiny data, 4 steps, 3 variants: checks the logic")
    parser.add_argument("--steps", type=int, default=None, help="proxy steps per trial (default 300; quick 4)")
    parser.add_argument("--window", type=float, default=None, help="seconds each variant starts trials (default 40; quick 30)")
    parser.add_argument("--trials", type=int, default=None,
                        help="run each variant for this many trials instead of --window seconds (a logic check)")
    parser.add_argument("--variants", default=None, help="e.g. 1e,1g,4g,8g: workers and e(ager) or g(raph)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 300)
    args.window = args.window or (30.0 if args.quick else 40.0)
    args.train, args.val = (256, 64) if args.quick else (45_000, 5_000)
    variants = QUICK_VARIANTS if args.quick else VARIANTS
    if args.variants:
        variants = [(int(v[:-1]), v[-1] == "g") for v in args.variants.split(",")]
    per_variant = f"{args.trials} trials per variant" if args.trials else f"{args.window:.0f} s per variant"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    on_gpu = torch.cuda.is_available() and not args.cpu
    device = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"gpu packing; {date}; device: {device}; torch {torch.__version__}; optuna {optuna.__version__}; "
          f"Python {platform.python_version()}")
    print(f"resnet56 -> resnet20 proxy trials ({args.steps} steps, the CIFAR-100 study's recipe), CIFAR-shaped random "
          f"data ({args.train} train, {args.val} val), EvolutionSampler on SQLite, {per_variant}\n",
          flush=True)
    print("| variant | evals/h | ratio | completed/h | median trial s | min per 2,000 evals | peak MiB (all) "
          "| steps | vanilla KD val_ce / acc | max diff vs first |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kd_packing_") as tmp:
        for workers, graph in variants:
            row = run_variant(Path(tmp), workers, graph, args)
            first = rows[0] if rows else row
            row["ratio"] = row["evals_per_hour"] / first["evals_per_hour"]
            a, b = row["kd_metrics"], first["kd_metrics"]
            row["kd_max_diff"] = None if a is None or b is None else max(abs(a[k] - b[k]) for k in a)
            rows.append(row)
            kd = "-" if a is None else f"{a['val_ce']:.4f} / {a['val_acc']:.4f}"
            diff = "-" if row["kd_max_diff"] is None else f"{row['kd_max_diff']:.1e}"
            modes = ", ".join(f"{k} {v}" for k, v in row["modes"].items())
            print(f"| {row['variant']} | {row['evals_per_hour']:.0f} | {row['ratio']:.2f} | {row['completed_per_hour']:.0f} "
                  f"| {row['trial_s']:.2f} | {2000 / row['evals_per_hour'] * 60:.1f} | {row['peak_mib']} | {modes} "
                  f"| {kd} | {diff} |", flush=True)
    best = max(rows, key=lambda r: r["evals_per_hour"])
    print(f"\nbest: {best['variant']}, {best['ratio']:.2f}x the first variant's evaluations per hour, "
          f"{2000 / best['evals_per_hour'] * 60:.1f} min for 2,000 evaluations")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": date, "device": device, "steps": args.steps,
                                               "window_s": None if args.trials else args.window,
                                               "trials": args.trials, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
