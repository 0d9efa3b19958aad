"""The README contract: its two commands exist, and .ci/run runs the test command verbatim."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _commands():
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_readme_has_demo_and_test_commands():
    cmds = _commands()
    assert any("medsynth demo" in c and "pip install" in c for c in cmds)
    assert any("pytest" in c and "pip install" in c for c in cmds)


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = next(c for c in _commands() if "pytest" in c and "pip install" in c)
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci.splitlines()
