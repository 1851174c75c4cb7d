"""Study configs: the TOML file that names a task, validated before anything is written.

A config has these tables (every key but ``data.dataset``, ``teacher.model`` and
``student.model`` has a default)::

    [study]    name                         the study name create-study uses by default
    [data]     dataset, root, download      digits | cifar10 | cifar100 | imagefolder (ImageNet)
               image_size                   imagefolder only: the square crop (default 224)
               val_fraction                 cifar/imagefolder: share of train held out as val (0.1)
    [teacher]  model, checkpoint, nodes, num_classes     checkpoint absent: train one, cache it
                                            (the dataset's recipe, kd_optuna.train.teachers.RECIPES:
                                            no key sets its epochs; [train] is the student's)
    [student]  model, nodes, num_classes
    [proxy]    the fields of kd_optuna.proxy.settings.ProxySettings
    [space]    gene = [options]             narrows the search space (kd_optuna.space)
    [search]   the keyword arguments of kd_optuna.search.sampler.EvolutionSampler
    [train]    full-training defaults for `kd-optuna export` (seed F.1 / F.2)

``load_config(path_or_name)`` reads a file, or a shipped config by name (``digits``,
``cifar100_resnet56_resnet20``, ...). ``StudyConfig.to_json()`` is what create-study stores in
the study; workers rebuild it with ``StudyConfig.from_dict(json.loads(...))``: plain data, never
pickled or evaluated. Relative paths are read from the directory the command runs in.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import inspect
import json
import logging
import re
import sys
import typing
from pathlib import Path
from typing import Any, Mapping

from kd_optuna.errors import InvalidSpace, KdOptunaError
from kd_optuna.search.from_config import PROPOSER_KEYS, PROPOSERS, build_sampler
from kd_optuna.space import GENES, SearchSpace

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: The study user attr that holds the validated config as JSON.
CONFIG_ATTR = "kd_optuna_config"

STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"


class ConfigError(KdOptunaError, ValueError):
    """A study config with a syntax error, an unknown key, a wrong type or an impossible value."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """``num_classes`` of imagefolder is ImageNet's unless teacher/student.num_classes say otherwise."""

    num_classes: int
    input_shape: tuple[int, int, int]
    needs_root: bool
    family: str


#: What validation needs to know of each dataset (kd_optuna.data loads them).
DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(10, (1, 16, 16), needs_root=False, family="digits"),
    "digits_hard": DatasetInfo(10, (1, 16, 16), needs_root=False, family="digits"),
    "cifar10": DatasetInfo(10, (3, 32, 32), needs_root=True, family="cifar"),
    "cifar100": DatasetInfo(100, (3, 32, 32), needs_root=True, family="cifar"),
    "imagefolder": DatasetInfo(1000, (3, 224, 224), needs_root=True, family="imagenet"),
}

#: Students trained with lr 0.01 instead of 0.05 on CIFAR (seed F.1, following CRD).
LOW_LR_STUDENTS = frozenset({"MobileNetV2", "mobile_half", "ShuffleV1", "ShuffleV2", "mobilenet_v2"})

KNOWLEDGE_NODES = ("feat", "emb", "logit")


@dataclasses.dataclass(frozen=True)
class StudySection:
    name: str | None = None

    def __post_init__(self) -> None:
        if self.name is not None and not self.name.strip():
            raise ValueError(f"name = {self.name!r} is blank; give the study a name or remove the key (the file's name is used)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``image_size``: imagefolder's square crop S, images (3, S, S); None is 224.
    ``val_fraction``: the class-balanced share of CIFAR's or the image folder's train images held
    out as the val split, in (0, 1); None is ``kd_optuna.data.VAL_FRACTION`` (0.1)."""

    dataset: str
    root: str | None = None
    download: bool = False
    image_size: int | None = None
    val_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.image_size is not None:
            from kd_optuna.data import MIN_IMAGE_SIZE

            if self.image_size < MIN_IMAGE_SIZE:
                raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} pixels, got {self.image_size}")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the models see."""
        shape = DATASETS[self.dataset].input_shape
        return shape if self.image_size is None else (shape[0], self.image_size, self.image_size)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    model: str
    checkpoint: str | None = None
    nodes: dict[str, str] | None = None
    num_classes: int | None = None


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    model: str
    nodes: dict[str, str] | None = None
    num_classes: int | None = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Full training of the student with the found distiller (what an exported script runs).

    SGD with momentum, the learning rate multiplied by ``gamma`` at each epoch of ``milestones``.
    ``None`` fields take the dataset's defaults: CIFAR (seed F.1, as CRD) 240 epochs, batch 64,
    lr 0.05 (0.01 for MobileNetV2 / ShuffleNet students), x0.1 at 150/180/210, weight decay
    5e-4; ImageNet (seed F.2) 100 epochs, batch 256, lr 0.1, x0.1 at 30/60/90, weight decay
    1e-4 (the seed gives none for ImageNet; 1e-4 is the usual ResNet setting); digits 30 epochs,
    batch 64, lr 0.05, x0.1 at 15/22/27, weight decay 5e-4.
    """

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    num_workers: int = 2
    seed: int = 0

    def resolved(self, dataset: str, student: str) -> "TrainConfig":
        family = DATASETS[dataset].family
        defaults: dict[str, Any] = {
            "cifar": dict(epochs=240, batch_size=64, lr=0.05, weight_decay=5e-4, milestones=(150, 180, 210)),
            "imagenet": dict(epochs=100, batch_size=256, lr=0.1, weight_decay=1e-4, milestones=(30, 60, 90)),
            "digits": dict(epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4, milestones=(15, 22, 27)),
        }[family]
        if family == "cifar" and student in LOW_LR_STUDENTS:
            defaults["lr"] = 0.01
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **filled)


def _proxy_settings_class() -> type:
    from kd_optuna.proxy.settings import ProxySettings

    return ProxySettings


def _sampler_class() -> type:
    from kd_optuna.search.sampler import EvolutionSampler

    return EvolutionSampler


#: EvolutionSampler arguments that the study config does not set: the space comes from
#: [space] and the proposer is built from [search] settings (kd_optuna.search.from_config).
_SAMPLER_EXCLUDED = ("self", "space")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A validated study config. ``proxy`` is a ProxySettings, ``space`` a SearchSpace,
    ``search`` the EvolutionSampler keyword arguments, ``train`` the resolved TrainConfig."""

    study: StudySection
    data: DataConfig
    teacher: TeacherConfig
    student: StudentConfig
    proxy: Any
    space: SearchSpace
    search: Mapping[str, Any]
    train: TrainConfig

    @property
    def name(self) -> str | None:
        return self.study.name

    @property
    def num_classes(self) -> int:
        return self.teacher.num_classes or self.student.num_classes or DATASETS[self.data.dataset].num_classes

    @classmethod
    def from_dict(
        cls, data: Any, source: str = "config", check_models: bool = True, proxy_from_recipe: bool = True
    ) -> "StudyConfig":
        """Validate a parsed config (TOML tables or stored JSON); raise ConfigError naming the key.

        The ``[proxy]`` keys a config leaves out follow the ``[train]`` recipe, shrunk
        (``ProxySettings.from_recipe``), so a user who changes the recipe searches for it; a
        stored config (``proxy_from_recipe=False``) keeps exactly the settings it was created with.

        ``check_models=False`` skips the model registry (and so the torch import) for a config
        that was checked when its study was created; building the models checks the names again."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a study config must be a table of tables")
        tables = ("study", "data", "teacher", "student", "proxy", "space", "search", "train")
        _check_unknown(source, "", data, tables)
        for required in ("data", "teacher", "student"):
            if required not in data:
                raise ConfigError(f"{source}: the [{required}] table is missing; add it (see studies/digits.toml)")
        for table in tables:
            if table in data and not isinstance(data[table], Mapping):
                raise ConfigError(f"{source}: {table} must be a table like [{table}], got {_kind(data[table])}")

        study = _build(StudySection, data.get("study", {}), source, "study")
        dataset_config = _build(DataConfig, data["data"], source, "data")
        if dataset_config.dataset not in DATASETS:
            raise ConfigError(
                f"{source}: data.dataset = {dataset_config.dataset!r} is not known; use one of: {', '.join(DATASETS)}"
            )
        if dataset_config.image_size is not None and dataset_config.dataset != "imagefolder":
            raise ConfigError(
                f"{source}: data.image_size sets the crop of imagefolder images; {dataset_config.dataset} images are "
                f"{DATASETS[dataset_config.dataset].input_shape}: remove the key"
            )
        if dataset_config.val_fraction is not None and DATASETS[dataset_config.dataset].family == "digits":
            raise ConfigError(
                f"{source}: data.val_fraction sets how much of CIFAR's or an image folder's train split is held out; "
                f"{dataset_config.dataset} has a fixed val split: remove the key"
            )
        teacher = _build(TeacherConfig, data["teacher"], source, "teacher")
        student = _build(StudentConfig, data["student"], source, "student")
        if check_models:
            teacher, student = _check_models(source, dataset_config, teacher, student)
        proxy_table = data.get("proxy", {})
        proxy = _build(_proxy_settings_class(), proxy_table, source, "proxy")
        space = _build_space(source, data.get("space", {}))
        search = _build_search(source, data.get("search", {}))
        train = _build(TrainConfig, data.get("train", {}), source, "train")
        _check_train(source, train)
        train = train.resolved(dataset_config.dataset, student.model)
        if proxy_from_recipe:
            given = {key: getattr(proxy, key) for key in proxy_table}
            try:
                proxy = _proxy_settings_class().from_recipe(train, given)
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        return cls(study, dataset_config, teacher, student, proxy, space, search, train)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/TOML types only); ``from_dict(to_dict())`` gives an equal config."""
        return _plain(
            {
                "study": dataclasses.asdict(self.study),
                "data": dataclasses.asdict(self.data),
                "teacher": dataclasses.asdict(self.teacher),
                "student": dataclasses.asdict(self.student),
                "proxy": dataclasses.asdict(self.proxy),
                "space": self.space.to_dict(),
                "search": dict(self.search),
                "train": dataclasses.asdict(self.train),
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "stored config", check_models: bool = True) -> "StudyConfig":
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{source}: not valid JSON ({exc}); recreate the study with create-study") from None
        return cls.from_dict(data, source, check_models, proxy_from_recipe=False)

    def check_files(self) -> None:
        """Check that the data (``check_data``) and the teacher checkpoint exist on this machine."""
        self.check_data()
        if self.teacher.checkpoint is not None:
            self.check_teacher_checkpoint()

    def check_data(self) -> None:
        """Check that the data root exists on this machine; an image folder's layout
        (``kd_optuna.data.open_image_folder``: no image is read) and that its val share leaves
        each class a train image, and a CIFAR copy's files
        (``kd_optuna.data.check_cifar``: their md5, nothing unpickled) are checked too."""
        info = DATASETS[self.data.dataset]
        if info.needs_root:
            if self.data.root:
                root = Path(self.data.root).expanduser()
            else:
                from kd_optuna.data import default_root

                root = default_root()
            shown = (f"data.root = {self.data.root!r}{_relative_note(self.data.root)}" if self.data.root
                     else f"the default data root {str(root)!r}{_relative_note(root)}")
            fix = " or set data.download = true" if self.data.dataset != "imagefolder" else ""
            if not root.is_dir() and not self.data.download:
                raise ConfigError(
                    f"{shown} is not a directory; put the {self.data.dataset} data there or fix the path{fix}"
                )
            if self.data.dataset in ("cifar10", "cifar100") and not self.data.download:
                from kd_optuna.data import check_cifar

                check_cifar(self.data.dataset, root)
            if self.data.dataset == "imagefolder":
                import torch

                from kd_optuna.data import VAL_FRACTION, held_out_split, open_image_folder

                train = open_image_folder(root)[0]
                if len(train.classes) != self.num_classes:
                    raise ConfigError(
                        f"{root / 'train'} holds {len(train.classes)} class folders but the models have "
                        f"{self.num_classes} classes; set teacher.num_classes and student.num_classes = {len(train.classes)}"
                    )
                held_out_split(torch.as_tensor(train.targets, dtype=torch.long), self.data.val_fraction or VAL_FRACTION,
                               0, train.classes, str(root / "train"))

    def check_teacher_checkpoint(self) -> None:
        """The teacher checkpoint exists, loads with ``torch.load(weights_only=True)`` and holds
        weights that fit ``teacher.model`` with the config's class count; else one-line ConfigError."""
        path = Path(self.teacher.checkpoint).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"teacher.checkpoint = {self.teacher.checkpoint!r}{_relative_note(self.teacher.checkpoint)} "
                "is not a file; fix the path, or remove "
                "the key to let kd-optuna train a teacher"
            )
        from kd_optuna.train.checkpoints import CheckpointError, load_state

        try:
            load_state(path, self.teacher.model, self.num_classes)
        except CheckpointError as exc:
            raise ConfigError(f"teacher.checkpoint: {_one_line(str(exc))}") from None

    def make_sampler(self, seed: int | None = None, with_llm: bool = True):
        """The study's EvolutionSampler; ``seed`` (one per worker) overrides search.seed;
        ``with_llm=False`` leaves out a language-model proposer (to read weights only)."""
        search = dict(self.search)
        if seed is not None:
            search["seed"] = seed
        return build_sampler(search, self.space, check_only=not with_llm)


def shipped_configs() -> dict[str, Path]:
    """Name -> path of each config shipped with kd-optuna (package copy, else the repo's studies/)."""
    found: dict[str, Path] = {}
    package_dir = importlib.resources.files("kd_optuna") / "studies"
    for directory in (Path(str(package_dir)), STUDIES_DIR):
        if directory.is_dir():
            for path in sorted(directory.glob("*.toml")):
                found.setdefault(path.stem, path)
    return found


def load_config(path_or_name: str | Path) -> StudyConfig:
    """Read and validate a study config from a TOML file or a shipped config's name."""
    path = Path(path_or_name).expanduser()
    if not path.is_file():
        shipped = shipped_configs()
        if str(path_or_name) not in shipped:
            names = ", ".join(shipped) or "none"
            raise ConfigError(f"no config file {str(path_or_name)!r}; give a TOML file or one of: {names}")
        path = shipped[str(path_or_name)]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.__class__.__name__}); check the file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {_one_line(str(exc))}; fix the syntax") from None
    proxy = data.get("proxy")
    if isinstance(proxy, dict) and "steps" in proxy and proxy.get("epochs"):
        raise ConfigError(f"{path}: [proxy] steps = {proxy['steps']!r} and epochs = {proxy['epochs']!r} both set the "
                          "proxy's length, and epochs (passes over the KD pool) would win; give one of them")
    config = StudyConfig.from_dict(data, str(path))
    if config.study.name is None:
        config = dataclasses.replace(config, study=StudySection(name=path.stem))
    return config


def _relative_note(path: str | Path) -> str:
    """For a relative path, where it was looked for: the working directory (not the config
    file's folder: the stored config is read by commands run anywhere)."""
    if Path(path).expanduser().is_absolute():
        return ""
    return f" (read from the working directory {Path.cwd()}; an absolute path works from any)"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    if value is None:
        return "nothing"
    return type(value).__name__


def _check_unknown(source: str, prefix: str, table: Mapping[str, Any], known: typing.Iterable[str]) -> None:
    """An unknown key of ``table`` raises ConfigError naming it, the known key it most likely
    misspells (``difflib``'s close matches), and every known key."""
    known = tuple(known)
    for key in table:
        if key not in known:
            where = f"[{prefix}] " if prefix else ""
            close = difflib.get_close_matches(str(key), known, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{source}: {where}unknown key {str(key)!r}{guess}; the keys are: {', '.join(known)}"
            )


def _check_value(source: str, key: str, value: Any, hint: Any) -> Any:
    """``value`` converted to ``hint`` (lists to tuples), or ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return _check_union(source, key, value, args)
    if origin is typing.Literal:
        if value in args and type(value) is not bool:
            return value
        raise ConfigError(f"{source}: {key} = {value!r} is not allowed; use one of: {', '.join(map(repr, args))}")
    if hint in (bool, int, float, str):
        return _check_scalar(source, key, value, hint)
    if origin in (tuple, list):
        return _check_list(source, key, value, origin, args)
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a table, got {_kind(value)} {value!r}")
        key_hint, value_hint = args if args else (Any, Any)
        return {
            _check_value(source, f"{key} key", k, key_hint): _check_value(source, f"{key}.{k}", v, value_hint)
            for k, v in value.items()
        }
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {_kind(value)} {value!r}")
    return value


def _check_union(source: str, key: str, value: Any, args: tuple) -> Any:
    """``value`` as the first type of ``args`` it converts to (``None`` if that is one of them);
    else the error of the first type tried."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _check_value(source, key, value, arg)
        except ConfigError as exc:
            errors.append(exc)
    raise errors[0]


def _check_scalar(source: str, key: str, value: Any, hint: type) -> Any:
    """``value`` as a TOML boolean, integer, finite number (an integer becomes a float) or string:
    ``hint`` is bool, int, float or str; a boolean is never an integer or a number."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {_kind(value)} {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -2**63 <= value < 2**63:  # TOML's integers; torch, numpy and SQLite take no more
                raise ConfigError(f"{source}: {key} = {value} does not fit in 64 bits; give a smaller integer")
            return value
        raise ConfigError(f"{source}: {key} must be an integer, got {_kind(value)} {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{source}: {key} must be a number, got {_kind(value)} {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{source}: {key} must be a string, got {_kind(value)} {value!r}")


def _check_list(source: str, key: str, value: Any, origin: type, args: tuple) -> Any:
    """``value`` (a list) as ``origin`` (tuple or list) of ``args``: ``tuple[X, ...]`` any length,
    ``tuple[X, Y]`` exactly those items, ``list[X]``; each item checked, named ``key[i]``."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{source}: {key} must be a list, got {_kind(value)} {value!r}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        items = [_check_value(source, f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
        return tuple(items)
    if origin is tuple and args:
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key} must be a list of {len(args)} items, got {len(value)}")
        return tuple(_check_value(source, f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    inner = args[0] if args else Any
    items = [_check_value(source, f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _build(cls: type, table: Mapping[str, Any], source: str, section: str):
    """An instance of dataclass ``cls`` from ``table``, every key and type checked."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _check_unknown(source, section, table, fields)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in table:
            values[name] = _check_value(source, f"{section}.{name}", table[name], hints.get(name, Any))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {section}.{name} is missing; add `{name} = ...` under [{section}]")
    try:
        return cls(**values)
    except KdOptunaError as exc:  # "proxy steps must be ..." reads "[proxy] steps must be ..."
        raise ConfigError(f"{source}: [{section}] {_one_line(str(exc)).removeprefix(section + ' ')}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: [{section}] {_one_line(str(exc))}; fix the value") from None


def _check_models(source: str, data: DataConfig, teacher: TeacherConfig,
                  student: StudentConfig) -> tuple[TeacherConfig, StudentConfig]:
    """``teacher`` and ``student`` checked against the dataset and each other; a model outside
    the zoo's and the tap's rules comes back with the nodes read off its forward (kept in the
    config, so the study's workers and exported script tap what was checked here)."""
    from kd_optuna.models import UnknownModel, input_mismatch, model_entry

    dataset, input_shape = data.dataset, data.input_shape
    info = DATASETS[dataset]
    entries = {}
    for role, part in (("teacher", teacher), ("student", student)):
        try:
            entry = entries[role] = model_entry(part.model)
        except UnknownModel as exc:
            raise ConfigError(f"{source}: {role}.model = {part.model!r} is not a known model: {exc}") from None
        any_size = info.family == "imagenet"
        mismatch = input_mismatch(part.model, input_shape, any_size)
        if mismatch:
            library = "" if entry.source == "zoo" else f" ({entry.source})"
            wanted = f"a model for {input_shape[0]}-channel images" if any_size else f"a {dataset} model"
            raise ConfigError(f"{source}: {role}.model = {part.model!r}{library} {mismatch} but {dataset} images are "
                              f"{input_shape}; pick {wanted}")
        if part.num_classes is not None and part.num_classes < 1:
            raise ConfigError(f"{source}: {role}.num_classes must be at least 1, got {part.num_classes}")
        if part.num_classes is not None and info.family != "imagenet" and part.num_classes != info.num_classes:
            raise ConfigError(
                f"{source}: {role}.num_classes = {part.num_classes} but {dataset} has {info.num_classes} classes; "
                f"remove the key or set it to {info.num_classes}"
            )
        if part.nodes is not None and sorted(part.nodes) != sorted(KNOWLEDGE_NODES):
            raise ConfigError(
                f"{source}: {role}.nodes must name exactly {', '.join(KNOWLEDGE_NODES)} (torch.fx node names), "
                f"got {', '.join(map(str, part.nodes)) or 'none'}"
            )
    t_classes = teacher.num_classes or student.num_classes or info.num_classes
    s_classes = student.num_classes or teacher.num_classes or info.num_classes
    if t_classes != s_classes:
        raise ConfigError(
            f"{source}: teacher.num_classes = {t_classes} but student.num_classes = {s_classes}; "
            "a distiller needs the same classes on both sides"
        )
    checked = {}
    for role, part in (("teacher", teacher), ("student", student)):
        entry = entries[role]
        inferred = None
        if part.nodes is not None or entry.source != "zoo" or tuple(entry.input_shape) != input_shape:
            inferred = _check_tap(source, role, part, entry.source, t_classes, input_shape, dataset)
        checked[role] = part if inferred is None else dataclasses.replace(part, nodes=inferred)
    return checked["teacher"], checked["student"]


def _check_tap(source: str, role: str, part: Any, library: str, num_classes: int, input_shape: tuple,
               dataset: str) -> dict[str, str] | None:
    """Trace ``part.model`` once, built by ``build_model_skeleton`` (on the meta device where it
    can be: no weights allocated; nothing downloaded): its tap nodes must exist, and, where a
    forward runs, give a feature map, a vector and ``num_classes`` logits on ``input_shape`` images.
    Where the meta forward fails, one on the CPU tells an op without a meta kernel (checked on
    first use) from images the model cannot take (a ViT's fixed patch grid at another size).
    Returns the nodes read off the model's forward where the config names none and no rule
    knows the model (said in a note), else None."""
    from kd_optuna.models import (
        TapError,
        build_model,
        build_model_skeleton,
        check_nodes,
        forward_error,
        knowledge_shapes,
        model_entry,
        tap_model,
    )
    from kd_optuna.models.tap import default_nodes, describe_nodes, known_nodes

    try:
        model = build_model_skeleton(part.model, num_classes)
    except KdOptunaError as exc:
        raise ConfigError(f"{source}: {role}.model = {part.model!r}: {_one_line(str(exc))}") from None
    except Exception as exc:
        raise ConfigError(
            f"{source}: {role}.model = {part.model!r} cannot be built with {num_classes} classes "
            f"({type(exc).__name__}: {_one_line(str(exc))[:200]})"
        ) from None
    nodes = part.nodes
    inferred = None
    if nodes is None and model_entry(part.model).nodes is None and known_nodes(model) is None:
        nodes = inferred = default_nodes(model, input_shape)
        if nodes is None:
            raise ConfigError(
                f"{source}: {role}.model = {part.model!r} is a {library} model outside the zoo whose tap nodes could "
                f"not be read off its forward: name them under [{role}] as "
                f"nodes = {{ feat = \"...\", emb = \"...\", logit = \"...\" }}; {describe_nodes(model)}"
            )
    try:
        if nodes is not None:
            check_nodes(model, nodes)
        tapped = tap_model(model, part.model, nodes=nodes)
    except TapError as exc:
        raise ConfigError(f"{source}: {role}.nodes: {_one_line(str(exc))}") from None
    try:
        shapes = knowledge_shapes(tapped, input_shape)
    except Exception:
        error = forward_error(tap_model(build_model(part.model, num_classes), part.model, nodes=nodes), input_shape)
        if error is None:  # an op without a meta kernel: the nodes exist, the shapes are checked on first use
            return _said_inferred(source, role, part.model, inferred)
        other_size = " or another [data] image_size" if dataset == "imagefolder" else ""
        raise ConfigError(f"{source}: {role}.model = {part.model!r} cannot take {dataset} images of {input_shape} "
                          f"({error}); pick a model for them{other_size}")
    wanted = {"feat": 3, "emb": 1}
    for key, rank in wanted.items():
        if len(shapes[key]) != rank:
            what = "a feature map (N, C, H, W)" if key == "feat" else "a vector (N, D)"
            raise ConfigError(
                f"{source}: {role}.nodes.{key} = {tapped.nodes[key]!r} gives per-image shape {shapes[key]}, "
                f"not {what}; name another node"
            )
    if shapes["logit"] != (num_classes,):
        raise ConfigError(
            f"{source}: {role}.nodes.logit = {tapped.nodes['logit']!r} gives per-image shape {shapes['logit']}, "
            f"not the {num_classes} class logits; name the classifier's last layer"
        )
    return _said_inferred(source, role, part.model, inferred)


def _said_inferred(source: str, role: str, model: str, nodes: dict[str, str] | None) -> dict[str, str] | None:
    """``nodes``, after a note naming them when the tap read them off the model's forward."""
    if nodes is not None:
        listed = ", ".join(f'{key} = "{nodes[key]}"' for key in KNOWLEDGE_NODES)
        logging.getLogger("kd_optuna").warning(
            "note: %s: %s.model = %r taps nodes = { %s }, read off its forward; name others under [%s] to change them",
            source, role, model, listed, role)
    return nodes


def _build_space(source: str, table: Mapping[str, Any]) -> SearchSpace:
    _check_unknown(source, "space", table, GENES)
    try:
        return SearchSpace().narrow(**{str(k): v for k, v in table.items()})
    except InvalidSpace as exc:
        raise ConfigError(f"{source}: [space] {_one_line(str(exc))}") from None


def _build_search(source: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """The [search] table checked against EvolutionSampler's signature.

    ``warm_start`` is true/false or a list of classic names (kd_optuna.distill.classics); ``proposer``
    is ``random`` (default), ``llm`` (with ``llm_url``, ``llm_model``; the key only from the
    environment variable KD_OPTUNA_LLM_API_KEY) or ``none``."""
    from kd_optuna.distill.classics import CLASSICS

    parameters = inspect.signature(_sampler_class()).parameters
    sampler_keys = [
        name
        for name, p in parameters.items()
        if name not in _SAMPLER_EXCLUDED + ("proposer",) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    _check_unknown(source, "search", table, sampler_keys + list(PROPOSER_KEYS))
    hints = typing.get_type_hints(_sampler_class().__init__)
    checked: dict[str, Any] = {}
    for name, value in table.items():
        key = f"search.{name}"
        if name in PROPOSER_KEYS:
            checked[name] = _check_value(source, key, value, PROPOSER_KEYS[name])
        elif name == "warm_start":
            checked[name] = _check_value(source, key, value, typing.Union[bool, list[str]])
            if isinstance(checked[name], list):
                for classic in checked[name]:
                    if classic not in CLASSICS:
                        raise ConfigError(
                            f"{source}: search.warm_start lists {classic!r}; use classic names: {', '.join(CLASSICS)}"
                        )
        else:
            hint = hints.get(name, Any)
            default = parameters[name].default
            if hint is Any and default not in (inspect.Parameter.empty, None):
                hint = type(default)
            checked[name] = _check_value(source, key, value, hint)
    proposer = checked.get("proposer", "random")
    if proposer not in PROPOSERS:
        raise ConfigError(f"{source}: search.proposer = {proposer!r}; use one of: {', '.join(PROPOSERS)}")
    url = checked.get("llm_url")
    if url is not None and re.search(r"//[^/@]*:[^/@]*@", url):
        raise ConfigError(
            f"{source}: search.llm_url must not hold a password (it is stored in the study); "
            "put the key in the environment variable KD_OPTUNA_LLM_API_KEY"
        )
    try:
        build_sampler(checked, SearchSpace(), check_only=True)
    except KdOptunaError as exc:
        raise ConfigError(f"{source}: [search] {_one_line(str(exc))}") from None
    return checked


def _check_train(source: str, train: TrainConfig) -> None:
    """The [train] values the exported script's own flags accept (kd_optuna.export.script.SETTINGS):
    epochs and batch_size at least 1, lr and gamma above 0, the others not negative, milestones
    increasing epochs from 1 (MultiStepLR would apply one at epoch 0 before the first epoch,
    where the proxy ignores it)."""
    for key in ("epochs", "batch_size"):
        value = getattr(train, key)
        if value is not None and value < 1:
            raise ConfigError(f"{source}: train.{key} must be at least 1, got {value}")
    for key in ("lr", "gamma"):
        value = getattr(train, key)
        if value is not None and not value > 0:
            raise ConfigError(f"{source}: train.{key} must be greater than 0, got {value}")
    for key in ("weight_decay", "momentum", "num_workers"):
        value = getattr(train, key)
        if value is not None and value < 0:
            raise ConfigError(f"{source}: train.{key} must not be negative, got {value}")
    if train.milestones is not None:
        if list(train.milestones) != sorted(set(train.milestones)):
            raise ConfigError(f"{source}: train.milestones must be increasing epochs, got {list(train.milestones)}")
        if train.milestones and train.milestones[0] < 1:
            raise ConfigError(f"{source}: train.milestones are epochs counted from 1, got {list(train.milestones)}")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
