"""Release: an export made into a folder a privacy officer can sign and a PACS can import.

``medsynth release EXPORT_DIR --run RUN --manifest TRAIN [--holdout HOLDOUT] --out DIR`` writes::

    DIR/DATA_CARD.md, data_card.json   the datasheet (medsynth.export.datacard)
    DIR/privacy_audit.json             every figure behind the card: QC, memorisation screen,
                                       membership inference, PHI scan
    DIR/SHA256SUMS                     sha256 of every other file ('sha256sum -c SHA256SUMS')
    DIR/DICOMDIR, DIR/PT*/ST*/SE*/IM*  the export's DICOM images and SEG as a DICOM File-set
                                       (PS3.10 file IDs, pydicom FileSet), when the export holds DICOM
    DIR/imagesTr, labelsTr, dataset.json, datalist.json, manifest.json, export.json   as exported

Before anything is written the release checks that the export is unchanged since export (sha256
of every image), that its samples come from ``RUN``, and that every sample has a passing QC
verdict (``force`` releases them anyway and the card says so in words).  It then screens the
released images again for copies of training cases (the memorisation screen, calibrated on the
hold-out cases) and refuses any possible copy, runs the membership-inference audit
(:mod:`medsynth.privacy.audit`) when hold-out cases are given, and runs the PHI scan over the whole
folder, the card included, against the training manifest, with every training and hold-out case id
added to what it looks for.  The folder is built beside ``DIR`` and renamed when complete.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medsynth import __version__
from medsynth.errors import ExportError, MedsynthError, PrivacyError
from medsynth.jobs import sha256_file, write_json, write_text

log = logging.getLogger("medsynth.export.release")

AUDIT_FORMAT = "medsynth-privacy-audit/1"
_EXPORT_FORMAT = "medsynth-export/1"
# the export's DICOM folders become the File-set; everything else is copied as it is
_DICOM_FOLDERS = ("dicom", "dicom_seg")


@dataclass
class ReleaseResult:
    """What :func:`release_export` published (sample ids are synthetic)."""

    out_dir: Path
    samples: list[str]
    card: dict[str, Any]
    n_files: int = 0
    n_dicom: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        c = self.card
        mem = c["memorisation"]
        mia = c["membership_inference"]
        lines = [f"released {len(self.samples)} sample(s) to {self.out_dir}: {self.n_files} files"
                 + (f", {self.n_dicom} DICOM instances with a DICOMDIR" if self.n_dicom else "")
                 + "; checksums in SHA256SUMS",
                 f"  QC: {c['qc']['statement']}",
                 f"  memorisation: {mem['statement']}",
                 f"  membership: {mia['statement']}",
                 f"  PHI scan: {c['phi_scan']['statement']}",
                 f"  data card: {self.out_dir / 'DATA_CARD.md'}"]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


# ---------------------------------------------------------------------------------------------
# reading and checking the export
# ---------------------------------------------------------------------------------------------


def read_export(export_dir: Path) -> tuple[dict[str, Any], Any]:
    """The export's report (``export.json``) and manifest; ExportError naming what is wrong."""
    from medsynth.manifest import load_manifest

    if not export_dir.is_dir():
        raise ExportError(f"{export_dir}: export folder not found",
                          hint="pass the folder written by 'medsynth export ... --out DIR'")
    rep_path = export_dir / "export.json"
    try:
        report = json.loads(rep_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{rep_path}: not a readable export report ({type(exc).__name__})",
                          hint="pass the folder written by 'medsynth export ... --out DIR', unchanged") from None
    if not isinstance(report, dict) or report.get("format") != _EXPORT_FORMAT:
        raise ExportError(f"{rep_path}: not a medsynth export report (format {_EXPORT_FORMAT!r} expected)",
                          hint="pass the folder written by 'medsynth export ... --out DIR'")
    try:
        manifest = load_manifest(export_dir / "manifest.json")
    except MedsynthError as exc:
        raise ExportError(f"{export_dir / 'manifest.json'}: {exc.message}",
                          hint="pass the folder written by 'medsynth export ... --out DIR', unchanged") from None
    if not manifest.cases:
        raise ExportError(f"{export_dir / 'manifest.json'}: the export holds no samples")
    return report, manifest


def check_unchanged(export_dir: Path, manifest: Any) -> None:
    """Every exported image still has the sha256 the export recorded."""
    changed = []
    for c in manifest.cases:
        p = Path(c.image)
        if not p.exists():
            changed.append(f"{c.id} (image missing)")
        elif p.is_file() and c.sha256 and sha256_file(p) != c.sha256:
            changed.append(f"{c.id} (image changed)")
    if changed:
        raise ExportError(f"{export_dir}: {len(changed)} sample(s) differ from what was exported: "
                          + ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""),
                          hint="export again with 'medsynth export'; a release holds exactly what was exported")


def check_generator(export_dir: Path, manifest: Any, card: dict[str, Any], run_dir: Path) -> None:
    """The exported samples were generated by the run's diffusion checkpoint."""
    want = ((card.get("checkpoints") or {}).get("diffusion") or {}).get("sha256")
    other = sorted({c.id for c in manifest.cases
                    if (c.extra.get("provenance") or {}).get("checkpoint_hash") not in (None, want)})
    if other:
        raise ExportError(f"{export_dir}: {len(other)} sample(s) were generated by another model than {run_dir} "
                          f"(e.g. {other[0]})", hint="pass the `run_dir` the samples were generated with")


def qc_status(manifest: Any) -> dict[str, str]:
    """Sample id -> the QC status the export recorded ("passed", "failed", "missing", ...)."""
    out = {}
    for c in manifest.cases:
        qc = (c.extra.get("provenance") or {}).get("qc") or {}
        out[c.id] = "passed" if qc.get("passed") is True and qc.get("status") == "passed" else str(qc.get("status")
                                                                                                    or "missing")
    return out


# ---------------------------------------------------------------------------------------------
# copying, the DICOM File-set, checksums
# ---------------------------------------------------------------------------------------------


def copy_export(export_dir: Path, tmp: Path) -> None:
    """Everything of the export except its DICOM folders (they become the File-set)."""
    for item in sorted(export_dir.iterdir()):
        if item.name in _DICOM_FOLDERS or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, tmp / item.name)
        else:
            shutil.copy2(item, tmp / item.name)


def write_fileset(export_dir: Path, tmp: Path) -> list[dict[str, Any]]:
    """The export's DICOM files as a DICOM File-set under ``tmp`` (DICOMDIR + PS3.10 file IDs).

    Returns one entry per series: sample id, modality, series UID, folder and instance count.
    """
    from pydicom import dcmread
    from pydicom.fileset import FileSet, is_conformant_file_id

    files = sorted(p for d in _DICOM_FOLDERS if (export_dir / d).is_dir() for p in (export_dir / d).rglob("*.dcm"))
    if not files:
        return []
    tmp = tmp.resolve()  # pydicom gives absolute paths; the file IDs are relative to the File-set root
    fs = FileSet()
    fs.ID = "MEDSYNTH"
    for p in files:
        fs.add(p)
    fs.write(tmp)
    check = FileSet(dcmread(tmp / "DICOMDIR"))
    bad = [i.FileID for i in check if not is_conformant_file_id(Path(i.path).relative_to(tmp))]
    if len(check) != len(files) or bad:
        raise ExportError(f"the DICOM File-set holds {len(check)} of {len(files)} instances"
                          + (f" and {len(bad)} non-conformant file IDs" if bad else ""),
                          hint="rerun with debug logging ('medsynth --debug release ...') and report it")
    series: dict[str, dict[str, Any]] = {}
    for inst in check:
        uid = str(inst.SeriesInstanceUID)
        entry = series.setdefault(uid, {"sample": str(inst.PatientID).removeprefix("SYNTHETIC-"),
                                        "modality": str(inst.Modality), "series_uid": uid,
                                        "folder": Path(inst.path).relative_to(tmp).parent.as_posix(), "instances": 0})
        entry["instances"] += 1
    return sorted(series.values(), key=lambda e: (e["sample"], e["modality"] == "SEG"))


def write_checksums(tmp: Path) -> int:
    """``SHA256SUMS`` (``sha256sum -c`` format) over every other file; returns how many."""
    lines = []
    for p in sorted(tmp.rglob("*")):
        if p.is_file() and p.name != "SHA256SUMS":
            lines.append(f"{sha256_file(p)}  {p.relative_to(tmp).as_posix()}")
    write_text(tmp / "SHA256SUMS", "\n".join(lines) + "\n")
    return len(lines)


# ---------------------------------------------------------------------------------------------
# privacy figures
# ---------------------------------------------------------------------------------------------


def screen_copies(cfg: Any, members: Any, heldout: Optional[Any], synthetic: list[np.ndarray],
                  sample_ids: list[str]) -> dict[str, Any]:
    """The memorisation screen on the released images: threshold calibrated on the hold-out cases
    (or a deterministic split of the training cases without them); PrivacyError on any possible copy."""
    from medsynth.privacy.audit import prepare
    from medsynth.privacy.memorisation import MemorisationScreen, holdout_split

    train = prepare(members.physical, cfg)
    if heldout is not None and len(heldout):
        held, calib, mode = prepare(heldout.physical, cfg), None, "holdout_manifest"
    else:
        calib, ho = holdout_split(members.ids, cfg.privacy.holdout_fraction, cfg.privacy.holdout_seed)
        held, mode = train[ho], "internal_split"
    screen = MemorisationScreen(members.ids, train, None, held, None, cfg.privacy, calibration_train=calib, mode=mode)
    results = screen.screen(prepare(synthetic, cfg))
    cal = screen.calibration.to_dict()
    thr = cal["image_threshold"]
    per = [{"sample": sid, "image_distance": round(r.image_distance, 6), "flagged": r.flagged,
            "distance_over_threshold": round(r.image_distance / thr, 3) if thr > 0 else None}
           for sid, r in zip(sample_ids, results, strict=True)]
    flagged = [p for p in per if p["flagged"]]
    if flagged:
        shown = ", ".join(f"{p['sample']} (1-NCC {p['image_distance']:.4g} < {thr:.4g})" for p in flagged[:5])
        raise PrivacyError(f"{len(flagged)} released sample(s) are possible copies of a training case: {shown}; "
                           "nothing was released",
                           hint="remove them (run 'medsynth qc ... --holdout HOLDOUT' and export again); "
                                "a possible copy is never released, `force=True` or not")
    return {"calibration": cal, "n_screened": len(per), "n_flagged": 0,
            "min_distance": min(p["image_distance"] for p in per), "samples": per,
            "distance": "1 - NCC of band-passed, downsampled volumes, maximised over shifts (image space)",
            "rule": "a sample closer to a training case than the threshold is a possible copy and is refused"}


def phi_identifiers(manifest_path: Path, *case_lists: Any) -> Any:
    """What the PHI scan looks for: the training manifest's DICOM identifiers plus every real case id."""
    from medsynth.privacy.phi_scan import collect_identifiers

    ids = collect_identifiers(manifest_path)
    for cases in case_lists:
        for c in cases:
            ids.add_id(c.id, "real case id")
    return ids


def run_phi_scan(tmp: Path, ids: Any) -> dict[str, Any]:
    """The PHI scan over the finished folder; PrivacyError (nothing published) on any hit."""
    from medsynth.privacy.phi_scan import scan_phi, summarise_hits

    hits = scan_phi(tmp, ids)
    if hits:
        shown = "; ".join(str(h).replace(str(tmp), "DIR") for h in hits[:5])
        raise PrivacyError(f"PHI scan of the release: {summarise_hits(hits)}, so nothing was released: {shown}",
                           hint="find how they reached the export (names, sidecars, reasons) and export again")
    return {"result": "clean", "identifiers_searched": len(ids), "reference_headers": ids.sources,
            "n_files": sum(1 for p in tmp.rglob("*") if p.is_file())}


def qc_report_figures(qc_json: Optional[Path]) -> Optional[dict[str, Any]]:
    """Pass rate and reason counts of a ``medsynth qc`` report (reason codes only: no case ids)."""
    if qc_json is None:
        return None
    path = qc_json / "qc.json" if qc_json.is_dir() else qc_json
    try:
        rep = json.loads(path.read_text())
        samples = rep["samples"]
        counts = rep["counts"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ExportError(f"{path}: not a readable 'medsynth qc' report ({type(exc).__name__})",
                          hint="pass the qc.json written by 'medsynth qc ... --out DIR' (or that folder)") from None
    reasons: dict[str, int] = {}
    for s in samples:
        for r in s.get("reasons", []):
            code = str(r).split(" (", 1)[0].strip()
            reasons[code] = reasons.get(code, 0) + 1
    n = int(counts.get("samples", len(samples)))
    mem = rep.get("memorisation") or {}
    return {"n_samples": n, "passed": int(counts.get("passed", 0)), "failed": int(counts.get("failed", 0)),
            "pass_rate": round(int(counts.get("passed", 0)) / n, 4) if n else None,
            "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            "memorisation_threshold": (mem.get("calibration") or {}).get("image_threshold"),
            "memorisation_flagged": mem.get("n_flagged"),
            "calibration_mode": (mem.get("calibration") or {}).get("mode")}


def utility_figures(utility_json: Optional[Path]) -> Optional[dict[str, Any]]:
    """The arms table of a ``medsynth evaluate utility`` report, without its paths or case ids."""
    if utility_json is None:
        return None
    path = utility_json / "utility.json" if utility_json.is_dir() else utility_json
    try:
        rep = json.loads(path.read_text())
        arms = [{"arm": a["label"], "n_train": a["n_train"],
                 "metrics": {m: {"mean": v["mean"], "ci95": v["ci95"]} for m, v in a["metrics"].items()}}
                for a in rep["arms"]]
        out = {"task": rep["task"], "metrics": list(rep["metrics"]), "arms": arms,
               "n_test": rep["data"]["test"]["n"], "repeats": rep["repeats"]}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ExportError(f"{path}: not a readable 'medsynth evaluate utility' report ({type(exc).__name__})",
                          hint="pass the utility.json written by 'medsynth evaluate utility'") from None
    return out


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------


def _check_paths(export_dir: Path, out_dir: Path) -> None:
    a, b = export_dir.resolve(), out_dir.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ExportError(f"{out_dir}: `out_dir` must not contain or be inside the export folder",
                          hint="release to a separate folder")
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise ExportError(f"{out_dir}: already exists and is not empty", hint="choose another `out_dir` or remove it")


def gate_qc(export_dir: Path, status: dict[str, str], force: bool) -> dict[str, str]:
    """The samples without a passing QC verdict; ExportError unless ``force``."""
    not_passed = {sid: st for sid, st in status.items() if st != "passed"}
    if not_passed and not force:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(_count(not_passed.values()).items()))
        raise ExportError(f"{export_dir}: {len(not_passed)} of {len(status)} sample(s) have no passing QC verdict "
                          f"({kinds}); a release holds QC-passed samples only",
                          hint="run 'medsynth qc' and export again without forcing, or pass `force=True` to "
                               "release them anyway (the data card says so)")
    if not_passed:
        log.warning("releasing %d sample(s) without a passing QC verdict because of --force", len(not_passed))
    return not_passed


@dataclass
class _Privacy:
    """The model, the real cases and the privacy figures of the released images."""

    sampler: Any
    model_card: dict[str, Any]
    train_manifest: Any
    n_members: int
    holdout_cases: list[Any]
    memorisation: dict[str, Any]
    membership: Optional[dict[str, Any]]


def privacy_figures(export_dir: Path, exp: Any, run_dir: Path, manifest: Path, holdout: Optional[Path],
                    device: Optional[str], settings: Any) -> _Privacy:
    """Load the run and the real cases, then screen the released images for copies and run the
    membership audit (hold-out cases needed) on them."""
    from medsynth.manifest import load_manifest
    from medsynth.privacy.audit import (
        audit_membership,
        load_audit_inputs,
        load_cases,
        sampler_card,
        training_split,
    )

    train_m = load_manifest(manifest)
    if holdout is not None:
        sampler, members, heldout, case_notes = load_audit_inputs(run_dir, manifest, holdout, device)
        hold_cases = load_manifest(holdout).cases
    else:
        from medsynth.model.sample import Sampler

        sampler = Sampler.from_run(run_dir, device=device)
        members = load_cases(sampler.cfg, training_split(sampler.cfg, train_m)[0], "training")
        heldout, hold_cases, case_notes = None, [], {}
    card = sampler_card(run_dir)  # checked against the checkpoints when the run was loaded
    check_generator(export_dir, exp, card, run_dir)
    synthetic = load_cases(sampler.cfg, exp.cases, "released", model_inputs=False)
    if len(synthetic) != len(exp.cases):
        raise ExportError(f"{export_dir}: {len(exp.cases) - len(synthetic)} exported image(s) cannot be read on the "
                          "run's grid (see the warnings above)", hint="export again from the run's own samples")
    memorisation = screen_copies(sampler.cfg, members, heldout, synthetic.physical, synthetic.ids)
    membership = None
    if heldout is not None:
        membership = audit_membership(sampler, members, heldout, settings, synthetic.physical,
                                      f"the {len(synthetic)} released samples")
        membership["cases"] = case_notes
    return _Privacy(sampler, card, train_m, len(members), hold_cases, memorisation, membership)


def write_cards(tmp: Path, out_dir: Path, audit: dict[str, Any], data_card: dict[str, Any], ids: Any) -> None:
    """The audit and the card, PHI-scanned on their own, then moved into the release."""
    from medsynth.export.datacard import render_markdown

    cards = out_dir.parent / f".{out_dir.name}.card-{os.getpid()}"
    shutil.rmtree(cards, ignore_errors=True)
    try:
        write_json(cards / "privacy_audit.json", audit)
        write_json(cards / "data_card.json", data_card)
        write_text(cards / "DATA_CARD.md", render_markdown(data_card))
        run_phi_scan(cards, ids)
        for f in cards.iterdir():
            os.replace(f, tmp / f.name)
    finally:
        shutil.rmtree(cards, ignore_errors=True)


def release_export(export_dir: str | os.PathLike, run_dir: str | os.PathLike, manifest: str | os.PathLike,
                   out_dir: str | os.PathLike, *, holdout: Optional[str | os.PathLike] = None, force: bool = False,
                   qc: Optional[str | os.PathLike] = None, utility: Optional[str | os.PathLike] = None,
                   licence: Optional[str] = None, name: Optional[str] = None, device: Optional[str] = None,
                   settings: Any = None) -> ReleaseResult:
    """Make ``export_dir`` into the release folder ``out_dir`` (see the module docstring).

    Raises:
        ExportError: not an export, changed since export, another model's samples, samples without
            a passing QC verdict (unless ``force``), ``out_dir`` not empty.
        PrivacyError: a released image is a possible copy of a training case, or the PHI scan hit.
    """
    from medsynth.export.datacard import build_card
    from medsynth.privacy.audit import AuditSettings

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    settings = settings or AuditSettings()
    settings.check()
    _check_paths(export_dir, out_dir)
    report, exp = read_export(export_dir)
    qc_fig = qc_report_figures(Path(qc) if qc is not None else None)
    util_fig = utility_figures(Path(utility) if utility is not None else None)
    check_unchanged(export_dir, exp)
    status = qc_status(exp)
    not_passed = gate_qc(export_dir, status, force)
    pv = privacy_figures(export_dir, exp, Path(run_dir), Path(manifest), Path(holdout) if holdout else None,
                         device, settings)

    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        copy_export(export_dir, tmp)
        dicom_index = write_fileset(export_dir, tmp)
        # the PHI scan of every data file; the card and audit that report it are scanned in write_cards
        ids = phi_identifiers(Path(manifest), pv.train_manifest.cases, pv.holdout_cases)
        phi = run_phi_scan(tmp, ids)
        phi["statement"] = (f"clean: {phi['identifiers_searched']} identifiers of the real cases (DICOM header "
                            f"values of {phi['reference_headers']} reference file(s) and every training and "
                            "hold-out case id) searched in every file and file name of the release, this card "
                            "included; none found")
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        audit = {"format": AUDIT_FORMAT, "created": created, "medsynth_version": __version__,
                 "qc": {"released": status, "forced": bool(not_passed), "qc_report": qc_fig},
                 "memorisation": pv.memorisation, "membership_inference": pv.membership, "phi_scan": phi}
        data_card = build_card(name=name or out_dir.name, created=created, model_card=pv.model_card,
                               cfg=pv.sampler.cfg, train_manifest=pv.train_manifest, members=pv.n_members,
                               export=exp, export_report=report, status=status, force=force, qc_report=qc_fig,
                               memorisation=pv.memorisation, membership=pv.membership, phi=phi, utility=util_fig,
                               licence=licence, dicom_index=dicom_index)
        write_cards(tmp, out_dir, audit, data_card, ids)
        n_files = write_checksums(tmp)
        _check_paths(export_dir, out_dir)  # again: the folder may have appeared meanwhile
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notes = [f"{len(not_passed)} sample(s) released without a passing QC verdict (--force)"] if not_passed else []
    if pv.membership is None:
        notes.append("no --holdout: membership inference not run and the memorisation threshold calibrated on "
                     "a split of the training cases")
    return ReleaseResult(out_dir, [c.id for c in exp.cases], data_card, n_files + 1,
                         sum(e["instances"] for e in dicom_index), notes)


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out

