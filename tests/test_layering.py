"""The layering of ../shared/DESIGN.md, read from the imports with ``ast`` (nothing is imported).

* **core** (the currency and the on-disk formats every stage shares) imports no stage and no
  orchestrator;
* a **stage** (``data/``, ``model/``, ``privacy/``, ``qc/``, ``export/``, ``evaluate/``) imports no
  orchestrator, and ``model/`` never imports ``export/``;
* no private name (``_x``) is imported from another module;
* library modules take only ``__version__`` from the package top (the Python API lives there);
* no test module imports another test module (shared helpers live in ``tests/helpers.py`` and
  fixtures in ``tests/conftest.py``).

Lazy imports inside functions count the same as module-level ones.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "medsynth"

CORE = {"config", "errors", "volume", "manifest", "jobs", "samples", "progress", "versions", "notices", "runtime",
        "formats", "dicom_series", "callable_module", "registry"}
STAGES = {"data", "model", "privacy", "qc", "export", "evaluate"}
ORCHESTRATORS = {"cli", "demo", "expand", "__main__"}

# Known exceptions, each with the reason it is allowed for now: {(importing file, imported module[:name])}.
# medsynth/cli.py breaks none of these rules today; keep this empty.
ALLOWED: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    file: str       # importing file, relative to the repo
    module: str     # imported module (absolute)
    names: tuple[str, ...]  # imported names for ``from m import a, b``; () for ``import m``
    line: int


def module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[Import]:
    """Every medsynth import in ``path`` (relative imports resolved), at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = path.relative_to(REPO).as_posix()
    package = module_of(path) if path.name == "__init__.py" else module_of(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(rel, a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            out.append(Import(rel, module, tuple(a.name for a in node.names), node.lineno))
    return [i for i in out if i.module == "medsynth" or i.module.startswith("medsynth.") or
            i.module == "tests" or i.module.startswith("tests.")]


def layer(module: str) -> str:
    """``core``, ``stage``, ``orchestrator`` or ``package`` (the package top) for a medsynth module."""
    parts = module.split(".")
    if parts == ["medsynth"]:
        return "package"
    top = parts[1]
    if top in CORE:
        return "core"
    if top in STAGES:
        return "stage"
    if top in ORCHESTRATORS:
        return "orchestrator"
    raise AssertionError(f"{module}: not placed in a layer; add it to CORE, STAGES or ORCHESTRATORS in {__file__}")


def library_imports() -> list[Import]:
    return [i for p in sorted(PACKAGE.rglob("*.py")) for i in imports_of(p) if i.module.startswith("medsynth")]


def violations(rule) -> list[str]:
    found = []
    for imp in library_imports():
        for problem in rule(imp):
            key = (imp.file, problem[0])
            if key not in ALLOWED:
                found.append(f"{imp.file}:{imp.line}: {problem[1]}")
    return found


def _layers(imp: Import) -> list[tuple[str, str]]:
    src = layer(module_of(REPO / imp.file))
    dst = layer(imp.module)
    out = []
    if src == "core" and dst in ("stage", "orchestrator"):
        out.append((imp.module, f"core module imports the {dst} {imp.module}"))
    if src == "stage" and dst == "orchestrator":
        out.append((imp.module, f"stage imports the orchestrator {imp.module}"))
    if imp.file.startswith("medsynth/model/") and imp.module.startswith("medsynth.export"):
        out.append((imp.module, f"model/ imports export/ ({imp.module})"))
    if dst == "package" and src != "orchestrator" and imp.file != "medsynth/__init__.py":
        extra = [n for n in imp.names if n != "__version__"] or ([] if imp.names else ["(the package)"])
        if extra:
            out.append((imp.module, f"library module imports {', '.join(extra)} from the package top "
                                    "(import it from its own module)"))
    return out


def _private(imp: Import) -> list[tuple[str, str]]:
    if imp.module == module_of(REPO / imp.file):
        return []
    return [(f"{imp.module}:{n}", f"private name {n} imported from {imp.module}")
            for n in imp.names if n.startswith("_") and not n.startswith("__")]


def test_every_module_has_a_layer():
    placed = {module_of(p): layer(module_of(p)) for p in sorted(PACKAGE.rglob("*.py"))}
    assert placed and set(placed.values()) <= {"package", "core", "stage", "orchestrator"}


@pytest.mark.parametrize("rule", [_layers, _private], ids=["layers", "private names"])
def test_library_imports_follow_the_layering(rule):
    assert violations(rule) == []


def test_no_test_module_imports_another():
    found = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for imp in imports_of(path):
            leaf = imp.module.rpartition(".")[2]
            names = [imp.module + "." + n for n in imp.names]
            if leaf.startswith("test_") or any(n.rpartition(".")[2].startswith("test_") for n in names):
                found.append(f"{imp.file}:{imp.line}: imports {imp.module}")
    assert found == []


def test_the_rules_catch_what_they_are_for():
    """The checks see a lazy import of a stage in core, a private name and a test module import."""
    assert layer("medsynth.manifest") == "core" and layer("medsynth.qc.gate") == "stage"
    assert layer("medsynth.cli") == "orchestrator"
    fake = Import("medsynth/volume.py", "medsynth.data.io", ("read_image",), 1)
    assert _layers(fake)
    assert _private(Import("medsynth/expand.py", "medsynth.manifest", ("_rel",), 1))
    assert not _private(Import("medsynth/expand.py", "medsynth.manifest", ("__version__",), 1))
    assert _layers(Import("medsynth/model/sample.py", "medsynth.export.dicom", ("x",), 1))
    assert _layers(Import("medsynth/qc/gate.py", "medsynth.cli", ("main",), 1))
