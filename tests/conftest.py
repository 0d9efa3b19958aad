"""Shared fixtures.  Tests are fast by default: 16³–32³ volumes, 8-channel networks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep CPU tests predictable on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process; returns (exit_code, stdout, stderr)."""
    from medsynth.cli import main

    def _run(*argv: str):
        code = main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    """8 built-in phantoms on a 16³ grid at 20 mm (balanced classes, labels), with their manifest."""
    from medsynth.data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("phantoms"), 8, 0, (16, 16, 16), (20.0, 20.0, 20.0))
