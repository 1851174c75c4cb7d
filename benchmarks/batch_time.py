"""Table 3 of the seed as ratios: the batch time of each distiller against vanilla KD.

For each (student, teacher) pair -- resnet20 / resnet56, resnet32 / resnet110, vgg8 / vgg13,
CIFAR-100 shapes (3 x 32 x 32, 100 classes), batch 64 -- one training step of every method is
timed: the teacher's forward (no grad, eval mode, as in real distillation training), the
student's forward, CE + the distillation term, backward and an SGD step (momentum 0.9,
weight decay 5e-4) over the student's and the distiller's parameters. DML has no teacher: its
step is the student's plus the peer student's forward, backward and step (two resnet20s, etc.).

Methods: KD (the classic "kd" spec through kd_optuna.distill.loss.DistillerLoss), PKT, CRD (50,000-row
memory bank, 16,384 negatives), RKD, DML, the other classic specs of kd_optuna.distill.classics, and
with ``--searched`` a DistillerSpec JSON (a file or the JSON text). Repeats are interleaved:
every repeat times each method once, in a fresh random order, for ``--steps`` batches (after
``--warmup`` untimed batches per method at the start), so slow drifts of a shared machine hit
all methods alike. A method's time is the median over repeats, its ratio is
median(method) / median(KD); the range shown is the min-max of the per-repeat paired ratios.
On CPU the clock is the process's CPU time with one torch thread: on a machine shared with
other jobs, wall time would time the neighbours. Inputs are random: the time does not depend
on the data.

    python benchmarks/batch_time.py               # CPU, 1 thread: 5 repeats x 1 step, ~3 min CPU
    python benchmarks/batch_time.py --quick       # smoke run: resnet20 only, 2 repeats
    python benchmarks/batch_time.py --searched best_spec.json --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from kd_optuna.distill.baselines import MutualLearning, build_baseline
from kd_optuna.distill.classics import CLASSICS
from kd_optuna.errors import KdOptunaError
from kd_optuna.distill.loss import DistillerLoss
from kd_optuna.models import build_model, knowledge_shapes, tap_model
from kd_optuna.space import DistillerSpec

#: "cpu": the process's CPU time, what the batch computes, unaffected by other processes
#: taking turns on a shared machine (with 1 torch thread it is the batch's compute time);
#: "wall": elapsed time, what a user waits (after a CUDA synchronise on a GPU).
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}

PAIRS = {"resnet20": "resnet56", "resnet32": "resnet110", "vgg8": "vgg13"}
INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 100
CIFAR100_TRAIN = 50_000

#: Table 3 of the seed: batch time in seconds on one RTX 3090 Ti.
SEED_SECONDS = {
    "resnet20": {"kd": 0.219, "pkt": 0.225, "crd": 0.234, "rkd": 0.234, "dml": 0.524, "searched": 0.222},
    "resnet32": {"kd": 0.319, "pkt": 0.336, "crd": 0.353, "rkd": 0.846, "dml": 0.912, "searched": 0.328},
    "vgg8": {"kd": 0.097, "pkt": 0.120, "crd": 0.139, "rkd": 0.207, "dml": 0.190, "searched": 0.105},
}


@dataclass
class Method:
    name: str
    step: Callable[[], None]


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _tapped(name: str, device: torch.device) -> nn.Module:
    return tap_model(build_model(name, NUM_CLASSES), name).to(device)


@torch.no_grad()
def _settle_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Give an untrained network the BN statistics of a batch, then put it in eval mode.

    A randomly initialised deep ResNet in eval mode (running mean 0, variance 1) grows its
    activations about 2x per residual block, and resnet110's features overflow the loss's
    1e12 guard; a trained teacher's statistics keep them at the scale this one-batch average
    gives.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    model(images)
    model.eval()


def _distillation_step(student, teacher, distiller, batch) -> Callable[[], None]:
    images, labels, index = batch
    needs_index = getattr(distiller, "needs_index", False)
    optimizer = _sgd(list(student.parameters()) + list(distiller.parameters()))
    student.train()
    distiller.train()
    teacher.eval()

    def step() -> None:
        with torch.no_grad():
            t_out = teacher(images)
        s_out = student(images)
        extra = (labels, index) if needs_index else (labels,)
        loss = F.cross_entropy(s_out["logit"], labels) + distiller(s_out, t_out, *extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _dml_step(student_name: str, batch, device: torch.device) -> Callable[[], None]:
    images, labels, _ = batch
    student, peer = _tapped(student_name, device), _tapped(student_name, device)
    optimizer = _sgd(student.parameters())
    mutual = MutualLearning(peer, _sgd(peer.parameters()))
    student.train()

    def step() -> None:
        logit = student(images)["logit"]
        loss = F.cross_entropy(logit, labels) + mutual.mutual_term(images, labels, logit)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def build_methods(
    student_name: str, device: torch.device, batch, searched: DistillerSpec | None, classics: bool
) -> tuple[list[Method], list[str]]:
    """The timed steps for one pair, and a note for every method that could not be built."""
    teacher = _tapped(PAIRS[student_name], device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    _settle_batchnorm(teacher, batch[0])
    probe = _tapped(student_name, device)
    s_shapes = knowledge_shapes(probe, INPUT_SHAPE)
    t_shapes = knowledge_shapes(teacher, INPUT_SHAPE)

    specs = {"kd": CLASSICS["kd"][0]}
    if searched is not None:
        specs["searched"] = searched
    if classics:
        specs.update({f"spec:{n}": spec for n, (spec, _) in CLASSICS.items() if n != "kd"})
    methods, skipped = [], []

    def add(name: str, make: Callable[[], Callable[[], None]]) -> None:
        try:
            methods.append(Method(name, make()))
        except KdOptunaError as exc:
            skipped.append(f"{student_name} {name}: not computable ({exc})")

    def spec_step(spec: DistillerSpec):
        loss = DistillerLoss(spec, s_shapes, t_shapes).to(device)
        return _distillation_step(_tapped(student_name, device), teacher, loss, batch)

    def baseline_step(name: str, **kw):
        loss = build_baseline(name, s_shapes, t_shapes, **kw).to(device)
        return _distillation_step(_tapped(student_name, device), teacher, loss, batch)

    add("kd", lambda: spec_step(specs["kd"]))
    add("pkt", lambda: baseline_step("pkt"))
    add("crd", lambda: baseline_step("crd", num_data=CIFAR100_TRAIN))
    add("rkd", lambda: baseline_step("rkd"))
    add("dml", lambda: _dml_step(student_name, batch, device))
    for name, spec in specs.items():
        if name != "kd":
            add(name, lambda spec=spec: spec_step(spec))
    return methods, skipped


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(
    methods: list[Method],
    device: torch.device,
    repeats: int,
    steps: int,
    warmup: int,
    seed: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, list[float]], list[str]]:
    """Seconds per batch of each method in each repeat, methods interleaved in random order,
    and a note for each method dropped because a step raised (a loss guard, say)."""
    order = random.Random(seed)
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    notes: list[str] = []
    live = list(methods)

    def run(method: Method, count: int) -> bool:
        try:
            for _ in range(count):
                method.step()
        except KdOptunaError as exc:
            notes.append(f"{method.name}: dropped, a step raised {type(exc).__name__}: {exc}")
            live.remove(method)
            del times[method.name]
            return False
        return True

    for method in list(live):
        run(method, warmup)
    for _ in range(repeats):
        shuffled = live[:]
        order.shuffle(shuffled)
        for method in shuffled:
            _synchronise(device)
            start = clock()
            if run(method, steps):
                _synchronise(device)
                times[method.name].append((clock() - start) / steps)
    return times, notes


def summarise(student: str, times: dict[str, list[float]]) -> list[dict]:
    kd = times["kd"]
    kd_median = statistics.median(kd)
    rows = []
    for name, values in times.items():
        paired = [v / k for v, k in zip(values, kd)]
        seed = SEED_SECONDS[student]
        seed_ratio = seed[name] / seed["kd"] if name in seed else None
        rows.append(
            {
                "student": student,
                "teacher": PAIRS[student],
                "method": name,
                "median_ms": 1000 * statistics.median(values),
                "ratio": statistics.median(values) / kd_median,
                "paired_min": min(paired),
                "paired_max": max(paired),
                "seed_ratio": seed_ratio,
                "repeats": len(values),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| student (teacher) | method | median ms/batch | ratio to KD | paired range | seed ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        seed = f"{r['seed_ratio']:.2f}" if r["seed_ratio"] is not None else ""
        label = "searched (seed: KD-Zero)" if r["method"] == "searched" else r["method"]
        lines.append(
            f"| {r['student']} ({r['teacher']}) | {label} | {r['median_ms']:.0f} | "
            f"{r['ratio']:.2f} | {r['paired_min']:.2f}-{r['paired_max']:.2f} | {seed} |"
        )
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def _load_spec(text: str) -> DistillerSpec:
    path = Path(text)
    if path.is_file():
        text = path.read_text()
    return DistillerSpec.from_json(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--students", default=",".join(PAIRS), help="comma-separated, of " + ", ".join(PAIRS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (CPU 5, GPU 20)")
    parser.add_argument("--steps", type=int, default=None, help="timed batches per repeat (CPU 1, GPU 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per method first")
    parser.add_argument("--searched", metavar="SPEC_JSON", help="a DistillerSpec as a JSON file or text")
    parser.add_argument("--no-classics", action="store_true", help="skip the classic specs but kd")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on a shared machine more threads oversubscribe the cores "
        "and one batch can take 6x longer, as measured on the 2-core machine of BENCHMARKS.md)",
    )
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), default=None,
        help="cpu: process CPU time (default on CPU); wall: elapsed time (default on GPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the machine as JSON")
    parser.add_argument("--quick", action="store_true", help="smoke run: resnet20, batch 16, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.students, args.batch_size, args.no_classics = "resnet20", 16, True
        args.repeats = args.repeats or 2
        args.steps = args.steps or 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    repeats = args.repeats or (20 if gpu else 5)
    steps = args.steps or (10 if gpu else 1)
    clock = args.clock or ("wall" if gpu else "cpu")
    students = [s.strip() for s in args.students.split(",") if s.strip()]
    unknown = [s for s in students if s not in PAIRS]
    if unknown:
        print(f"error: unknown student {unknown}; choose from {', '.join(PAIRS)}", file=sys.stderr)
        return 2
    try:
        searched = _load_spec(args.searched) if args.searched else None
    except KdOptunaError as exc:
        print(f"error: --searched: {exc}", file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    started = time.time()
    print(f"# {machine(device)}; batch {args.batch_size}; {repeats} repeats x {steps} steps; "
          f"{clock} clock; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
    rows, notes = [], []
    for student in students:
        images = torch.randn(args.batch_size, *INPUT_SHAPE, device=device)
        labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
        index = torch.randint(0, CIFAR100_TRAIN, (args.batch_size,), device=device)
        batch = (images, labels, index)
        methods, skipped = build_methods(student, device, batch, searched, not args.no_classics)
        times, dropped = time_methods(
            methods, device, repeats, steps, args.warmup, args.seed, CLOCKS[clock]
        )
        notes += skipped + [f"{student} {note}" for note in dropped]
        if "kd" not in times:
            notes.append(f"{student}: no ratios, KD itself could not be timed")
            continue
        student_rows = summarise(student, times)
        rows += student_rows
        print(markdown(student_rows), flush=True)
        del methods
    elapsed = time.time() - started
    print(f"# total {elapsed:.0f} s")
    for note in notes:
        print(f"# {note}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine(device),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "command": " ".join(["python", "benchmarks/batch_time.py", *(argv or sys.argv[1:])]),
                    "batch_size": args.batch_size,
                    "repeats": repeats,
                    "steps": steps,
                    "clock": clock,
                    "seconds": elapsed,
                    "rows": rows,
                    "notes": notes,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
