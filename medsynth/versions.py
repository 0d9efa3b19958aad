"""Versions of medsynth and the libraries that shaped an output, for provenance records."""

from __future__ import annotations

import importlib.metadata as md
from typing import Iterable, Optional

from medsynth import __version__


def package_versions(dists: Iterable[str]) -> dict[str, Optional[str]]:
    """``{"medsynth": version, dist: version or None (not installed), ...}``."""
    out: dict[str, Optional[str]] = {"medsynth": __version__}
    for dist in dists:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out
