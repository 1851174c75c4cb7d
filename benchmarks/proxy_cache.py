"""Proxy-trial time with and without the teacher-output cache, side by side.

    python benchmarks/proxy_cache.py [--checkpoint digits_teacher.pt] [--threads 2] [--cifar-steps 20]
    python benchmarks/proxy_cache.py --separation 5 [--checkpoint ...]

Two pairs: the digits task (digits_teacher -> digits_student, the study's proxy settings) and
resnet56 -> resnet20 on CIFAR-shaped random data (3 x 32 x 32, 100 classes, 1,000 train and
200 val images, 2 views with shift-and-flip augmentation, a short run of ``--cifar-steps``
steps: only the time per step matters there, untrained weights are fine). Uncached, the
teacher runs on every batch; cached, its outputs are read from the on-device cache built
once per study (its build time is shown apart). Both use the same views. The teacher outputs
are compared directly (largest difference relative to the largest value): live vs float32
cache differ only by the convolution kernels' batch-size effects, float16 by its rounding
(feat and emb; logits stay float32). The metrics after training are compared too: training
amplifies such last-bit differences, so they agree closely but not bit for bit.

``--separation N`` instead measures what the digits proxy can tell apart: no KD and vanilla KD,
each over N paired seeds (the same seeds for both), mean +- standard deviation of the
validation accuracy and CE, and the paired t statistic of the accuracy difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd_optuna.distill.classics import CLASSICS  # noqa: E402
from kd_optuna.run.config import load_config  # noqa: E402
from kd_optuna.models import build_model, tap_model  # noqa: E402
from kd_optuna.proxy.settings import ProxySettings  # noqa: E402
from kd_optuna.proxy.views import ProxyData  # noqa: E402
from kd_optuna.proxy.task import Task  # noqa: E402


def digits_task(checkpoint: str | None, **kwargs) -> Task:
    config = load_config("digits")
    if checkpoint is not None:
        config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, checkpoint=checkpoint))
    task = Task.from_config(config)
    kwargs.setdefault("proxy", task.proxy)
    return Task(task.data, task.teacher, task.new_student, **kwargs)


def cifar_task(steps: int, device: torch.device, **kwargs) -> Task:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 3, 32, 32, generator=generator)
    y = torch.arange(1000) % 100
    vx, vy = torch.randn(200, 3, 32, 32, generator=generator), torch.arange(200) % 100
    settings = ProxySettings(labels_per_class=1, steps=steps, batch_size=64, label_batch_size=64,
                             report_every=steps, views=2, augment="shift_flip", shift=4,
                             sharpness_size=128)
    data = ProxyData.build(x, y, vx, vy, settings, device, num_classes=100)
    torch.manual_seed(0)
    teacher = tap_model(build_model("resnet56", 100), "resnet56")

    def new_student():
        return tap_model(build_model("resnet20", 100), "resnet20").to(device)

    kwargs.setdefault("proxy", settings)
    return Task(data, teacher, new_student, **kwargs)


def timed(task: Task, spec) -> tuple[float, dict]:
    start = time.perf_counter()
    result = task.run(spec)
    if task.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result.metrics()


def output_gap(a, b, data) -> float:
    """Largest |a - b| / max|b| over the teacher outputs of the first 256 pool images, all views."""
    n = min(256, data.pool.shape[0])
    worst = 0.0
    for v in range(data.views.views):
        positions = torch.arange(n, device=data.device)
        views = torch.full_like(positions, v)
        left, right = a(positions, views), b(positions, views)
        for k in right:
            worst = max(worst, float((left[k] - right[k]).abs().max() / right[k].abs().max()))
    return worst


def compare(label: str, make, spec) -> str:
    uncached = make(use_cache=False)
    start = time.perf_counter()
    cached = make()
    outputs = cached.teacher_outputs
    build = time.perf_counter() - start
    uncached.reference, cached.reference  # study-level, computed once: not part of a trial
    cached.rejection_batch
    t_live, m_live = timed(uncached, spec)
    t_cached, m_cached = timed(cached, spec)
    full = make(proxy=dataclasses.replace(cached.proxy, cache_dtype="float32"))
    start = time.perf_counter()
    cached.reject(spec)
    t_reject = time.perf_counter() - start
    live_gap = output_gap(uncached.teacher_outputs, full.teacher_outputs, cached.data)
    half_gap = output_gap(outputs, full.teacher_outputs, cached.data)
    gaps = {k: abs(m_cached[k] - m_live[k]) for k in m_live}
    worst = max(gaps, key=gaps.get)
    metric_gap = f"{gaps[worst]:.1e} ({worst}); val_acc {gaps['val_acc']:.1e}"
    return (f"| {label} | {cached.proxy.steps} | {t_live:.2f} | {t_cached:.2f} | {t_live / t_cached:.2f}x | "
            f"{build:.2f} | {outputs.nbytes() / 2**20:.1f} | {t_reject * 1000:.0f} ms ({t_reject / t_cached:.1%}) | "
            f"{live_gap:.1e} | {half_gap:.1e} | {metric_gap} |")


def separation(task: Task, n_seeds: int) -> None:
    rows = {}
    for label, spec in (("no KD", None), ("vanilla KD", CLASSICS["kd"][0])):
        runs = [task.run(spec, dataclasses.replace(task.proxy, seeds=(seed,))) for seed in range(n_seeds)]
        rows[label] = runs
    print(f"digits proxy ({task.proxy.labels_per_class} labels per class, KD on the {task.proxy.kd_source} split, "
          f"{task.proxy.steps} steps), {n_seeds} seeds\n")
    print("| distiller | val acc mean | std | min | max | val CE (calibrated) | seconds per trial |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, runs in rows.items():
        acc = torch.tensor([r.val_acc for r in runs])
        ce = torch.tensor([r.val_ce for r in runs])
        secs = sum(r.train_seconds + r.score_seconds for r in runs) / len(runs)
        print(f"| {label} | {acc.mean():.4f} | {acc.std():.4f} | {acc.min():.4f} | {acc.max():.4f} | "
              f"{ce.mean():.4f} +- {ce.std():.4f} | {secs:.2f} |")
    diff = torch.tensor([b.val_acc - a.val_acc for a, b in zip(rows["no KD"], rows["vanilla KD"])])
    t = diff.mean() / (diff.std() / len(diff) ** 0.5)
    print(f"\npaired difference (KD - no KD): {diff.mean():.4f} +- {diff.std():.4f}, t = {t:.1f} over {len(diff)} seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="digits teacher checkpoint (default: train/cached)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cifar-steps", type=int, default=20)
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--separation", type=int, default=0, metavar="N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.separation:
        separation(digits_task(args.checkpoint), args.separation)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"device: {name}; spec: vanilla KD ({CLASSICS['kd'][0].key}); times are one proxy trial\n")
    print("| pair | steps | uncached s | cached s | speed-up | cache build s | cache MiB | rejection check "
          "| teacher outputs: live vs fp32 cache | fp16 vs fp32 cache | max metric diff, uncached vs cached |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    if not args.skip_digits:
        print(compare("digits_teacher -> digits_student", lambda **kw: digits_task(args.checkpoint, **kw),
                      CLASSICS["kd"][0]), flush=True)
    if not args.skip_cifar:
        print(compare("resnet56 -> resnet20, CIFAR-shaped", lambda **kw: cifar_task(args.cifar_steps, device, **kw),
                      CLASSICS["kd"][0]), flush=True)


if __name__ == "__main__":
    main()
