"""Train/test splits by case and the leakage checks the utility evaluation runs before any compute.

A case is identified twice: by its manifest id and by the content of its image (sha256 of the
NIfTI file, or of the DICOM series' files), so the same scan listed twice under two ids is still
caught.  :func:`check_disjoint` refuses a train/test pair that shares either; :func:`split_manifest`
writes a deterministic, class-stratified split that keeps identical images on one side.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from medsynth.errors import ManifestError
from medsynth.jobs import RunPaths
from medsynth.manifest import Case, Manifest, load_manifest, save_manifest

log = logging.getLogger("medsynth.evaluate.split")


def case_fingerprint(case: Case) -> Optional[str]:
    """The content hash of a case's image: the manifest's sha256, else computed from the file(s).

    A DICOM series folder hashes its files' hashes in sorted path order (only the listed
    ``series_files`` when the manifest names them).  Returns None when the image is missing.
    """
    from medsynth.jobs import sha256_file

    if case.sha256:
        return case.sha256
    img = Path(case.image)
    if img.is_file():
        return sha256_file(img)
    if img.is_dir():
        names = case.extra.get("series_files")
        files = [img / n for n in names] if names else sorted(p for p in img.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for f in files:
            if f.is_file():
                h.update(f.relative_to(img).as_posix().encode())
                h.update(sha256_file(f).encode())
        return h.hexdigest()
    return None


def fingerprints(cases: Sequence[Case]) -> dict[str, str]:
    """Case id -> content hash for every case whose image can be read."""
    out = {}
    for c in cases:
        fp = case_fingerprint(c)
        if fp is not None:
            out[c.id] = fp
    return out


def overlap(a: Sequence[Case], b: Sequence[Case]) -> tuple[list[str], list[str]]:
    """Ids shared by ``a`` and ``b``, and ids of ``b`` whose image content also appears in ``a``."""
    ids = sorted({c.id for c in a} & {c.id for c in b})
    fa = fingerprints(a)
    seen = set(fa.values())
    same_image = sorted(cid for cid, fp in fingerprints(b).items() if fp in seen and cid not in ids)
    return ids, same_image


def _few(ids: Sequence[str], k: int = 5) -> str:
    return ", ".join(ids[:k]) + (f" and {len(ids) - k} more" if len(ids) > k else "")


def check_disjoint(train: Manifest, test: Manifest, what: str = "train manifest") -> None:
    """Raise :class:`ManifestError` if ``test`` shares a case id or an image with ``train``.

    ``what`` names the train side in the message ("train manifest", "the generator's training
    manifest").  Ids are manifest ids (never patient data).
    """
    ids, same = overlap(train.cases, test.cases)
    if ids or same:
        parts = []
        if ids:
            parts.append(f"{len(ids)} case id(s) in both ({_few(ids)})")
        if same:
            parts.append(f"{len(same)} test case(s) whose image is also in the {what} ({_few(same)})")
        raise ManifestError(
            f"test manifest {test.path} overlaps the {what} {train.path}: " + "; ".join(parts),
            hint="the test set must hold cases never used for training; split by case with "
                 "'medsynth evaluate split MANIFEST --out DIR'")


def split_manifest(manifest: Manifest | str | Path, out_dir: str | Path, test_fraction: float = 0.3,
                   seed: int = 0) -> tuple[Path, Path]:
    """Split a manifest into ``out_dir/train.json`` and ``out_dir/test.json``; returns both paths.

    Deterministic (a hash of seed and case id orders the cases, so the split does not depend on
    the order of the manifest), stratified by class label (each class contributes
    ``round(test_fraction * n_class)`` cases, at least one when it has two or more), and cases with
    identical image content are kept together on one side.  Paths in the written manifests are
    relative to ``out_dir``; images are not copied.
    """
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    if not 0.0 < test_fraction < 1.0:
        raise ManifestError(f"`test_fraction` must be between 0 and 1 (exclusive), got {test_fraction}")
    if len(manifest.cases) < 2:
        raise ManifestError(f"{manifest.path}: needs at least 2 cases to split, has {len(manifest.cases)}")
    fps = fingerprints(manifest.cases)
    # groups of cases that share an image (or an id) travel together
    groups: dict[str, list[Case]] = {}
    for c in manifest.cases:
        groups.setdefault(fps.get(c.id, "id:" + c.id), []).append(c)
    by_class: dict[object, list[list[Case]]] = {}
    for g in groups.values():
        by_class.setdefault(g[0].class_label, []).append(g)
    test_ids: set[str] = set()
    for cls in sorted(by_class, key=lambda k: (k is None, k if k is not None else -1)):
        gs = sorted(by_class[cls], key=lambda g: hashlib.sha256(f"{seed}:{min(c.id for c in g)}".encode()).hexdigest())
        n = sum(len(g) for g in gs)
        want = round(test_fraction * n)
        if n >= 2:
            want = min(max(want, 1), n - 1)
        taken = 0
        for g in gs:
            if taken >= want:
                break
            test_ids.update(c.id for c in g)
            taken += len(g)
    train = [c for c in manifest.cases if c.id not in test_ids]
    test = [c for c in manifest.cases if c.id in test_ids]
    if not train or not test:
        raise ManifestError(f"{manifest.path}: cannot split {len(manifest.cases)} case(s) into non-empty "
                            f"train and test sets with test fraction {test_fraction}")
    out = Path(out_dir)
    extra = dict(manifest.extra)
    paths = []
    for name, cases in (("train", train), ("test", test)):
        m = Manifest(cases, name=f"{manifest.name}-{name}", modality=manifest.modality,
                     extra={**extra, "split": {"part": name, "test_fraction": test_fraction, "seed": seed}})
        paths.append(save_manifest(m, out / f"{name}.json"))
    log.info("split %d cases: %d train, %d test", len(manifest.cases), len(train), len(test))
    return paths[0], paths[1]


# --------------------------------------------------------------------------------------------
# what the utility evaluation checks before any compute
# --------------------------------------------------------------------------------------------


def generator_manifest(run_dir: Path, cfg: Any) -> Optional[Path]:
    """The manifest the generator was trained on, as the run records it (config, else model card)."""
    import json

    if cfg.data.manifest:
        return Path(cfg.data.manifest)
    card = RunPaths(Path(run_dir)).card
    if card.is_file():
        try:
            meta = json.loads(card.read_text())
        except (OSError, ValueError):
            return None
        for key in ("manifest", "data_manifest", "train_manifest"):
            v = meta.get(key) if isinstance(meta, dict) else None
            if isinstance(v, dict):
                v = v.get("path")
            if isinstance(v, str) and v:
                p = Path(v)
                return p if p.is_absolute() else (Path(run_dir) / p)
    return None


def check_leakage(train: Manifest, test: Manifest, run_dir: Path, cfg: Any, needs_generator: bool) -> dict[str, str]:
    """Refuse overlapping train/test sets and a generator trained on test cases; returns what was checked."""
    check_disjoint(train, test, "train manifest")
    out = {"train_vs_test": "disjoint (case ids and image sha256)"}
    if not needs_generator:
        out["generator"] = "not used"
        return out
    gm = generator_manifest(run_dir, cfg)
    if gm is None:
        out["generator"] = "unverified: the run records no training manifest"
        log.warning("the run does not record the manifest it was trained on; cannot check that the "
                    "generator never saw the test cases")
    elif not Path(gm).exists():
        out["generator"] = f"unverified: the run's training manifest {gm} is not readable"
        log.warning("the run's training manifest %s is missing; cannot check it against the test set", gm)
    else:
        gen = load_manifest(gm)
        check_disjoint(gen, test, "generator's training manifest")
        out["generator"] = "disjoint from the test set (case ids and image sha256)"
    return out


def check_cases(m: Manifest, task: str, role: str) -> None:
    """Every case of the ``role`` manifest carries what ``task`` needs: a class_label (classify) or a label map."""
    if not m.cases:
        raise ManifestError(f"{m.path}: the {role} manifest has no cases")
    if task == "classify":
        missing = [c.id for c in m.cases if c.class_label is None]
        if missing:
            raise ManifestError(f"{m.path}: {len(missing)} {role} case(s) have no class_label (e.g. {missing[0]})",
                                hint="classification needs a class_label on every case; build the manifest "
                                     "with a class CSV ('medsynth manifest build SRC -o OUT.json --classes CSV')")
    else:
        missing = [c.id for c in m.cases if c.label is None]
        if missing:
            raise ManifestError(f"{m.path}: {len(missing)} {role} case(s) have no label map (e.g. {missing[0]})",
                                hint="segmentation needs a label on every case; build the manifest with label maps "
                                     "('medsynth manifest build SRC -o OUT.json --labels DIR')")
