"""Peak resident memory of the teacher-output cache against the number and size of images.

    python benchmarks/cache_memory.py [--images 500 2000] [--sizes 64 224] [--views 2]
                                      [--budgets 2048 64] [--old-rev 99ef49e]

Each measurement runs in a fresh process (``ru_maxrss`` is a process's lifetime peak): it
makes synthetic ImageFolder-like data (N random RGB images of S x S, float32, 4 classes, as
``ProxyData`` holds them), measures the resident memory (VmRSS) with the data in place, then
builds the cache (``kd_optuna.proxy.cache.cached_teacher`` into an empty folder), loads it again as a
second worker would, and runs 200 lookups of 64 (image, view) pairs, as a proxy trial does.
The figure is the peak minus the resident memory before the cache: what the cache costs.

The teacher is a cheap stand-in with resnet18's output shapes at 224 px (feat 512 x S/32 x
S/32, emb 512, logit 4: two strided convolutions), so that building is quick on a CPU; the
cache's size and memory depend only on these shapes. ``--old-rev`` also measures the cache
of that git revision (the one before issue 11), loaded from ``git show``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stand_in_teacher():
    import torch
    from torch import nn

    from kd_optuna.models import tap_model

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 8, stride=8), nn.ReLU())
            self.layer4 = nn.Sequential(nn.Conv2d(64, 512, 4, stride=4), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, 4)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.layer4(self.stem(x))), 1))

    torch.manual_seed(0)
    return tap_model(StandIn().eval(), nodes={"feat": "layer4", "emb": "pool", "logit": "fc"})


def load_old_cache(rev: str):
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:kd_optuna/cache.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_cache.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(args) -> dict:
    import torch

    torch.set_num_threads(1)
    from kd_optuna.proxy.cache import cached_teacher as new_cached_teacher
    from kd_optuna.proxy.cache import state_dict_sha256
    from kd_optuna.proxy.settings import ProxySettings
    from kd_optuna.proxy.views import ProxyData

    n, size = args.n, args.size
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, size, size, generator=generator)
    y = torch.arange(n) % 4
    settings = ProxySettings(labels_per_class=5, views=args.views, augment="shift", shift=4)
    data = ProxyData.build(x, y, x[:64], y[:64], settings, "cpu", 4)
    teacher = stand_in_teacher()
    sha = state_dict_sha256(teacher)
    before = rss_mib()
    folder = Path(tempfile.mkdtemp(dir=args.tmp))
    start = time.perf_counter()
    if args.impl == "old":
        cache = load_old_cache(args.old_rev).cached_teacher(teacher, sha, None, data, folder, "float16")
        stored = cache.nbytes()
    else:
        budget = int(args.budget * 2**20)
        new_cached_teacher(teacher, sha, None, data, folder, "float16", memory_budget=budget)
        cache = new_cached_teacher(teacher, sha, None, data, folder, "float16", memory_budget=budget)
        stored = cache.nbytes()
    build = time.perf_counter() - start
    lookups = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for _ in range(200):
        positions = torch.randint(0, n, (64,), generator=lookups)
        views = torch.randint(0, args.views, (64,), generator=lookups)
        out = cache(positions, views)
    lookup_ms = (time.perf_counter() - start) / 200 * 1000
    assert out["feat"].shape == (64, 512, size // 32, size // 32)
    return {
        "impl": args.impl, "images": n, "size": size, "views": args.views,
        "budget_mib": None if args.impl == "old" else args.budget,
        "data_mib": round(x.numel() * 4 / 2**20, 1), "cache_mib": round(stored / 2**20, 1),
        "on_disk": args.impl == "new" and getattr(cache, "resident_bytes", lambda: 1)() == 0,
        "rss_before_mib": round(before, 1), "peak_mib": round(peak_mib(), 1),
        "cache_cost_mib": round(peak_mib() - before, 1), "build_s": round(build, 2),
        "lookup_ms": round(lookup_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--budgets", type=float, nargs="+", default=[2048, 64], help="MiB")
    parser.add_argument("--old-rev", default=None, help="also measure the cache of this git revision")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="new", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=2048, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    runs = [("new", b) for b in args.budgets] + ([("old", None)] if args.old_rev else [])
    print("| cache | images | px | views | data MiB | cache MiB | held | peak RSS MiB | cache cost MiB | build s | lookup ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for n in args.images:
                for impl, budget in runs:
                    command = [sys.executable, __file__, "--child", "--impl", impl, "--n", str(n), "--size", str(size),
                               "--views", str(args.views), "--tmp", tmp]
                    if budget is not None:
                        command += ["--budget", str(budget)]
                    if args.old_rev:
                        command += ["--old-rev", args.old_rev]
                    env = dict(os.environ, OMP_NUM_THREADS="1")
                    done = subprocess.run(command, capture_output=True, text=True, env=env)
                    if done.returncode != 0:
                        print(f"| {impl} | {n} | {size} | failed: {done.stderr.strip().splitlines()[-1]} |")
                        continue
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    label = f"before ({args.old_rev})" if impl == "old" else f"budget {budget:g} MiB"
                    held = "memory" if impl == "old" else ("disk" if r["on_disk"] else "memory")
                    print(f"| {label} | {n} | {size} | {r['views']} | {r['data_mib']} | {r['cache_mib']} | {held} | "
                          f"{r['peak_mib']} | {r['cache_cost_mib']} | {r['build_s']} | {r['lookup_ms']} |", flush=True)


if __name__ == "__main__":
    main()
