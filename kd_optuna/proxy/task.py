"""A Task: everything a proxy trial needs, built once per worker process.

The proxy data on the worker's device, the frozen tapped teacher, a student factory, the proxy
settings, the search space, the teacher's cached outputs over the proxy views, the study-level
teacher reference (val embeddings and sharpness) and the fixed rejection batch. The last three
are computed on first use and then shared by every trial of the worker.

    task = Task.from_config(config)                        # from a validated study config
    task = Task(data, teacher, new_student, ProxySettings())  # directly, e.g. in tests
    result = task.run(spec)                                # a ProxyResult
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd_optuna.proxy.cache import (
    CachedTeacher, cached_teacher, compute_teacher_outputs, knowledge_for, state_dict_sha256,
)
from kd_optuna.errors import KdOptunaError
from kd_optuna.distill.loss import DistillerLoss
from kd_optuna.proxy.settings import ProxySettings
from kd_optuna.proxy.views import ProxyData, TeacherLookup, live_teacher
from kd_optuna.proxy.training import NoDistillation, ProxyResult, TeacherReference, run_proxy
from kd_optuna.proxy.rejection import Rejection, RejectionBatch, reject
from kd_optuna.space import DistillerSpec, SearchSpace

log = logging.getLogger(__name__)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: the teacher never trains."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class Task:
    """The teacher/student pair, proxy data and settings of one study, on one device.

    Args:
        data: proxy tensors (kd_optuna.proxy.views.ProxyData), already on ``data.device``.
        teacher: the tapped teacher (forward -> {feat, emb, logit}), frozen here.
        new_student: returns a freshly initialised tapped student on the data's device
            (callers seed torch before calling it).
        proxy: the proxy settings; ``space`` the search space.
        test: optional held-out (images, labels) for final accuracies (``kd-optuna correlate``),
            or a function returning them, called on first use (``from_config`` passes one: an
            optimize worker never scores on the test split, so it never holds its images).
        cache_dir: where the teacher-output cache lives; None keeps it in memory only.
        use_cache: False runs the teacher on every batch instead (same views, same metrics).
        teacher_sha256, teacher_nodes: identify the teacher in the cache key (the hash is
            computed from its weights when not given).
    """

    def __init__(
        self,
        data: ProxyData,
        teacher: nn.Module,
        new_student: Callable[[], nn.Module],
        proxy: ProxySettings | None = None,
        space: SearchSpace | None = None,
        *,
        test: tuple[Tensor, Tensor] | Callable[[], tuple[Tensor, Tensor]] | None = None,
        cache_dir: Path | None = None,
        use_cache: bool = True,
        teacher_sha256: str | None = None,
        teacher_nodes: Mapping[str, str] | None = None,
        name: str = "task",
    ):
        self.data = data
        self.teacher = freeze(teacher.to(data.device))
        self.new_student = new_student
        self.proxy = (proxy or ProxySettings()).for_pool(data.pool.shape[0])
        self.space = space or SearchSpace()
        self._test = test
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.use_cache = use_cache
        self.teacher_sha256 = teacher_sha256 or state_dict_sha256(self.teacher)
        self.teacher_nodes = dict(teacher_nodes) if teacher_nodes else None
        self.name = name
        self._rejection_student: tuple[nn.Module, dict[str, Tensor]] | None = None
        input_shape = tuple(data.train_x.shape[1:])
        from kd_optuna.models import knowledge_shapes

        self.teacher_shapes = knowledge_shapes(self.teacher, input_shape)
        self.student_shapes = knowledge_shapes(new_student(), input_shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @functools.cached_property
    def test(self) -> tuple[Tensor, Tensor] | None:
        """The test (images, labels) on the task's device, loaded on first use; None without."""
        test = self._test() if callable(self._test) else self._test
        self._test = None
        if test is None:
            return None
        return test[0].float().to(self.device), test[1].long().to(self.device)

    @functools.cached_property
    def teacher_outputs(self) -> TeacherLookup:
        """The teacher lookup of every trial: cached outputs, or the live teacher."""
        if not self.use_cache:
            return live_teacher(self.teacher, self.data)
        knowledge = knowledge_for(self.space)
        if self.cache_dir is None:
            return CachedTeacher(compute_teacher_outputs(self.teacher, self.data, self.proxy.cache_dtype,
                                                         knowledge=knowledge))
        return cached_teacher(
            self.teacher, self.teacher_sha256, self.teacher_nodes, self.data, self.cache_dir,
            self.proxy.cache_dtype, knowledge=knowledge,
        )

    @functools.cached_property
    def reference(self) -> TeacherReference:
        return TeacherReference.compute(self.teacher, self.data, self.proxy)

    @functools.cached_property
    def rejection_batch(self) -> RejectionBatch:
        return RejectionBatch.build(self.data, self.teacher_outputs, self.proxy)

    def make_distiller(self, spec: DistillerSpec | None, check_finite: bool = False) -> nn.Module:
        """The DistillerLoss of ``spec`` on the task's shapes (None: no distillation)."""
        if spec is None:
            return NoDistillation()
        return DistillerLoss(spec, self.student_shapes, self.teacher_shapes, check_finite).to(self.device)

    def make_probe(self, spec: DistillerSpec) -> nn.Module:
        """The loss of ``spec`` with the teacher's shapes on both sides (for the repulsion check)."""
        return DistillerLoss(spec, self.teacher_shapes, self.teacher_shapes, True).to(self.device)

    def rejection_student(self) -> nn.Module:
        """One student kept for rejection checks, reset to its first-seed initial weights."""
        if self._rejection_student is None:
            torch.manual_seed(self.proxy.seeds[0])
            student = self.new_student()
            state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            self._rejection_student = (student, state)
        student, state = self._rejection_student
        student.load_state_dict(state)
        return student

    def reject(self, spec: DistillerSpec) -> Rejection | None:
        """The loss-rejection protocol (kd_optuna.proxy.rejection) for ``spec``."""
        return reject(spec, self.make_distiller, self.make_probe, self.rejection_student,
                      self.rejection_batch, self.proxy)

    def run(
        self,
        spec: DistillerSpec | None,
        settings: ProxySettings | None = None,
        report: Callable[[int, float], None] | None = None,
        on_test: bool = False,
    ) -> ProxyResult:
        """Train and score a proxy student with ``spec`` (None: CE only) under ``settings``.

        ``settings`` may differ from the task's in training fields (steps, seeds, lr...), not
        in the data fields that the cache depends on. ``on_test`` scores CE and accuracy on
        the test split.
        """
        settings = (settings or self.proxy).for_pool(self.data.pool.shape[0])
        if settings.data_key() != self.proxy.data_key():
            raise KdOptunaError("run() settings must keep the task's data settings; build another Task")
        test = None
        if on_test:
            if self.test is None:
                raise KdOptunaError("this task has no test split; give Task(test=(images, labels))")
            test = self.test
        return run_proxy(self.new_student, lambda: self.make_distiller(spec), self.data,
                         self.teacher_outputs, self.reference, settings, report, test)

    @classmethod
    def from_config(
        cls,
        config: Any,
        device: str | None = None,
        cache_dir: Path = Path(".kd_optuna_cache"),
    ) -> "Task":
        """Build the task a study config names, on ``device`` (CUDA when present, else CPU).

        ``config.teacher.checkpoint`` None: a teacher is trained once with
        ``kd_optuna.train.teachers.train_teacher`` and kept under ``cache_dir`` (see that function).
        """
        from kd_optuna.data import load_dataset
        from kd_optuna.models import build_model, tap_model
        from kd_optuna.train.classifier import default_device

        target = default_device(device)
        splits = load_dataset(config.data.dataset, root=config.data.root, download=config.data.download,
                              image_size=config.data.image_size, val_fraction=config.data.val_fraction)
        num_classes = splits.num_classes
        settings: ProxySettings = config.proxy
        if splits.has_pixels:  # 8-bit images stay uint8 on the device: a quarter of float32
            train_x, train_y = splits.pixels("train")
            stats = (splits.mean, splits.std)
        else:
            (train_x, train_y), stats = splits.tensors("train"), None
        val_x, val_y = splits.tensors("val")
        data = ProxyData.build(train_x, train_y, val_x, val_y, settings, target, num_classes, pixel_stats=stats)

        teacher_model = _load_teacher(config, num_classes, target, Path(cache_dir))
        teacher = tap_model(teacher_model, config.teacher.model, nodes=config.teacher.nodes)
        student_name, student_nodes = config.student.model, config.student.nodes

        def new_student() -> nn.Module:
            model = build_model(student_name, num_classes)
            return tap_model(model, student_name, nodes=student_nodes).to(target)

        return cls(
            data, teacher, new_student, settings, config.space, test=lambda: splits.tensors("test"), cache_dir=Path(cache_dir),
            teacher_nodes=teacher.nodes, name=f"{config.data.dataset}:{config.teacher.model}->{student_name}",
        )


def unkeyed_teacher_path(cache_dir: Path, dataset: str, model_name: str) -> Path:
    """``cache_dir/teacher-<dataset>-<model>.pt``, where ``kd-optuna train-teacher`` without
    ``-o`` writes; the model name with each character outside ``[A-Za-z0-9_.-]`` as ``_``
    (``torchvision:resnet18`` -> ``torchvision_resnet18``), as in the keyed names beside it."""
    import re

    safe_model = re.sub(r"[^\w.-]", "_", model_name)
    return Path(cache_dir) / f"teacher-{dataset}-{safe_model}.pt"


def cached_teacher_checkpoint(dataset: str, model_name: str, cache_dir: Path, root=None,
                              download: bool = False, device: str | None = None, *, seed: int = 0,
                              image_size: int | None = None, val_fraction: float | None = None,
                              training: Mapping[str, Any] | None = None,
                              progress: bool = False) -> Path:
    """A teacher trained with ``kd_optuna.train.teachers.train_teacher``, once per cache folder and key.

    The checkpoint is ``cache_dir/teacher-<dataset>-<model>-<key>.pt``, ``key`` naming all
    that changes the weights (``kd_optuna.train.teachers.teacher_identity``: data root and a
    fingerprint of its files, class folders, ``image_size`` and ``val_fraction``, model, recipe with the
    ``training`` overrides, ``seed``), so a study on other data never gets another study's
    teacher. A checkpoint at the older name ``teacher-<dataset>-<model>.pt`` (what
    ``kd-optuna train-teacher`` writes) is reused only when its metadata records the same key. A reuse says so in one line, with
    the path, once per command: a checkpoint this process or the process that started it
    (``kd-optuna optimize``'s parent, for its workers) already named or trained is reused
    silently (``_first_mention``). Workers starting at once wait on a lock while the first
    trains it (train_teacher writes it atomically). ``progress``: an epoch bar on stderr while
    training.
    """
    from kd_optuna.files import file_lock
    from kd_optuna.train.teachers import train_teacher

    overrides = dict(training or {})
    if download:
        from kd_optuna.data import load_dataset

        load_dataset(dataset, root=root, download=True, seed=seed)
    cached = _CachedTeacher(dataset, model_name, cache_dir, root, seed, image_size, val_fraction, overrides)
    path, legacy = cached.path, cached.legacy

    def reuse(found: Path) -> Path:
        if _first_mention(found):
            log.warning("reusing the cached teacher %s, trained on %s with seed %d: %s", model_name, cached.source,
                        seed, found)
        return found

    found = cached.find()
    if found is not None:
        return reuse(found)
    with file_lock(path.with_name(path.name + ".lock")):
        if path.exists():
            return reuse(path)
        if legacy.is_file():
            log.warning("not reusing %s: it was not trained on %s with this recipe and seed %d", legacy, cached.source,
                        seed)
        log.warning("no teacher checkpoint given: training %s on %s with seed %d into %s", model_name, cached.source,
                    seed, path)
        report = train_teacher(dataset, model_name, path, root=root, download=download, device=device,
                               progress=progress, seed=seed, image_size=image_size, val_fraction=val_fraction,
                               **overrides)
        log.warning("trained the teacher %s: test top-1 %.2f%%, val top-1 %.2f%%", model_name,
                    100 * report.test_accuracy, 100 * report.val_accuracy)
        if report.stale_batch_norm is not None:
            log.warning("note: %s; the search distils from it as it is, so train one longer with `kd-optuna "
                        "train-teacher CONFIG --epochs N -o teacher.pt` and give checkpoint = \"teacher.pt\" "
                        "under [teacher]", report.stale_batch_norm)
        _first_mention(path)  # trained here: its later loads in this command need no line
    return path


@dataclasses.dataclass
class _CachedTeacher:
    """Where :func:`cached_teacher_checkpoint` keeps the teacher of these settings: ``path``
    (named by the key of ``teacher_identity``) or, from before the key, ``legacy``."""

    dataset: str
    model_name: str
    cache_dir: Path
    root: Any
    seed: int
    image_size: int | None
    val_fraction: float | None
    overrides: dict

    def __post_init__(self) -> None:
        from kd_optuna.train.teachers import teacher_identity, teacher_key

        identity = teacher_identity(self.dataset, self.model_name, self.root, seed=self.seed,
                                    image_size=self.image_size, val_fraction=self.val_fraction, **self.overrides)
        self.key = teacher_key(identity)
        self.legacy = unkeyed_teacher_path(Path(self.cache_dir), self.dataset, self.model_name)
        self.path = self.legacy.with_name(f"{self.legacy.stem}-{self.key[:16]}.pt")
        self.source = (f"{self.dataset} from {identity['root']} ({identity['file_count']} files)" if "root" in identity
                       else f"{self.dataset} (embedded data)")

    def find(self) -> Path | None:
        """The checkpoint trained with these settings, if the cache holds one."""
        from kd_optuna.train.checkpoints import CheckpointError, read_checkpoint

        if self.path.exists():
            return self.path
        if not self.legacy.is_file():
            return None
        try:
            _, meta = read_checkpoint(self.legacy)
        except CheckpointError:
            return None
        return self.legacy if (meta or {}).get("cache_key") == self.key else None


def find_config_teacher(config: Any, cache_dir: Path) -> Path | None:
    """The cached teacher a study config's search used (:func:`config_teacher_checkpoint`),
    if ``cache_dir`` holds it; nothing is trained or downloaded."""
    data = config.data
    try:
        return _CachedTeacher(data.dataset, config.teacher.model, Path(cache_dir), data.root, 0, data.image_size,
                              data.val_fraction, {}).find()
    except (KdOptunaError, OSError):
        return None


#: The teacher checkpoints this command has already named, as absolute paths joined by
#: os.pathsep: kept in the environment, so that the processes a command starts after naming
#: one (``kd-optuna optimize``'s workers) inherit what their parent said.
SAID_ENV = "KD_OPTUNA_TEACHERS_SAID"


def _first_mention(path: Path) -> bool:
    """True the first time this command (this process or the one that started it) names the
    teacher checkpoint ``path``; marks it named."""
    key = str(Path(path).resolve())
    said = [p for p in os.environ.get(SAID_ENV, "").split(os.pathsep) if p]
    if key in said:
        return False
    os.environ[SAID_ENV] = os.pathsep.join([*said, key])
    return True


def config_teacher_checkpoint(config: Any, cache_dir: Path, device: str | None = None, progress: bool = False) -> Path:
    """:func:`cached_teacher_checkpoint` of a study config's ``[teacher]`` on its ``[data]``."""
    data = config.data
    return cached_teacher_checkpoint(data.dataset, config.teacher.model, cache_dir, data.root, data.download, device,
                                     image_size=data.image_size, val_fraction=data.val_fraction, progress=progress)


def _load_teacher(config: Any, num_classes: int, device: torch.device, cache_dir: Path) -> nn.Module:
    from kd_optuna.train.checkpoints import load_model

    checkpoint = config.teacher.checkpoint
    if checkpoint is None:
        checkpoint = config_teacher_checkpoint(config, cache_dir, str(device))
    model, _ = load_model(checkpoint, config.teacher.model, num_classes, device)
    return model
