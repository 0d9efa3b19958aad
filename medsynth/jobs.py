"""Run directories, atomic writes, shards and resume.

Every file medsynth writes appears atomically: it is written under a temporary name in the same
folder and renamed when complete, so a killed job never leaves a half-written file where
training code will read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps the suffixes of ``path`` (``.nii.gz`` etc.) so writers that pick a
    format from the extension still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) if path.suffixes else ""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (indent 2, sorted keys off to keep the author's order)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sample_seed(global_seed: int, index: int) -> int:
    """The seed of sample ``index``: a function of (global seed, index) only.

    Derived by hashing so that neighbouring indices get unrelated streams and the result does not
    depend on batch size, shard or restart.
    """
    digest = hashlib.sha256(f"medsynth-sample:{int(global_seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_id(run: str, index: int) -> str:
    """Stable id of a synthetic sample: ``synth-<run>-<index>`` (index zero-padded to 5)."""
    return f"synth-{run}-{int(index):05d}"
