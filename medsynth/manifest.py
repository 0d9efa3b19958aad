"""Data manifests: the list of cases medsynth trains on (and the list it exports).

A manifest is a JSON file (format ``medsynth-manifest/1``, schema in ``data_manifests/``)::

    {"format": "medsynth-manifest/1", "name": "...", "modality": "CT",
     "cases": [{"id": "case-000", "image": "images/case-000.nii.gz", "label": null,
                "class_label": 1, "modality": "CT", "shape": [..], "spacing": [..], "sha256": "..."}]}

``image`` is a NIfTI file or a DICOM series folder; paths are relative to the manifest file.
A DICOM case whose folder holds more than one series lists its files in ``series_files``.
Decathlon / nnU-Net ``dataset.json`` files are read too (:func:`load_manifest` detects them).

Three jobs live here: :func:`load_manifest` checks structure (all problems at once),
:func:`build_manifest` measures a folder of NIfTI files and DICOM series into a manifest without
copying any header value that identifies a person, and :func:`verify_manifest` opens every case
and returns every problem it finds, each naming the case and the fix.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from medsynth.errors import ImageReadError, ManifestError, MedsynthError

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
        d: dict[str, Any] = {"id": self.id, "image": relative_path(self.image, root),
                             "label": relative_path(self.label, root) if self.label else None,
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


def relative_path(p: Optional[Path], root: Path) -> Optional[str]:
    """``p`` as a POSIX path relative to ``root`` (with ``..`` when outside it), as manifests store paths."""
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
    if "name" in raw and not isinstance(raw["name"], str):
        errors.append(f"'name' must be a string, got {raw['name']!r}")
    if raw.get("modality") not in (None, "CT", "MR"):
        errors.append(f"'modality' must be 'CT', 'MR' or null, got {raw.get('modality')!r}")
    cases_raw = raw.get("cases")
    if not isinstance(cases_raw, list):
        raise ManifestError(f"{path}: 'cases' must be a list of case objects",
                            hint="see data_manifests/README.md for the format")
    cases = [c for i, item in enumerate(cases_raw) if (c := _case_from_json(item, i, path.parent, errors))]
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ManifestError(f"{path}: {len(errors)} problem(s):\n{lines}",
                            hint="see data_manifests/README.md for the format")
    extra = {k: v for k, v in raw.items() if k not in ("format", "name", "modality", "cases")}
    return Manifest(cases, name=str(raw.get("name", path.stem)), modality=raw.get("modality"),
                    path=path, extra=extra)


_KNOWN_CASE_KEYS = {"id", "image", "label", "class_label", "modality", "shape", "spacing", "sha256"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _case_from_json(c: Any, i: int, root: Path, errors: list[str]) -> Optional[Case]:
    """One case from its JSON object; structural problems go to ``errors`` (None if unusable)."""
    where = f"cases[{i}]"
    if not isinstance(c, dict):
        errors.append(f"{where}: must be an object")
        return None
    cid = c.get("id")
    if not isinstance(cid, str) or not cid.strip():
        errors.append(f"{where}.id: must be a non-empty string")
        cid = f"#{i}"
    where = f"{where} ({cid})"
    img = c.get("image")
    if not isinstance(img, str) or not img:
        errors.append(f"{where}.image: must be a path string (NIfTI file or DICOM series folder)")
        return None
    lab = c.get("label")
    if lab is not None and (not isinstance(lab, str) or not lab):
        errors.append(f"{where}.label: must be a path string or null")
        lab = None
    cl = c.get("class_label")
    if cl is not None and (isinstance(cl, bool) or not isinstance(cl, int) or cl < 0):
        errors.append(f"{where}.class_label: must be an integer >= 0 or null, got {cl!r}")
        cl = None
    mod = c.get("modality")
    if mod is not None and mod not in ("CT", "MR"):
        errors.append(f"{where}.modality: must be 'CT', 'MR' or null, got {mod!r}")
        mod = None
    shape = c.get("shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3
                                  and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        errors.append(f"{where}.shape: must be 3 positive integers or null, got {shape!r}")
        shape = None
    spacing = c.get("spacing")
    if spacing is not None and not (isinstance(spacing, list) and len(spacing) == 3 and all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in spacing)):
        errors.append(f"{where}.spacing: must be 3 positive numbers (mm) or null, got {spacing!r}")
        spacing = None
    sha = c.get("sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.match(sha)):
        errors.append(f"{where}.sha256: must be 64 lowercase hex digits or null")
        sha = None
    files = c.get("series_files")
    if files is not None and not (isinstance(files, list) and files
                                  and all(isinstance(f, str) and f for f in files)):
        errors.append(f"{where}.series_files: must be a non-empty list of file names (relative to 'image')")
    return Case(id=cid, image=(root / img).resolve(), label=(root / lab).resolve() if lab else None,
                class_label=cl, modality=mod,
                shape=tuple(shape) if shape else None,  # type: ignore[arg-type]
                spacing=tuple(float(s) for s in spacing) if spacing else None,  # type: ignore[arg-type]
                sha256=sha, extra={k: v for k, v in c.items() if k not in _KNOWN_CASE_KEYS})


def _load_decathlon(raw: dict[str, Any], path: Path) -> Manifest:
    """Read a Medical Segmentation Decathlon / nnU-Net v2 ``dataset.json`` (or a MONAI datalist).

    Decathlon files list ``training`` pairs; nnU-Net v2 files are resolved from
    ``imagesTr/<case>_0000<file_ending>`` and ``labelsTr/<case><file_ending>``.  Only single-channel
    datasets are supported: medsynth models one image per case.
    """
    root = path.parent
    mods = raw.get("modality") or raw.get("channel_names") or {}
    names = [str(v) for v in mods.values()] if isinstance(mods, dict) else []
    if len(names) > 1:
        raise ManifestError(f"{path}: dataset has {len(names)} channels ({', '.join(names)}); "
                            "medsynth reads single-channel datasets",
                            hint="write a medsynth manifest that lists one channel's files "
                                 "(e.g. 'medsynth manifest build imagesTr/ ...' on one channel)")
    first = names[0].upper() if names else ""
    modality = "CT" if first == "CT" else ("MR" if first else None)
    cases: list[Case] = []
    errors: list[str] = []
    training = raw.get("training")
    if isinstance(training, list):  # Decathlon: explicit pairs
        for i, item in enumerate(training):
            if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                errors.append(f"training[{i}]: must be an object whose 'image' is one path string")
                continue
            img = (root / item["image"]).resolve()
            lab = item.get("label")
            if lab is not None and not isinstance(lab, str):
                errors.append(f"training[{i}].label: must be a path string")
                lab = None
            cl = item.get("class_label")
            cl = cl if isinstance(cl, int) and not isinstance(cl, bool) and cl >= 0 else None
            cases.append(Case(id=_strip_nii(img.name), image=img,
                              label=(root / lab).resolve() if lab else None, class_label=cl, modality=modality))
    else:  # nnU-Net v2: imagesTr/<case>_0000<ending>
        ending = str(raw.get("file_ending", ".nii.gz"))
        for img in sorted((root / "imagesTr").glob(f"*_0000{ending}")):
            cid = img.name[: -len(f"_0000{ending}")]
            lab = root / "labelsTr" / f"{cid}{ending}"
            cases.append(Case(id=cid, image=img.resolve(), label=lab.resolve() if lab.exists() else None,
                              modality=modality))
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ManifestError(f"{path}: {len(errors)} problem(s):\n{lines}")
    if not cases:
        raise ManifestError(f"{path}: dataset.json lists no training cases",
                            hint="Decathlon files need a 'training' list; nnU-Net v2 files need "
                                 "imagesTr/<case>_0000<file_ending> beside them")
    extra = {k: raw[k] for k in ("labels", "description") if k in raw}
    return Manifest(cases, name=str(raw.get("name", root.name)), modality=modality, path=path, extra=extra)


def _strip_nii(name: str) -> str:
    from medsynth.formats import volume_stem

    return volume_stem(name)


# --------------------------------------------------------------------------------------------
# verify: open every case, report every problem
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One problem found by :func:`verify_manifest`: which case, which field, what is wrong, the fix."""

    case: str
    field: str
    message: str
    fix: str

    def __str__(self) -> str:
        msg = " ".join(self.message.split())  # one line per problem, whatever the source message held
        return f"{self.case}: {self.field}: {msg} (fix: {self.fix})"


_FIX_MISSING = "correct the path (relative to the manifest's folder) or remove the case"
_FIX_UNREADABLE = "replace the file with a complete, valid copy or remove the case"
_FIX_REBUILD = "rebuild the manifest with 'medsynth manifest build' or correct the recorded value"
_FIX_ONE_3D = "use one 3D volume per case (no 2D slices, 4D series or multi-channel images)"


def _read(path: Path, modality: Optional[str], extra: dict[str, Any]):
    from medsynth.formats import read_image

    kw = {"series_files": extra["series_files"]} if path.is_dir() and "series_files" in extra else {}
    return read_image(path, modality, **kw)


def _content_defects(vol) -> list[tuple[str, str]]:
    """What makes a readable volume unusable as a case, as (message, fix) pairs; [] if none.

    Shared by build (which skips such inputs) and verify (which reports them), so a manifest that
    build writes is one that verify accepts.
    """
    if min(vol.shape) < 2:
        return [(f"a 2D image (shape {list(vol.shape)}), not a 3D volume", "use one 3D volume per case (no 2D slices)")]
    arr = vol.array
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            return [(f"{bad} voxel(s) are NaN or infinite",
                     "re-export the image without NaN/Inf voxels or remove the case")]
    return []


def _check_volume(case: Case, field_: str, path: Path, modality: Optional[str], extra: dict[str, Any],
                  out: list[Problem]):
    """Read one image/label and append its own problems; returns the Volume or None."""
    if not path.exists():
        out.append(Problem(case.id, field_, f"{path}: file or folder not found", _FIX_MISSING))
        return None
    try:
        vol = _read(path, modality, extra)
    except ImageReadError as exc:
        shape_msg = "expected a 3D image" in exc.message
        out.append(Problem(case.id, field_, exc.message, _FIX_ONE_3D if shape_msg else (exc.hint or _FIX_UNREADABLE)))
        return None
    except MedsynthError as exc:
        out.append(Problem(case.id, field_, f"{path}: {exc.message}", exc.hint or _FIX_UNREADABLE))
        return None
    except MemoryError:
        out.append(Problem(case.id, field_, f"{path}: too large to read into memory", "downsample or crop it"))
        return None
    except Exception as exc:  # a reader failing in an unforeseen way must not sink the other cases
        log.debug("reading %s failed", path, exc_info=True)
        out.append(Problem(case.id, field_, f"{path}: could not be read ({type(exc).__name__})",
                           _FIX_UNREADABLE + "; rerun with --debug for details"))
        return None
    defects = _content_defects(vol)
    out += [Problem(case.id, field_, f"{path}: {msg}", fix) for msg, fix in defects]
    if defects and min(vol.shape) < 2:
        return None
    return vol


def _label_problems(case: Case, lab, vol, out: list[Problem]) -> None:
    """Problems of a case's label map ``lab`` against its image ``vol`` (None if unreadable)."""
    arr = lab.array
    integer = np.issubdtype(arr.dtype, np.integer) or (np.all(np.isfinite(arr)) and np.array_equal(arr, np.rint(arr)))
    if not integer:
        out.append(Problem(case.id, "label", f"{case.label}: values are not integers",
                           "store the label map as integer class values (e.g. uint8)"))
    elif arr.size and float(arr.min()) < 0:
        out.append(Problem(case.id, "label", f"{case.label}: negative label values",
                           "use 0 for background and positive integers for structures"))
    if vol is None:
        return
    if lab.shape != vol.shape:
        out.append(Problem(case.id, "label", f"{case.label}: shape {list(lab.shape)} differs "
                           f"from the image's {list(vol.shape)}",
                           "resample the label onto the image grid or fix the label path"))
    elif not np.allclose(lab.affine, vol.affine, atol=1e-3):
        d = float(np.abs(lab.affine - vol.affine).max())
        out.append(Problem(case.id, "label", f"{case.label}: affine differs from the image's (by up to {d:.3g} mm)",
                           "the label must share the image's voxel grid: resample it or fix its header"))


def _content_hash(case: Case, vol) -> str:
    from medsynth.formats import volume_sha256

    return vol.meta.get("sha256") if case.image.is_dir() else volume_sha256(case.image)


@dataclass
class _Duplicates:
    """Ids used twice, and two cases of one image (duplicates leak between training and validation)."""

    ids: dict[str, int] = field(default_factory=dict)
    images: dict[tuple, str] = field(default_factory=dict)

    def problems(self, index: int, case: Case) -> list[Problem]:
        out = []
        if case.id in self.ids:
            out.append(Problem(case.id, "id", f"id already used by case #{self.ids[case.id] + 1}",
                               "give every case a unique id"))
        else:
            self.ids[case.id] = index
        img_key = (str(case.image), tuple(case.extra.get("series_files") or ()))
        if img_key in self.images:
            out.append(Problem(case.id, "image", f"same image as case {self.images[img_key]!r}",
                               "remove the duplicate case (duplicates leak between training and validation)"))
        else:
            self.images[img_key] = case.id
        return out


def _recorded_problems(case: Case, vol, out: list[Problem]) -> None:
    """The DICOM Modality, shape, spacing and sha256 the manifest records, against the image read."""
    if case.image.is_dir() and case.modality and vol.modality != case.modality:
        out.append(Problem(case.id, "modality", f"DICOM Modality is {vol.modality} but the manifest "
                           f"says {case.modality}", "correct the case's modality"))
    if case.shape is not None and tuple(case.shape) != vol.shape:
        out.append(Problem(case.id, "shape", f"recorded {list(case.shape)} but the image is "
                           f"{list(vol.shape)}", _FIX_REBUILD))
    if case.spacing is not None and not np.allclose(case.spacing, vol.spacing, rtol=1e-3, atol=1e-4):
        out.append(Problem(case.id, "spacing", f"recorded {[round(s, 4) for s in case.spacing]} mm "
                           f"but the image has {[round(s, 4) for s in vol.spacing]} mm", _FIX_REBUILD))
    if case.sha256 is not None:
        try:
            actual = _content_hash(case, vol)
        except MedsynthError as exc:
            actual = None
            out.append(Problem(case.id, "sha256", exc.message, exc.hint or _FIX_UNREADABLE))
        if actual is not None and actual != case.sha256:
            out.append(Problem(case.id, "sha256", f"{case.image}: content changed since the "
                               "manifest was built (sha256 differs)",
                               "restore the original file(s) or rebuild the manifest"))


def _case_problems(case: Case, default_modality: Optional[str], out: list[Problem]) -> Optional[str]:
    """Open one case's image and label and add their problems to ``out``; returns its modality."""
    modality = case.modality or default_modality
    vol = _check_volume(case, "image", case.image, modality, case.extra, out)
    if vol is not None:
        _recorded_problems(case, vol, out)
        modality = modality or (vol.modality if case.image.is_dir() else None)
    if modality is None:
        out.append(Problem(case.id, "modality", "modality unknown (not set for the case or the manifest)",
                           "set 'modality' to CT or MR"))
    if case.label is not None:
        lab = _check_volume(case, "label", case.label, "SEG" if not case.label.is_dir() else None, {}, out)
        if lab is not None:
            _label_problems(case, lab, vol, out)
    return modality


def _mixed_modality_problems(modalities: list[tuple[str, str]], declared: Optional[str]) -> list[Problem]:
    counts: dict[str, int] = {}
    for _, m in modalities:
        counts[m] = counts.get(m, 0) + 1
    if len(counts) <= 1:
        return []
    majority = declared or max(sorted(counts), key=lambda m: counts[m])
    summary = ", ".join(f"{n} {m}" for m, n in sorted(counts.items()))
    return [Problem(cid, "modality", f"{m} in a {majority} manifest (mixed modality: {summary})",
                    "keep one modality per manifest (split CT and MR into two manifests)")
            for cid, m in modalities if m != majority]


def _class_label_problems(cases: Sequence[Case]) -> list[Problem]:
    with_class = [c for c in cases if c.class_label is not None]
    if not with_class or len(with_class) == len(cases):
        return []
    return [Problem(c.id, "class_label", f"missing while {len(with_class)} other case(s) have one",
                    "give every case a class_label, or none") for c in cases if c.class_label is None]


def verify_manifest(manifest: Manifest) -> list[Problem]:
    """Open every case of ``manifest`` and return ALL problems found, in case order.

    Per case: image and label exist and are readable, are 3D (no axis of size 1) and finite; the
    label is an integer map on the image's exact grid (same shape and affine); recorded shape,
    spacing and sha256 match the files (a changed file is reported); the DICOM Modality tag agrees
    with the manifest.  Across cases: duplicate ids, duplicate images, mixed or unknown modality,
    class labels given for some cases but not others.  An empty list means the manifest is clean.
    Images and labels may be NIfTI, NRRD or MetaImage files, or DICOM series folders (images).
    """
    from medsynth.progress import progress

    cases = manifest.cases
    if not cases:
        return [Problem("(manifest)", "cases", "the manifest lists no cases", "add cases or rebuild it")]
    problems: list[Problem] = []
    duplicates = _Duplicates()
    modalities: list[tuple[str, str]] = []  # (case id, modality), per case even if ids repeat
    for index, case in enumerate(progress(cases, desc="verifying cases", total=len(cases))):
        problems += duplicates.problems(index, case)
        modality = _case_problems(case, manifest.modality, problems)
        if modality is not None:
            modalities.append((case.id, modality))
    problems += _mixed_modality_problems(modalities, manifest.modality)
    problems += _class_label_problems(cases)
    order = {c.id: i for i, c in reversed(list(enumerate(cases)))}
    problems.sort(key=lambda p: order.get(p.case, -1))
    return problems


# --------------------------------------------------------------------------------------------
# build: measure a folder of volume files and DICOM series into one manifest per modality
# --------------------------------------------------------------------------------------------


@dataclass
class BuildReport:
    """What :func:`build_manifest` made: one manifest per modality found (CT first), plus one line per
    input it skipped or doubted.  Save it with :func:`save_build`."""

    manifests: list[Manifest]
    notes: list[str] = field(default_factory=list)
    n_nifti: int = 0
    n_itk: int = 0  # NRRD and MetaImage files
    n_dicom: int = 0

    @property
    def manifest(self) -> Manifest:
        """The manifest, when the folder held one modality (else see :attr:`manifests`)."""
        if len(self.manifests) != 1:
            raise ManifestError(f"the build made {len(self.manifests)} manifests (one per modality)",
                                hint="use BuildReport.manifests, or pass modality='CT' or 'MR'")
        return self.manifests[0]


def guess_modality(array: np.ndarray) -> str:
    """"CT" if the values look like Hounsfield units, else "MR".

    CT images hold air at about -1000 HU, so their minimum is <= -500, and apart from padding
    outside the field of view (scanners write -2048, -3024 or -32768 there) nearly all values lie
    in [-1100, 3100].  MR magnitude images are non-negative or only slightly negative.
    """
    a = np.asarray(array)
    finite = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a.ravel()
    if finite.size == 0 or float(finite.min()) > -500:
        return "MR"
    inside = finite[finite >= -1100]
    return "CT" if inside.size and float(np.mean(inside <= 3100)) >= 0.99 else "MR"


def _volume_files(src: Path, exclude: Sequence[Path]) -> list[Path]:
    """Volume files (NIfTI, NRRD, MetaImage) under ``src``, sorted, hidden and excluded folders skipped."""
    import os

    from medsynth.formats import is_volume_file

    excl = {p.resolve() for p in exclude}
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (d / n).resolve() not in excl)
        out += [d / n for n in sorted(filenames) if not n.startswith(".") and is_volume_file(n)]
    return out


def read_classes_csv(path: str | Path) -> dict[str, int]:
    """Read a ``--classes`` CSV: header ``id,class``; ``id`` is a case id, an image file name or an
    image path relative to the scanned folder; ``class`` an integer >= 0.  All bad rows are reported."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: classes file not found", hint="pass a CSV with columns id,class")
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8-sig").splitlines()))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: not a readable CSV file ({exc})", hint="save it as UTF-8 CSV") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "id" not in header or "class" not in header:
        raise ManifestError(f"{path}: the first row must name the columns 'id' and 'class', got {rows[0] if rows else []}",
                            hint="e.g. 'id,class' then one row per case: 'case-001,1'")
    ci, cc = header.index("id"), header.index("class")
    out: dict[str, int] = {}
    errors: list[str] = []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) <= max(ci, cc):
            errors.append(f"line {n}: needs an id and a class")
            continue
        key, val = row[ci].strip(), row[cc].strip()
        try:
            cls = int(val)
            if cls < 0:
                raise ValueError
        except ValueError:
            errors.append(f"line {n}: class must be an integer >= 0, got {val!r}")
            continue
        if not key:
            errors.append(f"line {n}: empty id")
        elif key in out and out[key] != cls:
            errors.append(f"line {n}: {key!r} listed twice with different classes")
        else:
            out[key] = cls
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ManifestError(f"{path}: {len(errors)} problem(s):\n{lines}", hint="fix the rows named above")
    return out


def _unique(base: str, taken: set[str]) -> str:
    cid, n = base, 2
    while cid in taken:
        cid, n = f"{base}-{n}", n + 1
    taken.add(cid)
    return cid


@dataclass
class _Builder:
    """The state of one :func:`build_manifest` run: cases so far, notes, label matching."""

    src: Path
    label_dir: Optional[Path]
    modality: Optional[str]
    report: BuildReport
    cases: list[Case] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)
    keys: dict[str, list[str]] = field(default_factory=dict)  # case id -> names the classes CSV may use
    guessed: dict[str, int] = field(default_factory=dict)
    used_labels: set[Path] = field(default_factory=set)

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    def find_label(self, names: Sequence[str]) -> Optional[Path]:
        if self.label_dir is None:
            return None
        for n in names:
            if (self.label_dir / n).is_file():
                self.used_labels.add((self.label_dir / n).resolve())
                return (self.label_dir / n).resolve()
        return None

    def usable_label(self, cid: str, label: Optional[Path], vol) -> Optional[Path]:
        """``label`` if verify would accept it for this image, else None (with a note saying why)."""
        if label is None:
            return None
        probe = Case(id=cid, image=Path(), label=label)
        probs: list[Problem] = []
        lab = _check_volume(probe, "label", label, "SEG", {}, probs)
        if lab is not None:
            _label_problems(probe, lab, vol, probs)
        if probs:
            p = probs[0]
            self.note(f"{label}: label not used for case {cid}: {_without_path(p.message, label)} (fix: {p.fix})")
            return None
        return label

    def add(self, case: Case, keys: list[str], vol) -> None:
        case.label = self.usable_label(case.id, case.label, vol)
        self.cases.append(case)
        self.keys[case.id] = keys


def _without_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _add_volume_files(b: _Builder, files: Sequence[Path]) -> None:
    """NIfTI, NRRD and MetaImage files: one case each; modality from the intensities."""
    from medsynth.formats import is_nifti, read_image, volume_sha256
    from medsynth.progress import progress

    for path in progress(files, desc="reading volumes", total=len(files)):
        try:
            vol = read_image(path, "CT")
            sha = volume_sha256(path)
        except MedsynthError as exc:
            b.note(f"{path}: skipped: {_without_path(exc.message, path)}")
            continue
        except Exception as exc:  # one unreadable file never sinks the build
            log.debug("reading %s failed", path, exc_info=True)
            b.note(f"{path}: skipped: could not be read ({type(exc).__name__})")
            continue
        defects = _content_defects(vol)
        if defects:
            b.note(f"{path}: skipped: {defects[0][0]}")
            continue
        mod = guess_modality(vol.array)
        if b.modality is not None and mod != b.modality:
            why = "values are Hounsfield units" if mod == "CT" else "values are not Hounsfield units"
            b.note(f"{path}: skipped: looks like {mod}, not {b.modality} ({why}; --modality {b.modality})")
            continue
        b.guessed[mod] = b.guessed.get(mod, 0) + 1
        cid = _unique(_strip_nii(path.name), b.taken)
        b.add(Case(id=cid, image=path.resolve(), label=b.find_label([path.name]), modality=mod,
                   shape=vol.shape, spacing=vol.spacing, sha256=sha),
              [path.name, path.relative_to(b.src).as_posix()], vol)
        if is_nifti(path):
            b.report.n_nifti += 1
        else:
            b.report.n_itk += 1
        del vol


def _add_dicom_series(b: _Builder, exclude: Sequence[Path]) -> None:
    """DICOM series: counter ids, modality from the Modality tag."""
    from medsynth.dicom_series import read_series, scan_dicom
    from medsynth.formats import VOLUME_SUFFIXES
    from medsynth.progress import progress

    series, dproblems = scan_dicom(b.src, recursive=True, exclude=exclude)
    b.report.notes += [str(p) for p in dproblems]
    counter = 0
    for s in progress(series, desc="reading DICOM series", total=len(series)):
        if b.modality is not None and s.modality != b.modality:
            b.note(f"{s.folder}: skipped: a {s.modality} series (--modality {b.modality})")
            continue
        try:
            vol = read_series(s.files)
        except ImageReadError as exc:
            b.note(f"{s.folder}: rejected: {exc.message}")
            continue
        except Exception as exc:  # one unreadable series never sinks the build
            b.note(f"{s.folder}: rejected: could not be read ({type(exc).__name__})")
            continue
        defects = _content_defects(vol)
        if defects:
            b.note(f"{s.folder}: rejected: {defects[0][0]}")
            continue
        counter += 1
        cid = _unique(f"series-{counter:04d}", b.taken)
        extra: dict[str, Any] = {} if s.exclusive else {"series_files": s.relative_files()}
        label = b.find_label([s.folder.name + suf for suf in VOLUME_SUFFIXES]) if s.exclusive else None
        rel = s.folder.resolve().relative_to(b.src.resolve()).as_posix()
        b.add(Case(id=cid, image=s.folder.resolve(), label=label, modality=vol.modality,
                   shape=vol.shape, spacing=vol.spacing, sha256=vol.meta["sha256"], extra=extra),
              [rel] if s.exclusive else [], vol)
        b.report.n_dicom += 1
        del vol


def _assign_classes(b: _Builder, class_map: dict[str, int], classes: Path) -> None:
    """Give each case its class from the CSV (by case id, file name or path); report stray rows."""
    used_keys: set[str] = set()
    for c in b.cases:
        for k in [c.id, *b.keys.get(c.id, [])]:
            if k in class_map:
                c.class_label = class_map[k]
                used_keys.add(k)
                break
    stray = sorted(set(class_map) - used_keys)
    if stray:
        b.note(f"{len(stray)} row(s) of {classes} match no case: {', '.join(stray[:5])}"
               + (" ..." if len(stray) > 5 else ""))


def _without_class_left_out(cases: list[Case], classes: Path, notes: list[str]) -> list[Case]:
    """The cases of one manifest, less those without a class when others have one (verify requires a
    class_label for every case of a manifest, or for none)."""
    missing = [c.id for c in cases if c.class_label is None]
    if not missing:
        return cases
    left_out = len(missing) < len(cases)
    notes.append(f"{len(missing)} case(s) have no row in {classes}: {', '.join(missing[:5])}"
                 + (" ..." if len(missing) > 5 else "")
                 + ("; left out (a manifest gives every case a class_label, or none)" if left_out else ""))
    return [c for c in cases if c.class_label is not None] if left_out else cases


def build_manifest(src: str | Path, labels: Optional[str | Path] = None, classes: Optional[str | Path] = None,
                   modality: Optional[str] = None, name: Optional[str] = None) -> BuildReport:
    """Scan ``src`` recursively for volume files and DICOM series and measure each into a :class:`Case`.

    Volume files are NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) and MetaImage
    (``.mha``, ``.mhd``); their case ids are file names without extension, their modality is guessed
    from the intensities (:func:`guess_modality`).  DICOM series get counter ids ``series-0001``...
    in folder order (never a UID or header value) and the modality of their Modality tag.
    ``modality`` ("CT" or "MR") keeps only the cases of that modality; without it the cases are split
    into one manifest per modality found.  Each case records modality, shape, spacing and sha256.
    A label in ``labels`` is matched by identical file name (for a DICOM series: the series folder's
    name plus a volume suffix, e.g. ``.nii.gz``); ``classes`` is a CSV read by :func:`read_classes_csv`.
    Every input that verify would reject (unreadable, 2D, NaN voxels, a label off the image grid, a
    case without a class among cases with one) is left out or loses its label, with a note saying
    why, so :func:`verify_manifest` accepts what this writes.  The input is never modified.  Save
    the result with :func:`save_build`.
    """
    from medsynth import __version__

    src = Path(src)
    if not src.is_dir():
        raise ManifestError(f"{src}: not a folder", hint="pass the folder that holds the image files / DICOM series")
    if modality is not None and modality not in ("CT", "MR"):
        raise ManifestError(f"`modality` must be CT or MR, got {modality!r}")
    label_dir = Path(labels) if labels is not None else None
    if label_dir is not None and not label_dir.is_dir():
        raise ManifestError(f"{label_dir}: labels folder not found", hint="pass the folder that holds the label maps")
    class_map = read_classes_csv(classes) if classes is not None else None
    exclude = [label_dir] if label_dir is not None else []

    b = _Builder(src, label_dir, modality, BuildReport([]))
    _add_volume_files(b, _volume_files(src, exclude))
    _add_dicom_series(b, exclude)
    if class_map is not None:
        _assign_classes(b, class_map, Path(classes))  # type: ignore[arg-type]
    notes = b.report.notes
    if not b.cases:
        what = f"{modality} " if modality else ""
        raise ManifestError(f"{src}: no readable {what}volume file (NIfTI, NRRD, MetaImage) or DICOM series found"
                            + (f" ({len(notes)} input(s) skipped: {notes[0]})" if notes else ""),
                            hint="point `src` at the folder holding the images; see 'medsynth manifest build --help'")
    if b.guessed:
        notes.append("modality guessed from intensities for NIfTI/NRRD/MetaImage files: "
                     + ", ".join(f"{n} {m}" for m, n in sorted(b.guessed.items()))
                     + (f" (--modality {modality} keeps only {modality})" if modality else
                        " (pass --modality CT or MR to keep one)"))
    if label_dir is not None:
        n_lab = sum(c.label is not None for c in b.cases)
        unused = [p for p in _volume_files(label_dir, []) if p.resolve() not in b.used_labels]
        if n_lab < len(b.cases):
            notes.append(f"{len(b.cases) - n_lab} of {len(b.cases)} case(s) have no label in {label_dir} "
                         "(labels are matched by identical file name)")
        if unused:
            notes.append(f"{len(unused)} label file(s) in {label_dir} match no image, e.g. {unused[0].name}")

    base = name or src.resolve().name or "dataset"
    by_mod = {m: [c for c in b.cases if c.modality == m] for m in ("CT", "MR")}
    by_mod = {m: cs for m, cs in by_mod.items() if cs}
    if len(by_mod) > 1:
        notes.append("cases have mixed modalities: written as one manifest per modality ("
                     + ", ".join(f"{len(cs)} {m}" for m, cs in by_mod.items()) + ")")
    for m, cs in by_mod.items():
        if class_map is not None:
            cs = _without_class_left_out(cs, Path(classes), notes)  # type: ignore[arg-type]
        b.report.manifests.append(Manifest(cs, name=base if len(by_mod) == 1 else f"{base}-{m}", modality=m,
                                           extra={"built_by": f"medsynth {__version__} manifest build"}))
    return b.report


def build_paths(report: BuildReport, out: str | Path) -> list[Path]:
    """Where :func:`save_build` writes each manifest: ``OUT`` for one, ``OUT-CT.json``/``OUT-MR.json``
    (the modality before the suffix) when the build made one per modality."""
    out = Path(out)
    if len(report.manifests) == 1:
        return [out]
    stem, suffix = (out.stem, out.suffix) if out.suffix else (out.name, ".json")
    return [out.with_name(f"{stem}-{m.modality}{suffix}") for m in report.manifests]


def save_build(report: BuildReport, out: str | Path) -> list[Path]:
    """Write every manifest of a build (atomically, see :func:`build_paths` for the names)."""
    return [save_manifest(m, p) for m, p in zip(report.manifests, build_paths(report, out))]


def source_counts(manifest: Manifest) -> str:
    """What a manifest's images are, e.g. ``1 NIfTI, 2 NRRD, 3 DICOM series`` (formats with none omitted,
    NIfTI and DICOM always named)."""
    from medsynth.formats import fmt_name

    counts: dict[str, int] = {}
    for c in manifest.cases:
        kind = fmt_name(c.image)
        counts[kind] = counts.get(kind, 0) + 1
    parts = [f"{counts.get('nifti', 0)} NIfTI"]
    parts += [f"{counts[k]} {label}" for k, label in (("nrrd", "NRRD"), ("metaimage", "MetaImage")) if counts.get(k)]
    return ", ".join(parts + [f"{counts.get('dicom', 0)} DICOM series"])
