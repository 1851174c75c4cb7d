"""The teacher-output cache: the frozen teacher's {feat, emb, logit} over the proxy views.

Computed once per study and machine and reused by every trial. For P pool images and V views
the cache holds ``feat (P, V, C, H, W)``, ``emb (P, V, D)``, ``logit (P, V, K)``, but only the
knowledge that the space's ``knowledge`` gene can use (``knowledge_for(space)``: its options,
plus logit, which calibrations always read). feat and emb are stored in ``cache_dtype``
(float16 halves memory; BENCHMARKS.md measured 3e-4 against float32 on trained digits
features); a tensor with values beyond float16's range stays float32 with a warning; logits
stay float32. bfloat16 is not used: nothing measured it safe for the metrics.

Memory: outputs are written batch by batch as they are computed, never gathered whole. A cache
within ``memory_budget`` bytes (``KD_OPTUNA_CACHE_MEMORY_MB``, default 2048 MiB) is held in
memory on the data's device; a larger one stays on disk and each lookup reads only its rows
(``DiskArray``, positioned reads: the file is not mapped, so the process's resident memory
does not grow with it). The teacher runs on batches sized to the images (``build_batch_size``).

Files: ``teacher-outputs-<key>.pt`` is a small index (torch.save of plain data: the key, and
per tensor its dtype, shape, data file and sha256); each tensor is a raw row-major file
``teacher-outputs-<key>.<name>.bin`` beside it. The key is a sha256 of what the outputs depend
on: the teacher's weights, class and tap nodes, the pool images, the view pool (offsets and
flips), the knowledge kept and the storage dtype. Data files are written to temporary names
and moved into place with ``os.replace``, the index last, under an exclusive lock so that
workers starting at once build it once. The index is read with ``torch.load(weights_only=True)``
and every data file's size and sha256 is checked on every load (streamed in chunks): a
corrupt or truncated cache is rebuilt with a warning, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from kd_optuna.files import atomic_save, file_lock
from kd_optuna.proxy.views import ProxyData

KNOWLEDGE = ("feat", "emb", "logit")
FORMAT_VERSION = 2
#: Bytes a cache may hold in memory before it stays on disk (env KD_OPTUNA_CACHE_MEMORY_MB).
DEFAULT_MEMORY_BUDGET = 2048 * 2**20
_CHUNK = 16 * 2**20


def default_memory_budget() -> int:
    """The cache's in-memory budget in bytes: ``KD_OPTUNA_CACHE_MEMORY_MB`` or 2048 MiB."""
    value = os.environ.get("KD_OPTUNA_CACHE_MEMORY_MB")
    if value is None:
        return DEFAULT_MEMORY_BUDGET
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"KD_OPTUNA_CACHE_MEMORY_MB = {value!r} is not a number of MiB") from None
    return max(0, int(megabytes * 2**20))


def knowledge_for(space) -> tuple[str, ...]:
    """The knowledge a study's space can use: its ``knowledge`` options plus logit (in KNOWLEDGE order)."""
    options = set(space["knowledge"]) | {"logit"}
    return tuple(k for k in KNOWLEDGE if k in options)


def _bytes_of(t: Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a uint8 array, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)


def tensor_sha256(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors``, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(_bytes_of(t))
    return digest.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 of a model's state dict (parameters and buffers): the identity of its weights."""
    return tensor_sha256(model.state_dict())


def _pool_sha256(data: ProxyData) -> str:
    """sha256 of the pool images, gathered about 16 MiB at a time (never a copy of the pool).
    The images hashed are the normalised float32 ones (``ProxyData.train_images``), so uint8
    pixels give the key their float32 images gave."""
    digest = hashlib.sha256()
    x = data.train_x
    dtype = torch.float32 if data.pixel_stats is not None else x.dtype
    chunk = max(1, _CHUNK // max(1, x[0].numel() * dtype.itemsize)) if x.shape[0] else 1
    digest.update(f"pool|{dtype}|{(data.pool.shape[0], *x.shape[1:])}|".encode())
    for start in range(0, data.pool.shape[0], chunk):
        digest.update(_bytes_of(data.train_images(data.pool[start : start + chunk]).cpu().contiguous()))
    return digest.hexdigest()


def cache_key(
    teacher_sha256: str,
    nodes: Mapping[str, str] | None,
    data: ProxyData,
    dtype: str,
    knowledge: Iterable[str] = KNOWLEDGE,
    teacher_class: str = "",
) -> str:
    """sha256 naming one cache: teacher weights, class and tap nodes, pool images, view pool,
    the knowledge kept and the dtype."""
    digest = hashlib.sha256()
    digest.update(
        f"v{FORMAT_VERSION}|{teacher_sha256}|{teacher_class}|{sorted((nodes or {}).items())}|{dtype}|"
        f"{sorted(knowledge)}|".encode()
    )
    digest.update(_pool_sha256(data).encode())
    digest.update(data.views.fingerprint())
    return digest.hexdigest()


#: Values beyond this stay float32: float16 would turn them into inf (its largest is 65504).
FLOAT16_LIMIT = 6.0e4


def build_batch_size(data: ProxyData, limit: int = 512, budget: int = 256 * 2**20) -> int:
    """Images per teacher batch while building: at most ``limit``, and about ``budget`` bytes of
    input x 20 (a CNN's activations in eval mode are a few times its input; 22 at 224 px)."""
    per_image = int(np.prod(data.train_x.shape[1:])) * 4
    return max(1, min(limit, budget // (20 * per_image)))


class _Overflow(Exception):
    def __init__(self, names: list[str]):
        self.names = names


class _MemorySink:
    """Preallocated output tensors on ``device``, filled batch by batch."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, torch.dtype], device):
        self.tensors = {k: torch.empty(shapes[k], dtype=dtypes[k], device=device) for k in shapes}

    def write(self, name: str, start: int, values: Tensor) -> None:
        self.tensors[name][start : start + values.shape[0]] = values.to(self.tensors[name].device)

    def finish(self) -> dict[str, Tensor]:
        return self.tensors


@torch.no_grad()
def _run_teacher(teacher, data, knowledge, dtypes, batch_size, sink) -> None:
    """Stream the teacher's outputs over every (pool image, view) into ``sink``; raise _Overflow
    naming every float16 tensor of a batch that holds values beyond FLOAT16_LIMIT."""
    teacher.eval()
    n, views = data.pool.shape[0], data.views.views
    for start in range(0, n, batch_size):
        positions = torch.arange(start, min(start + batch_size, n), device=data.device)
        per_view = []
        for v in range(views):
            out = teacher(data.pool_images(positions, torch.full_like(positions, v)))
            per_view.append({k: out[k] for k in knowledge})
        stacked = {k: torch.stack([o[k].float() for o in per_view], dim=1).contiguous() for k in knowledge}
        overflow = [k for k in knowledge if dtypes[k] == torch.float16 and float(stacked[k].abs().max()) > FLOAT16_LIMIT]
        if overflow:
            raise _Overflow(overflow)
        for k in knowledge:
            sink.write(k, start, stacked[k].to(dtypes[k]))


@torch.no_grad()
def output_shapes(teacher: nn.Module, data: ProxyData, knowledge: Iterable[str] = KNOWLEDGE) -> dict[str, tuple]:
    """(P, V, ...) shape of each cached tensor, from one eval forward of a single pool image."""
    teacher.eval()
    one = torch.zeros(1, dtype=torch.long, device=data.device)
    out = teacher(data.pool_images(one, one))
    return {k: (data.pool.shape[0], data.views.views, *out[k].shape[1:]) for k in knowledge}


def _stream(teacher, data, dtype, knowledge, batch_size, make_sink):
    """Run the teacher into the sink ``make_sink(shapes, dtypes)`` makes; on a float16
    overflow, warn and start again with those tensors in float32."""
    knowledge = tuple(k for k in KNOWLEDGE if k in set(knowledge))
    dtypes = {k: torch.float32 if k == "logit" else getattr(torch, dtype) for k in knowledge}
    shapes = output_shapes(teacher, data, knowledge)
    while True:
        sink = make_sink(shapes, dtypes)
        try:
            _run_teacher(teacher, data, knowledge, dtypes, batch_size, sink)
            return sink.finish()
        except _Overflow as exc:
            for k in exc.names:
                warnings.warn(f"teacher {k} values go beyond float16's range: caching {k} in float32",
                              RuntimeWarning, stacklevel=3)
                dtypes[k] = torch.float32


def compute_teacher_outputs(
    teacher: nn.Module, data: ProxyData, dtype: str = "float16", batch_size: int | None = None,
    knowledge: Iterable[str] = KNOWLEDGE,
) -> dict[str, Tensor]:
    """Eval-mode teacher outputs for every (pool image, view): {feat, emb, logit} (P, V, ...)
    on the data's device, held in memory (``knowledge`` picks which).

    feat and emb are stored in ``dtype``; with float16, a tensor holding any value beyond
    ``FLOAT16_LIMIT`` in magnitude (an untrained or unnormalised teacher) stays float32 with a
    warning, so the cache never changes a value into inf.
    """
    size = batch_size or build_batch_size(data)
    return _stream(teacher, data, dtype, knowledge, size, lambda s, d: _MemorySink(s, d, data.device))


class DiskArray:
    """A read-only (rows, ...) array in a raw file; ``take(rows)`` reads just those rows.

    Positioned reads (``os.preadv``) into a fresh tensor: the file is never mapped, so reading
    it does not grow the process's resident memory (the kernel's page cache may keep it)."""

    def __init__(self, path: Path, dtype: torch.dtype, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape = Path(path), dtype, tuple(shape)
        self.row_shape = self.shape[2:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        self._fd = os.open(self.path, os.O_RDONLY)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty((), dtype=self.dtype).element_size()

    def take(self, positions: Tensor, views: Tensor) -> Tensor:
        """(B, ...) rows at (positions (B,), views (B,)), a CPU tensor of the stored dtype."""
        flat = (positions.cpu().long() * self.shape[1] + views.cpu().long()).tolist()
        out = torch.empty((len(flat), *self.row_shape), dtype=self.dtype)
        buffer = _bytes_of(out).reshape(len(flat), self.row_bytes) if flat else None
        for j, row in enumerate(flat):
            if os.preadv(self._fd, [buffer[j]], row * self.row_bytes) != self.row_bytes:
                raise OSError(f"teacher-output cache {self.path} is shorter than its index says")
        return out

    def __del__(self):
        with contextlib.suppress(Exception):
            os.close(self._fd)


class CachedTeacher:
    """A teacher lookup over stored outputs: (positions (B,), views (B,)) -> float32 outputs on
    ``device``. Values are tensors (in memory) or DiskArrays (read per lookup)."""

    def __init__(self, outputs: Mapping[str, Tensor | DiskArray], device: torch.device | str | None = None):
        self.outputs = dict(outputs)
        self.device = device

    def __call__(self, positions: Tensor, views: Tensor) -> dict[str, Tensor]:
        found = {}
        for k, v in self.outputs.items():
            if isinstance(v, DiskArray):
                rows = v.take(positions, views)
                found[k] = rows.to(self.device or positions.device, non_blocking=True).float()
            else:
                found[k] = v[positions, views].float()
        return found

    def nbytes(self) -> int:
        """Bytes the cache stores (in memory or on disk)."""
        return sum(v.nbytes if isinstance(v, DiskArray) else v.numel() * v.element_size() for v in self.outputs.values())

    def resident_bytes(self) -> int:
        """Bytes held in memory (disk-backed tensors count 0)."""
        return sum(v.numel() * v.element_size() for v in self.outputs.values() if isinstance(v, Tensor))


def _data_path(index: Path, name: str) -> Path:
    stem = index.name[: -len(".pt")] if index.name.endswith(".pt") else index.name
    return index.with_name(f"{stem}.{name}.bin")


class _FileSink:
    """Raw data files beside ``index``, written sequentially under temporary names; ``finish``
    moves them into place and returns their index entries (dtype, shape, file, sha256)."""

    def __init__(self, index: Path, shapes, dtypes):
        self.index, self.shapes, self.dtypes = index, shapes, dtypes
        self.handles, self.digests, self.temps = {}, {}, {}
        for k in shapes:
            fd, temp = tempfile.mkstemp(prefix=_data_path(index, k).name + ".", suffix=".tmp", dir=index.parent)
            self.handles[k], self.temps[k], self.digests[k] = os.fdopen(fd, "wb"), temp, hashlib.sha256()

    def write(self, name: str, start: int, values: Tensor) -> None:
        raw = _bytes_of(values.detach().cpu().contiguous())
        self.digests[name].update(raw)
        self.handles[name].write(memoryview(raw))

    def finish(self) -> dict:
        entries = {}
        for k, handle in self.handles.items():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(self.temps[k], _data_path(self.index, k))
            entries[k] = {"dtype": str(self.dtypes[k]).removeprefix("torch."), "shape": list(self.shapes[k]),
                          "file": _data_path(self.index, k).name, "sha256": self.digests[k].hexdigest()}
        return entries

    def discard(self) -> None:
        for k, handle in self.handles.items():
            with contextlib.suppress(Exception):
                handle.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temps[k])


def _expected_bytes(entry: Mapping) -> int:
    return int(np.prod(entry["shape"], dtype=np.int64)) * torch.empty((), dtype=getattr(torch, entry["dtype"])).element_size()


def _read_entry(path: Path, entry: Mapping, in_memory: bool) -> Tensor | DiskArray | str:
    """One data file, checked (size, sha256, streamed): a tensor, a DiskArray or why not."""
    try:
        dtype = getattr(torch, str(entry["dtype"]))
        shape = tuple(int(s) for s in entry["shape"])
        file = path.with_name(str(entry["file"]))
        if not isinstance(dtype, torch.dtype) or Path(str(entry["file"])).name != str(entry["file"]):
            return "an index with an invalid entry"
    except (KeyError, TypeError, ValueError, AttributeError):
        return "an index with an invalid entry"
    size = _expected_bytes({"shape": shape, "dtype": str(dtype).removeprefix("torch.")})
    try:
        if file.stat().st_size != size:
            return "truncated (a data file has the wrong size)"
        digest = hashlib.sha256()
        tensor = torch.empty(shape, dtype=dtype) if in_memory else None
        target = _bytes_of(tensor) if in_memory else np.empty(min(size, _CHUNK), np.uint8)
        with open(file, "rb", buffering=0) as handle:
            done = 0
            while done < size:
                step = min(_CHUNK, size - done)
                view = target[done : done + step] if in_memory else target[:step]
                got = handle.readinto(memoryview(view))
                if not got:
                    return "truncated (a data file ends early)"
                digest.update(view[:got])
                done += got
    except OSError as exc:
        return f"unreadable ({type(exc).__name__})"
    if digest.hexdigest() != entry.get("sha256"):
        return "checksum mismatch"
    return tensor if in_memory else DiskArray(file, dtype, shape)


def _read_checked(path: Path, key: str, budget: int) -> dict[str, Tensor | DiskArray] | str:
    """The outputs cached at ``path`` (index + data files), or a string saying why they cannot be used."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holding code
        return f"unreadable ({type(exc).__name__})"
    if not isinstance(stored, dict) or stored.get("key") != key:
        return "written for another key"
    arrays = stored.get("arrays")
    if stored.get("format") != FORMAT_VERSION or not isinstance(arrays, dict):
        return "of another format"
    try:
        total = sum(_expected_bytes(e) for e in arrays.values())
    except Exception:
        return "an index with an invalid entry"
    found = {}
    for name, entry in arrays.items():
        value = _read_entry(path, entry, total <= budget)
        if isinstance(value, str):
            return value
        found[str(name)] = value
    return found


Writer = Callable[[Callable[[Mapping[str, tuple], Mapping[str, torch.dtype]], _FileSink]], dict]


def _load_or_write(path: Path, key: str, write: Writer, budget: int) -> dict[str, Tensor | DiskArray]:
    path = Path(path)
    if path.exists():
        found = _read_checked(path, key, budget)
        if isinstance(found, dict):
            return found
    with file_lock(path.with_name(path.name + ".lock")):
        if path.exists():
            found = _read_checked(path, key, budget)
            if isinstance(found, dict):
                return found
            warnings.warn(f"teacher-output cache {path} is {found}; rebuilding it", RuntimeWarning, stacklevel=3)
        sinks: list[_FileSink] = []

        def make_sink(shapes, dtypes):
            for old in sinks:
                old.discard()
            sinks.append(_FileSink(path, shapes, dtypes))
            return sinks[-1]

        try:
            entries = write(make_sink)
        except BaseException:
            for sink in sinks:
                sink.discard()
            raise
        atomic_save({"format": FORMAT_VERSION, "key": key, "arrays": entries}, path)
    found = _read_checked(path, key, budget)
    if isinstance(found, str):
        raise OSError(f"teacher-output cache {path} is {found} right after writing it; check the disk")
    return found


def load_or_build(
    path: Path, key: str, build: Callable[[], Mapping[str, Tensor]], memory_budget: int | None = None
) -> dict[str, Tensor | DiskArray]:
    """The tensors cached at ``path`` for ``key``, building and saving them if absent or corrupt.

    Safe when several processes call it at once: the first builds under the lock, the others
    wait and then read its files. Returns tensors when they fit ``memory_budget`` (default
    ``default_memory_budget()``), else DiskArrays.
    """

    def write(make_sink):
        tensors = {k: v.detach().cpu().contiguous() for k, v in build().items()}
        sink = make_sink({k: tuple(v.shape) for k, v in tensors.items()}, {k: v.dtype for k, v in tensors.items()})
        for k, v in tensors.items():
            sink.write(k, 0, v)
        return sink.finish()

    budget = default_memory_budget() if memory_budget is None else memory_budget
    return _load_or_write(path, key, write, budget)


def cached_teacher(
    teacher: nn.Module,
    teacher_sha256: str,
    nodes: Mapping[str, str] | None,
    data: ProxyData,
    cache_dir: Path,
    dtype: str = "float16",
    *,
    knowledge: Iterable[str] = KNOWLEDGE,
    memory_budget: int | None = None,
) -> CachedTeacher:
    """The teacher's outputs over ``data``'s pool and views for ``knowledge``, from
    ``cache_dir`` or computed now (streamed to disk); in memory on the data's device when they
    fit ``memory_budget`` bytes, else read from disk per lookup."""
    knowledge = tuple(k for k in KNOWLEDGE if k in set(knowledge))
    inner = getattr(teacher, "model", teacher)
    teacher_class = f"{type(inner).__module__}.{type(inner).__qualname__}"
    key = cache_key(teacher_sha256, nodes, data, dtype, knowledge, teacher_class)
    path = Path(cache_dir) / f"teacher-outputs-{key[:24]}.pt"
    size = build_batch_size(data)
    budget = default_memory_budget() if memory_budget is None else memory_budget
    tensors = _load_or_write(
        path, key, lambda make_sink: _stream(teacher, data, dtype, knowledge, size, make_sink), budget
    )
    return CachedTeacher(
        {k: v.to(data.device) if isinstance(v, Tensor) else v for k, v in tensors.items()}, data.device
    )
