"""resnet56 -> resnet20 proxy trials on CIFAR-shaped data: cache, bf16 autocast, channels_last.

    bash benchmarks/gpu_check.sh                  # on a GPU machine: the whole check, < 8 min
    python benchmarks/gpu_check.py --cpu --quick  # the same logic on the CPU, in seconds

The device is the project's default (``kd_optuna.train.classifier.default_device``: the first CUDA
GPU when one is present, else the CPU), so nothing needs a flag on a GPU; ``--cpu`` forces the
CPU. Data: random CIFAR-shaped tensors (3 x 32 x 32, 100 classes; 45,000 train and 5,000 val
images like kd_optuna's CIFAR-100 split; ``--quick``: 64 and 32 of 16 x 16, batches of 8), untrained resnet56 teacher
(its BN statistics settled on a batch) and resnet20 students: only the times matter.

Eight variants: teacher-output cache on/off x bf16 autocast on/off x channels_last on/off. For
each, after one short warm-up trial, ``--repeats`` proxy trials are timed at the
``cifar100_resnet56_resnet20`` study's proxy settings (``--steps`` overrides the step count):
the rejection protocol plus ``Task.run`` (training with its validation passes, then scoring),
with vanilla KD. Printed per variant: the median trial seconds, the batch time (training
seconds minus the validation passes, over the steps), the batch-time ratio to the plain
variant (live teacher, float32, contiguous), peak GPU memory, and the largest metric
difference from the plain variant (the cache and bf16 change numerics a little).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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

from kd_optuna.distill.classics import CLASSICS  # noqa: E402
from kd_optuna.run.config import load_config  # noqa: E402
from kd_optuna.models import build_model, tap_model  # noqa: E402
from kd_optuna.proxy.settings import ProxySettings  # noqa: E402
from kd_optuna.proxy.views import ProxyData  # noqa: E402
from kd_optuna.proxy.training import predict  # noqa: E402
from kd_optuna.proxy.task import Task  # noqa: E402
from kd_optuna.train.classifier import default_device  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Variant:
    cache: bool
    bf16: bool
    channels_last: bool

    @property
    def name(self) -> str:
        return (f"{'cache' if self.cache else 'live teacher'}, {'bf16' if self.bf16 else 'fp32'}, "
                f"{'channels_last' if self.channels_last else 'contiguous'}")


VARIANTS = [Variant(c, b, m) for c in (False, True) for b in (False, True) for m in (False, True)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def settled_teacher(device: torch.device, images: torch.Tensor) -> torch.nn.Module:
    """An untrained resnet56 with the BN statistics of one batch, tapped, in eval mode."""
    torch.manual_seed(0)
    model = build_model("resnet56", 100).to(device)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    model(images)
    return tap_model(model.eval(), "resnet56")


#: ``--quick``'s image side: a CPU without bf16 kernels took 6 s a bf16 step at 32 px.
QUICK_SIZE = 16


def build_data(settings: ProxySettings, device: torch.device, train: int, val: int, size: int = 32) -> ProxyData:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(train, 3, size, size, generator=g), torch.arange(train) % 100
    vx, vy = torch.randn(val, 3, size, size, generator=g), torch.arange(val) % 100
    return ProxyData.build(x, y, vx, vy, settings, device, num_classes=100)


def time_variant(variant: Variant, data: ProxyData, teacher, settings: ProxySettings, outputs, reference,
                 repeats: int, warm_up: bool = True) -> dict:
    """One variant's timed trials; ``warm_up``: a shorter trial first (kernels, allocator), which
    ``--quick`` leaves out: it checks the logic, and its times are not figures."""
    device = data.device
    settings = dataclasses.replace(settings, channels_last=variant.channels_last)

    def new_student():
        return tap_model(build_model("resnet20", 100), "resnet20").to(device)

    task = Task(data, teacher, new_student, settings, use_cache=variant.cache, cache_dir=None)
    if variant.cache:
        task.teacher_outputs = outputs
    task.reference = reference
    spec = CLASSICS["kd"][0]
    with autocast(device, variant.bf16):
        if warm_up:
            warm = min(2, settings.steps)
            task.run(spec, dataclasses.replace(settings, steps=warm, report_every=warm))
        task.rejection_batch
        student = new_student().to(memory_format=torch.channels_last if variant.channels_last else torch.contiguous_format)
        predict(student, data.val_x, settings.eval_batch_size)
        sync(device)
        start = time.perf_counter()
        predict(student, data.val_x, settings.eval_batch_size)
        sync(device)
        val_pass = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trials, batches, result = [], [], None
    reports = -(-settings.steps // settings.report_every)
    for _ in range(repeats):
        with autocast(device, variant.bf16):
            sync(device)
            start = time.perf_counter()
            rejection = task.reject(spec)
            result = task.run(spec)
            sync(device)
        if rejection is not None:
            raise RuntimeError(f"vanilla KD was rejected on CIFAR-shaped data: {rejection}")
        trials.append(time.perf_counter() - start)
        batches.append(max(0.0, result.train_seconds - reports * val_pass) / settings.steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"variant": variant.name, "trial_s": statistics.median(trials), "batch_s": statistics.median(batches),
            "val_pass_s": val_pass, "peak_mib": peak, "metrics": result.metrics()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--quick", action="store_true", help="tiny data and batches, 1 step, 1 repeat: checks the logic")
    parser.add_argument("--steps", type=int, default=None, help="proxy steps per trial (default: the study's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed trials per variant (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu") if args.cpu else default_device()
    study = load_config("cifar100_resnet56_resnet20").proxy
    steps = args.steps or (1 if args.quick else study.steps)
    settings = dataclasses.replace(study, steps=steps, epochs=0.0, report_every=min(study.report_every, steps))
    # quick: 64 train images and batches of 8. A 1-step proxy's stale BatchNorm statistics are
    # recomputed over the pool at each report (kd_optuna.proxy.training.fresh_batch_norm), and a CPU
    # without bf16 convolution kernels took 16-34 s a report for it over 256 images
    if args.quick:
        settings = dataclasses.replace(settings, sharpness_size=8, batch_size=8, reject_batch_size=8,
                                       label_batch_size=min(settings.label_batch_size, 8))
    train, val = (64, 32) if args.quick else (45_000, 5_000)
    repeats = args.repeats or (1 if args.quick else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s))"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"gpu check; {date}; device: {name} (project default: {default_device()}); torch {torch.__version__}; "
          f"Python {platform.python_version()}")
    size = QUICK_SIZE if args.quick else 32
    print(f"resnet56 -> resnet20, CIFAR-shaped random data ({train} train, {val} val, {size} px), vanilla KD, {steps} steps "
          f"(validation every {settings.report_every}), batch {settings.batch_size} + {settings.label_batch_size} "
          f"labelled, {repeats} timed trial(s) per variant\n", flush=True)

    data = build_data(settings, device, train, val, size)
    teacher = settled_teacher(device, data.train_x[:256])
    probe = Task(data, teacher, lambda: tap_model(build_model("resnet20", 100), "resnet20").to(device), settings,
                 cache_dir=None)
    sync(device)
    start = time.perf_counter()
    outputs = probe.teacher_outputs
    sync(device)
    build = time.perf_counter() - start
    reference = probe.reference
    print(f"teacher-output cache: built in {build:.2f} s, {outputs.nbytes() / 2**20:.0f} MiB\n")

    print("| variant | trial s | batch s | batch ratio to plain | val pass s | peak MiB | max metric diff vs plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for variant in VARIANTS:
        row = time_variant(variant, data, teacher, settings, outputs, reference, repeats, warm_up=not args.quick)
        plain = rows[0] if rows else row
        diff, metric = max((abs(row["metrics"][k] - plain["metrics"][k]), k) for k in row["metrics"])
        row["ratio"] = row["batch_s"] / plain["batch_s"] if plain["batch_s"] > 0 else float("nan")
        row["max_diff"] = {"metric": metric, "diff": diff}
        rows.append(row)
        print(f"| {row['variant']} | {row['trial_s']:.3f} | {row['batch_s']:.4f} | {row['ratio']:.2f} "
              f"| {row['val_pass_s']:.3f} | {row['peak_mib']:.0f} | {diff:.1e} ({metric}) |", flush=True)
    best = min(rows, key=lambda r: r["trial_s"])
    print(f"\nfastest: {best['variant']}, {best['trial_s']:.2f} s per trial, {best['batch_s'] * 1000:.1f} ms per batch; "
          f"default settings (cache, fp32, channels_last): "
          f"{next(r for r in rows if r['variant'] == 'cache, fp32, channels_last')['trial_s']:.2f} s per trial")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": date, "device": name, "steps": steps, "rows": rows,
                                               "cache_build_s": build}, indent=2))
    return rows


if __name__ == "__main__":
    main()
