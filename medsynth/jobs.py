"""Run directories, atomic writes, seeds, shards and resume.

:class:`RunPaths` is the one owner of a run directory's layout and :func:`load_run_config` the
one reader of its config.  Every file medsynth writes appears atomically: it is written under a temporary name in the same
folder and renamed when complete, so a killed job never leaves a half-written file where
training code will read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional


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


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
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


def seed_from(namespace: str, *parts: Any) -> int:
    """A 63-bit seed that is a pure function of ``namespace`` and ``parts``: the one seed formula.

    sha256 of ``"<namespace>:<part>:<part>..."`` (hashing, so neighbouring parts get unrelated
    streams); every seed medsynth derives goes through here, each family under its own namespace.
    """
    digest = hashlib.sha256(f"{namespace}:{':'.join(str(p) for p in parts)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def derive_seed(*parts: Any) -> int:
    """A seed for one use of randomness inside medsynth (network init, sampling steps, ...), a pure
    function of ``parts`` such as ``(seed, "init", stage)``."""
    return seed_from("medsynth", *parts)


def sample_seed(global_seed: int, index: int) -> int:
    """The seed of sample ``index``: a function of (global seed, index) only.

    Derived by hashing so that neighbouring indices get unrelated streams and the result does not
    depend on batch size, shard or restart.
    """
    return seed_from("medsynth-sample", int(global_seed), int(index))


def sample_id(run: str, index: int) -> str:
    """Stable id of a synthetic sample: ``synth-<run>-<index>`` (index zero-padded to 5)."""
    return f"synth-{run}-{int(index):05d}"


# --------------------------------------------------------------------------------------------
# run directories
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPaths:
    """The files of a run directory (what ``medsynth train`` writes); no other code spells them::

        RUN/config.yaml             the resolved config the run was trained with
        RUN/versions.json           library versions and git commit of the training code
        RUN/model_card.json         input contract, classes, scale factor, intended use, checkpoint hashes
        RUN/<stage>/last.pt         a stage's checkpoint (autoencoder, diffusion, controlnet)
        RUN/<stage>/metrics.jsonl   its training log
        RUN/low_noise/              the low-noise expert (model.low_noise_expert): a run folder of its own
    """

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def versions(self) -> Path:
        return self.root / "versions.json"

    @property
    def card(self) -> Path:
        return self.root / "model_card.json"

    def checkpoint(self, stage: str) -> Path:
        return self.root / stage / "last.pt"

    @property
    def low_noise(self) -> "RunPaths":
        """The run folder of this run's low-noise expert (``model.low_noise_expert``)."""
        return RunPaths(self.root / "low_noise")

    def has_checkpoint(self) -> bool:
        """True when any stage has written its checkpoint (the run can be resumed)."""
        return self.root.is_dir() and any(self.root.glob(f"*/{self.checkpoint('x').name}"))

    def checkpoint_name(self, stage: str) -> str:
        """A stage's checkpoint relative to the run (``diffusion/last.pt``), as the model card records it."""
        return self.checkpoint(stage).relative_to(self.root).as_posix()

    def metrics(self, stage: str) -> Path:
        return self.root / stage / "metrics.jsonl"


def load_run_config(run_dir: str | os.PathLike, error: Optional[type] = None,
                    hint: str = "pass the folder written by 'medsynth train CONFIG --run RUN'") -> Any:
    """The config a run was trained with (``RUN/config.yaml``), validated.

    A missing run directory or config raises ``error`` (a :class:`~medsynth.errors.MedsynthError`
    subclass, the calling stage's; :class:`~medsynth.errors.CheckpointError` by default) with ``hint``.
    """
    from medsynth.config import load_config
    from medsynth.errors import CheckpointError

    error = error or CheckpointError
    paths = RunPaths(Path(run_dir))
    if not paths.root.is_dir():
        raise error(f"{run_dir}: run directory not found", hint=hint)
    if not paths.config.is_file():
        raise error(f"{run_dir}: not a medsynth run (no {paths.config.name} in the run directory)", hint=hint)
    return load_config(paths.config)


# --------------------------------------------------------------------------------------------
# shards and job records
# --------------------------------------------------------------------------------------------


def parse_shard(spec: str | None) -> tuple[int, int]:
    """Parse ``--shard i/n`` (0 <= i < n); ``None`` means the whole job, ``(0, 1)``."""
    from medsynth.errors import JobError

    if spec is None:
        return 0, 1
    try:
        i_s, n_s = str(spec).split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise JobError(f"`shard` must look like i/n (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise JobError(f"`shard={spec!r}`: need 0 <= i < n", hint="shards are numbered from 0, e.g. 0/4 ... 3/4")
    return i, n


def shard_items(items: list[Any], shard: tuple[int, int]) -> list[Any]:
    """The deterministic part of ``items`` shard (i, n) owns: every n-th item starting at i.

    The union over i = 0..n-1 is ``items`` and the parts are disjoint, whatever n is.
    """
    i, n = shard
    return items[i::n]


def create_or_check_record(path: str | os.PathLike, record: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Create a job record once (atomically, safe when several shards start together) or check it.

    If the file exists, the values under ``keys`` must equal ``record``'s, else :class:`JobError`
    names the differing keys: a job folder is never resumed with different arguments.
    """
    from medsynth.errors import JobError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps(record, indent=2, default=_json_default) + "\n"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(blob)
        try:
            os.link(tmp, path)  # atomic create-if-absent: exactly one concurrent shard wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise JobError(f"{path}: job record unreadable", hint="remove the job folder and start again") from None
    diff = [k for k in keys if json.loads(json.dumps(old.get(k), default=_json_default))
            != json.loads(json.dumps(record.get(k), default=_json_default))]
    if diff:
        raise JobError(f"{path.parent}: this job folder was started with different arguments ({', '.join(diff)})",
                       hint="repeat the original arguments, or use a new `out_dir` folder")
    return old
