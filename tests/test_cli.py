"""CLI contract: help for every verb with an example, version, env, error mapping, --debug."""

import subprocess
import sys

import pytest

from medsynth import __version__
from medsynth.cli import build_parser


def _verbs():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    out = []
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if getattr(a, "choices", None) and a.dest.endswith("_cmd")]
        if nested:
            out += [(name, n) for n in nested[0].choices]
        else:
            out.append((name,))
    return out


@pytest.mark.parametrize("verb", _verbs(), ids=lambda v: " ".join(v))
def test_every_verb_has_help_with_example(verb, run_cli):
    with pytest.raises(SystemExit) as ei:
        run_cli(*verb, "--help")
    assert ei.value.code == 0


def test_help_text_contains_example(capsys):
    from medsynth.cli import main

    for verb in _verbs():
        with pytest.raises(SystemExit):
            main([*verb, "--help"])
        out = capsys.readouterr().out
        assert "example:" in out and "medsynth " in out, verb


def test_version(capsys):
    from medsynth.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_env_lists_versions_and_devices(run_cli):
    code, out, err = run_cli("env")
    assert code == 0
    for name in ("medsynth", "python", "torch", "monai", "nibabel", "SimpleITK", "pydicom", "cuda"):
        assert name in out


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "medsynth", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and __version__ in r.stdout


def test_unknown_verb_and_option_exit_2(run_cli):
    with pytest.raises(SystemExit) as ei:
        run_cli("frobnicate")
    assert ei.value.code == 2
    with pytest.raises(SystemExit) as ei:
        run_cli("env", "--no-such-option")
    assert ei.value.code == 2


def test_error_is_one_line_without_traceback_unless_debug(run_cli, tmp_path):
    missing = tmp_path / "nope.yaml"
    code, out, err = run_cli("config", "check", missing)
    assert code == 2 and "config file not found" in err and "Traceback" not in err
    from medsynth.errors import ConfigError

    with pytest.raises(ConfigError):
        run_cli("--debug", "config", "check", missing)
    with pytest.raises(ConfigError):
        run_cli("config", "check", missing, "--debug")


def test_third_party_notices_are_silenced_and_shown_with_v(run_cli, tmp_path, capsys, caplog):
    """MONAI logs 'nvImageCodec is not available; ...' each time a LoadImage is built (twice per qc
    run); nibabel logs each header field it repairs.  Not on stderr by default; with -v, at DEBUG."""
    import logging

    from monai.transforms import LoadImage

    def emit() -> str:
        caplog.clear()
        LoadImage(image_only=True)  # where MONAI itself says it (when the codec is missing)
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").warning(
            "nvImageCodec is not available; skipping pydicom decoder plugin registration.")
        logging.getLogger("nibabel.global").warning("qform_code 129 not valid; setting to 0")
        logging.getLogger("monai.other").warning("a MONAI warning that is not a known notice")
        return capsys.readouterr().err

    run_cli("manifest", "verify", tmp_path / "none.json")
    err = emit()
    shown = err + caplog.text  # stderr, and what reaches the root logger (pytest holds it there)
    assert "nvImageCodec" not in shown and "qform_code" not in shown
    assert "a MONAI warning that is not a known notice" in shown  # only the listed notices are silenced
    run_cli("-vv", "manifest", "verify", tmp_path / "none.json")
    err = emit()
    assert "DEBUG medsynth.notices: monai.data.nvimgcodec_pydicom_plugin: nvImageCodec is not available" in err
    assert "DEBUG medsynth.notices: nibabel.global: qform_code 129 not valid" in err
    run_cli("-v", "manifest", "verify", tmp_path / "none.json")
    err = emit()
    assert "nvImageCodec is not available" in err and "qform_code 129 not valid" in err
    run_cli("manifest", "verify", tmp_path / "none.json")  # and hidden again without -v
    assert "nvImageCodec" not in emit()
