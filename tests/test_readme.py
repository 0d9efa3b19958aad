"""The README contract: its two commands exist, .ci/run runs the test command verbatim, the README
stays short and lists every CLI verb and dependency, and every relative link in README.md and
docs/*.md resolves (file and, when given, heading anchor)."""

import argparse
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 250  # issue 20 item 7: details live in docs/, one page per stage


def _commands():
    text = README.read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.DOTALL)


def test_readme_has_demo_and_test_commands():
    cmds = _commands()
    assert any("medsynth demo" in c and "pip install" in c for c in cmds)
    assert any("pytest" in c and "pip install" in c for c in cmds)


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = next(c for c in _commands() if "pytest" in c and "pip install" in c)
    ci = (REPO / ".ci" / "run").read_text()
    assert test_cmd.strip() in ci.splitlines()


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move details to docs/"


def _cli_verbs() -> list[str]:
    """Every verb `medsynth --help` lists, with its actions: ['env', 'config check', ...]."""
    from medsynth.cli import build_parser

    def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    verbs = []
    for name, p in subcommands(build_parser()).items():
        actions = subcommands(p)
        verbs += [f"{name} {a}" for a in actions] if actions else [name]
    return verbs


def test_cli_table_has_one_row_per_verb():
    rows = re.findall(r"^\| `medsynth ([a-z][a-z -]*?)(?: [A-Z\[-].*?)?` \|", README.read_text(), flags=re.MULTILINE)
    verbs = _cli_verbs()
    assert {"release", "audit", "send", "export-bundle"} <= set(verbs)
    assert sorted(rows) == sorted(verbs), "README CLI table: one row per verb of `medsynth --help`"


def test_readme_names_every_dependency_and_the_cpu_bf16_switch():
    text = README.read_text().lower()
    pyproject = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, flags=re.MULTILINE | re.DOTALL)
    names = re.findall(r'"([A-Za-z0-9_.-]+)', block.group(1))
    assert "pynetdicom" in names
    missing = [n for n in names if n.lower() not in text]
    assert not missing, f"README.md does not name the dependencies {missing}"
    from medsynth.model.networks import CPU_BF16_ENV

    assert f"{CPU_BF16_ENV}=0".lower() in text and f"{CPU_BF16_ENV}=1".lower() in text


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def _links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)  # code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    return re.findall(r"\]\(([^)\s]+)\)", text)


MARKDOWN = [README, *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", MARKDOWN, ids=[str(p.relative_to(REPO)) for p in MARKDOWN])
def test_relative_links_resolve(page):
    bad = []
    for link in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        file, _, anchor = link.partition("#")
        target = (page.parent / file).resolve() if file else page
        if not target.exists():
            bad.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            bad.append(f"{link}: no heading #{anchor} in {target.relative_to(REPO)}")
    assert not bad, f"{page.relative_to(REPO)}: broken links: {bad}"


def test_readme_links_every_docs_page():
    linked = {(REPO / link.partition("#")[0]).resolve() for link in _links(README)}
    missing = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"
