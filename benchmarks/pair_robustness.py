"""Random distillers on teacher/student pairs of the zoo: does any fail other than by design?

For each pair, build the tapped teacher (eval) and student (train) for 100 classes, draw
``--per-pair`` distillers from the full search space, build each ``DistillerLoss`` from the
pair's real knowledge shapes, and run one forward and backward on 8 random 32 px images.
A distiller may be refused with ``InvalidDistiller`` (by design: the spec cannot be computed
for those shapes); any other exception is a fault, printed with one spec that raised it, and
the script exits 1.

    python benchmarks/pair_robustness.py --per-pair 150
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from kd_optuna.distill.loss import DistillerLoss
from kd_optuna.errors import InvalidDistiller
from kd_optuna.models import build_model, tap_model
from kd_optuna.space import FULL_OPTIONS, GENES, DistillerSpec

#: The shipped CIFAR-100 pairs, the paper's heterogeneous ones, and a ViT in either role.
PAIRS = (
    ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
    ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"), ("wrn_40_2", "ShuffleV1"), ("vit_tiny_cifar", "resnet8"),
    ("resnet32x4", "vit_tiny_cifar"),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-pair", type=int, default=150, help="random distillers per pair")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    draw = random.Random(args.seed)
    faults: dict[tuple[str, str, str], str] = {}
    print("| teacher | student | student shapes | teacher shapes | computed | refused (InvalidDistiller) | faults |")
    print("|---|---|---|---|---:|---:|---:|")
    for teacher_name, student_name in PAIRS:
        torch.manual_seed(args.seed)
        teacher = tap_model(build_model(teacher_name, 100), teacher_name).eval()
        student = tap_model(build_model(student_name, 100), student_name).train()
        images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
        with torch.no_grad():
            teacher_out = teacher(images)
        t_shapes = {k: tuple(v.shape[1:]) for k, v in teacher_out.items()}
        s_shapes = {k: tuple(v.shape[1:]) for k, v in student(images).items()}
        computed = refused = failed = 0
        for _ in range(args.per_pair):
            spec = DistillerSpec.from_params({gene: draw.choice(FULL_OPTIONS[gene]) for gene in GENES})
            try:
                DistillerLoss(spec, s_shapes, t_shapes)(student(images), teacher_out, labels).backward()
                computed += 1
            except InvalidDistiller:
                refused += 1
            except Exception as error:  # noqa: BLE001 - every other exception is what this looks for
                failed += 1
                faults.setdefault((teacher_name, student_name, f"{type(error).__name__}: {str(error)[:120]}"), spec.key)
        print(f"| {teacher_name} | {student_name} | {s_shapes} | {t_shapes} | {computed} | {refused} | {failed} |",
              flush=True)
    for (teacher_name, student_name, what), key in faults.items():
        print(f"fault: {teacher_name} -> {student_name}: {what} (for example `{key}`)")
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main())
