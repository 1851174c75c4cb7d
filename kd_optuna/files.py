"""Files that several processes share: written whole or not at all, and held under locks.

``atomic_write`` writes to a uniquely named temporary file beside the target and moves it into
place with ``os.replace``, so a reader sees the old file or the new one, never a part, and two
writers of one path never write into each other's temporary file. ``file_lock`` holds an
exclusive ``flock`` on a lock file for a block: waiting for it, or, with ``wait=False``, raising
:class:`LockHeld` at once when another process holds it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


class LockHeld(Exception):
    """Another process holds the lock on ``path``."""

    def __init__(self, path: Path):
        super().__init__(f"{path} is locked by another process")
        self.path = path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, mode: int | None = None) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then replace ``path`` with it.

    The file gets ``mode`` (for example ``0o755``; default: ``0o666`` less the umask, what
    ``open`` gives) before the move. On any error the temporary file is removed and ``path`` is
    left as it was. Returns ``path``.
    """
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` with :func:`atomic_write`, creating its folder."""
    import torch

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | os.PathLike, text: str, *, mode: int | None = None) -> Path:
    """``text`` in UTF-8 to ``path`` with :func:`atomic_write`; the folder must exist."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), mode=mode)


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[None]:
    """An exclusive lock on ``path`` (created, with its folder, if absent) for the block.

    ``wait=False``: raise :class:`LockHeld` if another process holds it, instead of waiting.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            import msvcrt

            handle.seek(0)
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
            except OSError as error:
                if wait:
                    raise
                raise LockHeld(path) from error
            try:
                yield
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise LockHeld(path) from error
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
