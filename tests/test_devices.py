"""Workers per GPU (issue 13): how many workers, which GPU each takes, and its memory share.

The machine running the suite has no GPU; CUDA's presence, its devices and their free memory
are stood in for where the code asks torch and nvidia-smi, the only places it asks.
"""

import subprocess

import pytest
import torch

from kd_optuna.errors import KdOptunaError
from kd_optuna.train import devices
from kd_optuna.train.devices import WorkerContext, resolve_workers


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(free GiB per GPU, cores)``: CUDA present with those GPUs, nvidia-smi answering;
    returns the list of (device, fraction) memory limits the workers set."""
    limits = []

    def install(free_gib, cores=16):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free_gib))
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: limits.append((str(d), f)))
        monkeypatch.setattr(devices, "cpu_cores", lambda: cores)
        monkeypatch.setattr(devices.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        answer = "".join(f"{int(g * 1024)}\n" for g in free_gib)
        monkeypatch.setattr(devices.subprocess, "run",
                            lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=answer, stderr=""))
        return limits

    return install


def test_without_workers_per_gpu_n_workers_counts_as_before():
    assert resolve_workers(None, None) == (1, None)
    assert resolve_workers(3, None) == (3, None)


def test_k_per_gpu_runs_k_times_the_gpus(gpus):
    gpus([140, 140])
    assert resolve_workers(None, "4") == (8, None)
    assert resolve_workers(None, "4", device="cuda:1") == (4, None)


def test_auto_takes_what_the_cores_and_the_free_memory_allow(gpus):
    gpus([140], cores=16)
    count, line = resolve_workers(None, "auto")
    assert count == 16 and "16 per GPU x 1 GPU" in line
    gpus([10], cores=16)  # 10 GiB free, 4 GiB a worker
    assert resolve_workers(None, "auto")[0] == 2
    gpus([1], cores=16)
    assert resolve_workers(None, "auto")[0] == 1
    gpus([140, 140], cores=16)
    assert resolve_workers(None, "auto")[0] == 16  # 8 per GPU: the cores shared by both


def test_without_a_gpu_workers_per_gpu_is_ignored_and_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    count, line = resolve_workers(None, "4")
    assert count == 1 and "no CUDA device" in line
    assert resolve_workers(None, "4", device="cpu")[0] == 1


@pytest.mark.parametrize("value", ["0", "-1", "many", "2.5"])
def test_a_bad_count_is_refused(value):
    with pytest.raises(KdOptunaError, match="--workers-per-gpu must be a positive integer or auto"):
        resolve_workers(None, value)


def test_both_counts_are_refused():
    with pytest.raises(KdOptunaError, match="not both"):
        resolve_workers(2, "2")


def test_workers_sharing_a_gpu_each_get_a_share_of_its_memory(gpus):
    limits = gpus([140, 140])
    before = torch.get_num_threads()
    try:
        assert [WorkerContext(i, 8, "auto", threads=1).torch_device() for i in range(8)] == [
            "cuda:0", "cuda:1"] * 4
        assert limits == [(f"cuda:{i % 2}", pytest.approx(0.95 / 4)) for i in range(8)]
        limits.clear()
        assert WorkerContext(0, 1, "auto", threads=1).torch_device() == "cuda:0" and limits == []
        assert WorkerContext(0, 3, "cuda:1", threads=1).torch_device() == "cuda:1"
        assert limits == [("cuda:1", pytest.approx(0.95 / 3))]
    finally:
        torch.set_num_threads(before)



@pytest.mark.parametrize("device, words", [("bogus", ["'bogus' is not a device", "cuda:N"]),
                                           ("cuda:", ["is not a device"]),
                                           ("cuda:2", ["cuda:0 to cuda:1"])])
def test_a_device_torch_cannot_use_is_named_before_any_worker_starts(gpus, device, words):
    gpus([140, 140])
    with pytest.raises(KdOptunaError) as info:
        WorkerContext(0, 1, device).torch_device()
    assert all(word in str(info.value) for word in words)
    devices.check_device("cuda:1")


def test_a_cuda_device_without_cuda_is_named_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(KdOptunaError, match="no CUDA device is visible; use --device cpu"):
            devices.check_device(device)
    devices.check_device("auto")
    devices.check_device("cpu")


@pytest.mark.parametrize("device", ["mps", "meta", "xpu:0"])
def test_a_device_type_kd_optuna_does_not_train_on_is_one_line_in_every_command(device, tmp_path, capsys):
    """--device mps on a Linux torch (or meta, xpu) passed the check: train-teacher and compare
    ended in a traceback (PyTorch is not linked with support for mps devices / Cannot copy out
    of meta tensor), optimize after loading the teacher."""
    from conftest import invoke_cli

    with pytest.raises(KdOptunaError, match="use auto, cpu, cuda or cuda:N"):
        devices.check_device(device)
    code, out, err = invoke_cli(capsys, "train-teacher", "digits", "--epochs", "1", "--device", device,
                                "-o", str(tmp_path / "t.pt"))
    assert code == 2 and err.startswith(f"kd-optuna: error: --device {device}") and len(err.splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_optimize_refuses_a_bad_device_before_opening_the_study(tmp_path, capsys):
    from conftest import invoke_cli

    code, _, err = invoke_cli(capsys, "optimize", "--storage", f"sqlite:///{tmp_path / 'none.db'}",
                              "--n-trials", "1", "--device", "bogus")
    assert code == 2 and err.count("\n") == 1 and "'bogus' is not a device" in err
