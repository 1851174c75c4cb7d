import dataclasses
import multiprocessing
import time
import warnings

import pytest
import torch

from kd_optuna.proxy.cache import (
    cache_key,
    cached_teacher,
    compute_teacher_outputs,
    load_or_build,
    state_dict_sha256,
    tensor_sha256,
)
from kd_optuna.distill.classics import CLASSICS
from kd_optuna.data import load_dataset
from kd_optuna.models import tap_model
from kd_optuna.models.digits import DigitsCNN
from kd_optuna.proxy.settings import ProxySettings
from kd_optuna.proxy.views import ProxyData
from kd_optuna.proxy.task import Task


FAST = ProxySettings(labels_per_class=2, steps=4, batch_size=16, report_every=4, sharpness_size=32,
                     views=3, augment="shift", shift=1)


def tiny_parts(settings=FAST):
    splits = load_dataset("digits")
    x, y = splits.tensors("train", torch.arange(120))
    vx, vy = splits.tensors("val", torch.arange(40))
    data = ProxyData.build(x, y, vx, vy, settings, num_classes=10)
    torch.manual_seed(5)
    return data, tap_model(DigitsCNN((8, 8, 16)))


def new_student():
    return tap_model(DigitsCNN((4, 8, 8)))


def test_cached_trial_gives_the_metrics_of_an_uncached_one(tmp_path):
    data, teacher = tiny_parts(dataclasses.replace(FAST, cache_dtype="float32"))
    spec = CLASSICS["fitnets"][0]
    live = Task(data, teacher, new_student, data_settings := dataclasses.replace(FAST, cache_dtype="float32"),
                use_cache=False).run(spec)
    cached = Task(data, teacher, new_student, data_settings, cache_dir=tmp_path).run(spec)
    for name, value in live.metrics().items():
        assert cached.metrics()[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    half = Task(data, teacher, new_student, FAST, cache_dir=tmp_path).run(spec)
    assert half.val_acc == pytest.approx(live.val_acc, abs=0.05)
    assert half.cka_gap == pytest.approx(live.cka_gap, abs=0.02)


def test_outputs_cover_every_view_and_fp16_halves_memory(tmp_path):
    data, teacher = tiny_parts()
    half = compute_teacher_outputs(teacher, data, "float16")
    full = compute_teacher_outputs(teacher, data, "float32")
    assert half["feat"].shape == (120, 3, 16, 4, 4) and half["emb"].shape == (120, 3, 16)
    assert half["logit"].dtype == torch.float32 and half["feat"].dtype == torch.float16
    assert half["feat"].nbytes * 2 == full["feat"].nbytes
    teacher.eval()
    with torch.no_grad():
        direct = teacher(data.pool_images(torch.tensor([7]), torch.tensor([2])))
    assert torch.allclose(full["logit"][7, 2], direct["logit"][0], atol=1e-5)
    assert not torch.allclose(full["logit"][:, 2], full["logit"][:, 0])


def test_values_beyond_float16_stay_float32():
    data, teacher = tiny_parts()
    with torch.no_grad():
        teacher.model.fc.bias.fill_(1e5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs = compute_teacher_outputs(teacher, data, "float16")
    assert outputs["feat"].dtype == torch.float16 and outputs["logit"].dtype == torch.float32
    assert outputs["logit"].min() > 9e4
    with torch.no_grad():
        teacher.model.features[0][0].weight.mul_(1e6)
    with pytest.warns(RuntimeWarning) as record:
        outputs = compute_teacher_outputs(teacher, data, "float16")
    assert sorted(str(w.message).split()[1] for w in record) == ["emb", "feat"]
    assert outputs["feat"].dtype == torch.float32 and torch.isfinite(outputs["feat"]).all()


def test_key_depends_on_weights_views_and_dtype():
    data, teacher = tiny_parts()
    sha = state_dict_sha256(teacher)
    key = cache_key(sha, None, data, "float16")
    assert key == cache_key(sha, None, data, "float16")
    assert key != cache_key(sha, None, data, "float32")
    other_views, _ = tiny_parts(dataclasses.replace(FAST, view_seed=1))
    assert key != cache_key(sha, None, other_views, "float16")
    with torch.no_grad():
        next(teacher.parameters())[0, 0, 0, 0] += 1.0
    assert key != cache_key(state_dict_sha256(teacher), None, data, "float16")


def _counting_builder(calls):
    def build():
        calls.append(1)
        return {"a": torch.arange(10.0), "b": torch.ones(3, 2, dtype=torch.float16)}

    return build


def test_load_or_build_reuses_and_rebuilds_corrupt_files(tmp_path):
    path = tmp_path / "outputs.pt"
    calls = []
    first = load_or_build(path, "k", _counting_builder(calls))
    second = load_or_build(path, "k", _counting_builder(calls))
    assert len(calls) == 1 and tensor_sha256(first) == tensor_sha256(second)
    data_a = tmp_path / "outputs.a.bin"
    raw = bytearray(data_a.read_bytes())
    raw[12] ^= 0xFF
    data_a.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="checksum"):
        third = load_or_build(path, "k", _counting_builder(calls))
    assert len(calls) == 2 and third["a"][3] == 3.0
    data_a.write_bytes(data_a.read_bytes()[:-4])
    with pytest.warns(RuntimeWarning, match="truncated"):
        load_or_build(path, "k", _counting_builder(calls))
    path.write_bytes(path.read_bytes()[:50])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        load_or_build(path, "k", _counting_builder(calls))
    with pytest.warns(RuntimeWarning, match="another key"):
        load_or_build(path, "other", _counting_builder(calls))
    assert len(calls) == 5
    assert not list(tmp_path.glob("*.tmp"))


def _build_in_process(path, log):
    def build():
        with open(log, "a") as handle:
            handle.write("built\n")
        time.sleep(0.5)
        return {"x": torch.arange(4.0)}

    out = load_or_build(path, "key", build)
    assert torch.equal(out["x"], torch.arange(4.0))


def test_workers_building_at_once_build_once(tmp_path):
    path, log = tmp_path / "shared.pt", tmp_path / "log.txt"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_build_in_process, args=(path, log)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert log.read_text() == "built\n"


def test_cached_teacher_reads_the_file_of_an_earlier_worker(tmp_path):
    data, teacher = tiny_parts()
    sha = state_dict_sha256(teacher)
    first = cached_teacher(teacher, sha, None, data, tmp_path)
    assert len(list(tmp_path.glob("teacher-outputs-*.pt"))) == 1
    second = cached_teacher(teacher, sha, None, data, tmp_path)
    positions, views = torch.tensor([0, 5]), torch.tensor([1, 2])
    for k, v in first(positions, views).items():
        assert torch.equal(v, second(positions, views)[k]) and v.dtype == torch.float32


# -- a memory budget at any dataset size, only the knowledge in force (issue 11, point 3) --------

def test_a_cache_over_the_budget_stays_on_disk_and_reads_the_same_rows(tmp_path):
    from kd_optuna.proxy.cache import DiskArray

    data, teacher = tiny_parts()
    sha = state_dict_sha256(teacher)
    memory = cached_teacher(teacher, sha, None, data, tmp_path / "a", memory_budget=2**30)
    disk = cached_teacher(teacher, sha, None, data, tmp_path / "b", memory_budget=1000)
    assert all(isinstance(v, DiskArray) for v in disk.outputs.values())
    assert disk.resident_bytes() == 0 and disk.nbytes() == memory.nbytes() == memory.resident_bytes()
    positions, views = torch.tensor([119, 0, 7, 7]), torch.tensor([2, 0, 1, 2])
    for k, v in memory(positions, views).items():
        assert torch.equal(disk(positions, views)[k], v) and v.dtype == torch.float32
    streamed = compute_teacher_outputs(teacher, data, batch_size=7)
    whole = compute_teacher_outputs(teacher, data, batch_size=512)
    for k in whole:  # one batch or many: the same up to batch-size kernel effects and float16 rounding
        assert torch.allclose(streamed[k].float(), whole[k].float(), rtol=2e-3, atol=1e-4), k
    assert torch.allclose(memory(positions, views)["feat"], whole["feat"][positions, views].float(), rtol=2e-3, atol=1e-4)


def test_only_the_knowledge_in_force_is_cached(tmp_path):
    from kd_optuna.proxy.cache import knowledge_for
    from kd_optuna.space import SearchSpace

    assert knowledge_for(SearchSpace()) == ("feat", "emb", "logit")
    space = SearchSpace().narrow(knowledge=["emb"])
    assert knowledge_for(space) == ("emb", "logit")
    data, teacher = tiny_parts()
    task = Task(data, teacher, new_student, FAST, space, cache_dir=tmp_path)
    assert sorted(task.teacher_outputs.outputs) == ["emb", "logit"]
    assert sorted(p.name.split(".")[-2] for p in tmp_path.glob("teacher-outputs-*.bin")) == ["emb", "logit"]
    spec = next(s for s, *_ in CLASSICS.values() if s.knowledge == "emb")
    assert task.run(spec).val_acc >= 0


def test_optimize_with_a_tiny_budget_keeps_the_cache_on_disk(tmp_path, capsys, monkeypatch):
    import optuna

    from conftest import invoke_cli, tiny_digits_toml
    from kd_optuna.train.checkpoints import save_checkpoint
    from kd_optuna.models import build_model

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KD_OPTUNA_CACHE_MEMORY_MB", "0.01")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "t.pt", build_model("digits_teacher", 10), model_name="digits_teacher",
                    num_classes=10, dataset="digits", accuracy=0.1)
    text = tiny_digits_toml().replace('model = "digits_teacher"\n', 'model = "digits_teacher"\ncheckpoint = "t.pt"\n')
    text = text.replace("[search]\npopulation_size = 4", "[space]\nknowledge = [\"logit\"]\n\n[search]\npopulation_size = 8")
    (tmp_path / "c.toml").write_text(text)
    url = f"sqlite:///{tmp_path / 'kd.db'}"
    code, _, err = invoke_cli(capsys, "create-study", "c.toml", "--storage", url)
    assert code == 0, err
    code, _, err = invoke_cli(capsys, "optimize", "--storage", url, "--n-trials", "1", "--device", "cpu",
                              "--threads", "1", "--no-progress")
    assert code == 0, err
    trials = optuna.load_study(study_name="digits_tiny", storage=url).get_trials()
    assert trials[0].state.is_finished() and trials[0].params["knowledge"] == "logit"
    files = sorted(p.name.split(".")[-2] for p in (tmp_path / ".kd_optuna_cache").glob("teacher-outputs-*.bin"))
    assert files == ["logit"]
