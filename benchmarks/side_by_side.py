"""K proxy students trained side by side in one process against K sequential proxy trials.

    bash benchmarks/gpu_check.sh --side-by-side            # on a GPU machine, about 2 min
    python benchmarks/side_by_side.py --cpu --quick         # the same logic on the CPU

Issue 13's fourth measure, measured before it is built into ``optimize``: the K students of K
candidates (same architecture, same proxy seed, hence the same initial weights and batches,
each with its own distiller) become one model whose weights are stacked along a new first
axis (``torch.func.stack_module_state``) and whose forward is ``torch.func.vmap`` of
``functional_call`` over them. One step is then::

    t = teacher(batch)                                  (one cache lookup for all K)
    out = vmap(student)(W (K, ...), buffers (K, ...), x (B, C, H, W))   -> {k: (K, B, ...)}
    loss = sum_k  ce_weight * CE(out.logit[k], y) + distiller_k(out[k], t)
    backward; one optimiser step over W and every distiller's adapter

The candidates' parameters are disjoint, so the summed loss gives each the gradient it gets
alone, and SGD/Adam act elementwise: the arithmetic is the sequential trial's, up to the
order of floating-point sums inside the batched kernels. BatchNorm's running statistics are
buffers stacked and batched with the weights, so its in-place update writes each student's
own slice (checked below: the students' validation CE after training). Side by side runs
twice, in the recipe's channels-last format and in the contiguous one: under vmap,
``adaptive_avg_pool2d`` of a channels-last input has no batching rule (torch 2.x warns of a
per-slice fallback), so the contiguous format may be the faster there.

Printed for K in ``--ks``, eager and CUDA-graphed (the step replayed, ``kd_optuna.train.graphs``):
milliseconds per candidate-step, sequential and side by side, the speed-ups, peak memory, and
the largest difference of a candidate's calibrated validation CE between the two, beside the
difference the proxy seed alone makes (seed 0 against seed 1, one candidate): the side-by-side
students must agree with the sequential ones far inside that. The data are those of
``benchmarks/gpu_check.py`` (CIFAR-shaped random tensors, an untrained resnet56 teacher,
the resnet20 student, 100 classes, the CIFAR-100 study's proxy recipe): only times matter.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.func import functional_call, stack_module_state, vmap  # noqa: E402

from kd_optuna.distill.classics import CLASSICS  # noqa: E402
from kd_optuna.proxy.metrics import calibrated_cross_entropy  # noqa: E402
from kd_optuna.proxy.settings import ProxySettings  # noqa: E402
from kd_optuna.proxy.training import (  # noqa: E402
    _proxy_batches, candidate_loss, memory_format, predict, step_inputs, train_student,
)
from kd_optuna.run.config import load_config  # noqa: E402
from kd_optuna.train import engine  # noqa: E402
from kd_optuna.train.graphs import CudaGraphs, GraphedStep  # noqa: E402


def synthetic_task(device: torch.device, train: int, val: int, settings: ProxySettings, size: int = 32):
    """The GPU check's task (``benchmarks/gpu_check.py``): random CIFAR-shaped data, an
    untrained resnet56 teacher with settled BatchNorm statistics, resnet20 students, in memory."""
    from gpu_check import build_data, settled_teacher  # benchmarks/, this script's folder

    from kd_optuna.models import build_model, tap_model
    from kd_optuna.proxy.task import Task

    data = build_data(settings, device, train, val, size)
    teacher = settled_teacher(device, data.train_x[:256])

    def new_student():
        return tap_model(build_model("resnet20", 100), "resnet20").to(device)

    return Task(data, teacher, new_student, settings, cache_dir=None)


class StackedStudents:
    """K students of one architecture as one vmapped model: ``weights`` and ``buffers`` map
    each parameter/buffer name to a (K, ...) tensor; ``self(x)`` -> {name: (K, B, ...)}."""

    def __init__(self, students):
        self.students = students
        self.weights, self.buffers = stack_module_state(students)
        skeleton = copy.deepcopy(students[0]).to("meta")

        def forward(weights, buffers, x):
            return functional_call(skeleton, (weights, buffers), (x,))

        self._forward = vmap(forward, in_dims=(0, 0, None), randomness="different")

    def __call__(self, x):
        return self._forward(self.weights, self.buffers, x)

    def unstack(self) -> None:
        """Copy each student's slice back into its module (weights and BatchNorm statistics)."""
        with torch.no_grad():
            for k, student in enumerate(self.students):
                student.load_state_dict({name: t[k] for name, t in {**self.weights, **self.buffers}.items()})


def train_side_by_side(students, distillers, data, teacher, settings: ProxySettings, seed: int, graph: bool) -> None:
    """:func:`kd_optuna.proxy.training.train_student` for K candidates at once (module docstring)."""
    fmt = memory_format(settings)
    for s in students:
        s.to(memory_format=fmt).train()
    for d in distillers:
        d.train()
    stacked = StackedStudents(students)
    params = list(stacked.weights.values()) + [p for d in distillers for p in d.parameters()]
    optimizer = settings.make_optimizer(params)

    def step_loss(batch):
        positions, views, _ = batch
        inputs = step_inputs(data, batch)
        out = stacked(inputs.images.contiguous(memory_format=fmt))
        t = teacher(positions, views)
        return sum(candidate_loss({name: v[k] for name, v in out.items()}, distiller, t, inputs, settings.ce_weight)
                   for k, distiller in enumerate(distillers))

    hooks = engine.Hooks()
    run_step = GraphedStep(optimizer, step_loss, hooks, CudaGraphs(data.device)) if graph else None
    engine.train_steps(optimizer, _proxy_batches(data, settings, seed), step_loss,
                       lr=settings.lr, lr_at=settings.lr_factor, hooks=hooks, run_step=run_step)
    stacked.unstack()


def val_ce(student, data, settings) -> float:
    return calibrated_cross_entropy(predict(student, data.val_x, settings.eval_batch_size)["logit"], data.val_y)


def fresh(task, specs, seed):
    """Per candidate, as a trial builds them: seed torch, build the student, then the distiller."""
    students, distillers = [], []
    for spec in specs:
        torch.manual_seed(seed)
        students.append(task.new_student())
        distillers.append(task.make_distiller(spec))
    return students, distillers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn) -> tuple[float, int]:
    """(seconds, peak bytes allocated on a CUDA device, else 0) of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def measure(task, specs, settings, graph: bool, repeats: int) -> dict:
    """Sequential against side by side for ``specs`` (K candidates), ``repeats`` times each, alternated."""
    device, data, teacher = task.device, task.data, task.teacher_outputs
    graphed = dataclasses.replace(settings, cuda_graph=graph)
    contiguous = dataclasses.replace(settings, channels_last=False)
    seq_s, sbs_s, sbs_c, seq_mem, sbs_mem, diff = [], [], [], 0, 0, 0.0
    for _ in range(repeats):
        students, distillers = fresh(task, specs, 0)
        s, m = timed(device, lambda: [train_student(st, d, data, teacher, graphed, 0) for st, d in zip(students, distillers)])
        seq_s.append(s)
        seq_mem = max(seq_mem, m)
        sequential = [val_ce(st, data, settings) for st in students]
        for fmt_settings, times in ((settings, sbs_s), (contiguous, sbs_c)):
            students, distillers = fresh(task, specs, 0)
            s, m = timed(device, lambda: train_side_by_side(students, distillers, data, teacher, fmt_settings, 0, graph))
            times.append(s)
            sbs_mem = max(sbs_mem, m)
            side = [val_ce(st, data, settings) for st in students]
            diff = max(diff, max(abs(a - b) for a, b in zip(sequential, side)))
    steps = settings.steps * len(specs)
    seq, sbs, sbs_contiguous = (statistics.median(t) for t in (seq_s, sbs_s, sbs_c))
    return {
        "k": len(specs), "graph": graph, "seq_ms_per_candidate_step": 1000 * seq / steps,
        "sbs_ms_per_candidate_step": 1000 * sbs / steps, "speedup": seq / sbs,
        "sbs_contiguous_ms_per_candidate_step": 1000 * sbs_contiguous / steps,
        "speedup_contiguous": seq / sbs_contiguous,
        "seq_peak_mib": seq_mem / 2**20, "sbs_peak_mib": sbs_mem / 2**20,
        "max_val_ce_diff": diff, "val_ce": sequential,
    }


def seed_noise(task, spec, settings) -> float:
    """|val CE(seed 0) - val CE(seed 1)| of one candidate: what the proxy seed alone changes."""
    values = []
    for seed in (0, 1):
        (student,), (distiller,) = fresh(task, [spec], seed)
        train_student(student, distiller, task.data, task.teacher_outputs, settings, seed)
        values.append(val_ce(student, task.data, settings))
    return abs(values[0] - values[1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--quick", action="store_true", help="tiny data (16 px), 4 steps, K = 1 and 2: checks the logic")
    parser.add_argument("--steps", type=int, default=None, help="proxy steps per candidate (default 100; quick 4)")
    parser.add_argument("--ks", default=None, help="candidates side by side, e.g. 1,4,16 (default; quick 1,2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row, medians (default 3; quick 1)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.quick else 100)
    ks = [int(k) for k in (args.ks or ("1,2" if args.quick else "1,4,16")).split(",")]
    repeats = args.repeats or (1 if args.quick else 3)
    train, val = (256, 64) if args.quick else (45_000, 5_000)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    study = load_config("cifar100_resnet56_resnet20").proxy  # the CIFAR-100 study's proxy recipe, shortened
    settings = dataclasses.replace(study, steps=steps, epochs=0.0, report_every=steps, confirm_seeds=(),
                                   sharpness_size=32 if args.quick else study.sharpness_size)
    from gpu_check import QUICK_SIZE  # benchmarks/, this script's folder

    size = QUICK_SIZE if args.quick else 32
    task = synthetic_task(device, train, val, settings, size)
    safe = [spec for spec, _ in CLASSICS.values() if task.make_distiller(spec).graph_safe]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"side by side; {date}; device: {name}; torch {torch.__version__}; Python {platform.python_version()}")
    print(f"resnet56 -> resnet20 proxy students, {steps} steps of batch {settings.batch_size}, CIFAR-shaped random data ({train} train, {size} px), "
          f"candidates cycling through {len(safe)} graph-safe classic distillers; medians of {repeats}\n", flush=True)
    noise = seed_noise(task, safe[0], settings)
    train_side_by_side(*fresh(task, safe[:1], 0), task.data, task.teacher_outputs, settings, 0, False)  # warm-up
    print(f"seed noise: |val CE(seed 0) - val CE(seed 1)| of {safe[0].key} = {noise:.2e}\n")
    print("| K | steps | sequential ms / candidate-step | side by side (channels_last) | speed-up "
          "| side by side (contiguous) | speed-up | peak MiB seq / sbs | max val CE diff |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for graph, k in itertools.product((False, True) if device.type == "cuda" else (False,), ks):
        specs = [safe[i % len(safe)] for i in range(k)]
        row = measure(task, specs, settings, graph, repeats)
        rows.append(row)
        print(f"| {k} | {'cuda graph' if graph else 'eager'} | {row['seq_ms_per_candidate_step']:.2f} "
              f"| {row['sbs_ms_per_candidate_step']:.2f} | {row['speedup']:.2f} "
              f"| {row['sbs_contiguous_ms_per_candidate_step']:.2f} | {row['speedup_contiguous']:.2f} "
              f"| {row['seq_peak_mib']:.0f} / {row['sbs_peak_mib']:.0f} | {row['max_val_ce_diff']:.1e} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"date": date, "device": name, "steps": steps, "seed_noise": noise,
                                               "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
