"""Which device and how many CPU threads a worker process uses, and how many workers share a GPU.

Worker ``i`` of ``N`` uses GPU ``i mod count`` when CUDA is there (``--device auto`` or
``cuda``), and ``max(1, cores // N)`` CPU threads unless ``--threads`` says how many. When
several workers share one GPU, each may allocate at most ``0.95 / sharing`` of its memory
(``torch.cuda.set_per_process_memory_fraction``), so a distiller that needs more fails its own
trial with CUDA's out-of-memory error instead of starving the other workers' trials.

A proxy trial of a small student keeps a large GPU mostly idle (it is bound by kernel
launches, BENCHMARKS.md "GPU figures"), so ``--workers-per-gpu K`` runs K workers on each GPU;
``auto`` takes ``K = min(cores // gpus, free memory // WORKER_GPU_BYTES)``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess

from kd_optuna.errors import KdOptunaError

#: GPU memory ``--workers-per-gpu auto`` gives each worker: the CUDA context (about 0.5 GiB)
#: plus the peak of a resnet56 -> resnet20 proxy trial on CIFAR-100, 1.5 GiB on an H200
#: (BENCHMARKS.md "GPU figures"), doubled for students and teachers larger than those.
WORKER_GPU_BYTES = 4 * 2**30
#: The share of a GPU's memory its workers may take together.
GPU_MEMORY_SHARE = 0.95


def cpu_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_device(device: str) -> None:
    """One-line KdOptunaError for a ``--device`` torch cannot use here: not a device name, a
    type other than cpu and cuda (kd-optuna trains on nothing else: mps, meta, xpu, ...), or a
    CUDA device that is not visible (``auto`` always passes: it falls back to the CPU)."""
    import torch

    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise KdOptunaError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise KdOptunaError(f"--device {device}: kd-optuna trains on the CPU or CUDA GPUs only; use auto, cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KdOptunaError(f"--device {device} but no CUDA device is visible; use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise KdOptunaError(f"--device {device} but the visible CUDA devices are cuda:0 to cuda:{count - 1}")


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """What a worker knows of itself; ``torch_device()`` picks and configures its device."""

    index: int
    n_workers: int
    device: str = "auto"
    threads: int | None = None

    def cpu_threads(self) -> int:
        """``threads`` if set, else an even split of this process's cores: ``max(1, cores // n_workers)``."""
        if self.threads is not None:
            return self.threads
        return max(1, cpu_cores() // self.n_workers)

    def torch_device(self) -> str:
        """``cuda:i mod count`` (auto or cuda with CUDA present), else the device asked for;
        sets torch to ``cpu_threads()`` threads and, on a GPU shared with other workers, this
        worker's memory share."""
        import torch

        check_device(self.device)
        torch.set_num_threads(self.cpu_threads())
        if self.device in ("auto", "cuda"):
            if torch.cuda.is_available():
                count = torch.cuda.device_count()
                device = f"cuda:{self.index % count}"
                self._limit_memory(device, len(range(self.index % count, self.n_workers, count)))
                return device
            return "cpu"
        if self.device.startswith("cuda"):
            self._limit_memory(self.device, self.n_workers)
        return self.device

    def _limit_memory(self, device: str, sharing: int) -> None:
        """``GPU_MEMORY_SHARE / sharing`` of ``device``'s memory for this process when shared."""
        import torch

        if sharing > 1 and self.n_workers > 1:
            torch.cuda.set_per_process_memory_fraction(GPU_MEMORY_SHARE / sharing, torch.device(device))


def gpu_free_bytes() -> list[int]:
    """Free memory of each visible GPU in bytes ([] without CUDA). Asks ``nvidia-smi`` when it
    is there, so that the parent process does not create a CUDA context of its own."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    smi = shutil.which("nvidia-smi")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if smi is not None and visible is None:
        try:
            out = subprocess.run([smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
            free = [int(line.strip()) * 2**20 for line in out.splitlines() if line.strip()]
            if len(free) == count:
                return free
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return [torch.cuda.mem_get_info(i)[0] for i in range(count)]


def resolve_workers(n_workers: int | None, workers_per_gpu: str | None, device: str = "auto") -> tuple[int, str | None]:
    """(worker count, a line to show or None) from ``--n-workers`` and ``--workers-per-gpu``.

    ``--workers-per-gpu K`` (or ``auto``, see the module docstring) gives K x the visible GPUs;
    without a GPU (or with ``--device cpu``) it is ignored, with a line saying so, and
    ``--n-workers`` (default 1) counts. Giving both is refused.
    """
    if workers_per_gpu is None:
        return (1 if n_workers is None else n_workers), None
    if n_workers is not None:
        raise KdOptunaError("give --n-workers or --workers-per-gpu, not both (--workers-per-gpu K runs K x the GPUs)")
    per_gpu = _per_gpu_count(workers_per_gpu)
    free = [] if device == "cpu" else gpu_free_bytes()
    if not free:
        return 1, "--workers-per-gpu ignored: no CUDA device is visible; 1 worker (use --n-workers for more)"
    if device not in ("auto", "cuda"):
        free = free[:1]  # one named device
    if per_gpu is None:
        by_memory = min(free) // WORKER_GPU_BYTES
        per_gpu = max(1, min(cpu_cores() // len(free), by_memory))
        return per_gpu * len(free), (
            f"--workers-per-gpu auto: {per_gpu} per GPU x {len(free)} GPU(s) "
            f"(cores {cpu_cores()}, free memory {min(free) / 2**30:.0f} GiB at {WORKER_GPU_BYTES / 2**30:.0f} GiB a worker)"
        )
    return per_gpu * len(free), None


def _per_gpu_count(value: str) -> int | None:
    """``auto`` -> None; a positive integer -> itself; anything else is refused."""
    if value == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise KdOptunaError(f"--workers-per-gpu must be a positive integer or auto, got {value!r}")
    return count
