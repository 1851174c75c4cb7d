"""Full training with a distiller: the function the exported script calls (seed F.1 / F.2).

SGD with momentum, lr x ``gamma`` at each milestone epoch, loss ``CE(student logits, labels) +
distiller(student, teacher, labels)`` on the train split, top-1 on the val split after each
epoch (on the test split once, after the last), a checkpoint of student, distiller adapters,
optimiser and scheduler each epoch (``resume`` continues from it), the best student (by val
top-1) kept apart.

``method`` swaps the distiller for a reference method on the same settings (:data:`METHODS`):
``searched`` (the trial's spec, the default), ``kd`` (Hinton's KD as a spec), ``pkt``, ``rkd``,
``crd`` (``kd_optuna.distill.baselines``; CRD reads each sample's index in the train split) or ``dml``
(a peer student trained beside the student, no teacher). The term is added to the student's CE.
The script itself is written by :mod:`kd_optuna.export.script`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from pathlib import Path
from typing import Any, Iterator

from kd_optuna.distill.baselines import METHOD_DESCRIPTIONS
from kd_optuna.errors import KdOptunaError, TrainingDiverged
from kd_optuna.files import LockHeld, atomic_save, file_lock

log = logging.getLogger(__name__)

#: ``--method`` choices: the term added to the student's cross-entropy.
METHODS: dict[str, str] = {
    "searched": "the exported trial's distiller",
    "kd": "vanilla KD (Hinton et al. 2015): T^2 KL(softmax(t/4) || softmax(s/4)), T 4",
    **METHOD_DESCRIPTIONS,
}

#: The recipe length the baselines' published warm-ups were set for (CIFAR-100, 240 epochs):
#: a warm-up of w epochs there becomes round(w * epochs / 240) epochs (at least 1) here.
PUBLISHED_EPOCHS = 240

def train_with_distiller(
    spec_params: dict[str, Any],
    *,
    epochs: int, batch_size: int, lr: float, momentum: float, weight_decay: float, milestones: list[int], gamma: float,
    num_workers: int, seed: int,
    dataset: str, data_root: str | None, download: bool, image_size: int | None = None,
    val_fraction: float | None = None,
    teacher: str, teacher_checkpoint: str | None, student: str,
    device: str, output_dir: str,
    method: str = "searched", max_steps: int | None = None, resume: bool = False, overwrite: bool = True,
    progress: bool = True, epoch_lines: bool | None = None,
    cache_dir: str = ".kd_optuna_cache", split_seed: int = 0,
    teacher_nodes: dict[str, str] | None = None, student_nodes: dict[str, str] | None = None,
    download_hint: str | None = None,
) -> dict[str, Any]:
    """Train ``student`` with CE plus the ``method``'s term; return final/best top-1.

    Each epoch: for every batch (x, y, index) of the train split, ``loss = CE(s_logit, y) +
    term`` where ``term = distiller(s, t, y[, index])`` with s, t the tapped outputs {feat,
    emb, logit} of student and (frozen, eval-mode) teacher, or for ``dml`` the peer's KL term
    (the peer steps first); SGD step; then the lr schedule; then test top-1. ``max_steps``
    (smoke tests) ends each epoch after that many batches. Writes ``output_dir/last.pt``
    (everything to resume), ``output_dir/best_student.pt`` (the best val top-1) and, at the
    end, ``output_dir/last_student.pt`` (the student whose test top-1 is returned), the two
    students in our checkpoint format, all atomically. The history holds per epoch the mean ``loss``, ``ce`` and ``term``.
    ``overwrite=False`` (the exported script) refuses, before anything is loaded, to start a
    fresh run in an ``output_dir`` that holds one, which the new run would replace epoch by epoch.
    ``download_hint``: how the caller's user asks for the dataset's download, said when it is
    missing (None: the study config's ``download = true``; the exported script gives its flag).
    ``image_size``: an image folder's crop (``kd_optuna.data.load_dataset``; None: 224);
    ``val_fraction``: the share of CIFAR's or an image folder's train images held out as val, for
    picking ``best_student.pt`` (None: ``kd_optuna.data.VAL_FRACTION``).
    ``progress`` draws each epoch's progress bar; ``epoch_lines`` (None: as ``progress``) prints,
    after each epoch, its mean loss split into CE and the term, and the val top-1, and at the end
    a stale-BatchNorm note (the exported script keeps them without the bars, for logs).
    """
    import torch

    from kd_optuna.data import load_dataset
    from kd_optuna.models import build_model, tap_model
    from kd_optuna.space import DistillerSpec
    from kd_optuna.train.devices import WorkerContext
    from kd_optuna.train.engine import train_epochs

    _check_arguments(epochs, batch_size, method, max_steps, seed)
    _check_milestones(milestones, epochs)
    _check_image_size(dataset, image_size)
    _check_val_fraction(dataset, val_fraction)
    with _only_run_in(Path(output_dir)):
        if not (resume or overwrite):
            _check_no_earlier_run(Path(output_dir))
        target = torch.device(WorkerContext(0, 1, device).torch_device())
        _say_late_milestones(milestones, epochs)
        spec = DistillerSpec.from_params(spec_params)
        torch.manual_seed(seed)
        hint = {} if download_hint is None else {"download_hint": download_hint}
        splits = load_dataset(dataset, root=data_root, download=download, seed=split_seed, image_size=image_size,
                              val_fraction=val_fraction, val_fraction_key="--val-fraction", **hint)
        num_classes = splits.num_classes
        _check_models(student, None if method == "dml" else teacher, num_classes, dataset,
                      tuple(splits.input_shape), student_nodes, teacher_nodes)
        tapped_teacher = None if method == "dml" else _frozen_teacher(
            teacher, num_classes, target, checkpoint=teacher_checkpoint, nodes=teacher_nodes,
            dataset=dataset, data_root=data_root, download=download, image_size=image_size, val_fraction=val_fraction,
            cache_dir=cache_dir)
        tapped_student = tap_model(build_model(student, num_classes), student, nodes=student_nodes).to(target)
        sgd = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "milestones": milestones, "gamma": gamma}
        term = build_method_term(
            method, spec, tapped_student, tapped_teacher, tuple(splits.input_shape),
            num_data=len(splits.train), student_name=student, num_classes=num_classes, sgd=sgd, device=target,
            epochs=epochs,
        )
        optimizer, scheduler = _milestone_sgd(list(tapped_student.parameters()) + list(term.parameters()), **sgd)
        loaders = (_indexed_loader(splits, batch_size, num_workers, seed, pin_memory=target.type == "cuda"),
                   splits.loader("val", max(batch_size, 256), shuffle=False, num_workers=0))
        run = _FullTraining(tapped_student, tapped_teacher, term, optimizer, scheduler, loaders, spec=spec, method=method,
                            out=Path(output_dir), device=target, seed=seed, epochs=epochs, progress=progress,
                            epoch_lines=progress if epoch_lines is None else epoch_lines,
                            meta={"model_name": student, "num_classes": num_classes, "dataset": dataset})
        test_loader = splits.loader("test", max(batch_size, 256), shuffle=False, num_workers=0)
        start_epoch = run.resume() if resume else 0
        train_epochs(optimizer, run.epoch_batches, run.loss, epochs=epochs, first_epoch=start_epoch,
                     max_steps=max_steps, hooks=run.hooks())
        return run.results(test_loader)


@contextlib.contextmanager
def _only_run_in(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the run, so that a second run into ``out`` (whose checkpoints
    would overwrite this one's, epoch by epoch) is refused instead of mixing the two. The lock
    file is removed when the run ends, and so are the folders this run created (``out`` and
    its missing parents, such as the default ``kd_optuna_runs/``) where it left them empty (it
    failed first)."""
    if out.exists() and not out.is_dir():
        raise KdOptunaError(f"--output-dir {out} is a file; give a folder for the run's checkpoints")
    lock = out / ".lock"
    created = list(itertools.takewhile(lambda folder: not folder.exists(), (out, *out.absolute().parents)))
    try:
        with file_lock(lock, wait=False):
            try:
                yield
            finally:
                lock.unlink(missing_ok=True)
                for folder in created:  # the deepest first
                    if any(folder.iterdir()):
                        break
                    folder.rmdir()
    except LockHeld:
        raise KdOptunaError(f"another run is training into {out}; wait for it to finish or give another --output-dir") from None


def _check_arguments(epochs: int, batch_size: int, method: str, max_steps: int | None, seed: int) -> None:
    if epochs < 1 or batch_size < 1:
        raise KdOptunaError("--epochs and --batch-size must be at least 1")
    if not -2**63 <= seed <= 2**64 - 1 - epochs:  # torch seeds with seed, and epoch e's loader with seed + e
        raise KdOptunaError(f"--seed {seed} is outside torch's 64-bit seed range; give a seed from 0 to 2**63 - 1")
    if method not in METHODS:
        raise KdOptunaError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if max_steps is not None and max_steps < 1:
        raise KdOptunaError(f"--max-steps {max_steps}: give a positive number of batches or leave it out")


def _check_milestones(milestones: list[int], epochs: int) -> None:
    if any(m < 1 for m in milestones):
        raise KdOptunaError(f"--milestones {','.join(map(str, milestones))}: give positive epochs below --epochs "
                            f"{epochs} (the lr is multiplied by --gamma after each), or none")


def _say_late_milestones(milestones: list[int], epochs: int) -> None:
    """Say in one line which milestones are at or past ``epochs``: the lr is multiplied by gamma
    after epoch m, so they never apply, and a user who shortened ``--epochs`` and kept the
    default milestones would train at a constant lr without knowing it."""
    late = [m for m in milestones if m >= epochs]
    if late:
        log.warning("note: --milestones %s: %s %s not before the last of --epochs %d, so the lr never decays there; "
                    "give --milestones below %d", ",".join(map(str, milestones)), ", ".join(map(str, late)),
                    "is" if len(late) == 1 else "are", epochs, epochs)


def _check_no_earlier_run(out: Path) -> None:
    held = [name for name in ("last.pt", "best_student.pt", "last_student.pt") if (out / name).exists()]
    if held:
        raise KdOptunaError(
            f"--output-dir {out} holds an earlier run ({', '.join(held)}), which a fresh run would replace: "
            "add --resume to continue it, or give another --output-dir (or delete it) to start over"
        )


def _check_image_size(dataset: str, image_size: int | None) -> None:
    from kd_optuna.data import MIN_IMAGE_SIZE

    if image_size is None:
        return
    if dataset != "imagefolder":
        raise KdOptunaError(f"--image-size crops imagefolder images; {dataset} images have one size: give --image-size none")
    if image_size < MIN_IMAGE_SIZE:
        raise KdOptunaError(f"--image-size {image_size}: give at least {MIN_IMAGE_SIZE} pixels, or none for 224")


def _check_val_fraction(dataset: str, val_fraction: float | None) -> None:
    """Digits' fixed split would silently ignore a val_fraction; its range is the data's check."""
    from kd_optuna.data import FIXED_SPLIT_DATASETS

    if val_fraction is not None and dataset in FIXED_SPLIT_DATASETS:
        raise KdOptunaError(f"--val-fraction holds out part of CIFAR's or an image folder's train split; {dataset} "
                            "has a fixed val split: give --val-fraction none")


def _check_models(student: str, teacher: str | None, num_classes: int, dataset: str,
                  input_shape: tuple[int, int, int], student_nodes: dict[str, str] | None = None,
                  teacher_nodes: dict[str, str] | None = None) -> None:
    """Build ``student`` and ``teacher`` (None: no teacher) once, run a batch of two blank
    ``input_shape`` images through each, tap it and drop it, so an unknown name, a model that
    cannot take the dataset's images (``--student resnet8`` on digits) or tap nodes it lacks
    (``--student resnet18`` with a MobileNet's ``--student-nodes``) fail in one line before a
    teacher is trained; the global torch RNG is left as it was."""
    import torch

    from kd_optuna.models import TapError, build_model, forward_error, input_mismatch, tap_model

    any_size = dataset == "imagefolder"  # crops of any size; the other datasets have one
    wanted = f"a model for {input_shape[0]}-channel images" if any_size else f"a {dataset} model"
    with torch.random.fork_rng(devices=[]):
        for flag, name, nodes in (("--student", student, student_nodes), ("--teacher", teacher, teacher_nodes)):
            if name is None:
                continue
            model = build_model(name, num_classes)
            mismatch = input_mismatch(name, input_shape, any_size)
            if mismatch:
                raise KdOptunaError(f"{flag} {name} {mismatch} but {dataset} images are {tuple(input_shape)}; "
                                    f"give {wanted} with {flag}")
            error = forward_error(model, input_shape)
            if error:
                other_size = " or another --image-size" if any_size else ""
                raise KdOptunaError(f"{flag} {name} cannot take {dataset} images of {tuple(input_shape)} ({error}); "
                                    f"give {wanted} with {flag}{other_size}")
            try:
                tap_model(model, name, nodes=nodes)
            except TapError as exc:
                example = '{"feat": "...", "emb": "...", "logit": "..."}'
                raise KdOptunaError(f"{flag} {name}: {exc}; give its nodes with {flag}-nodes '{example}' "
                                    f"(or {flag}-nodes none where kd-optuna knows them)") from None


def _frozen_teacher(teacher: str, num_classes: int, device: Any, *, checkpoint: str | None,
                    nodes: dict[str, str] | None, dataset: str, data_root: str | None, download: bool,
                    image_size: int | None, val_fraction: float | None, cache_dir: str) -> Any:
    """The tapped ``teacher`` in eval mode without gradients, on ``device``, loaded from
    ``checkpoint``; with none, from the teacher cache in ``cache_dir`` (trained there first if
    missing, on ``dataset``)."""
    from kd_optuna.models import tap_model
    from kd_optuna.train.checkpoints import load_model

    if checkpoint is None:
        from kd_optuna.proxy.task import cached_teacher_checkpoint

        checkpoint = str(cached_teacher_checkpoint(
            dataset, teacher, Path(cache_dir), root=data_root, download=download, device=str(device),
            image_size=image_size, val_fraction=val_fraction,
        ))
    model, _ = load_model(checkpoint, teacher, num_classes, device)
    tapped = tap_model(model, teacher, nodes=nodes).to(device).eval()
    for p in tapped.parameters():
        p.requires_grad_(False)
    return tapped


def _milestone_sgd(params: list, *, lr: float, momentum: float, weight_decay: float, milestones: list[int],
                   gamma: float) -> tuple[Any, Any]:
    """(SGD(params, lr, momentum, weight_decay), the MultiStepLR that multiplies lr by ``gamma``
    at each epoch of ``milestones``)."""
    import torch

    from kd_optuna.train.engine import make_optimizer

    optimizer = make_optimizer("sgd", params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)


#: What ``last.pt`` holds (written at each epoch's end by :meth:`_FullTraining.epoch_end`).
_LAST_KEYS = ("spec", "student", "distiller", "optimizer", "epoch", "best_top1", "best_epoch", "history")


class _FullTraining:
    """The state and engine hooks of :func:`train_with_distiller`: the batches and loss of an
    epoch, the running means, and at each epoch's end the lr schedule, val top-1, the best
    student and ``last.pt`` (which :meth:`resume` reads back)."""

    def __init__(self, student, teacher, term, optimizer, scheduler, loaders, *, spec, method, out, device, seed,
                 epochs, progress, epoch_lines, meta):
        self.student, self.teacher, self.term = student, teacher, term
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.val_loader = loaders
        self.spec, self.method, self.out, self.device, self.seed = spec, method, out, device, seed
        self.epochs, self.progress, self.epoch_lines, self.meta = epochs, progress, epoch_lines, meta
        self.best_top1, self.best_epoch, self.history = -1.0, 0, []
        self.epoch, self.bar, self.totals, self.seen, self.parts = 0, None, {}, 0, ()

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    def results(self, test_loader) -> dict[str, Any]:
        """What :func:`train_with_distiller` returns: the student's top-1 on ``test_loader`` now
        (``final_top1``), the last and best val top-1, the best epoch, the history, and
        ``stale_batch_norm``: a sentence when the training was too short for the student's
        BatchNorm statistics (:func:`kd_optuna.train.batch_norm.stale_note`), else None. The
        student now, whose test top-1 is reported, is saved as ``last_student.pt``."""
        from kd_optuna.train.checkpoints import save_checkpoint

        from kd_optuna.train.batch_norm import stale_note

        history = self.history
        final_top1 = _top1(self.student, test_loader, self.device)
        note = stale_note(self.student, "the student's")
        if self.epoch_lines and note is not None:
            from tqdm.auto import tqdm

            tqdm.write(f"note: {note} (--epochs)")
        save_checkpoint(
            self.out / "last_student.pt", self.student.model, **self.meta, accuracy=final_top1,
            extra={"distiller": self.spec.key if self.method == "searched" else self.method,
                   "epoch": history[-1]["epoch"] if history else 0, "chosen_on": "last epoch", "accuracy_on": "test"},
        )
        return {
            "final_top1": final_top1,
            "final_val_top1": history[-1]["val_top1"] if history else None,
            "best_val_top1": self.best_top1, "best_epoch": self.best_epoch, "history": history,
            "stale_batch_norm": note,
        }

    def hooks(self):
        from kd_optuna.train.engine import Hooks

        return Hooks(epoch_start=self.epoch_start, after_loss=self.check, after_step=self.add, epoch_end=self.epoch_end)

    def resume(self) -> int:
        """Load ``last.pt`` into the models, term, optimiser and schedules; the epoch to start at.

        A ``last.pt`` that cannot be read (empty, truncated, not ours) or whose weights do not fit
        this run's student, teacher or dataset is refused in one line, saying how to start over."""
        import torch

        from kd_optuna.train.checkpoints import LOAD_ERRORS

        if not self.last_path.is_file():
            raise KdOptunaError(f"--resume: no checkpoint {self.last_path}; run without --resume first")
        start_over = "run without --resume to start over, or give another --output-dir"
        try:
            state = torch.load(self.last_path, map_location=self.device, weights_only=True)
        except LOAD_ERRORS as exc:
            raise KdOptunaError(f"--resume: {self.last_path} cannot be read ({type(exc).__name__}: it is empty, "
                                f"truncated or not a training checkpoint); {start_over}") from None
        missing = [key for key in _LAST_KEYS if not isinstance(state, dict) or key not in state]
        if missing:
            raise KdOptunaError(f"--resume: {self.last_path} is not a checkpoint of this training "
                                f"(it lacks {', '.join(missing)}); {start_over}")
        if state.get("method", "searched") != self.method:
            raise KdOptunaError(
                f"--resume: {self.last_path} was written by --method {state.get('method', 'searched')}; "
                "use the same --method or another --output-dir"
            )
        if self.method == "searched" and state.get("spec") != self.spec.to_json():
            raise KdOptunaError(f"--resume: {self.last_path} was written for another distiller; use another --output-dir")
        if int(state["epoch"]) > self.epochs:
            raise KdOptunaError(f"--resume: {self.last_path} is at epoch {int(state['epoch'])}, past --epochs "
                                f"{self.epochs}; give --epochs {int(state['epoch'])} or more")
        try:
            self.student.model.load_state_dict(state["student"])
            self.term.load_state_dict(state["distiller"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise KdOptunaError(f"--resume: {self.last_path} holds weights that do not fit this run's student, "
                                f"teacher or dataset ({type(exc).__name__}); use the settings it was trained "
                                f"with, or {start_over}") from None
        self.scheduler.last_epoch = int(state["epoch"])
        self.term.resume_schedule(int(state["epoch"]))
        self.best_top1, self.best_epoch = float(state["best_top1"]), int(state["best_epoch"])
        self.history = list(state["history"])
        self._restore_random_state(state)
        return int(state["epoch"])

    def epoch_start(self, epoch: int) -> None:
        if self.train_loader.generator is not None:
            self.train_loader.generator.manual_seed(self.seed + epoch)
        self.student.train()
        self.term.train()
        self.term.epoch_start(epoch)
        self.totals, self.seen = {"loss": 0.0, "ce": 0.0, "term": 0.0}, 0

    def epoch_batches(self, epoch: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch",
                        disable=not self.progress, leave=False)
        self.epoch = epoch
        return self.bar

    def loss(self, batch):
        """``ce_weight * CE(s_logit, y) + term``, the teacher run without gradients."""
        import torch
        import torch.nn.functional as F

        x, y, index = batch
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        t_out = None
        if self.teacher is not None:
            with torch.no_grad():
                t_out = self.teacher(x)
        s_out = self.student(x)
        ce = F.cross_entropy(s_out["logit"], y)
        extra = self.term(x, y, index.to(self.device), s_out, t_out)
        self.parts = (ce, extra)
        return self.term.ce_weight * ce + extra

    def check(self, step: int, loss) -> None:
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(f"the loss became {loss.item()} in epoch {self.epoch + 1}")

    def add(self, step: int, loss, batch) -> None:
        for name, value in (("loss", loss), ("ce", self.parts[0]), ("term", self.parts[1])):
            self.totals[name] += value.item() * len(batch[1])
        self.seen += len(batch[1])
        self.bar.set_postfix(loss=f"{self.totals['loss'] / self.seen:.4f}")

    def epoch_end(self, epoch: int) -> None:
        self.scheduler.step()
        self.term.epoch_end()
        val_top1 = _top1(self.student, self.val_loader, self.device)
        if val_top1 > self.best_top1:
            self.best_top1, self.best_epoch = val_top1, epoch + 1
            self._save_best(epoch, val_top1)
        means = {name: total / max(1, self.seen) for name, total in self.totals.items()}
        self.history.append({"epoch": epoch + 1, **means, "val_top1": val_top1})
        if self.epoch_lines:
            from tqdm.auto import tqdm

            tqdm.write(
                f"epoch {epoch + 1}/{self.epochs}: loss {means['loss']:.4f} (CE {means['ce']:.4f} + {self.method} "
                f"{means['term']:.4f})  val top-1 {100 * val_top1:.2f}%"
            )
        atomic_save({
            "spec": self.spec.to_json(),
            "method": self.method,
            "student": self.student.model.state_dict(),
            "distiller": self.term.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch + 1,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "history": self.history,
            **self._random_state(),
        }, self.last_path)

    def _random_state(self) -> dict[str, Any]:
        """torch's global generator (and the device's, on CUDA) as the next epoch will find it:
        augmentations, dropout and random transforms (``mask``, ``drop``) draw from it."""
        import torch

        state = {"rng_state": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)
        return state

    def _restore_random_state(self, state: dict) -> None:
        """Put back what :meth:`_random_state` saved, so a resumed run draws what an uninterrupted
        one would (a ``last.pt`` without it, from before it was saved, leaves the generators)."""
        import torch

        if "rng_state" in state:
            torch.set_rng_state(state["rng_state"].cpu())
        if "cuda_rng_state" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng_state"].cpu(), self.device)

    def _save_best(self, epoch: int, val_top1: float) -> None:
        from kd_optuna.train.checkpoints import save_checkpoint

        save_checkpoint(
            self.out / "best_student.pt", self.student.model, **self.meta, accuracy=val_top1,
            extra={"distiller": self.spec.key if self.method == "searched" else self.method, "epoch": epoch + 1,
                   "chosen_on": "val"},
        )


class MethodTerm:
    """What a ``--method`` adds to the student's CE, and the state it trains and checkpoints.

    ``loss`` (a ``DistillerLoss`` or a ``kd_optuna.distill.baselines`` loss, trained with the student:
    ``parameters()``) is called as ``loss(s, t, labels)``, or with ``index`` (N,) when it
    ``needs_index`` (CRD). ``mutual`` (DML) instead steps its peer on the batch and returns
    the student's KL term; the peer has its own SGD and lr schedule (``epoch_end``).
    """

    def __init__(self, name: str, loss=None, mutual=None, peer_scheduler=None):
        self.name = name
        self.loss = loss
        self.mutual = mutual
        self.peer_scheduler = peer_scheduler

    def __call__(self, images, labels, index, student_out, teacher_out):
        """The 0-dim term for a batch: images (N, C, H, W), labels (N,), index (N,) into the
        train split, tapped outputs {feat, emb, logit} (``teacher_out`` None for dml)."""
        if self.mutual is not None:
            return self.mutual.mutual_term(images, labels, student_out["logit"])
        if getattr(self.loss, "needs_index", False):
            return self.loss(student_out, teacher_out, labels, index)
        return self.loss(student_out, teacher_out, labels)

    def parameters(self) -> list:
        return [] if self.loss is None else list(self.loss.parameters())

    def train(self) -> None:
        if self.loss is not None:
            self.loss.train()

    @property
    def ce_weight(self) -> float:
        """The weight of the student's CE in the method's published recipe (0.1 for kd+ls, else 1)."""
        return float(getattr(self.loss, "ce_weight", 1.0))

    def epoch_start(self, epoch: int) -> None:
        """Tell the loss the 0-based epoch about to run (DKD's warm-up reads it)."""
        if self.loss is not None and hasattr(self.loss, "set_epoch"):
            self.loss.set_epoch(epoch)

    def epoch_end(self) -> None:
        if self.peer_scheduler is not None:
            self.peer_scheduler.step()

    def resume_schedule(self, epoch: int) -> None:
        if self.peer_scheduler is not None:
            self.peer_scheduler.last_epoch = epoch

    def state_dict(self) -> dict:
        if self.mutual is not None:
            return {"peer": self.mutual.peer.state_dict(), "peer_optimizer": self.mutual.optimizer.state_dict()}
        return self.loss.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.mutual is not None:
            self.mutual.peer.load_state_dict(state["peer"])
            self.mutual.optimizer.load_state_dict(state["peer_optimizer"])
        else:
            self.loss.load_state_dict(state)


def build_method_term(
    method: str,
    spec: Any,
    tapped_student: Any,
    tapped_teacher: Any,
    input_shape: tuple[int, ...],
    *,
    num_data: int,
    student_name: str,
    num_classes: int,
    sgd: dict[str, Any],
    device: Any,
    epochs: int = PUBLISHED_EPOCHS,
) -> MethodTerm:
    """The :class:`MethodTerm` of ``method`` (a key of :data:`METHODS`) for these tapped models.

    ``searched`` uses ``spec``; ``kd`` the spec ``CLASSICS["kd"]``; every other loss method
    ``build_baseline`` with ``num_data`` = size of the train split and its published warm-up
    scaled to ``epochs`` (see PUBLISHED_EPOCHS); dml a fresh peer ``student_name`` with
    SGD(lr, momentum, weight_decay) and MultiStepLR(milestones, gamma) from ``sgd``
    (``tapped_teacher`` may then be None).
    """
    import torch

    from kd_optuna.train.engine import make_optimizer
    from kd_optuna.models import build_model, knowledge_shapes, tap_model

    if method not in METHODS:
        raise KdOptunaError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "dml":
        from kd_optuna.distill.baselines import MutualLearning

        peer = tap_model(build_model(student_name, num_classes), student_name,
                         nodes=getattr(tapped_student, "nodes", None)).to(device)
        optimizer = make_optimizer(
            "sgd", peer.parameters(), lr=sgd["lr"], momentum=sgd["momentum"], weight_decay=sgd["weight_decay"],
            nesterov=False,
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(sgd["milestones"]), gamma=sgd["gamma"])
        return MethodTerm(method, mutual=MutualLearning(peer, optimizer), peer_scheduler=scheduler)
    student_shapes = knowledge_shapes(tapped_student, input_shape)
    teacher_shapes = knowledge_shapes(tapped_teacher, input_shape)
    if method in ("searched", "kd"):
        from kd_optuna.distill.classics import CLASSICS
        from kd_optuna.distill.loss import DistillerLoss

        chosen = spec if method == "searched" else CLASSICS["kd"][0]
        return MethodTerm(method, loss=DistillerLoss(chosen, student_shapes, teacher_shapes).to(device))
    import inspect

    from kd_optuna.distill.baselines import BASELINES, build_baseline

    options = {}
    warmup = inspect.signature(BASELINES[method]).parameters.get("warmup_epochs")
    if warmup is not None and isinstance(warmup.default, int) and warmup.default > 0:
        options["warmup_epochs"] = max(1, round(warmup.default * epochs / PUBLISHED_EPOCHS))
    loss = build_baseline(method, student_shapes, teacher_shapes, num_data=num_data, **options)
    return MethodTerm(method, loss=loss.to(device))


class IndexedDataset:
    """Items (image, label, i) of ``base``, whose items are (image, label): CRD needs i."""

    def __init__(self, base: Any):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return image, label, i


class _TensorBatches:
    """The batches a shuffled, seeded DataLoader over a TensorDataset yields, by tensor indexing.

    Each epoch one int64 draw (the DataLoader iterator's base seed), then ``order =
    randperm(N, generator)``; batch b is ``(x[order[bB:(b+1)B]], y[...], order[...])``: the
    same draws and the same batches as ``DataLoader(shuffle=True, generator=generator,
    drop_last=lone_last_batch(N, B))`` gives, without collating item by item (for un-augmented
    data already in memory, such as digits).
    """

    def __init__(self, dataset: Any, batch_size: int, generator: Any):
        from kd_optuna.data import lone_last_batch

        self.images, self.labels = dataset.tensors
        self.batch_size = batch_size
        self.generator = generator
        self.end = len(self.labels) - lone_last_batch(len(self.labels), batch_size)

    def __len__(self) -> int:
        return -(-self.end // self.batch_size)

    def __iter__(self):
        import torch

        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # DataLoader's base seed
        order = torch.randperm(len(self.labels), generator=self.generator)
        for start in range(0, self.end, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.images[index], self.labels[index], index


def _indexed_loader(splits: Any, batch_size: int, num_workers: int, seed: int, pin_memory: bool = False):
    """The train loader of ``splits.loader`` (shuffled, seeded, augmented, a last batch of one
    image dropped) yielding (x, y, index); ``pin_memory`` when the batches go to a GPU.

    Its workers are not persistent: each epoch starts them afresh with a base seed drawn from
    the generator that the epoch reseeded (``seed + epoch``), so epoch e's order and augmentations
    depend on (seed, e) alone, the same in a resumed run as in an uninterrupted one (persistent
    workers carried their generators on from epoch to epoch, which a resumed run cannot redo)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from kd_optuna.data import lone_last_batch

    if isinstance(splits.train, TensorDataset) and splits.augmentation == "none":
        return _TensorBatches(splits.train, batch_size, torch.Generator().manual_seed(seed))
    return DataLoader(
        IndexedDataset(splits.train),
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        drop_last=lone_last_batch(len(splits.train), batch_size),
        pin_memory=pin_memory,
    )


def _top1(tapped, loader, device) -> float:
    """Top-1 in [0, 1] of a tapped model's ``logit`` over the (x, y) batches of ``loader``."""
    from kd_optuna.train.engine import evaluate

    return evaluate(tapped, loader, device=device, output="logit").accuracy


