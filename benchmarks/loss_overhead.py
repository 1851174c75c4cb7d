"""Cost of a distiller in one student training step, as a ratio to vanilla KD.

One step = student forward (tapped: feat, emb, logit), loss, backward, SGD step, on a batch of
CIFAR-shaped images (3x32x32, 100 classes). The teacher is frozen, so its outputs are computed
once before timing. Measured: CE only, CE + vanilla KD, and CE + each of N random valid specs
per knowledge. Every step of a candidate is timed right after a vanilla-KD step (interleaved),
so a candidate's ratio is median(candidate steps) / median(its neighbouring KD steps). Steps
are timed in this process's CPU time (time.process_time) on one thread by default, so that
other processes on a shared machine do not add their load to one side of a ratio.

    .venv/bin/python benchmarks/loss_overhead.py                 # 50 specs per knowledge
    .venv/bin/python benchmarks/loss_overhead.py --specs 5 --repeats 2   # smoke run

"Valid" means what the search's rejection keeps at the least: the spec builds for these shapes
and its first loss is finite.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch
import torch.nn.functional as F

from kd_optuna.distill.classics import CLASSICS
from kd_optuna.errors import InvalidDistiller
from kd_optuna.distill.loss import DistillerLoss
from kd_optuna.models import build_model, knowledge_shapes, tap_model
from kd_optuna.space import FULL_OPTIONS, GENES, KNOWLEDGE, DistillerSpec


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--specs", type=int, default=50, help="random valid specs per knowledge")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per candidate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--controls", type=int, default=10,
                        help="measurements of CE only and of KD against itself")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


class Step:
    """One training step of the student with CE plus, optionally, a distiller."""

    def __init__(self, student, distiller, images, labels, teacher_out):
        self.student, self.distiller = student, distiller
        self.images, self.labels, self.teacher_out = images, labels, teacher_out
        params = list(student.parameters()) + (list(distiller.parameters()) if distiller else [])
        # lr 0: the step costs the same, and the student every candidate sees stays the same.
        self.optimizer = torch.optim.SGD(params, lr=0.0, momentum=0.9)

    def __call__(self) -> float:
        start = time.process_time()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.student(self.images)
        loss = F.cross_entropy(out["logit"], self.labels)
        if self.distiller is not None:
            loss = loss + self.distiller(out, self.teacher_out, self.labels)
        loss.backward()
        self.optimizer.step()
        return time.process_time() - start


def random_valid_specs(knowledge, count, rng, student_shapes, teacher_shapes, probe):
    """``count`` distinct random specs of ``knowledge`` that build and give a finite loss."""
    specs, seen, tried = [], set(), 0
    while len(specs) < count:
        tried += 1
        genes = {gene: rng.choice(FULL_OPTIONS[gene]) for gene in GENES}
        spec = DistillerSpec.from_params({**genes, "knowledge": knowledge})
        if spec.key in seen:
            continue
        seen.add(spec.key)
        try:
            distiller = DistillerLoss(spec, student_shapes, teacher_shapes)
            with torch.no_grad():
                distiller(*probe)
        except InvalidDistiller:
            continue
        specs.append(spec)
    return specs, tried


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    student = tap_model(build_model(args.student, num_classes=100), args.student)
    teacher = tap_model(build_model(args.teacher, num_classes=100), args.teacher).eval()
    student_shapes = knowledge_shapes(student, (3, 32, 32))
    teacher_shapes = knowledge_shapes(teacher, (3, 32, 32))
    images = torch.randn(args.batch, 3, 32, 32)
    labels = torch.randint(0, 100, (args.batch,))
    with torch.no_grad():
        teacher_out = {k: v.detach() for k, v in teacher(images).items()}
        probe_student = {k: v.detach() for k, v in student(images).items()}
    student.train()

    def step(distiller=None):
        return Step(student, distiller, images, labels, teacher_out)

    kd_step = step(DistillerLoss(CLASSICS["kd"][0], student_shapes, teacher_shapes))
    for _ in range(3):
        kd_step()

    def ratio(candidate) -> tuple[float, float]:
        candidate()
        kd, mine = [], []
        for _ in range(args.repeats):
            kd.append(kd_step())
            mine.append(candidate())
        return statistics.median(mine) / statistics.median(kd), statistics.median(kd)

    student_leaves = {k: v.clone().requires_grad_(True) for k, v in probe_student.items()}

    def loss_only_ms(distiller) -> float:
        """CPU ms of the distiller's forward and backward alone, on fixed student outputs."""
        times = []
        for _ in range(args.repeats + 2):
            start = time.process_time()
            distiller(student_leaves, teacher_out, labels).backward()
            times.append(time.process_time() - start)
        return statistics.median(times) * 1e3

    print(f"# {args.student} student, {args.teacher} teacher outputs precomputed, batch {args.batch}, "
          f"CPU {platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}")
    print(f"# student shapes {student_shapes}, teacher shapes {teacher_shapes}")
    kd_loss_ms = loss_only_ms(kd_step.distiller)
    controls = {
        "CE only": step(None),
        "vanilla KD again (noise floor)": step(
            DistillerLoss(CLASSICS["kd"][0], student_shapes, teacher_shapes)
        ),
    }
    kd_seconds = []
    for name, candidate in controls.items():
        measured = [ratio(candidate) for _ in range(args.controls)]
        kd_seconds += [seconds for _, seconds in measured]
        values = sorted(r for r, _ in measured)
        print(f"{name}: median {statistics.median(values):.3f}x vanilla KD "
              f"(range {values[0]:.3f}-{values[-1]:.3f} over {len(values)} measurements)")
    print(f"vanilla KD step: {statistics.median(kd_seconds) * 1e3:.1f} ms CPU (median), "
          f"its loss alone {kd_loss_ms:.2f} ms")

    def quantiles(values):
        values = sorted(values)
        return statistics.median(values), values[int(0.9 * (len(values) - 1))], values[-1]

    summary = {}
    probe = (probe_student, teacher_out, labels)
    for knowledge in KNOWLEDGE:
        specs, tried = random_valid_specs(
            knowledge, args.specs, rng, student_shapes, teacher_shapes, probe
        )
        rows = []
        for spec in specs:
            distiller = DistillerLoss(spec, student_shapes, teacher_shapes)
            try:
                step_ratio, _ = ratio(step(distiller))
                loss_ms = loss_only_ms(distiller)
            except InvalidDistiller as error:
                print(f"  dropped mid-run ({error.reason}): {spec.key}")
                continue
            rows.append((step_ratio, loss_ms, spec.key))
        ratios = quantiles(r for r, _, _ in rows)
        costs = quantiles(ms for _, ms, _ in rows)
        summary[knowledge] = ratios, costs
        print(f"\n{knowledge}: {len(rows)} valid specs timed ({tried} drawn)")
        print(f"  step / KD step: median {ratios[0]:.3f}x, p90 {ratios[1]:.3f}x, max {ratios[2]:.3f}x")
        print(f"  loss alone: median {costs[0]:.2f} ms, p90 {costs[1]:.2f} ms, max {costs[2]:.2f} ms")
        for r, ms, key in sorted(rows, key=lambda row: -row[1])[:3]:
            print(f"  costliest: {ms:.2f} ms ({r:.3f}x) {key}")

    print("\n| knowledge | step ratio median | p90 | max | loss alone median (ms) | max (ms) |")
    print("|---|---|---|---|---|---|")
    for knowledge, (ratios, costs) in summary.items():
        print(f"| {knowledge} | {ratios[0]:.3f}x | {ratios[1]:.3f}x | {ratios[2]:.3f}x "
              f"| {costs[0]:.2f} | {costs[2]:.2f} |")

if __name__ == "__main__":
    main()
