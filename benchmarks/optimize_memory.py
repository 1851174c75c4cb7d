"""Peak resident memory of a real ``kd-optuna optimize`` on an ImageFolder study, and where it goes.

    python benchmarks/optimize_memory.py [--images 120 480] [--sources 64 224] [--batch-sizes 256]
        [--student mobilenet_v3_small] [--teacher resnet18] [--steps 1] [--n-trials 2]
        [--repeats 3] [--old-rev REV] [--stages 64 224] [--stage-images 480] [--quick]

Rows "optimize": each run is a fresh ``kd-optuna optimize --n-workers 1 --threads 1 --device cpu``
(spawned worker, SQLite study, the study's sampler: its first trials are vanilla KD and KD with
logit standardization) on a 4-class ImageFolder made here: N train images (N/4 in ``val/``, the
test split) of S x S pixels, striped patterns with noise, JPEG. The teacher is the study's
``--teacher`` with random weights saved as a state dict (memory does not depend on the weights),
the student ``--student`` (torchvision; mobilenet_v3_small with its tap nodes). The study's
proxy is its recipe (ImageNet's: batch 256) with ``[proxy] steps`` set to ``--steps`` (a step's
memory is the same at every step) and ``batch_size`` to each of ``--batch-sizes``. Peaks are
``ru_maxrss``: the parent's own, and its children's (the worker, the largest child). With
``--old-rev`` every row also runs that git revision's tree (``git archive``, on PYTHONPATH) side
by side, alternating, and prints the ratio. Figures are medians of ``--repeats`` runs.

kd-optuna's imagefolder loader crops every image to 224 px (resize 256, centre crop 224), so the
source size S changes nothing in a study; rows "stages" use the Python API
(``load_dataset(..., image_size=S)``) to measure crops of 64 and 224 px, in one process, stage
by stage: the resident memory after each and the peak during it (VmRSS sampled every 5 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MOBILENET_NODES = '{ feat = "features", emb = "flatten", logit = "classifier.3" }'
CLASSES = 4

RUNNER = r"""
import atexit, json, resource, sys
def report():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("PEAKS " + json.dumps({"parent_mib": own, "worker_mib": kids}), file=sys.stderr, flush=True)
atexit.register(report)
from kd_optuna.run.cli import main
main(sys.argv[1:])
"""


def make_image_folder(root: Path, n_train: int, size: int, seed: int = 0) -> Path:
    """root/train/class<c>/*.jpg (n_train / 4 a class) and root/val/... (a quarter as many)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for part, n in (("train", n_train), ("val", max(CLASSES, n_train // 4))):
        for c in range(CLASSES):
            folder = root / part / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n // CLASSES):
                angle = c * np.pi / CLASSES + rng.normal(0, 0.3)
                wave = np.sin(2 * np.pi * (3 + 2 * c) * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6.3))
                pixels = 127 + 70 * np.stack([wave * (0.6 + 0.3 * ((c + k) % 2)) for k in range(3)], -1)
                pixels = pixels + rng.normal(0, 50, pixels.shape)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def teacher_checkpoint(path: Path, model: str, num_classes: int = CLASSES) -> Path:
    """``model`` with random weights (seed 0) saved as a state dict at ``path``."""
    import torch

    from kd_optuna.models import build_model

    torch.manual_seed(0)
    torch.save(build_model(model, num_classes).state_dict(), path)
    return path


def nodes_line(model: str) -> str:
    return f"nodes = {MOBILENET_NODES}\n" if model.startswith("mobilenet_v3") else ""


def config_text(root: Path, checkpoint: Path, args, batch_size: int) -> str:
    return (
        f'[study]\nname = "memory"\n\n[data]\ndataset = "imagefolder"\nroot = "{root}"\n\n'
        f'[teacher]\nmodel = "{args.teacher}"\nnum_classes = {CLASSES}\ncheckpoint = "{checkpoint}"\n{nodes_line(args.teacher)}\n'
        f'[student]\nmodel = "{args.student}"\nnum_classes = {CLASSES}\n{nodes_line(args.student)}\n'
        f"[proxy]\nsteps = {args.steps}\nbatch_size = {batch_size}\n\n[search]\nshrink_after = 1000\n"
    )


def run_optimize(tree: Path | None, work: Path, config: str, n_trials: int) -> dict:
    """One fresh study and one optimize in ``work``; the peaks and the wall time."""
    work.mkdir(parents=True)
    (work / "study.toml").write_text(config)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    url = f"sqlite:///{work / 'kd.db'}"
    cli = [sys.executable, "-c", RUNNER]
    subprocess.run([*cli, "create-study", "study.toml", "--storage", url], cwd=work, env=env, check=True,
                   capture_output=True, text=True)
    start = time.perf_counter()
    done = subprocess.run([*cli, "optimize", "--storage", url, "--n-trials", str(n_trials), "--n-workers", "1",
                           "--threads", "1", "--device", "cpu", "--no-progress"],
                          cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peaks = [json.loads(line[6:]) for line in done.stderr.splitlines() if line.startswith("PEAKS ")]
    if done.returncode != 0 or not peaks:
        raise RuntimeError(f"optimize failed ({done.returncode}): {done.stderr.strip()[-600:]}")
    return {**peaks[-1], "seconds": seconds, "summary": done.stdout.strip().splitlines()[-1]}


def old_tree(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def optimize_rows(args, tmp: Path) -> None:
    trees = [("new", None)]
    if args.old_rev:
        trees.insert(0, (f"before ({args.old_rev})", old_tree(args.old_rev, Path(tempfile.mkdtemp(dir=tmp)))))
    checkpoint = teacher_checkpoint(tmp / "teacher.pth", args.teacher)
    print(f"## optimize: {args.teacher} -> {args.student}, [proxy] steps = {args.steps}, {args.n_trials} trials, "
          f"medians of {args.repeats}")
    head = "| code | train images | source px | batch | worker peak MiB | parent peak MiB | s |"
    if args.old_rev:
        head += " worker new / before |"
    print(head)
    print("| --- " + "| ---: " * (head.count("|") - 2) + "|")
    count = 0
    for size in args.sources:
        for n in args.images:
            root = make_image_folder(tmp / f"images-{n}-{size}", n, size)
            for batch in args.batch_sizes:
                config = config_text(root, checkpoint, args, batch)
                runs: dict[str, list[dict]] = {label: [] for label, _ in trees}
                for _ in range(args.repeats):
                    for label, tree in trees:  # alternating, so load drifts hit both alike
                        count += 1
                        runs[label].append(run_optimize(tree, tmp / f"run-{count}", config, args.n_trials))
                first_worker = None
                for label, _ in trees:
                    worker = statistics.median(r["worker_mib"] for r in runs[label])
                    parent = statistics.median(r["parent_mib"] for r in runs[label])
                    seconds = statistics.median(r["seconds"] for r in runs[label])
                    row = f"| {label} | {n} | {size} | {batch} | {worker:,.0f} | {parent:,.0f} | {seconds:.0f} |"
                    if args.old_rev:
                        first_worker = first_worker or worker
                        row += f" {worker / first_worker:.2f} |"
                    print(row, flush=True)
                if args.verbose:
                    for label, _ in trees:
                        print(f"    {label}: {[round(r['worker_mib']) for r in runs[label]]} {runs[label][-1]['summary']}")


STAGES_CHILD = r"""
import json, os, sys, threading, time
args = json.loads(sys.argv[1])
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
peak = [0.0]
def sample():
    while True:
        peak[0] = max(peak[0], rss()); time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
rows = []
def mark(name):
    time.sleep(0.03)
    rows.append({"stage": name, "rss": rss(), "peak": max(peak[0], rss())}); peak[0] = rss()
mark("python")
import torch
torch.set_num_threads(1)
mark("import torch")
import dataclasses
from pathlib import Path
import torchvision, optuna
from kd_optuna.data import load_dataset
from kd_optuna.distill.classics import CLASSICS
from kd_optuna.models import build_model, tap_model
from kd_optuna.proxy.task import Task
from kd_optuna.proxy.settings import ProxySettings
from kd_optuna.proxy.views import ProxyData
from kd_optuna.run.config import TrainConfig
mark("import torchvision, optuna, kd_optuna")
splits = load_dataset("imagefolder", root=args["root"], image_size=args["crop"])
recipe = TrainConfig().resolved("imagefolder", args["student"])
settings = ProxySettings.from_recipe(recipe, {"steps": args["steps"], "batch_size": args["batch"]})
train_x, train_y = splits.pixels("train")  # as Task.from_config: 8-bit images stay uint8
val_x, val_y = splits.tensors("val")
data = ProxyData.build(train_x, train_y, val_x, val_y, settings, "cpu", splits.num_classes,
                       pixel_stats=(splits.mean, splits.std))
del train_x, val_x
mark("data (train uint8, val float32)")
def nodes(name):
    return {"feat": "features", "emb": "flatten", "logit": "classifier.3"} if name.startswith("mobilenet_v3") else None
teacher = tap_model(build_model(args["teacher"], 4), args["teacher"], nodes=nodes(args["teacher"]))
teacher.model.load_state_dict(torch.load(args["checkpoint"], weights_only=True))
student = lambda: tap_model(build_model(args["student"], 4), args["student"], nodes=nodes(args["student"]))
task = Task(data, teacher, student, settings, cache_dir=Path(args["cache"]))
mark("teacher, student shapes")
task.teacher_outputs
mark("teacher outputs (cache)")
task.reference
mark("teacher reference (val, sharpness)")
task.reject(CLASSICS["kd"][0])
mark("rejection (batch 32)")
result = task.run(CLASSICS["kd"][0])
mark(f"proxy trial ({settings.steps} step of {settings.batch_size}, scoring)")
print(json.dumps({"rows": rows, "train": int(data.train_x.shape[0]), "val": int(data.val_x.shape[0]),
                  "data_mib": (data.train_x.numel() * data.train_x.element_size() + data.val_x.numel() * 4) / 2**20}))
"""


def stage_rows(args, tmp: Path) -> None:
    checkpoint = tmp / "teacher.pth"
    if not checkpoint.exists():
        teacher_checkpoint(checkpoint, args.teacher)
    for n in args.stage_images:
        root = tmp / f"images-{n}-224"
        if not root.exists():
            make_image_folder(root, n, 224)
        for crop in args.stages:
            for batch in args.batch_sizes:
                child = {"root": str(root), "crop": crop, "batch": batch, "steps": args.steps, "teacher": args.teacher,
                         "student": args.student, "checkpoint": str(checkpoint), "cache": str(tempfile.mkdtemp(dir=tmp))}
                done = subprocess.run([sys.executable, "-c", STAGES_CHILD, json.dumps(child)], capture_output=True,
                                      text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                if done.returncode != 0:
                    print(f"stages {n} images {crop} px failed: {done.stderr.strip()[-600:]}")
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"\n## stages: {n} images ({r['train']} train, {r['val']} val) at {crop} px, batch {batch}, "
                      f"{args.teacher} -> {args.student}; proxy data {r['data_mib']:.0f} MiB")
                print("| stage | resident after MiB | peak during MiB |")
                print("| --- | ---: | ---: |")
                for row in r["rows"]:
                    print(f"| {row['stage']} | {row['rss']:,.0f} | {row['peak']:,.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[120, 480])
    parser.add_argument("--sources", type=int, nargs="+", default=[64, 224], help="source image sizes (px)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="mobilenet_v3_small")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--n-trials", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-rev", default=None, help="also run this git revision, side by side")
    parser.add_argument("--stages", type=int, nargs="*", default=[64, 224], help="crops of the stage rows (none: skip)")
    parser.add_argument("--stage-images", type=int, nargs="+", default=[480])
    parser.add_argument("--no-optimize", action="store_true", help="only the stage rows")
    parser.add_argument("--verbose", action="store_true", help="every run's peak and summary line")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 images, 32 px, batch 16, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.images, args.sources, args.batch_sizes, args.repeats = [40], [32], [16], 1
        args.stages, args.stage_images, args.n_trials = [32], [40], 1
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB, "
          f"load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_optimize:
            optimize_rows(args, Path(tmp))
        if args.stages:
            stage_rows(args, Path(tmp))


if __name__ == "__main__":
    main()
