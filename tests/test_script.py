"""The exported script is plain Python a user keeps: literals, flags, one training call, inert data."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import io
import math
import os
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from kd_optuna.distill.classics import CLASSICS
from kd_optuna.run.config import StudyConfig, load_config
from kd_optuna.errors import KdOptunaError
from kd_optuna.export.training import METHODS, train_with_distiller
from kd_optuna.export.script import SETTINGS, python_literal, script_defaults, script_text, write_script

REPO = Path(__file__).resolve().parent.parent

#: Study text that would run, break a literal, a docstring, a comment or the template if it
#: were ever written as code: quotes of every kind, newlines, backslashes, template markers.
HOSTILE = [
    'x"""\'\'\'\nimport os; os.system("touch PWNED")  # %s {0} \\',
    "__import__('os').system('touch PWNED')",
    'PWNED"); __import__("os").system("touch PWNED"); ("',
    "PWNED\\",
    "PWNED\\'\n'''\r\n\"\"\"",
    "PWNED $settings ${flags} $$ $",
    "PWNED\u2028\x00\x0c\t\x1b end",
    "PWNED é ünïcode 🙂",
]

#: Names of the script's module-level data: what a study value may become.
DATA_NAMES = {name.upper() for name in SETTINGS} | {"DISTILLER", "FORMULA", "STUDY", "TRIAL", "SCORE", "KEY", "METHODS"}


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _source(spec, **overrides):
    return {"study": "digits", "trial": 3, "score": 0.25, **overrides}


def _digits_text(spec=CLASSICS["kd"][0], defaults=None, **source):
    return script_text(spec.to_params(), defaults or script_defaults(load_config("digits")), _source(spec, **source))


def _load(text, tmp_path, name="exported_script"):
    path = tmp_path / f"{name}.py"
    path.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _module_assignments(tree):
    """{NAME: value node} of the script's module-level ``NAME = ...``, refusing a name assigned twice."""
    seen = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            (target,) = node.targets
            assert isinstance(target, ast.Name)
            assert target.id not in seen, f"{target.id} assigned twice"
            seen[target.id] = node.value
    return seen


def _flag_calls(tree):
    """{'--flag': call node} of the ``flag(...)`` calls in parse_args."""
    (parse_args,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "parse_args"]
    return {
        call.args[0].value: call for call in ast.walk(parse_args)
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "flag"
    }


def _comments(text):
    return [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type == tokenize.COMMENT]


def test_the_script_reads_as_plain_python_with_the_distiller_as_a_dict_beside_its_formula():
    spec = CLASSICS["at"][0]
    text = _digits_text(spec)
    tree = ast.parse(text)
    compile(text, "train_best.py", "exec")
    values = _module_assignments(tree)
    assert ast.literal_eval(values["DISTILLER"]) == spec.to_params()
    assert isinstance(values["DISTILLER"], ast.Dict) and text.count("\n    \"knowledge\": ") == 1  # one gene a line
    assert ast.literal_eval(values["FORMULA"]) == spec.formula()
    assert f"# distiller(s, t) = {spec.formula()}" in _comments(text)
    assert ast.literal_eval(values["KEY"]) == spec.key
    assert ast.literal_eval(values["METHODS"]) == METHODS
    # No JSON blobs: the only json.loads reads what a user types for --teacher-nodes / --student-nodes.
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "json.loads"]
    (nodes_parser,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "nodes"]
    assert len(loads) == 1 and loads[0] in list(ast.walk(nodes_parser))
    assert ast.unparse(loads[0].args[0]) == "text"
    called = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not called & {"eval", "exec", "compile", "__import__", "ast.literal_eval", "pickle.loads"}
    assert "loads(" not in text.replace("json.loads(text)", "")


def test_every_setting_is_one_literal_and_the_default_of_its_flag(tmp_path):
    defaults = script_defaults(load_config("cifar100_resnet56_resnet20"))
    text = script_text(CLASSICS["kd"][0].to_params(), defaults, _source(CLASSICS["kd"][0]))
    tree = ast.parse(text)
    values = _module_assignments(tree)
    flags = _flag_calls(tree)
    for name in SETTINGS:
        constant = name.upper()
        assert text.count(f"\n{constant} = ") == 1
        literal = ast.literal_eval(values[constant])
        assert literal == defaults[name] and type(literal) is type(defaults[name]), name
        call = flags["--" + name.replace("_", "-")]
        default = {k.arg: k.value for k in call.keywords}["default"]
        assert isinstance(default, ast.Name) and default.id == constant, name
    assert set(flags) == {"--" + n.replace("_", "-") for n in SETTINGS} | {"--method", "--max-steps", "--resume", "--no-progress"}
    module = _load(text, tmp_path)
    args = vars(module.parse_args([]))
    assert {name: args[name] for name in SETTINGS} == defaults
    assert (args["method"], args["max_steps"], args["resume"], args["no_progress"]) == ("searched", None, False, False)
    module.EPOCHS = 7  # an edit of the literal is the flag's new default
    assert module.parse_args([]).epochs == 7 and module.parse_args(["--epochs", "3"]).epochs == 3


def test_main_calls_train_with_distiller_once_with_every_setting_as_a_keyword(tmp_path, monkeypatch, capsys):
    spec = CLASSICS["at"][0]
    defaults = script_defaults(load_config("digits"))
    text = _digits_text(spec, defaults)
    (main,) = [n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    (call,) = [n for n in ast.walk(main) if isinstance(n, ast.Call) and ast.unparse(n.func) == "train_with_distiller"]
    assert [ast.unparse(a) for a in call.args] == ["DISTILLER"]
    keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
    assert keywords == {**{n: f"args.{n}" for n in SETTINGS}, "method": "args.method", "max_steps": "args.max_steps",
                        "resume": "args.resume", "overwrite": "False", "progress": "not args.no_progress",
                        "epoch_lines": "True",  # a log gets each epoch's line, bars or not
                        "download_hint": "'run it again with --download true'"}  # the script's own flag
    assert set(keywords) <= set(inspect.signature(train_with_distiller).parameters)

    calls = []
    import kd_optuna.export.training

    def fake(spec_params, **kwargs):
        calls.append((spec_params, kwargs))
        return {"final_top1": 0.5, "best_val_top1": 0.75, "best_epoch": 2}

    monkeypatch.setattr(kd_optuna.export.training, "train_with_distiller", fake)
    _load(text, tmp_path).main(["--epochs", "3", "--milestones", "1,2", "--method", "dml", "--max-steps", "4"])
    ((spec_params, kwargs),) = calls
    assert spec_params == spec.to_params()
    expected = {**defaults, "epochs": 3, "milestones": [1, 2]}
    assert kwargs == {**expected, "method": "dml", "max_steps": 4, "resume": False, "overwrite": False, "progress": True,
                      "epoch_lines": True, "download_hint": "run it again with --download true"}
    out = capsys.readouterr().out
    assert "distiller: dml" in out and "final top-1: 50.00%" in out and "best val top-1: 75.00% (epoch 2" in out


def test_help_says_which_split_each_printed_top1_is_on(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _load(_digits_text(), tmp_path).main(["--help"])
    words = " ".join(capsys.readouterr().out.split())
    assert "the last epoch's test top-1 (its student is last_student.pt) and the best val top-1 (its student is " \
           "best_student.pt)" in words and "best test top-1" not in words


def test_a_python_without_kd_optuna_is_told_so_in_one_line(tmp_path):
    path = tmp_path / "train_best.py"
    path.write_text(_digits_text(), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-S", "-E", str(path), "--epochs", "1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr and run.stderr.count("\n") == 1, run.stderr
    assert "cannot import kd_optuna, which trains the student; install kd-optuna into it" in run.stderr


def test_the_dataset_flag_names_every_dataset_a_study_can_use():
    from kd_optuna.data import DATASET_NAMES

    assert "digits_hard" in DATASET_NAMES and all(name in SETTINGS["dataset"][1] for name in DATASET_NAMES)


def test_ctrl_c_ends_the_script_with_one_line_saying_how_to_resume(tmp_path, monkeypatch, capsys):
    import kd_optuna.export.training

    def interrupted(spec_params, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kd_optuna.export.training, "train_with_distiller", interrupted)
    main = _load(_digits_text(), tmp_path).main
    run = tmp_path / "run"
    for held, words in ((False, "no epoch had finished, so run it again as it was"),
                        (True, f"add --resume to continue from the last finished epoch ({run / 'last.pt'})")):
        if held:
            run.mkdir()
            (run / "last.pt").write_bytes(b"")
        with pytest.raises(SystemExit) as exit_info:
            main(["--output-dir", str(run)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 130
        assert err.count("\n") == 1 and "interrupted; " + words in err and "Traceback" not in err


@pytest.mark.parametrize("evil", HOSTILE)
def test_hostile_study_names_paths_and_nodes_stay_inert_string_literals(evil, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    defaults = script_defaults(load_config("digits"))
    nodes = {"feat": evil, "emb": "flatten", evil: "fc"}
    defaults.update(data_root=evil, teacher_checkpoint=evil, teacher_nodes=nodes, student_nodes=nodes,
                    output_dir=evil, teacher=evil)
    text = _digits_text(defaults=defaults, study=evil)
    tree = ast.parse(text)
    compile(text, "train_best.py", "exec")
    values = _module_assignments(tree)
    # Every constant holding study text is (inside) the value of a module-level data literal.
    inside = {id(n) for name, value in values.items() if name in DATA_NAMES for n in ast.walk(value)}
    hostile = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and "PWNED" in str(n.value)]
    assert hostile and all(id(n) in inside for n in hostile)
    assert "PWNED" not in (ast.get_docstring(tree) or "")
    assert not any("PWNED" in comment for comment in _comments(text))
    module = _load(text, tmp_path)
    assert not (tmp_path / "PWNED").exists()
    assert (module.STUDY, module.DATA_ROOT, module.TEACHER, module.TEACHER_CHECKPOINT) == (evil,) * 4
    assert module.TEACHER_NODES == nodes and module.STUDENT_NODES == nodes
    assert vars(module.parse_args([]))["output_dir"] == evil


def test_write_script_keeps_a_hostile_study_name_and_file_name_inert(tmp_path):
    import optuna
    from optuna.distributions import CategoricalDistribution

    from kd_optuna.space import FULL_OPTIONS, GENES

    spec = CLASSICS["kd"][0]
    trial = optuna.trial.create_trial(
        params=spec.to_params(), distributions={g: CategoricalDistribution(list(FULL_OPTIONS[g])) for g in GENES},
        value=float("inf"), user_attrs={"formula": HOSTILE[0]},
    )
    config = StudyConfig.from_dict(load_config("digits").to_dict() | {"data": {"dataset": "digits", "root": HOSTILE[0], "download": False}})
    path = write_script(tmp_path / 'it\'s "$flags".py', HOSTILE[0], trial, config)
    module = _load(path.read_text(), tmp_path)
    assert (module.STUDY, module.DATA_ROOT, module.TRIAL) == (HOSTILE[0], HOSTILE[0], trial.number)
    assert module.FORMULA == spec.formula() and math.isinf(module.SCORE)
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert "python train_best.py --resume" in docstring and "$flags" not in docstring  # a name unfit for it
    normal = write_script(tmp_path / "train_kd.py", "s", trial, config)
    assert "python train_kd.py --resume" in normal.read_text()
    assert os.access(normal, os.X_OK)


def test_exported_script_finds_relative_config_paths_from_any_directory(tmp_path, monkeypatch):
    """The config's relative paths are read from the working directory; the script is run
    elsewhere, so export writes those that exist there as absolute paths and keeps the rest."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    from kd_optuna.space import FULL_OPTIONS, GENES

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "teacher.pt").write_bytes(b"weights")
    spec = CLASSICS["kd"][0]
    trial = optuna.trial.create_trial(
        params=spec.to_params(), distributions={g: CategoricalDistribution(list(FULL_OPTIONS[g])) for g in GENES},
        value=0.5,
    )
    digits = load_config("digits").to_dict()
    config = StudyConfig.from_dict(digits | {"data": digits["data"] | {"root": "data"},
                                             "teacher": digits["teacher"] | {"checkpoint": "teacher.pt"}})
    module = _load(write_script(tmp_path / "train.py", "s", trial, config).read_text(), tmp_path)
    assert module.DATA_ROOT == str(tmp_path.resolve() / "data")
    assert module.TEACHER_CHECKPOINT == str(tmp_path.resolve() / "teacher.pt")

    missing = StudyConfig.from_dict(digits | {"data": digits["data"] | {"root": "elsewhere/data"}})
    module = _load(write_script(tmp_path / "train2.py", "s", trial, missing).read_text(), tmp_path, "second")
    assert module.DATA_ROOT == "elsewhere/data"


@pytest.mark.parametrize("gene", ["transform1", "distance", "temperature"])
def test_genes_that_are_not_options_are_refused_so_the_formula_comment_is_the_specs_own(gene):
    params = CLASSICS["kd"][0].to_params() | {gene: HOSTILE[0]}
    with pytest.raises(KdOptunaError, match="is not an option"):
        script_text(params, script_defaults(load_config("digits")), {"study": "s"})
    with pytest.raises(KdOptunaError, match="unknown source fields formula"):
        script_text(CLASSICS["kd"][0].to_params(), script_defaults(load_config("digits")), {"formula": HOSTILE[0]})


def test_python_literal_writes_only_data():
    class Sneaky(str):
        def __repr__(self):
            return "__import__('os').system('touch PWNED')"

    assert python_literal(Sneaky("a")) == '"a"'
    assert python_literal((1, 2.5, None, True)) == "[1, 2.5, None, True]"
    assert python_literal("it's") == '"it\'s"' and python_literal('say "hi"') == "'say \"hi\"'"
    for value in ["a\\b", "a\nb", '"', "'", "\"'\"\"\"", "\x00", "\u2028", "🙂", "$x"]:
        assert ast.literal_eval(python_literal(value)) == value
        assert ast.literal_eval(python_literal({value: [value]})) == {value: [value]}
    assert python_literal(float("-inf")) == 'float("-inf")'
    for bad in (object(), {1, 2}, b"bytes", print, Path("x")):
        with pytest.raises(KdOptunaError, match="export cannot write the thing"):
            python_literal(bad, "the thing")


def test_a_setting_that_is_not_data_is_refused_with_its_name():
    defaults = script_defaults(load_config("digits")) | {"data_root": Path("data")}
    with pytest.raises(KdOptunaError, match="the setting data_root of type"):
        _digits_text(defaults=defaults)
    with pytest.raises(KdOptunaError, match="needs defaults for epochs"):
        _digits_text(defaults={k: v for k, v in script_defaults(load_config("digits")).items() if k != "epochs"})


def test_the_script_runs_with_help(tmp_path):
    path = tmp_path / "train_best.py"
    path.write_text(_digits_text(study=HOSTILE[0]))
    result = subprocess.run([sys.executable, str(path), "--help"], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in SETTINGS:
        assert "--" + name.replace("_", "-") in result.stdout
    for words in ("--method", "--resume", "--max-steps", "--no-progress", "(default: 30)", "(default: [15, 22, 27])"):
        assert words in result.stdout
    bad = subprocess.run([sys.executable, str(path), "--epochs", "0"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "train_best.py: error: argument --epochs: expected a positive integer; see --help"]
    assert not (tmp_path / "PWNED").exists()
