"""`kd-optuna export`: a trial's distiller -> a runnable script that trains the student for real.

The script is plain Python a user reads, keeps and edits: the distiller as a dict of its genes
with its formula beside it, each setting as one module-level literal (``EPOCHS = 240``) that is
also the default of an ``argparse`` flag (``--epochs``), and one call of
:func:`kd_optuna.export.train_with_distiller` with the settings as keywords.

Nothing read from a study (its name, the config's paths, model and node names) is ever written
as code: every such value is checked to be str/int/float/bool/None or a list/dict of them and
written by the builtin ``repr`` (:func:`python_literal`), and the template is filled in one pass
(:class:`string.Template`), so a study name full of quotes, newlines, ``$`` or Python leaves the
script valid and inert and comes back as the same string.
"""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

from kd_optuna.data import DATASET_NAMES, VAL_FRACTION
from kd_optuna.errors import KdOptunaError
from kd_optuna.files import atomic_write_text
from kd_optuna.export.training import METHODS

#: The script's settings, in flag order: name -> (type, help). Each is the module-level
#: literal ``NAME.upper()`` in the script, the flag ``--name-with-dashes`` whose default it
#: is, and the keyword ``name`` of :func:`kd_optuna.export.train_with_distiller`.
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
    "dataset": ("str", f"dataset name ({', '.join(DATASET_NAMES)})"),
    "data_root": ("str_or_none", "data directory"),
    "image_size": ("positive_int_or_none", "imagefolder's square crop in pixels (none: 224)"),
    "val_fraction": ("fraction_or_none", f"share of cifar's or imagefolder's train images held out as val (none: {VAL_FRACTION})"),
    "download": ("bool", "download the dataset if missing (true/false)"),
    "teacher": ("str", "teacher model name"),
    "teacher_checkpoint": ("str_or_none", "teacher checkpoint (none: train one, cached)"),
    "teacher_nodes": ("nodes", "the teacher's feat/emb/logit nodes as JSON "
                            "(none: the zoo's, or read off the model's forward)"),
    "student": ("str", "student model name"),
    "student_nodes": ("nodes", "the student's feat/emb/logit nodes as JSON "
                            "(none: the zoo's, or read off the model's forward)"),
    "device": ("str", "auto, cpu, cuda or cuda:N"),
    "output_dir": ("str", "where checkpoints go"),
}

#: The script's parser of each setting type (functions defined in the template).
_PARSERS = {
    "int": "int", "float": "float", "str": "str", "bool": "true_or_false", "int_list": "int_list",
    "str_or_none": "str_or_none", "nodes": "nodes", "positive_int": "positive_int",
    "non_negative_int": "non_negative_int", "positive_float": "positive_float",
    "non_negative_float": "non_negative_float", "positive_int_or_none": "positive_int_or_none",
    "fraction_or_none": "fraction_or_none",
}

# The template is filled by string.Template in one pass: $name markers, $$ for a dollar sign.
# Inserted text is never scanned again, so a value holding "$NAME" stays what it is.
_TEMPLATE = string.Template(r'''#!/usr/bin/env python3
"""Train the student with a distiller found by kd-optuna (written by `kd-optuna export`).

    python $script_name                 # full training with the settings below
    python $script_name --epochs 2      # every setting is a flag: see --help
    python $script_name --resume        # continue from the last checkpoint in --output-dir
    python $script_name --method kd     # the same training with a reference method instead

The distiller is DISTILLER below: the eight genes of kd-optuna's search space, computed by
kd_optuna.distill.loss.DistillerLoss as FORMULA (s_* student, t_* teacher outputs). The settings
are the study config's [train], [data], [teacher] and [student] values; edit them here or
override them with flags. main() calls kd_optuna.export.train_with_distiller, which trains
with SGD and the CE + distiller loss, saves a checkpoint each epoch and prints top-1.
"""

import argparse
import json
import os
import sys

# -- the distiller ---------------------------------------------------------------------------
$formula_comment
DISTILLER = $distiller
FORMULA = $formula

# Where it comes from: the study, the trial, its proxy score (lower is better), its key.
STUDY = $study
TRIAL = $trial
SCORE = $score
KEY = $key

# -- the settings: each is the default of the flag of the same name (--epochs for EPOCHS) ---
$settings

# --method: the term added to the student's cross-entropy.
METHODS = $methods


# -- the command line ------------------------------------------------------------------------
def true_or_false(text):
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError("expected true or false")


def int_list(text):
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected integers such as 15,22,27") from None


def str_or_none(text):
    return None if text.lower() in ("", "none") else text


def nodes(text):
    # The flag's value is JSON the user types, e.g. {"feat": "layer4", "emb": "flatten", "logit": "fc"}.
    if text.lower() in ("", "none"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise argparse.ArgumentTypeError('expected JSON such as {"feat": "layer4", "emb": "flatten", "logit": "fc"}')
    return value


def number(kind, low, strict, words):
    # A parser of numbers >= low (> low when strict), refusing NaN.
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected " + words) from None
        if value < low or (strict and value == low) or value != value:
            raise argparse.ArgumentTypeError("expected " + words)
        return value

    return parse


positive_int = number(int, 0, True, "a positive integer")
non_negative_int = number(int, 0, False, "an integer >= 0")
positive_float = number(float, 0.0, True, "a number > 0")
non_negative_float = number(float, 0.0, False, "a number >= 0")


def positive_int_or_none(text):
    return None if text.lower() in ("", "none") else positive_int(text)


def fraction_or_none(text):
    if text.lower() in ("", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError("expected a number between 0 and 1 (exclusive), or none")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, "{}: error: {}; see --help\n".format(self.prog, message))


def parse_args(argv=None):
    parser = Parser(
        description="Train the student with the distiller of a kd-optuna trial on the full data; "
        "prints the last epoch's test top-1 (its student is last_student.pt) and the best val top-1 "
        "(its student is best_student.pt).",
    )
    flag = parser.add_argument
$flags
    flag("--method", choices=list(METHODS), default="searched",
         help="the term added to the student's CE: "
         + "; ".join("{}: {}".format(k, v) for k, v in METHODS.items()).replace("%", "%%")
         + " (default: %(default)s)")
    flag("--max-steps", type=positive_int, default=None,
         help="smoke test / debugging: stop each epoch after this many batches")
    flag("--resume", action="store_true",
         help="continue from the last checkpoint in --output-dir (without it, a folder holding a run is refused)")
    flag("--no-progress", action="store_true", help="hide the progress bars (each epoch's summary line is still printed)")
    return parser.parse_args(argv)


# -- the training ----------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    try:
        from kd_optuna.errors import KdOptunaError, error_message
        from kd_optuna.export import train_with_distiller
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] != "kd_optuna":
            raise
        print("{}: error: this Python ({}) cannot import kd_optuna, which trains the student; install kd-optuna "
              "into it (pip install -e the kd-optuna folder) or run the script with the Python that has it".format(
                  sys.argv[0], sys.executable), file=sys.stderr)
        sys.exit(2)

    print("distiller:", FORMULA if args.method == "searched" else args.method)
    try:
        result = train_with_distiller(
            DISTILLER,
$keywords
            method=args.method,
            max_steps=args.max_steps,
            resume=args.resume,
            overwrite=False,
            progress=not args.no_progress,
            epoch_lines=True,
            download_hint="run it again with --download true",
        )
    except (KdOptunaError, OSError) as error:
        text = " ".join(error_message(error).split()) or type(error).__name__
        print("{}: error: {}".format(sys.argv[0], text), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        last = os.path.join(args.output_dir, "last.pt")
        then = ("add --resume to continue from the last finished epoch ({})".format(last) if os.path.isfile(last)
                else "no epoch had finished, so run it again as it was")
        print("{}: interrupted; {}".format(sys.argv[0], then), file=sys.stderr)
        sys.exit(130)
    print("final top-1: {:.2f}% (test, last epoch)  best val top-1: {:.2f}% (epoch {}, kept in --output-dir)".format(
        100 * result["final_top1"], 100 * result["best_val_top1"], result["best_epoch"]))


if __name__ == "__main__":
    main()
''')


def python_literal(value: Any, what: str = "value") -> str:
    """``value`` as Python source that evaluates back to it, or KdOptunaError naming ``what``.

    Only None, bool, int, float, str and lists, tuples (written as lists) and dicts of them
    are accepted; scalars are written by the builtin ``repr`` of their base type (a subclass's
    own ``__repr__`` is never called), non-finite floats as ``float("inf")`` and the like.
    """
    if value is None or value is True or value is False:
        return repr(value)
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float.__repr__(value)
        return 'float("nan")' if value != value else ('float("inf")' if value > 0 else 'float("-inf")')
    if isinstance(value, str):
        text = str.__repr__(value)
        if text[0] == "'" and '"' not in text and "\\" not in text:  # no quote, no escape: write "..."
            text = '"' + text[1:-1] + '"'
        return text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(python_literal(item, what) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(
            f"{python_literal(key, what)}: {python_literal(item, what)}" for key, item in value.items()
        ) + "}"
    raise KdOptunaError(f"export cannot write {what} of type {type(value).__name__}; "
                        "give it as a string, number, boolean, list or table")


def _comment(text: str) -> str | None:
    """``text`` as the body of a ``#`` comment if it is one line of printable ASCII, else None."""
    return text if text.isascii() and text.isprintable() else None


def script_text(spec_params: dict[str, Any], defaults: dict[str, Any], source: dict[str, Any],
                script_name: str = "train_best.py") -> str:
    """The script's source; every value from the study is written by :func:`python_literal`.

    ``spec_params`` must be a valid distiller (``DistillerSpec.from_params``, which checks every
    gene against its options): its formula, the only text written outside a literal (as a
    comment), and its key are the spec's own. ``source`` holds ``study``, ``trial`` and
    ``score`` (any may be missing: None). ``script_name`` (the file's name, shown in the
    docstring's usage) must be one line of printable ASCII without quotes or backslashes,
    else ``train_best.py`` is shown.
    """
    from kd_optuna.space import DistillerSpec

    missing = [name for name in SETTINGS if name not in defaults]
    if missing:
        raise KdOptunaError(f"export needs defaults for {', '.join(missing)}")
    unknown = sorted(set(source) - {"study", "trial", "score"})
    if unknown:
        raise KdOptunaError(f"script_text: unknown source fields {', '.join(unknown)}")
    spec = DistillerSpec.from_params(spec_params)
    assignments = {name: f"{name.upper()} = {python_literal(defaults[name], f'the setting {name}')}"
                   for name in SETTINGS}
    width = max((len(line) for line in assignments.values() if len(line) <= 40), default=0)
    settings, flags, keywords = [], [], []
    for name, (kind, help_text) in SETTINGS.items():
        constant = name.upper()
        settings.append(f"{assignments[name]:<{width}}  # {help_text}")
        flags.append(
            f"    flag({python_literal('--' + name.replace('_', '-'))}, type={_PARSERS[kind]}, default={constant},\n"
            f"         help={python_literal(help_text.replace('%', '%%') + ' (default: %(default)s)')})"
        )
        keywords.append(f"            {name}=args.{name},")
    genes = "".join(f"    {python_literal(gene)}: {python_literal(value, 'the gene ' + str(gene))},\n"
                    for gene, value in spec_params.items())
    formula = spec.formula()
    comment = _comment(formula)
    safe_name = script_name if (_comment(script_name) and not set(script_name) & set("'\"\\")) else "train_best.py"
    text = _TEMPLATE.substitute(
        script_name=safe_name,
        formula_comment="# distiller(s, t) = " + comment if comment else "# (the formula is FORMULA below)",
        distiller="{\n" + genes + "}",
        formula=python_literal(formula, "the formula"),
        study=python_literal(source.get("study"), "the study name"),
        trial=python_literal(source.get("trial"), "the trial number"),
        score=python_literal(source.get("score"), "the score"),
        key=python_literal(spec.key, "the distiller key"),
        settings="\n".join(settings),
        methods="{\n" + "".join(f"    {python_literal(k)}: {python_literal(v)},\n" for k, v in METHODS.items()) + "}",
        flags="\n".join(flags),
        keywords="\n".join(keywords),
    )
    compile(text, "<exported script>", "exec")
    return text


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
        "image_size": config.data.image_size,
        "val_fraction": config.data.val_fraction,
        "download": config.data.download,
        "teacher": config.teacher.model,
        "teacher_checkpoint": config.teacher.checkpoint,
        "teacher_nodes": config.teacher.nodes,
        "student": config.student.model,
        "student_nodes": config.student.nodes,
        "device": "auto",
        "output_dir": "kd_optuna_runs/best",
    }


def anchored_paths(defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` with a relative ``data_root`` or ``teacher_checkpoint`` that exists from the
    working directory made absolute, so that the script finds them wherever it is run (the
    config's relative paths are read from the working directory of each command; a path that
    is not there now is kept as written)."""
    anchored = dict(defaults)
    for name in ("data_root", "teacher_checkpoint"):
        value = anchored.get(name)
        found = Path(value).expanduser() if isinstance(value, str) and value else None
        if found is not None and not found.is_absolute() and found.exists():
            anchored[name] = str(found.resolve())
    return anchored


def write_script(path: Path, study_name: str, trial: Any, config: Any, teacher_checkpoint: str | None = None) -> Path:
    """Write the training script of ``trial`` (a completed FrozenTrial) to ``path``;
    ``teacher_checkpoint`` (the search's cached teacher) stands for a config that names none."""
    from kd_optuna.space import DistillerSpec

    spec = DistillerSpec.from_params(trial.params)
    source = {
        "study": study_name,
        "trial": trial.number,
        "score": trial.value,
    }
    defaults = script_defaults(config)
    if defaults["teacher_checkpoint"] is None:
        defaults["teacher_checkpoint"] = teacher_checkpoint
    text = script_text(spec.to_params(), anchored_paths(defaults), source, script_name=Path(path).name)
    compile(text, str(path), "exec")
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise KdOptunaError(f"directory {str(path.parent)!r} does not exist; create it or choose another -o")
    try:
        return atomic_write_text(path, text, mode=0o755)
    except OSError as exc:
        raise KdOptunaError(f"cannot write {path} ({exc.strerror or type(exc).__name__}); choose another -o") from None


