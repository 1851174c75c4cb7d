"""Study configs: the shipped files, round trips through JSON, and one-line errors for bad input."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_PROXY, tiny_digits_toml
from kd_optuna.run.config import (
    ConfigError,
    StudyConfig,
    load_config,
    shipped_configs,
)
from kd_optuna.errors import KdOptunaError
from kd_optuna.space import SearchSpace

REPO = Path(__file__).resolve().parent.parent

SHIPPED_PAIRS = {
    "cifar100_resnet56_resnet20": ("resnet56", "resnet20"),
    "cifar100_resnet110_resnet32": ("resnet110", "resnet32"),
    "cifar100_resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
    "cifar100_wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "cifar100_vgg13_vgg8": ("vgg13", "vgg8"),
    "imagenet_resnet34_resnet18": ("resnet34", "resnet18"),
}


def base() -> dict:
    return {
        "data": {"dataset": "digits"},
        "teacher": {"model": "digits_teacher"},
        "student": {"model": "digits_student"},
    }


def test_every_shipped_config_loads_with_its_pair_and_the_seed_training_defaults():
    names = shipped_configs()
    assert "digits" in names and set(SHIPPED_PAIRS) <= set(names)
    for name, (teacher, student) in SHIPPED_PAIRS.items():
        config = load_config(name)
        assert (config.teacher.model, config.student.model) == (teacher, student)
        assert config.name == name
    cifar = load_config("cifar100_resnet56_resnet20").train
    assert (cifar.epochs, cifar.batch_size, cifar.lr, cifar.momentum, cifar.weight_decay) == (240, 64, 0.05, 0.9, 5e-4)
    assert cifar.milestones == (150, 180, 210) and cifar.gamma == 0.1
    imagenet = load_config("imagenet_resnet34_resnet18").train
    assert (imagenet.epochs, imagenet.batch_size, imagenet.lr, imagenet.milestones) == (100, 256, 0.1, (30, 60, 90))


def test_package_ships_the_same_configs_as_the_repository():
    package = REPO / "kd_optuna" / "studies"
    repo = REPO / "studies"
    names = sorted(p.name for p in repo.glob("*.toml"))
    assert names == sorted(p.name for p in package.glob("*.toml"))
    match, mismatch, errors = filecmp.cmpfiles(repo, package, names, shallow=False)
    assert mismatch == [] and errors == []


def test_train_defaults_follow_the_dataset_and_the_student():
    data = base() | {"data": {"dataset": "cifar100", "root": "x"}}
    data["teacher"] = {"model": "resnet32x4"}
    data["student"] = {"model": "ShuffleV2"}
    config = StudyConfig.from_dict(data)
    assert config.train.lr == 0.01 and config.train.epochs == 240
    data["student"] = {"model": "resnet8x4"}
    assert StudyConfig.from_dict(data).train.lr == 0.05
    data["train"] = {"lr": 0.2, "milestones": [10, 20]}
    config = StudyConfig.from_dict(data)
    assert config.train.lr == 0.2 and config.train.milestones == (10, 20)


def test_json_round_trip_keeps_every_setting(tiny_config_path):
    config = load_config(tiny_config_path)
    again = StudyConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(config.to_json())["proxy"]["steps"] == TINY_PROXY["steps"]
    assert again.proxy.steps == TINY_PROXY["steps"]


def test_space_table_narrows_the_search_space():
    data = base() | {"space": {"transform1": ["satt", "no"], "temperature": [4]}}
    config = StudyConfig.from_dict(data)
    assert config.space == SearchSpace().narrow(transform1=["satt", "no"], temperature=[4])


def test_search_table_builds_the_sampler():
    data = base() | {"search": {"population_size": 7, "top_k": 2, "warm_start": ["kd", "at"], "proposer": "none"}}
    sampler = StudyConfig.from_dict(data).make_sampler()
    assert sampler.population_size == 7 and sampler.top_k == 2
    assert [s.key for s in sampler.warm_start][0].startswith("logit|")
    assert sampler.proposer is None


@pytest.mark.parametrize(
    "change, words",
    [
        ({"data": {"dataset": "digits", "rooot": "x"}}, ["rooot", "dataset, root, download"]),
        ({"teacher": {"model": "resnet57"}}, ["teacher.model", "resnet57", "known"]),
        ({"teacher": {"model": "resnet20"}}, ["teacher.model", "inputs"]),
        ({"student": {"model": "digits_student", "num_classes": 100}}, ["student.num_classes", "10 classes"]),
        ({"proxy": {"steps": "many"}}, ["proxy.steps", "integer"]),
        ({"proxy": {"stepz": 3}}, ["stepz", "did you mean 'steps'?", "labels_per_class"]),
        ({"proxyy": {"steps": 3}}, ["proxyy", "did you mean 'proxy'?"]),
        ({"proxy": {"optimizer": "adamw2"}}, ["[proxy]", "adamw2"]),
        ({"proxy": {"seeds": [0, 0]}}, ["[proxy] seeds must be distinct seeds"]),
        ({"proxy": {"steps": 0}}, ["[proxy] steps must be an integer >= 1, got 0"]),
        ({"proxy": {"views": 10**30}}, ["proxy.views = 1000000000000000000000000000000 does not fit in 64 bits"]),
        ({"train": {"milestones": [2**63]}}, ["train.milestones[0]", "64 bits"]),
        ({"proxy": {"confirm_seeds": [3, 3]}}, ["[proxy]", "confirm_seeds", "distinct"]),
        ({"space": {"distance": ["l3"]}}, ["distance", "l3", "l1"]),
        ({"space": {"colour": ["red"]}}, ["colour", "knowledge"]),
        ({"search": {"top_k": 0}}, ["[search]", "top_k"]),
        ({"search": {"top_k": 2.5}}, ["search.top_k", "integer"]),
        ({"search": {"seed": -1}}, ["[search]", "seed", "from 0"]),
        ({"search": {"seed": 2**32}}, ["[search]", "seed", "from 0"]),
        ({"search": {"proposer": "oracle"}}, ["search.proposer", "random"]),
        ({"search": {"llm_url": "https://u:hunter2@h/v1"}}, ["llm_url", "KD_OPTUNA_LLM_API_KEY"]),
        ({"train": {"epochs": 0}}, ["train.epochs", "at least 1"]),
        ({"train": {"milestones": [30, 10]}}, ["train.milestones", "increasing"]),
        ({"train": {"milestones": [-1, 10]}}, ["train.milestones", "from 1"]),
        ({"train": {"milestones": [0, 10]}}, ["train.milestones", "from 1"]),
        ({"train": {"lr": 0}}, ["train.lr", "greater than 0"]),
        ({"train": {"gamma": 0}}, ["train.gamma", "greater than 0"]),
        ({"train": {"num_workers": -1}}, ["train.num_workers", "must not be negative"]),
        ({"teacher": {"model": "digits_teacher", "nodes": {"feat": "x"}}}, ["teacher.nodes", "feat, emb, logit"]),
        ({"extra": {}}, ["unknown key 'extra'"]),
        ({"study": {"name": " "}}, ["[study]", "blank"]),
        ({"data": {"dataset": "mnist"}}, ["data.dataset", "digits"]),
        ({"data": "digits"}, ["data must be a table"]),
        ({"data": {"dataset": "digits", "download": "yes"}}, ["data.download", "true or false"]),
    ],
)
def test_bad_values_raise_one_line_errors_naming_the_key(change, words):
    with pytest.raises(ConfigError) as info:
        StudyConfig.from_dict(base() | change)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert "hunter2" not in message


def test_missing_table_and_missing_required_key():
    with pytest.raises(ConfigError, match=r"\[teacher\] table is missing"):
        StudyConfig.from_dict({"data": {"dataset": "digits"}, "student": {"model": "digits_student"}})
    with pytest.raises(ConfigError, match="student.model is missing"):
        StudyConfig.from_dict(base() | {"student": {}})


def test_missing_data_root_and_checkpoint_are_refused_by_check_files(tmp_path):
    data = base() | {"data": {"dataset": "cifar100", "root": str(tmp_path / "nowhere")}}
    data["teacher"], data["student"] = {"model": "resnet56"}, {"model": "resnet20"}
    with pytest.raises(ConfigError, match="data.root .* is not a directory"):
        StudyConfig.from_dict(data).check_files()
    data["data"]["root"], data["data"]["download"] = str(tmp_path), True  # the CIFAR files come later
    data["teacher"]["checkpoint"] = str(tmp_path / "teacher.pth")
    with pytest.raises(ConfigError, match="teacher.checkpoint .* is not a file"):
        StudyConfig.from_dict(data).check_files()


def test_toml_syntax_error_and_unknown_name(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[data]\ndataset = "digits\n')
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_config(path)
    with pytest.raises(ConfigError, match="digits"):
        load_config("no_such_config")


def test_study_name_defaults_to_the_file_name(tmp_path):
    path = tmp_path / "my_pair.toml"
    path.write_text(tiny_digits_toml().replace('name = "digits_tiny"\n', ""))
    assert load_config(path).name == "my_pair"


def test_a_proxy_given_both_steps_and_epochs_is_refused_since_epochs_would_win(tmp_path):
    """Both set the proxy's length; epochs (passes over the KD pool) silently decided it. A
    config's own dict, which holds every field, is not a user's table and round-trips."""
    path = tmp_path / "both.toml"
    assert TINY_PROXY["steps"] == 4
    path.write_text(tiny_digits_toml().replace("[proxy]\n", "[proxy]\nepochs = 2\n", 1))
    with pytest.raises(ConfigError, match=r"both\.toml: \[proxy\] steps = 4 and epochs = 2 both set the proxy's length"):
        load_config(path)
    path.write_text(tiny_digits_toml().replace("[proxy]\n", "[proxy]\nepochs = 0\n", 1))
    config = load_config(path)
    assert config.proxy.steps == 4 and StudyConfig.from_dict(config.to_dict(), check_models=False) == config


_toml_value = st.one_of(
    st.integers(-3, 10**6), st.floats(allow_nan=True), st.booleans(), st.text(max_size=8),
    st.lists(st.integers(-2, 300), max_size=3), st.lists(st.text(max_size=5), max_size=3),
)
_keys = st.sampled_from(
    ["dataset", "root", "download", "model", "checkpoint", "nodes", "num_classes", "steps", "lr", "seeds",
     "distance", "transform1", "temperature", "population_size", "top_k", "warm_start", "epochs", "milestones", "zzz"]
)
_tables = st.sampled_from(["data", "teacher", "student", "proxy", "space", "search", "train", "study", "other"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=_tables, key=_keys, value=_toml_value)
def test_fuzzed_values_give_a_config_or_a_one_line_error(table, key, value):
    data = base()
    data[table] = dict(data.get(table, {})) | {key: value}
    try:
        StudyConfig.from_dict(data)
    except KdOptunaError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=80, deadline=None)
@given(text=st.text(max_size=120))
def test_fuzzed_toml_text_gives_a_config_or_a_one_line_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.toml"
    path.write_text('[data]\ndataset = "digits"\n' + text, encoding="utf-8")
    try:
        load_config(path)
    except KdOptunaError as exc:
        assert str(exc) and "\n" not in str(exc)
