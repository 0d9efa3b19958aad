"""The on-disk format of synthetic samples, shared by generate, qc, export and jobs.

A samples folder holds, per sample ``<id>`` (``synth-<run>-<index>``):

* ``<id>.nii.gz``       the image in physical units (HU for CT), float32, affine of the configured grid;
* ``<id>.json``         the sidecar (:class:`SampleSidecar`): ``format: "medsynth-sample/1"``, id,
                        index, seed, class, modality, units, shape, spacing, orientation,
                        checkpoint hash, config hash, versions, and ``label_values`` when a label exists;
* ``<id>_label.nii.gz`` optional integer label map on the same grid;
* ``<id>.qc.json``      optional QC verdict written by ``medsynth qc``: ``{"passed": bool, "reasons": [...]}``.

Files are written atomically; the sidecar is written last, so a sample "exists" only when its
sidecar does.  ``quarantine/`` holds samples that failed QC.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from medsynth.errors import MedsynthError
from medsynth.jobs import write_json
from medsynth.volume import Volume

SAMPLE_FORMAT = "medsynth-sample/1"
# Sample ids name files (<id>.qc.json is written beside the sidecar): never a path or a dot name.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass
class Sample:
    """One sample on disk: its id, files and sidecar (loaded lazily)."""

    id: str
    image_path: Path
    sidecar_path: Path
    sidecar: dict[str, Any]
    label_path: Optional[Path] = None

    @property
    def qc_path(self) -> Path:
        return self.sidecar_path.with_name(f"{self.id}.qc.json")

    def qc_verdict(self) -> Optional[dict[str, Any]]:
        if not self.qc_path.is_file():
            return None
        return json.loads(self.qc_path.read_text())

    def load(self) -> Volume:
        """The image as a Volume; raises MedsynthError naming the file if it cannot be read."""
        modality = self.sidecar.get("modality", "CT")
        if modality not in ("CT", "MR"):
            raise MedsynthError(f"{self.sidecar_path}: sidecar modality {str(modality)[:16]!r} is not CT or MR",
                                hint="regenerate the sample or remove it")
        units = self.sidecar.get("units")
        v = Volume.load_nifti(self.image_path, modality=modality, units=units if isinstance(units, str) else None)
        v.meta.update(id=self.id, index=self.sidecar.get("index"), seed=self.sidecar.get("seed"),
                      class_label=self.sidecar.get("class"))
        return v

    def load_label(self) -> Optional[Volume]:
        if self.label_path is None:
            return None
        return Volume.load_nifti(self.label_path, modality="SEG", units="label")


def write_sample(out_dir: Path, sample_id: str, image: Volume, sidecar: dict[str, Any],
                 label: Optional[Volume] = None) -> Sample:
    """Write one sample (image, optional label, then the sidecar last), each file atomically."""
    out_dir = Path(out_dir)
    img_path = out_dir / f"{sample_id}.nii.gz"
    image.save_nifti(img_path, dtype="float32", description="medsynth synthetic")
    label_path = None
    if label is not None:
        label_path = out_dir / f"{sample_id}_label.nii.gz"
        label.save_nifti(label_path, dtype="uint8", description="medsynth synthetic label")
    meta = {"format": SAMPLE_FORMAT, "id": sample_id, **sidecar,
            "shape": list(image.shape), "spacing": list(image.spacing),
            "orientation": image.orientation, "affine": image.affine.tolist(),
            "modality": image.modality, "units": image.units,
            "image": img_path.name, "label": label_path.name if label_path else None}
    side = out_dir / f"{sample_id}.json"
    write_json(side, meta)
    return Sample(sample_id, img_path, side, meta, label_path)


def read_sample(sidecar_path: Path) -> Sample:
    """Read one sample from its sidecar; raises MedsynthError if it is not a medsynth sample."""
    sidecar_path = Path(sidecar_path)
    try:
        meta = json.loads(sidecar_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise MedsynthError(f"{sidecar_path}: not a readable sample sidecar ({type(exc).__name__})",
                            hint="regenerate the sample or remove the broken sidecar") from None
    if not isinstance(meta, dict) or meta.get("format") != SAMPLE_FORMAT:
        raise MedsynthError(f"{sidecar_path}: not a medsynth sample sidecar (no format '{SAMPLE_FORMAT}')")
    sid = meta.get("id")
    if not isinstance(sid, str) or not _SAFE_ID.match(sid):
        raise MedsynthError(f"{sidecar_path}: 'id' is not a sample id (letters, digits, '.', '_', '-')",
                            hint="regenerate the sample or remove the broken sidecar")
    img = _own_file(sidecar_path, meta.get("image", f"{sid}.nii.gz"), "image")
    if not img.is_file():
        raise MedsynthError(f"{sidecar_path}: its image {img.name} is missing",
                            hint="regenerate the sample or remove the stray sidecar")
    lab = meta.get("label")
    label_path = _own_file(sidecar_path, lab, "label") if lab else None
    if label_path is not None and not label_path.is_file():
        raise MedsynthError(f"{sidecar_path}: its label {lab} is missing")
    return Sample(sid, img, sidecar_path, meta, label_path)


def _own_file(sidecar_path: Path, name: Any, key: str) -> Path:
    """``name`` as a file beside the sidecar; a path elsewhere (or not a string) is refused."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise MedsynthError(f"{sidecar_path}: '{key}' must name a file beside the sidecar",
                            hint="regenerate the sample or remove the broken sidecar")
    return sidecar_path.parent / name


def is_damaged_sidecar(side: Path) -> bool:
    """True for an ``<id>.json`` that sits beside an ``<id>.nii.gz``: a sample's sidecar, whatever
    its content now is (so a damaged one is reported, not mistaken for some other JSON file)."""
    return side.name.endswith(".json") and side.with_name(side.name[:-len(".json")] + ".nii.gz").is_file()


@dataclass(frozen=True)
class BrokenSample:
    """A sidecar that claims to be a sample but cannot be read: its id, file and what is wrong.

    ``error`` names the sidecar (message and fix); ``json_error`` is the decoder's exception name
    when the sidecar is not even JSON."""

    id: str
    sidecar: Path
    error: MedsynthError
    json_error: Optional[str] = None


@dataclass
class SampleListing:
    """What a samples folder holds: the readable samples (sorted by index, then id) and the broken ones."""

    samples: list[Sample]
    broken: list[BrokenSample]


def scan_samples(samples_dir: Path) -> SampleListing:
    """All samples in a folder (not in ``quarantine/``), sorted by index then id, and the broken ones.

    One broken sample (a sidecar whose image is missing, a damaged sidecar beside its image, ...)
    never hides the others: it is listed in ``broken``.  Raises :class:`MedsynthError` naming the
    folder if it is missing, is a file, or holds nothing that is (or claims to be) a sample.
    """
    samples_dir = Path(samples_dir)
    hint = "pass the folder written by 'medsynth generate RUN --out DIR'"
    if samples_dir.exists() and not samples_dir.is_dir():
        raise MedsynthError(f"{samples_dir}: is a file, not a samples folder", hint=hint)
    if not samples_dir.is_dir():
        raise MedsynthError(f"{samples_dir}: samples folder not found", hint=hint)
    listing = SampleListing([], [])
    for side in sorted(samples_dir.glob("*.json")):
        if not side.name.endswith(".qc.json"):
            _scan_sidecar(side, listing)
    if not listing.samples and not listing.broken:
        raise MedsynthError(f"{samples_dir}: holds no medsynth samples (no '<id>.json' sidecar with "
                            f"format '{SAMPLE_FORMAT}')", hint=hint + " (NIfTI files alone are not samples)")
    listing.samples.sort(key=lambda s: (s.sidecar.get("index") if isinstance(s.sidecar.get("index"), int) else 0,
                                        s.id))
    return listing


def _scan_sidecar(side: Path, listing: SampleListing) -> None:
    """Add the sample ``side`` describes to ``listing`` (or to its broken ones); other JSON is ignored."""
    sid = side.name[: -len(".json")]
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        if is_damaged_sidecar(side):  # a sample's sidecar, damaged: reported, never used
            err = MedsynthError(f"{side}: not a readable sample sidecar ({type(exc).__name__}) beside its image",
                                hint="regenerate the sample or remove it")
            listing.broken.append(BrokenSample(sid, side, err, type(exc).__name__))
        return
    if not (isinstance(meta, dict) and meta.get("format") == SAMPLE_FORMAT):
        return  # some other JSON file
    try:
        listing.samples.append(read_sample(side))
    except MedsynthError as exc:
        listing.broken.append(BrokenSample(sid, side, exc))


def list_samples(samples_dir: Path) -> list[Sample]:
    """All samples in a folder (not in ``quarantine/``), sorted by index then id.

    Raises :class:`MedsynthError` naming the folder if it does not exist or holds no samples, and
    naming the sidecar if one sample is broken (:func:`scan_samples` lists the others as well).
    """
    listing = scan_samples(samples_dir)
    if listing.broken:
        raise listing.broken[0].error
    return listing.samples
