"""Library errors name Python parameters (in backticks); the CLI prints them as the verb's flags.

A notebook user of ``medsynth.generate(steps=0)`` reads "`steps` must be ...", a shell user of
``medsynth generate --steps 0`` reads "--steps must be ...": one message, written once in the library.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from medsynth.cli import build_parser, cli_message
from medsynth.errors import CheckpointError, ConfigError, JobError, MedsynthError

REPO = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
COMMAND = re.compile(r"'medsynth [^']*'")  # advice to run a whole command may spell its flags


def _error_texts(tree: ast.AST):
    """(line, text) of every raise with a call, every ``hint = ...`` and every ``hint=`` default."""
    def text(node: ast.AST) -> str:
        return " ".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))

    for n in ast.walk(tree):
        if isinstance(n, ast.Raise) and isinstance(n.exc, ast.Call):
            yield n.lineno, text(n.exc)
        elif isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "hint" for t in n.targets):
            yield n.lineno, text(n.value)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = n.args.args + n.args.kwonlyargs
            defaults = n.args.defaults + [d for d in n.args.kw_defaults if d is not None]
            for a, d in zip(args[::-1], defaults[::-1]):
                if a.arg == "hint":
                    yield d.lineno, text(d)


def test_library_errors_name_no_flag_outside_a_quoted_command():
    found = []
    for path in sorted((REPO / "medsynth").rglob("*.py")):
        if path == REPO / "medsynth" / "cli.py":
            continue
        for line, text in _error_texts(ast.parse(path.read_text(encoding="utf-8"))):
            flags = FLAG.findall(COMMAND.sub("", text))
            if flags:
                found.append(f"{path.relative_to(REPO)}:{line}: {', '.join(flags)}")
    assert found == [], "write the parameter in backticks (`steps`), or quote the whole command ('medsynth ...')"


def test_param_is_the_first_parameter_the_message_names():
    assert ConfigError("`steps` must be >= 1, got 0").param == "steps"
    assert CheckpointError("`class_label=2`: this model knows classes 0..1", hint="drop `class_label`").param == \
        "class_label"
    assert ConfigError("sampling.steps: must be >= 1").param is None  # a config key, not a parameter
    assert ConfigError("`a` and `b` clash", param="b").param == "b"


def _verb(*argv: str):
    return build_parser().parse_args(list(argv)).verb_parser


@pytest.mark.parametrize("argv, message, hint, shown", [
    (("generate", "r", "--out", "o"), "`steps` must be between 1 and 20, got 0", None,
     "--steps must be between 1 and 20, got 0"),
    (("generate", "r", "--out", "o"), "`class_label=5`: this model knows classes 0..1", "drop `class_label`",
     "--class 5: this model knows classes 0..1\n  fix: drop --class"),
    (("generate", "r", "--out", "o"), "`steps`: DDPM needs all 20", "use `scheduler='ddim'` for fewer steps",
     "--steps: DDPM needs all 20\n  fix: use --scheduler ddim for fewer steps"),
    (("generate", "r", "--out", "o"), "no EMA weights in `run_dir`", "pass `use_ema=False` or a new `out_dir`",
     "no EMA weights in RUN\n  fix: pass --no-ema or a new --out"),
    (("train", "c.yaml", "--run", "r"), "no run to resume", "drop `resume=True`; train `stage='autoencoder'`",
     "no run to resume\n  fix: drop --resume; train --stage autoencoder"),
    (("train", "c.yaml", "--run", "r"), "new `run_dir` folder, not sampling.steps", None,
     "new --run folder, not sampling.steps"),
    (("demo",), "demo needs `n_cases` >= 4", "or `labels=False`", "demo needs --cases >= 4\n  fix: or --no-labels"),
    (("expand", "r", "--manifest", "m", "--out", "o"), "give exactly one of `n`, `per_class` or `factor`", None,
     "give exactly one of --n, --per-class or --factor"),
    (("expand", "r", "--manifest", "m", "--out", "o"), "`formats`: unknown format 'png'", None,
     "--format: unknown format 'png'"),
    (("qc", "s", "--reference", "m", "--out", "o"), "give either `config` or `run_dir`", "pass `cfg=CONFIG`",
     "give either --config or --run\n  fix: pass --config CONFIG"),
    # a parameter the verb has no flag for keeps its Python name
    (("audit", "r", "--manifest", "m", "--holdout", "h"), "`bootstrap` must be >= 100", None,
     "`bootstrap` must be >= 100"),
])
def test_cli_message_spells_parameters_as_the_verbs_flags(argv, message, hint, shown):
    assert cli_message(MedsynthError(message, hint=hint), _verb(*argv)) == shown


def test_python_caller_reads_the_parameter_and_cli_user_the_flag(tmp_path, run_cli):
    """The same refusal, before any model is loaded: expand's ``max_tries`` / ``--max-tries``."""
    from medsynth.expand import expand

    with pytest.raises(JobError, match=r"^`max_tries` must be >= 1, got 0$") as exc:
        expand(tmp_path / "run", tmp_path / "m.json", tmp_path / "out", n=2, max_tries=0)
    assert "--" not in str(exc.value) and exc.value.param == "max_tries"

    code, out, err = run_cli("expand", tmp_path / "run", "--manifest", tmp_path / "m.json", "--out",
                             tmp_path / "out", "--n", "2", "--max-tries", "0")
    assert code == JobError.exit_code and out == ""
    assert err == "medsynth: error: --max-tries must be >= 1, got 0\n"

    code, out, err = run_cli("expand", tmp_path / "run", "--manifest", tmp_path / "m.json", "--out",
                             tmp_path / "out", "--n", "2", "--format", "nifti,dicm")
    assert code == 5 and "--format: unknown format 'dicm' (did you mean 'dicom'?)" in err
    assert "`" not in err and "Traceback" not in err
