"""Which device and how many CPU threads a worker process uses.

Worker ``i`` of ``N`` uses GPU ``i mod count`` when CUDA is there (``--device auto`` or
``cuda``), and ``max(1, cores // N)`` CPU threads unless ``--threads`` says how many.
"""

from __future__ import annotations

import dataclasses
import os

from kd_optuna.errors import KdOptunaError


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
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // self.n_workers)

    def torch_device(self) -> str:
        """``cuda:i mod count`` (auto or cuda with CUDA present), else the device asked for;
        sets torch to ``cpu_threads()`` threads."""
        import torch

        torch.set_num_threads(self.cpu_threads())
        if self.device in ("auto", "cuda"):
            if torch.cuda.is_available():
                return f"cuda:{self.index % torch.cuda.device_count()}"
            if self.device == "cuda":
                raise KdOptunaError("--device cuda but no CUDA device is visible; use --device cpu")
            return "cpu"
        return self.device
