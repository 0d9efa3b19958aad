"""Export a samples folder as a training-ready dataset: NIfTI, DICOM, DICOM SEG, dataset files.

Layout of ``OUT`` (every part optional except the manifest and the report)::

    imagesTr/<id>_0000.nii.gz   CT int16 HU / MR float32          (nnU-Net v2 raw layout)
    labelsTr/<id>.nii.gz        uint8 label map
    dataset.json                nnU-Net v2 (channel_names, labels, numTraining, file_ending)
    datalist.json               Decathlon-style list MONAI's load_decathlon_datalist reads
    manifest.json               medsynth-manifest/1 with provenance per case
    dicom/<id>/IM00001.dcm ...  one CT/MR Image Storage series per sample, one file per slice
    dicom_seg/<id>.dcm          DICOM SEG of the label, referencing that series
    export.json                 what was exported, refused and failed, with versions

The whole folder is built beside ``OUT`` under a hidden temporary name and renamed into place
only when complete, so ``OUT`` is either absent, the previous export, or the complete new one.
A sample that fails is reported and skipped; the caller exits non-zero if any failed.
Samples without a passing QC verdict (``<id>.qc.json``) are refused unless ``force``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from medsynth import __version__
from medsynth.errors import ExportError, MedsynthError, PrivacyError
from medsynth.jobs import sha256_file, write_json
from medsynth.progress import progress
from medsynth.registry import EXPORT_FORMATS
from medsynth.samples import Sample, scan_samples
from medsynth.versions import package_versions

log = logging.getLogger("medsynth.export")

FORMATS = tuple(EXPORT_FORMATS)  # the table's order is the order formats are written in
DEFAULT_FORMATS = tuple(n for n, f in EXPORT_FORMATS.items() if f.default)
EXPORT_REPORT_FORMAT = "medsynth-export/1"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------


def parse_formats(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"nifti,dicom"`` (or a list) as a validated tuple; raise ExportError with a suggestion."""
    import difflib

    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        f = str(raw).strip().lower()
        if not f:
            continue
        if f not in FORMATS:
            close = difflib.get_close_matches(f, FORMATS, n=1)
            raise ExportError(f"`formats`: unknown format {f!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                              hint=f"choose from {', '.join(FORMATS)}, comma-separated")
        if f not in out:
            out.append(f)
    if not out:
        raise ExportError("`formats` is empty", hint=f"choose from {', '.join(FORMATS)}, comma-separated")
    for f in out:
        missing = [r for r in EXPORT_FORMATS[f].requires if r not in out]
        if missing:
            wanted = [n for n in FORMATS if n in out or n in missing or n in DEFAULT_FORMATS]
            raise ExportError(f"`formats` {f} needs {' and '.join(missing)} too: {EXPORT_FORMATS[f].why}",
                              hint=f"use `formats={','.join(wanted)!r}`")
    return tuple(f for f in FORMATS if f in out)


# ---------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What :func:`export_samples` did.  Ids are synthetic sample ids (never patient data)."""

    out_dir: Path
    formats: tuple[str, ...]
    exported: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    n_dicom_files: int = 0
    n_seg: int = 0
    dataset_files: list[str] = field(default_factory=list)
    phi_scan: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        parts = [f"exported {len(self.exported)} sample(s) to {self.out_dir} ({', '.join(self.formats)})"]
        if "dicom" in self.formats:
            parts.append(f"{self.n_dicom_files} DICOM image file(s)")
        if "seg" in self.formats:
            parts.append(f"{self.n_seg} DICOM SEG")
        if self.dataset_files:
            parts.append("dataset files: " + ", ".join(self.dataset_files))
        if self.phi_scan:
            parts.append(self.phi_scan)
        lines = ["; ".join(parts)]
        if self.refused:
            lines.append(refusal_summary(self.refused))
        if self.failed:
            lines.append(f"{len(self.failed)} sample(s) failed and were skipped:")
            lines += [f"  {sid}: {msg}" for sid, msg in self.failed.items()]
        return "\n".join(lines)


def refusal_summary(refused: dict[str, str]) -> str:
    """One line per refusal reason with its count, e.g. ``2 without a QC verdict``."""
    counts: dict[str, int] = {}
    for reason in refused.values():
        counts[reason] = counts.get(reason, 0) + 1
    body = "; ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda t: -t[1]))
    return (f"refused {len(refused)} sample(s) without a passing QC verdict ({body}); "
            "run 'medsynth qc' or pass --force to export them anyway")


# ---------------------------------------------------------------------------------------------
# samples and the QC gate
# ---------------------------------------------------------------------------------------------


def collect_samples(samples_dir: Path) -> tuple[list[Sample], dict[str, str]]:
    """All samples of a folder, plus the sidecars that claim to be samples but are broken (id ->
    reason): :func:`medsynth.samples.scan_samples`, whose folder errors become ExportError."""
    try:
        listing = scan_samples(samples_dir)
    except MedsynthError as exc:
        raise ExportError(exc.message, hint=exc.hint) from None
    broken = {b.id: f"sidecar is not readable JSON ({b.json_error})" if b.json_error else b.error.message
              for b in listing.broken}
    return listing.samples, broken


def qc_status(sample: Sample) -> tuple[str, Optional[dict[str, Any]]]:
    """("passed" | "failed" | "missing" | "unreadable" | "stale", verdict) for one sample's QC verdict.

    A passing verdict that records the image's sha256 (``medsynth qc`` does) must match the image
    as it is now: an image changed after QC judged it is "stale", not "passed".
    """
    try:
        verdict = sample.qc_verdict()
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return "unreadable", None
    if verdict is None:
        return "missing", None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("passed"), bool):
        return "unreadable", None
    if not verdict["passed"]:
        return "failed", verdict
    recorded = verdict.get("image_sha256")
    if recorded is not None:
        try:
            current = sha256_file(sample.image_path)
        except OSError:
            return "unreadable", None
        if recorded != current:
            return "stale", verdict
    return "passed", verdict


_REFUSAL = {"missing": "without a QC verdict", "failed": "that failed QC",
            "unreadable": "with an unreadable QC verdict",
            "stale": "whose image changed after its QC verdict (rerun 'medsynth qc')"}


# ---------------------------------------------------------------------------------------------
# one sample
# ---------------------------------------------------------------------------------------------


def _label_names(sidecar: dict[str, Any]) -> dict[int, str]:
    """Label value -> name from the sidecar's ``label_values`` ({name: value}, {value: name} or [values])."""
    lv = sidecar.get("label_values")
    out: dict[int, str] = {}
    if isinstance(lv, dict):
        for k, v in lv.items():
            if isinstance(v, int) and not isinstance(v, bool):
                out[int(v)] = str(k)
            elif re.fullmatch(r"\d+", str(k)):
                out[int(k)] = str(v)
    elif isinstance(lv, list):
        out = {int(v): f"label_{int(v)}" for v in lv if isinstance(v, int) and not isinstance(v, bool)}
    out.setdefault(0, "background")
    return out


@dataclass
class _Case:
    """One sample being exported: what every format writer reads, and the record they fill in."""

    sample: Sample
    tmp: Path
    uid_root: str
    vol: Any                  # the image (Volume)
    out_vol: Any              # what the NIfTI holds (CT: the integers the DICOM stores)
    encoding: Any             # the DICOM pixel encoding
    label_arr: Any            # the label map's array, or None
    names: dict[int, str]     # label value -> name
    source_sha: str           # sha256 of the sample's image file
    uid_key: str
    rec: dict[str, Any]
    dicom_info: dict[str, Any] = field(default_factory=dict)
    datasets: list[Any] = field(default_factory=list)  # the written DICOM series (the SEG references it)

    @property
    def sid(self) -> str:
        return self.sample.id


def _write_nifti(c: _Case) -> None:
    from medsynth.export import nifti

    c.rec["image"] = nifti.write_image(c.out_vol, c.tmp / "imagesTr" / f"{c.sid}_0000.nii.gz")
    if c.label_arr is not None:
        c.rec["label"] = nifti.write_label(c.vol.with_array(c.label_arr, modality="SEG", units="label"),
                                           c.tmp / "labelsTr" / f"{c.sid}.nii.gz")


def _write_dicom(c: _Case) -> None:
    from medsynth.export import dicom as dcm

    checkpoint = str(_checkpoint_hash(c.sample.sidecar) or "")[:16]
    info, c.datasets = dcm.write_series(
        c.vol, c.encoding, c.tmp / "dicom" / c.sid, case_id=c.sid, uid_key=c.uid_key, uid_root=c.uid_root,
        description=f"sample {c.sid}, seed {c.sample.sidecar.get('seed')}"
                    + (f", checkpoint {checkpoint}" if checkpoint else ""))
    c.dicom_info = info.as_dict(c.tmp)
    c.rec["n_dicom_files"] = len(info.files)
    if c.rec["image"] is None:
        c.rec["image"] = info.folder


def _write_seg(c: _Case) -> None:
    import numpy as np

    from medsynth.export.seg import write_seg

    if c.label_arr is None:
        return
    if not np.any(c.label_arr):
        log.warning("%s: label map is empty; no DICOM SEG written", c.sid)
        return
    seg_path = c.tmp / "dicom_seg" / f"{c.sid}.dcm"
    seg_uid, n_seg = write_seg(c.vol.with_array(c.label_arr, modality="SEG", units="label"), c.datasets,
                                   seg_path, uid_key=c.uid_key, uid_root=c.uid_root, label_names=c.names)
    c.dicom_info["seg"] = {"file": seg_path.relative_to(c.tmp).as_posix(), "series_uid": seg_uid,
                           "n_segments": n_seg}


#: The writer of each entry of :data:`medsynth.registry.EXPORT_FORMATS`, run in the table's order.
FORMAT_WRITERS: dict[str, Callable[[_Case], None]] = {"nifti": _write_nifti, "dicom": _write_dicom,
                                                      "seg": _write_seg}


def _prepare_case(sample: Sample, tmp: Path, uid_root: str) -> _Case:
    """Load and check one sample, encode it for DICOM and start its record; ExportError if it cannot
    be exported."""
    import numpy as np

    from medsynth.export import dicom as dcm
    from medsynth.export import nifti
    from medsynth.volume import Volume

    sid = sample.id
    if not _SAFE_ID.match(sid):
        raise ExportError("sample id is not a safe file name (letters, digits, '.', '_', '-' only)",
                          hint="regenerate the samples; ids look like synth-<run>-<index>")
    vol = sample.load()
    if vol.modality not in ("CT", "MR"):
        raise ExportError(f"modality {vol.modality!r} cannot be exported as an image (CT or MR only)")
    if not np.all(np.isfinite(vol.array)):
        raise ExportError("image holds NaN or infinite values", hint="run 'medsynth qc'; it rejects such samples")
    dcm.check_representable(vol)
    label_vol = sample.load_label()
    label_arr = nifti.check_label(label_vol, vol) if label_vol is not None else None
    names = _label_names(sample.sidecar)
    encoding = dcm.encode_ct(vol.array) if vol.modality == "CT" else dcm.encode_mr(vol.array)
    # CT: the NIfTI holds exactly the integers the DICOM stores; MR: NIfTI keeps float32 values.
    out_vol = Volume(encoding.stored, vol.affine, "CT", "HU") if vol.modality == "CT" else vol
    rec: dict[str, Any] = {"id": sid, "modality": vol.modality, "shape": list(vol.shape),
                           "spacing": [float(s) for s in vol.spacing], "image": None, "label": None,
                           "label_values": [] if label_arr is None else sorted(int(v) for v in np.unique(label_arr)),
                           "label_names": names}
    source_sha = sha256_file(sample.image_path)
    uid_key = f"medsynth {__version__}|{sid}|{source_sha}"
    return _Case(sample, tmp, uid_root, vol, out_vol, encoding, label_arr, names, source_sha, uid_key, rec)


def _provenance(c: _Case, qc: str, verdict: Optional[dict[str, Any]]) -> dict[str, Any]:
    side = c.sample.sidecar
    return {
        "sample_format": side.get("format"),
        "index": side.get("index"),
        "seed": side.get("seed"),
        "class": side.get("class"),
        "checkpoint_hash": _checkpoint_hash(side),
        "config_hash": side.get("config_hash"),
        "versions": side.get("versions"),
        "source_image_sha256": c.source_sha,
        "qc": {"status": qc, "passed": bool(verdict and verdict.get("passed") is True),
               "reasons": list(verdict.get("reasons", [])) if verdict else []},
        "exported_by": f"medsynth {__version__}",
        "dicom": c.dicom_info or None,
        # everything else the generator recorded, so no provenance is lost in export
        "generation": {k: v for k, v in side.items() if k not in _SIDECAR_GEOMETRY_KEYS},
    }


def _export_one(sample: Sample, tmp: Path, formats: tuple[str, ...], uid_root: str, qc: str,
                verdict: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Export one sample into the temporary tree in every format asked for; return its record."""
    case = _prepare_case(sample, tmp, uid_root)
    for name, write in FORMAT_WRITERS.items():
        if name in formats:
            write(case)
    case.rec["class_label"] = sample.sidecar.get("class")
    case.rec["provenance"] = _provenance(case, qc, verdict)
    return case.rec


_SIDECAR_GEOMETRY_KEYS = {"format", "id", "index", "seed", "class", "image", "label", "affine", "shape",
                          "spacing", "orientation", "modality", "units", "versions", "config_hash",
                          "checkpoint_hash", "label_values"}


def _checkpoint_hash(sidecar: dict[str, Any]) -> Optional[str]:
    for key in ("checkpoint_hash", "checkpoint_sha256", "checkpoint"):
        if sidecar.get(key):
            return str(sidecar[key])
    return None


def _remove_case(tmp: Path, sid: str) -> None:
    """Remove whatever a failed sample left in the temporary tree."""
    for p in (tmp / "imagesTr" / f"{sid}_0000.nii.gz", tmp / "labelsTr" / f"{sid}.nii.gz",
              tmp / "dicom_seg" / f"{sid}.dcm"):
        p.unlink(missing_ok=True)
    shutil.rmtree(tmp / "dicom" / sid, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# dataset files
# ---------------------------------------------------------------------------------------------


def _dataset_labels(records: list[dict[str, Any]]) -> dict[str, int]:
    """nnU-Net label dict {name: value}, consecutive from 0 ("background": 0) over all cases."""
    names: dict[int, str] = {}
    top = 0
    for r in records:
        for v, n in r["label_names"].items():
            names.setdefault(int(v), n)
        top = max([top, *r["label_values"], *[int(v) for v in r["label_names"]]])
    out: dict[str, int] = {}
    for v in range(top + 1):
        name = "background" if v == 0 else names.get(v, f"label_{v}")
        if name in out:
            name = f"{name}_{v}"
        out[name] = v
    return out


def weights_licenses(run_dir: Optional[str | os.PathLike], samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """The licences the samples inherit from the initial weights of the model that made them: from
    the run's model card (``--run``), else from the samples' sidecars (``weights_licenses``)."""
    from medsynth.jobs import RunPaths
    from medsynth.model.checkpoint import weights_licenses as card_licenses

    if run_dir is not None:
        card_path = RunPaths(Path(run_dir)).card
        try:
            card = json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ExportError(f"{card_path}: cannot read the run's model card ({type(exc).__name__})",
                              hint="pass `run`, the run folder the samples were generated from") from None
        return card_licenses(card if isinstance(card, dict) else {})
    seen: dict[str, dict[str, Any]] = {}
    for s in samples:
        for lic in s.sidecar.get("weights_licenses") or []:
            if isinstance(lic, dict) and lic.get("license"):
                seen.setdefault(json.dumps(lic, sort_keys=True), lic)
    return list(seen.values())


def _write_dataset_files(tmp: Path, name: str, modality: str, records: list[dict[str, Any]],
                         result: ExportResult, licenses: Sequence[dict[str, Any]] = ()) -> None:
    from medsynth.manifest import Case, Manifest, save_manifest
    from medsynth.model.checkpoint import license_text

    labelled = [r for r in records if r["label"] is not None]
    labels = _dataset_labels(labelled) if labelled else {}
    if records and records[0]["image"] is not None and str(records[0]["image"]).endswith(".nii.gz"):
        if labelled and len(labelled) == len(records):
            write_json(tmp / "dataset.json", {
                "channel_names": {"0": modality},
                "labels": labels,
                "numTraining": len(records),
                "file_ending": ".nii.gz",
                "name": name,
                "description": f"SYNTHETIC images generated by medsynth {__version__}; no real patient data",
                "licence": license_text(list(licenses)),
                "weights_licenses": list(licenses),
                "reference": "medsynth",
                "release": __version__,
            })
            result.dataset_files.append("dataset.json")
        else:
            log.warning("not writing nnU-Net dataset.json: %d of %d samples have no label map",
                        len(records) - len(labelled), len(records))
        training = []
        for r in records:
            item: dict[str, Any] = {"image": "./" + r["image"].relative_to(tmp).as_posix()}
            if r["label"] is not None:
                item["label"] = "./" + r["label"].relative_to(tmp).as_posix()
            if r["class_label"] is not None:
                item["class_label"] = r["class_label"]
            training.append(item)
        write_json(tmp / "datalist.json", {
            "name": name,
            "description": f"SYNTHETIC images generated by medsynth {__version__}; no real patient data",
            "modality": {"0": modality},
            "labels": {str(v): k for k, v in labels.items()},
            "numTraining": len(training),
            "numTest": 0,
            "training": training,
            "test": [],
        })
        result.dataset_files.append("datalist.json")
    cases = [Case(id=r["id"], image=r["image"], label=r["label"], class_label=r["class_label"],
                  modality=r["modality"], shape=tuple(r["shape"]), spacing=tuple(r["spacing"]),
                  sha256=sha256_file(r["image"]) if Path(r["image"]).is_file() else None,
                  extra={"synthetic": True, "provenance": r["provenance"]})
             for r in records]
    extra: dict[str, Any] = {"synthetic": True, "generator": f"medsynth {__version__}",
                             "licence": license_text(list(licenses)), "weights_licenses": list(licenses)}
    if labels:
        extra["labels"] = labels
    save_manifest(Manifest(cases, name=name, modality=modality, extra=extra), tmp / "manifest.json")
    result.dataset_files.append("manifest.json")


# ---------------------------------------------------------------------------------------------
# PHI scan and publishing
# ---------------------------------------------------------------------------------------------


def _phi_scan(tmp: Path, reference: Path) -> str:
    """Run the privacy stage's PHI scan over the finished export; raise PrivacyError on any hit.

    Hits name the file, the place in it and a masked form of the identifier, never the value.
    """
    try:
        from medsynth.privacy.phi_scan import scan_phi
    except ImportError:
        raise ExportError("`reference` needs the PHI scanner (medsynth.privacy.phi_scan), "
                          "which this installation lacks",
                          hint="update medsynth, or export without `reference`") from None
    hits = list(scan_phi(tmp, reference))
    if hits:
        # what could not be searched first: it is why the scan failed closed
        hits.sort(key=lambda h: not h.not_scanned)
        found = sum(not h.not_scanned for h in hits)
        unscanned = len(hits) - found
        what = []
        if found:
            what.append(f"found {found} possible identifier(s) of the reference patients in the export")
        if unscanned:
            what.append(f"could not search {unscanned} place(s) (not scanned)")
        shown = "; ".join(str(h).replace(str(tmp), "OUT") for h in hits[:5])
        more = f" (and {len(hits) - 5} more)" if len(hits) > 5 else ""
        hint = ("repair or remove what is listed as not scanned (an unreadable reference file's identifiers "
                "cannot be searched for), then export again" if unscanned else
                "find how they reached the samples (sample ids, sidecars) and regenerate")
        raise PrivacyError(f"PHI scan {' and '.join(what)}, so nothing was published: {shown}{more}", hint=hint)
    return "PHI scan against the reference: clean"


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temporary tree onto ``out_dir`` (replacing it only with ``overwrite``)."""
    old: Optional[Path] = None
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        elif overwrite:
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        else:  # checked before starting; re-checked because the folder may have appeared meanwhile
            raise ExportError(f"{out_dir}: already exists and is not empty",
                              hint="pass `overwrite=True` or another `out_dir`")
    os.replace(tmp, out_dir)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------


def _check_arguments(samples_dir: Path, out_dir: Path, reference: Optional[str | os.PathLike],
                     overwrite: bool) -> None:
    if reference is not None and not Path(reference).exists():
        raise ExportError(f"{reference}: reference manifest not found",
                          hint="pass the manifest the model was trained on")
    res_in, res_out = samples_dir.resolve(), out_dir.resolve()
    if res_out == res_in or res_in in res_out.parents or res_out in res_in.parents:
        raise ExportError(f"{out_dir}: `out_dir` must not contain or be inside the samples folder",
                          hint="export to a separate folder")
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not overwrite:
        raise ExportError(f"{out_dir}: already exists and is not empty",
                          hint="pass `overwrite=True` or another `out_dir`")


def _select(samples: Sequence[Sample], result: ExportResult, force: bool, samples_dir: Path
            ) -> tuple[list[tuple[Sample, str, Optional[dict[str, Any]]]], str]:
    """The samples to export, each with its QC status and verdict (the others go into ``result``'s
    refused or failed), and their one modality; ExportError when there is none or they mix."""
    todo = []
    for s in samples:
        if s.sidecar.get("modality", "CT") not in ("CT", "MR"):
            result.failed[s.id] = (f"sidecar modality {s.sidecar.get('modality')!r} cannot be exported "
                                   "(CT or MR only)")
            continue
        status, verdict = qc_status(s)
        if status != "passed" and not force:
            result.refused[s.id] = _REFUSAL[status]
            continue
        if status != "passed":
            log.warning("%s: exporting without a passing QC verdict (%s) because of --force", s.id, status)
        todo.append((s, status, verdict))
    if result.refused:
        log.debug(refusal_summary(result.refused))
    if not todo:
        why = [refusal_summary(result.refused)] if result.refused else []
        why += [f"{sid}: {msg}" for sid, msg in result.failed.items()]
        raise ExportError(f"{samples_dir}: nothing to export; " + "; ".join(why))
    modalities = sorted({str(s.sidecar.get("modality", "CT")) for s, _, _ in todo})
    if len(modalities) > 1:
        raise ExportError(f"{samples_dir}: mixes modalities {modalities}; one dataset holds one modality",
                          hint="export each modality's samples to its own folder")
    return todo, modalities[0]


def _export_all(todo: Sequence[tuple[Sample, str, Optional[dict[str, Any]]]], tmp: Path, fmts: tuple[str, ...],
                root: str, result: ExportResult, samples_dir: Path) -> list[dict[str, Any]]:
    """Export each sample into ``tmp``; one that fails is recorded in ``result.failed`` and removed."""
    records: list[dict[str, Any]] = []
    for s, status, verdict in progress(todo, desc="export", total=len(todo)):
        if s.id in {r["id"] for r in records}:
            result.failed[f"{s.id} ({s.sidecar_path.name})"] = "duplicate sample id; the first one was exported"
            continue
        try:
            records.append(_export_one(s, tmp, fmts, root, status, verdict))
        except MedsynthError as exc:
            result.failed[s.id] = exc.message
            _remove_case(tmp, s.id)
        except Exception as exc:  # one bad sample never sinks the batch
            log.debug("%s: export failed", s.id, exc_info=True)
            result.failed[s.id] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            _remove_case(tmp, s.id)
    for sid, msg in result.failed.items():
        log.debug("%s: export failed: %s", sid, msg)
    if not records:
        raise ExportError(f"{samples_dir}: every sample failed to export",
                          hint="see the messages above; debug logging ('medsynth --debug export ...') "
                               "shows the details")
    result.exported = [r["id"] for r in records]
    result.n_dicom_files = sum(r.get("n_dicom_files", 0) for r in records)
    result.n_seg = sum(1 for r in records if (r["provenance"]["dicom"] or {}).get("seg"))
    return records


def _export_report(result: ExportResult, fmts: tuple[str, ...], root: str, force: bool,
                   licenses: list[dict[str, Any]]) -> dict[str, Any]:
    """The content of ``export.json`` (its ``phi_scan`` is filled in once the scan has run)."""
    return {
        "format": EXPORT_REPORT_FORMAT,
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(("numpy", "nibabel", "SimpleITK", "pydicom", "highdicom")),
        "formats": list(fmts),
        "uid_root": root,
        "uid_scheme": "deterministic: 2.25.<uuid5> or <root>.<sha256 digits> of (medsynth version, "
                      "sample id, source image sha256, object)",
        "dicom_dates": "fixed synthetic date 20000101 (no date relates to a person or event)",
        "force": force,
        "phi_scan": None,
        "weights_licenses": licenses,
        "exported": result.exported,
        "refused": result.refused,
        "failed": result.failed,
    }


def export_samples(
    samples_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    formats: str | Sequence[str] = DEFAULT_FORMATS,
    uid_root: Optional[str] = None,
    force: bool = False,
    reference: Optional[str | os.PathLike] = None,
    overwrite: bool = False,
    name: Optional[str] = None,
    run: Optional[str | os.PathLike] = None,
) -> ExportResult:
    """Export every sample of ``samples_dir`` into the dataset folder ``out_dir``.

    Samples without a passing QC verdict are refused unless ``force``; a sample that fails is
    reported in ``ExportResult.failed`` and skipped.  With ``reference`` (a data manifest of the
    real training scans) the privacy stage's PHI scan runs over the finished export and must be
    clean before the folder is published.  The inputs are never modified.  ``run`` (the run folder
    the samples came from) gives the licences of its initial weights, which ``dataset.json`` and the
    manifest carry (:func:`weights_licenses`).

    Raises:
        ExportError: bad arguments, no samples, nothing exportable, or ``out_dir`` not empty.
        PrivacyError: the PHI scan found identifiers (nothing is published).
    """
    from medsynth.export.dicom import check_uid_root

    samples_dir, out_dir = Path(samples_dir), Path(out_dir)
    fmts = parse_formats(formats)
    root = check_uid_root(uid_root)
    _check_arguments(samples_dir, out_dir, reference, overwrite)
    samples, broken = collect_samples(samples_dir)
    licenses = weights_licenses(run, samples)
    result = ExportResult(out_dir=out_dir, formats=fmts, failed=dict(broken))
    todo, modality = _select(samples, result, force, samples_dir)

    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        records = _export_all(todo, tmp, fmts, root, result, samples_dir)
        _write_dataset_files(tmp, name or out_dir.name, modality, records, result, licenses)
        report = _export_report(result, fmts, root, force, licenses)
        write_json(tmp / "export.json", report)
        if reference is not None:  # scans every file, this report included
            result.phi_scan = _phi_scan(tmp, Path(reference))
            write_json(tmp / "export.json", {**report, "phi_scan": result.phi_scan})
        _publish(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
