"""The teacher-output cache: the frozen teacher's {feat, emb, logit} over the proxy views.

Computed once per study and machine and reused by every trial. For P pool images and V views
the cache holds ``feat (P, V, C, H, W)``, ``emb (P, V, D)``, ``logit (P, V, K)``; feat and emb
in ``cache_dtype`` (float16 halves memory; logits stay float32). The file name is a sha256 of
what the outputs depend on: the teacher's weights, its tap nodes, the pool images and the view
pool (offsets and flips), and the storage dtype.

File safety: the file is written to a temporary name in the same folder and moved into place
with ``os.replace`` (a reader never sees half a file), under an exclusive lock so that workers
starting at once build it once. It is read with ``torch.load(weights_only=True)``; a sha256 of
the tensors' bytes, stored beside them, is checked on every load: a corrupt or truncated file
is rebuilt with a warning, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from kd_optuna.proxy import ProxyData

KNOWLEDGE = ("feat", "emb", "logit")
FORMAT_VERSION = 1


def tensor_sha256(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors``, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 of a model's state dict (parameters and buffers): the identity of its weights."""
    return tensor_sha256(model.state_dict())


def cache_key(teacher_sha256: str, nodes: Mapping[str, str] | None, data: ProxyData, dtype: str) -> str:
    """sha256 naming one cache: teacher weights, tap nodes, pool images, view pool, dtype."""
    digest = hashlib.sha256()
    digest.update(f"v{FORMAT_VERSION}|{teacher_sha256}|{sorted((nodes or {}).items())}|{dtype}|".encode())
    digest.update(tensor_sha256({"pool": data.train_x[data.pool]}).encode())
    digest.update(data.views.fingerprint())
    return digest.hexdigest()


#: Values beyond this stay float32: float16 would turn them into inf (its largest is 65504).
FLOAT16_LIMIT = 6.0e4


@torch.no_grad()
def compute_teacher_outputs(
    teacher: nn.Module, data: ProxyData, dtype: str = "float16", batch_size: int = 512
) -> dict[str, Tensor]:
    """Eval-mode teacher outputs for every (pool image, view): {feat, emb, logit} (P, V, ...).

    feat and emb are stored in ``dtype``; with float16, a tensor holding any value beyond
    ``FLOAT16_LIMIT`` in magnitude (an untrained or unnormalised teacher) stays float32 with a
    warning, so the cache never changes a value into inf.
    """
    teacher.eval()
    n, views = data.pool.shape[0], data.views.views
    parts: dict[str, list[Tensor]] = {k: [] for k in KNOWLEDGE}
    store = {k: torch.float32 if k == "logit" else getattr(torch, dtype) for k in KNOWLEDGE}
    for start in range(0, n, batch_size):
        positions = torch.arange(start, min(start + batch_size, n), device=data.device)
        per_view = []
        for v in range(views):
            view = torch.full_like(positions, v)
            per_view.append(teacher(data.pool_images(positions, view)))
        for k in KNOWLEDGE:
            stacked = torch.stack([out[k].float().contiguous() for out in per_view], dim=1).contiguous()
            if store[k] == torch.float16 and float(stacked.abs().max()) > FLOAT16_LIMIT:
                warnings.warn(
                    f"teacher {k} values reach {float(stacked.abs().max()):.3g}, beyond float16: "
                    f"caching {k} in float32", RuntimeWarning, stacklevel=2,
                )
                store[k] = torch.float32
                parts[k] = [p.float() for p in parts[k]]
            parts[k].append(stacked.to(store[k]))
    return {k: torch.cat(v) for k, v in parts.items()}


class CachedTeacher:
    """A teacher lookup over stored outputs: (positions (B,), views (B,)) -> float32 outputs."""

    def __init__(self, outputs: Mapping[str, Tensor]):
        self.outputs = dict(outputs)

    def __call__(self, positions: Tensor, views: Tensor) -> dict[str, Tensor]:
        return {k: v[positions, views].float() for k, v in self.outputs.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.outputs.values())


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held on ``path`` (created if absent) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, then os.replace it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _read_checked(path: Path, key: str) -> dict[str, Tensor] | str:
    """The tensors stored at ``path``, or a string saying why they cannot be used."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holding code
        return f"unreadable ({type(exc).__name__})"
    if not isinstance(stored, dict) or stored.get("key") != key:
        return "written for another key"
    tensors = stored.get("tensors")
    if not isinstance(tensors, dict) or tensor_sha256(tensors) != stored.get("sha256"):
        return "checksum mismatch"
    return tensors


def load_or_build(path: Path, key: str, build: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """The tensors cached at ``path`` for ``key``, building and saving them if absent or corrupt.

    Safe when several processes call it at once: the first builds under the lock, the others
    wait and then read its file.
    """
    path = Path(path)
    if path.exists():
        found = _read_checked(path, key)
        if isinstance(found, dict):
            return found
    with file_lock(path.with_name(path.name + ".lock")):
        if path.exists():
            found = _read_checked(path, key)
            if isinstance(found, dict):
                return found
            warnings.warn(f"teacher-output cache {path} is {found}; rebuilding it", RuntimeWarning, stacklevel=2)
        tensors = {k: v.detach().cpu().contiguous() for k, v in build().items()}
        atomic_save({"key": key, "sha256": tensor_sha256(tensors), "tensors": tensors}, path)
        return tensors


def cached_teacher(
    teacher: nn.Module,
    teacher_sha256: str,
    nodes: Mapping[str, str] | None,
    data: ProxyData,
    cache_dir: Path,
    dtype: str = "float16",
) -> CachedTeacher:
    """The teacher's outputs over ``data``'s pool and views, from ``cache_dir`` or computed now."""
    key = cache_key(teacher_sha256, nodes, data, dtype)
    path = Path(cache_dir) / f"teacher-outputs-{key[:24]}.pt"
    tensors = load_or_build(path, key, lambda: compute_teacher_outputs(teacher, data, dtype))
    return CachedTeacher({k: v.to(data.device) for k, v in tensors.items()})
