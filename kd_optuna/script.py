"""`kd-optuna export`: a trial's distiller -> a runnable script that trains the student for real.

The script is short: it holds the spec and the settings as JSON *data* (``json.loads`` of
string literals written with ``repr``), turns every setting into an ``argparse`` flag whose
default is the study config's ``[train]`` value, and calls
:func:`kd_optuna.export.train_with_distiller`. No text from the study (its name, user attrs,
paths) is ever written as code, so a study name full of quotes, newlines or Python leaves the
script valid and inert.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kd_optuna.errors import KdOptunaError
from kd_optuna.export import METHODS

#: The script's settings, in flag order: name -> (type, help).
SETTINGS: dict[str, tuple[str, str]] = {
    "epochs": ("positive_int", "training epochs"),
    "batch_size": ("positive_int", "mini-batch size"),
    "lr": ("positive_float", "initial learning rate (SGD)"),
    "momentum": ("non_negative_float", "SGD momentum"),
    "weight_decay": ("non_negative_float", "weight decay"),
    "milestones": ("int_list", "epochs at which the learning rate is multiplied by --gamma"),
    "gamma": ("positive_float", "learning-rate decay factor"),
    "num_workers": ("non_negative_int", "data-loader worker processes"),
    "seed": ("int", "random seed"),
    "dataset": ("str", "dataset name (digits, cifar10, cifar100, imagefolder)"),
    "data_root": ("str_or_none", "data directory"),
    "download": ("bool", "download the dataset if missing (true/false)"),
    "teacher": ("str", "teacher model name"),
    "teacher_checkpoint": ("str_or_none", "teacher checkpoint (none: train one, cached)"),
    "teacher_nodes": ("nodes", "the teacher's feat/emb/logit nodes as JSON (none: the zoo's)"),
    "student": ("str", "student model name"),
    "student_nodes": ("nodes", "the student's feat/emb/logit nodes as JSON (none: the zoo's)"),
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
import sys

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
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected integers such as 15,22,27") from None


def _str_or_none(text):
    return None if text.lower() in ("", "none") else text


def _nodes(text):
    if text.lower() in ("", "none"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise argparse.ArgumentTypeError('expected JSON such as {{"feat": "layer4", "emb": "flatten", "logit": "fc"}}')
    return value


def _number(kind, low, strict, words):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected " + words) from None
        if value < low or (strict and value == low) or value != value:
            raise argparse.ArgumentTypeError("expected " + words)
        return value

    return parse


_positive_int = _number(int, 0, True, "a positive integer")
TYPES = {{"int": int, "float": float, "str": str, "bool": _bool, "int_list": _int_list, "str_or_none": _str_or_none,
         "nodes": _nodes, "positive_int": _positive_int, "non_negative_int": _number(int, 0, False, "an integer >= 0"),
         "positive_float": _number(float, 0.0, True, "a number > 0"),
         "non_negative_float": _number(float, 0.0, False, "a number >= 0")}}
HELP = json.loads({help})
METHODS = dict(json.loads({methods}))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, "{{}}: error: {{}}; see --help\\n".format(self.prog, message))


def parse_args(argv=None):
    parser = _Parser(
        description="Train the student with the distiller of a kd-optuna trial on the full data; "
        "prints the final and best test top-1.",
    )
    for name, (kind, text) in HELP.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=TYPES[kind], default=DEFAULTS[name],
                            help=text.replace("%", "%%") + " (default: %(default)s)")
    parser.add_argument("--method", choices=list(METHODS), default="searched",
                        help="the term added to the student's CE: "
                        + "; ".join("{{}}: {{}}".format(k, v) for k, v in METHODS.items()).replace("%", "%%")
                        + " (default: %(default)s)")
    parser.add_argument("--max-steps", type=_positive_int, default=None,
                        help="smoke test / debugging: stop each epoch after this many batches")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="hide the per-epoch progress bars")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from kd_optuna.export import train_with_distiller

    from kd_optuna.errors import KdOptunaError

    settings = {{name: getattr(args, name) for name in HELP}}
    print("distiller:", SOURCE["formula"] if args.method == "searched" else args.method)
    try:
        result = train_with_distiller(SPEC, method=args.method, max_steps=args.max_steps, resume=args.resume,
                                      progress=not args.no_progress, **settings)
    except (KdOptunaError, OSError) as error:
        text = " ".join(str(error).split()) or type(error).__name__
        print("{{}}: error: {{}}".format(sys.argv[0], text), file=sys.stderr)
        sys.exit(2)
    print("final top-1: {{:.2f}}% (test, last epoch)  best val top-1: {{:.2f}}% (epoch {{}}, kept in --output-dir)".format(
        100 * result["final_top1"], 100 * result["best_val_top1"], result["best_epoch"]))


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
        methods=literal([[name, text] for name, text in METHODS.items()]),
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
        "teacher_nodes": config.teacher.nodes,
        "student": config.student.model,
        "student_nodes": config.student.nodes,
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


