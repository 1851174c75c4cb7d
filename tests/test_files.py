"""Shared files: written whole or not at all, and one holder of a lock at a time."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from kd_optuna.files import LockHeld, atomic_save, atomic_write_text, file_lock


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "report.html"
    atomic_write_text(path, "old")

    def fail(handle):
        handle.write(b"half")
        raise OSError("disk full")

    from kd_optuna.files import atomic_write

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_atomic_save_creates_the_folder_and_the_mode_is_set_before_the_move(tmp_path):
    atomic_save({"w": torch.ones(2)}, tmp_path / "a" / "b" / "last.pt")
    assert torch.equal(torch.load(tmp_path / "a" / "b" / "last.pt", weights_only=True)["w"], torch.ones(2))
    script = atomic_write_text(tmp_path / "train.py", "print(1)\n", mode=0o755)
    assert script.stat().st_mode & 0o777 == 0o755


def _save_many(path, value, count):
    for _ in range(count):
        atomic_save({"v": torch.full((1000,), float(value))}, path)


def test_two_processes_saving_one_path_never_leave_a_mixed_or_broken_file(tmp_path):
    """Before, both wrote ``last.pt.partial`` and one's rename found the other's moved away."""
    path = tmp_path / "last.pt"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_save_many, args=(path, v, 30)) for v in (1, 2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    assert [w.exitcode for w in writers] == [0, 0]
    values = torch.load(path, weights_only=True)["v"].unique().tolist()
    assert values in ([1.0], [2.0]) and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_held_lock_is_refused_at_once_without_wait_and_free_after(tmp_path):
    lock = tmp_path / "run" / ".lock"
    with file_lock(lock):
        with pytest.raises(LockHeld) as held:
            with file_lock(lock, wait=False):
                pass
        assert held.value.path == lock
    with file_lock(lock, wait=False):
        pass


def test_a_written_file_has_the_permissions_open_gives_not_mkstemps_0600(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        atomic_save({"w": torch.zeros(1)}, tmp_path / "best_student.pt")
    finally:
        os.umask(umask)
    assert (tmp_path / "best_student.pt").stat().st_mode & 0o777 == 0o644
