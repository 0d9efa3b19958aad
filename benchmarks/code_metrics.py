#!/usr/bin/env python
"""Code-shape figures for medsynth (issue 20): long functions, long files, private cross-module imports.

    python benchmarks/code_metrics.py            # summary
    python benchmarks/code_metrics.py --list     # every long function, long file and private import

Reads the library's source with ``ast`` (nothing is imported or run).  A *library function* is any
``def`` in ``medsynth/`` (methods and nested functions included); its length runs from the ``def``
line (decorators excluded) to its last line.  A *private cross-module import* is ``from medsynth.x
import _name`` (or ``import medsynth.x._y``) in a module other than ``medsynth.x`` itself.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUNCTION_LIMIT = 80
FILE_LIMIT = 500


def module_name(path: Path) -> str:
    """``medsynth/qc/gate.py`` -> ``medsynth.qc.gate`` (``__init__`` names its package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def long_functions(tree: ast.AST, limit: int) -> list[tuple[str, int]]:
    """(name, lines) of every function in ``tree`` longer than ``limit`` lines."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append((node.name, length))
    return found


def private_imports(tree: ast.AST, module: str) -> list[str]:
    """``source:name`` for each private name imported from another medsynth module."""
    package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([source] if source else []))
            if not source.startswith("medsynth") or source == module:
                continue
            found += [f"{source}:{alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def measure(root: Path = ROOT) -> dict:
    """The figures for every ``.py`` file below ``root/medsynth``."""
    functions, files, private = [], [], []
    for path in sorted((root / "medsynth").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        rel = str(path.relative_to(root))
        lines = len(text.splitlines())
        if lines > FILE_LIMIT:
            files.append(f"{rel} {lines}")
        functions += [f"{rel}:{name} {n}" for name, n in long_functions(tree, FUNCTION_LIMIT)]
        private += [f"{rel} <- {imp}" for imp in private_imports(tree, module_name(path))]
    return {f"functions_over_{FUNCTION_LIMIT}_lines": functions,
            f"files_over_{FILE_LIMIT}_lines": files,
            "private_cross_module_imports": private}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list every item, not just the counts")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    figures = measure()
    if args.json:
        print(json.dumps(figures, indent=1))
        return 0
    for key, items in figures.items():
        print(f"{key}: {len(items)}")
        if args.list:
            for item in items:
                print(f"  {item}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
