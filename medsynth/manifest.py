"""Data manifests: the list of cases medsynth trains on (and the list it exports).

A manifest is a JSON file (format ``medsynth-manifest/1``, schema in ``data_manifests/``)::

    {"format": "medsynth-manifest/1", "name": "...", "modality": "CT",
     "cases": [{"id": "case-000", "image": "images/case-000.nii.gz", "label": null,
                "class_label": 1, "modality": "CT", "shape": [..], "spacing": [..], "sha256": "..."}]}

``image`` is a NIfTI file or a DICOM series folder; paths are relative to the manifest file.
Decathlon / nnU-Net ``dataset.json`` files are read too (:func:`load_manifest` detects them).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from medsynth.errors import ManifestError

log = logging.getLogger("medsynth.manifest")

MANIFEST_FORMAT = "medsynth-manifest/1"


@dataclass
class Case:
    """One case of a manifest.  ``image``/``label`` are absolute paths once loaded."""

    id: str
    image: Path
    label: Optional[Path] = None
    class_label: Optional[int] = None
    modality: Optional[str] = None
    shape: Optional[tuple[int, int, int]] = None
    spacing: Optional[tuple[float, float, float]] = None
    sha256: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, root: Path) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "image": _rel(self.image, root),
                             "label": _rel(self.label, root) if self.label else None,
                             "class_label": self.class_label, "modality": self.modality,
                             "shape": list(self.shape) if self.shape else None,
                             "spacing": [round(float(s), 6) for s in self.spacing] if self.spacing else None,
                             "sha256": self.sha256}
        d.update(self.extra)
        return d


@dataclass
class Manifest:
    """A list of cases plus dataset-level facts; ``path`` is where it was read from (if any)."""

    cases: list[Case]
    name: str = "dataset"
    modality: Optional[str] = None
    path: Optional[Path] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def to_json(self, root: Path) -> dict[str, Any]:
        d: dict[str, Any] = {"format": MANIFEST_FORMAT, "name": self.name, "modality": self.modality}
        d.update(self.extra)
        d["cases"] = [c.to_json(root) for c in self.cases]
        return d

    def class_labels(self) -> list[int]:
        return sorted({c.class_label for c in self.cases if c.class_label is not None})


def _rel(p: Optional[Path], root: Path) -> Optional[str]:
    if p is None:
        return None
    p = Path(p)
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        import os

        return Path(os.path.relpath(p.resolve(), root.resolve())).as_posix()


def save_manifest(manifest: Manifest, path: str | Path) -> Path:
    """Write a manifest atomically; case paths are stored relative to the manifest's folder."""
    from medsynth.jobs import write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, manifest.to_json(path.parent))
    manifest.path = path
    return path


def load_manifest(path: str | Path) -> Manifest:
    """Read a medsynth manifest or a Decathlon/nnU-Net ``dataset.json``.

    Structural problems (not JSON, missing keys, wrong types) raise :class:`ManifestError` listing
    all of them; whether files exist and are readable is :func:`verify_manifest`'s job.
    """
    path = Path(path)
    if path.is_dir() and (path / "manifest.json").is_file():
        path = path / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found",
                            hint="create one with 'medsynth manifest build SRC -o manifest.json'")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: top level must be a JSON object")
    if "cases" not in raw and ("training" in raw or "file_ending" in raw):
        return _load_decathlon(raw, path)
    errors: list[str] = []
    fmt = raw.get("format")
    if fmt != MANIFEST_FORMAT:
        errors.append(f"'format' must be '{MANIFEST_FORMAT}', got {fmt!r}")
    cases_raw = raw.get("cases")
    if not isinstance(cases_raw, list):
        raise ManifestError(f"{path}: 'cases' must be a list of case objects",
                            hint="see data_manifests/README.md for the format")
    root = path.parent
    cases: list[Case] = []
    known = {"id", "image", "label", "class_label", "modality", "shape", "spacing", "sha256"}
    for i, c in enumerate(cases_raw):
        where = f"cases[{i}]"
        if not isinstance(c, dict):
            errors.append(f"{where}: must be an object")
            continue
        cid = c.get("id")
        if not isinstance(cid, str) or not cid:
            errors.append(f"{where}.id: must be a non-empty string")
            cid = f"#{i}"
        img = c.get("image")
        if not isinstance(img, str) or not img:
            errors.append(f"{where} ({cid}).image: must be a path string")
            continue
        lab = c.get("label")
        if lab is not None and not isinstance(lab, str):
            errors.append(f"{where} ({cid}).label: must be a path string or null")
            lab = None
        cl = c.get("class_label")
        if cl is not None and (isinstance(cl, bool) or not isinstance(cl, int)):
            errors.append(f"{where} ({cid}).class_label: must be an integer or null, got {cl!r}")
            cl = None
        mod = c.get("modality")
        if mod is not None and mod not in ("CT", "MR"):
            errors.append(f"{where} ({cid}).modality: must be 'CT' or 'MR', got {mod!r}")
        shape = c.get("shape")
        spacing = c.get("spacing")
        cases.append(Case(
            id=cid, image=(root / img).resolve(), label=(root / lab).resolve() if lab else None,
            class_label=cl, modality=mod,
            shape=tuple(shape) if isinstance(shape, list) else None,  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in spacing) if isinstance(spacing, list) else None,  # type: ignore
            sha256=c.get("sha256"), extra={k: v for k, v in c.items() if k not in known}))
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ManifestError(f"{path}: {len(errors)} problem(s):\n{lines}",
                            hint="see data_manifests/README.md for the format")
    extra = {k: v for k, v in raw.items() if k not in ("format", "name", "modality", "cases")}
    return Manifest(cases, name=str(raw.get("name", path.stem)), modality=raw.get("modality"),
                    path=path, extra=extra)


def _load_decathlon(raw: dict[str, Any], path: Path) -> Manifest:
    """Read a Medical Segmentation Decathlon / nnU-Net v2 ``dataset.json``."""
    root = path.parent
    mods = raw.get("modality") or raw.get("channel_names") or {}
    first = str(next(iter(mods.values()), "")).upper() if isinstance(mods, dict) else ""
    modality = "CT" if first == "CT" else ("MR" if first else None)
    cases: list[Case] = []
    training = raw.get("training")
    if isinstance(training, list):  # Decathlon: explicit pairs
        for i, item in enumerate(training):
            if not isinstance(item, dict) or "image" not in item:
                raise ManifestError(f"{path}: training[{i}] must be an object with 'image'")
            img = (root / item["image"]).resolve()
            lab = item.get("label")
            cases.append(Case(id=_strip_nii(img.name), image=img,
                              label=(root / lab).resolve() if lab else None, modality=modality))
    else:  # nnU-Net v2: imagesTr/<case>_0000<ending>
        ending = raw.get("file_ending", ".nii.gz")
        for img in sorted((root / "imagesTr").glob(f"*_0000{ending}")):
            cid = img.name[: -len(f"_0000{ending}")]
            lab = root / "labelsTr" / f"{cid}{ending}"
            cases.append(Case(id=cid, image=img.resolve(), label=lab.resolve() if lab.exists() else None,
                              modality=modality))
    if not cases:
        raise ManifestError(f"{path}: dataset.json lists no training cases")
    return Manifest(cases, name=str(raw.get("name", root.name)), modality=modality, path=path)


def _strip_nii(name: str) -> str:
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name
