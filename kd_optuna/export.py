"""`kd-optuna export`: a trial's distiller -> a runnable script that trains the student for real.

The script is short: it holds the spec and the settings as JSON *data* (``json.loads`` of
string literals written with ``repr``), turns every setting into an ``argparse`` flag whose
default is the study config's ``[train]`` value, and calls :func:`train_with_distiller`. No text
from the study (its name, user attrs, paths) is ever written as code, so a study name full of
quotes, newlines or Python leaves the script valid and inert.

Full training (seed F.1 / F.2): SGD with momentum, lr x ``gamma`` at each milestone epoch, loss
``CE(student logits, labels) + distiller(student, teacher, labels)`` on the train split, top-1
on the test split after each epoch, a checkpoint of student, distiller adapters, optimiser and
scheduler each epoch (``--resume`` continues from it), the best student kept apart.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from kd_optuna.errors import KdOptunaError

#: The script's settings, in flag order: name -> (type, help).
SETTINGS: dict[str, tuple[str, str]] = {
    "epochs": ("int", "training epochs"),
    "batch_size": ("int", "mini-batch size"),
    "lr": ("float", "initial learning rate (SGD)"),
    "momentum": ("float", "SGD momentum"),
    "weight_decay": ("float", "weight decay"),
    "milestones": ("int_list", "epochs at which the learning rate is multiplied by --gamma"),
    "gamma": ("float", "learning-rate decay factor"),
    "num_workers": ("int", "data-loader worker processes"),
    "seed": ("int", "random seed"),
    "dataset": ("str", "dataset name (digits, cifar10, cifar100, imagefolder)"),
    "data_root": ("str_or_none", "data directory"),
    "download": ("bool", "download the dataset if missing (true/false)"),
    "teacher": ("str", "teacher model name"),
    "teacher_checkpoint": ("str_or_none", "teacher checkpoint (none: train one, cached)"),
    "student": ("str", "student model name"),
    "device": ("str", "auto, cpu, cuda or cuda:N"),
    "output_dir": ("str", "where checkpoints go"),
}

_TEMPLATE = '''#!/usr/bin/env python3
"""Train a student with a distiller found by kd-optuna (written by `kd-optuna export`).

Every setting is a flag (see --help); checkpoints go to --output-dir each epoch and
--resume continues from the last one. The distiller and the defaults below are JSON data.
"""

import argparse
import json

SPEC = json.loads({spec})
DEFAULTS = json.loads({defaults})
SOURCE = json.loads({source})


def _bool(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError("expected true or false")


def _int_list(text):
    return [int(part) for part in text.replace(",", " ").split()]


def _str_or_none(text):
    return None if text.lower() in ("", "none") else text


TYPES = {{"int": int, "float": float, "str": str, "bool": _bool, "int_list": _int_list, "str_or_none": _str_or_none}}
HELP = json.loads({help})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Train the student with the distiller of a kd-optuna trial on the full data; "
        "prints the final and best test top-1.",
    )
    for name, (kind, text) in HELP.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=TYPES[kind], default=DEFAULTS[name],
                            help=text.replace("%", "%%") + " (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="hide the per-epoch progress bars")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from kd_optuna.export import train_with_distiller

    settings = {{name: getattr(args, name) for name in HELP}}
    print("distiller:", SOURCE["formula"])
    result = train_with_distiller(SPEC, resume=args.resume, progress=not args.no_progress, **settings)
    print("final top-1: {{:.2f}}%  best top-1: {{:.2f}}% (epoch {{}})".format(
        100 * result["final_top1"], 100 * result["best_top1"], result["best_epoch"]))


if __name__ == "__main__":
    main()
'''


def script_text(spec_params: dict[str, Any], defaults: dict[str, Any], source: dict[str, Any]) -> str:
    """The script's source; user data appears only inside ``repr``-written JSON literals."""
    missing = [name for name in SETTINGS if name not in defaults]
    if missing:
        raise KdOptunaError(f"export needs defaults for {', '.join(missing)}")
    literal = lambda data: repr(json.dumps(data, sort_keys=True))  # noqa: E731
    return _TEMPLATE.format(
        spec=literal(spec_params),
        defaults=literal({name: defaults[name] for name in SETTINGS}),
        source=literal(source),
        help=literal({name: list(kind_help) for name, kind_help in SETTINGS.items()}),
    )


def script_defaults(config: Any) -> dict[str, Any]:
    """The script's flag defaults from a StudyConfig ([train], [data], [teacher], [student])."""
    train = config.train
    return {
        "epochs": train.epochs,
        "batch_size": train.batch_size,
        "lr": train.lr,
        "momentum": train.momentum,
        "weight_decay": train.weight_decay,
        "milestones": list(train.milestones),
        "gamma": train.gamma,
        "num_workers": train.num_workers,
        "seed": train.seed,
        "dataset": config.data.dataset,
        "data_root": config.data.root,
        "download": config.data.download,
        "teacher": config.teacher.model,
        "teacher_checkpoint": config.teacher.checkpoint,
        "student": config.student.model,
        "device": "auto",
        "output_dir": "kd_optuna_runs/best",
    }


def write_script(path: Path, study_name: str, trial: Any, config: Any) -> Path:
    """Write the training script of ``trial`` (a completed FrozenTrial) to ``path``."""
    from kd_optuna.space import DistillerSpec

    spec = DistillerSpec.from_params(trial.params)
    source = {
        "study": study_name,
        "trial": trial.number,
        "score": trial.value,
        "formula": spec.formula(),
        "key": spec.key,
    }
    text = script_text(spec.to_params(), script_defaults(config), source)
    compile(text, str(path), "exec")
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise KdOptunaError(f"directory {str(path.parent)!r} does not exist; create it or choose another -o")
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    path.chmod(0o755)
    return path


def train_with_distiller(
    spec_params: dict[str, Any],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    milestones: list[int],
    gamma: float,
    num_workers: int,
    seed: int,
    dataset: str,
    data_root: str | None,
    download: bool,
    teacher: str,
    teacher_checkpoint: str | None,
    student: str,
    device: str,
    output_dir: str,
    resume: bool = False,
    progress: bool = True,
    cache_dir: str = ".kd_optuna_cache",
) -> dict[str, Any]:
    """Train ``student`` with the distiller ``spec_params`` and CE; return final/best top-1.

    Each epoch: for every batch (x, y) of the train split, ``loss = CE(s_logit, y) +
    distiller(s, t, y)`` where s, t are the tapped outputs {feat, emb, logit} of student and
    (frozen, eval-mode) teacher; SGD step; then the lr schedule; then test top-1. Writes
    ``output_dir/last.pt`` (everything to resume) and ``output_dir/best_student.pt`` (our
    checkpoint format), both atomically.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from kd_optuna.checkpoints import load_model, save_checkpoint
    from kd_optuna.data import load_dataset
    from kd_optuna.loss import DistillerLoss
    from kd_optuna.models import build_model, knowledge_shapes, tap_model
    from kd_optuna.space import DistillerSpec
    from kd_optuna.workers import WorkerContext

    if epochs < 1 or batch_size < 1:
        raise KdOptunaError("--epochs and --batch-size must be at least 1")
    spec = DistillerSpec.from_params(spec_params)
    target = torch.device(WorkerContext(0, 1, device).torch_device())
    torch.manual_seed(seed)
    splits = load_dataset(dataset, root=data_root, download=download, seed=seed)
    num_classes = splits.num_classes

    if teacher_checkpoint is None:
        from kd_optuna.task import cached_teacher_checkpoint

        teacher_checkpoint = str(cached_teacher_checkpoint(
            dataset, teacher, Path(cache_dir), root=data_root, download=download, device=str(target),
        ))
    teacher_model, _ = load_model(teacher_checkpoint, teacher, num_classes, target)
    tapped_teacher = tap_model(teacher_model, teacher).to(target).eval()
    for p in tapped_teacher.parameters():
        p.requires_grad_(False)
    tapped_student = tap_model(build_model(student, num_classes), student).to(target)
    shape = tuple(splits.input_shape)
    distiller = DistillerLoss(
        spec, knowledge_shapes(tapped_student, shape), knowledge_shapes(tapped_teacher, shape)
    ).to(target)
    params = list(tapped_student.parameters()) + list(distiller.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path = out / "last.pt"
    start_epoch, best_top1, best_epoch, history = 0, -1.0, 0, []
    if resume:
        if not last_path.is_file():
            raise KdOptunaError(f"--resume: no checkpoint {last_path}; run without --resume first")
        state = torch.load(last_path, map_location=target, weights_only=True)
        if state.get("spec") != spec.to_json():
            raise KdOptunaError(f"--resume: {last_path} was written for another distiller; use another --output-dir")
        tapped_student.model.load_state_dict(state["student"])
        distiller.load_state_dict(state["distiller"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.last_epoch = int(state["epoch"])
        start_epoch, best_top1, best_epoch = int(state["epoch"]), float(state["best_top1"]), int(state["best_epoch"])
        history = list(state["history"])

    train_loader = splits.loader("train", batch_size, num_workers=num_workers, seed=seed)
    test_loader = splits.loader("test", max(batch_size, 256), shuffle=False, num_workers=num_workers)
    top1 = best_top1
    for epoch in range(start_epoch, epochs):
        if train_loader.generator is not None:
            train_loader.generator.manual_seed(seed + epoch)
        tapped_student.train()
        distiller.train()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress, leave=False)
        total, seen = 0.0, 0
        for x, y in bar:
            x, y = x.to(target, non_blocking=True), y.to(target, non_blocking=True)
            with torch.no_grad():
                t_out = tapped_teacher(x)
            s_out = tapped_student(x)
            loss = F.cross_entropy(s_out["logit"], y) + distiller(s_out, t_out, y)
            if not math.isfinite(loss.item()):
                raise KdOptunaError(f"the loss became {loss.item()} in epoch {epoch + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        scheduler.step()
        top1 = _top1(tapped_student, test_loader, target)
        if top1 > best_top1:
            best_top1, best_epoch = top1, epoch + 1
            save_checkpoint(
                out / "best_student.pt", tapped_student.model, model_name=student, num_classes=num_classes,
                dataset=dataset, accuracy=top1, extra={"distiller": spec.key, "epoch": epoch + 1},
            )
        history.append({"epoch": epoch + 1, "loss": total / max(1, seen), "top1": top1})
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {total / max(1, seen):.4f}  top-1 {100 * top1:.2f}%")
        _save_atomic(last_path, {
            "spec": spec.to_json(),
            "student": tapped_student.model.state_dict(),
            "distiller": distiller.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "best_top1": best_top1,
            "best_epoch": best_epoch,
            "history": history,
        })
    return {"final_top1": top1, "best_top1": best_top1, "best_epoch": best_epoch, "history": history}


def _top1(tapped, loader, device) -> float:
    import torch

    tapped.eval()
    correct, seen = 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = tapped(x.to(device))["logit"]
            correct += (logits.argmax(1).cpu() == y).sum().item()
            seen += len(y)
    return correct / max(1, seen)


def _save_atomic(path: Path, payload: dict) -> None:
    import torch

    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)
