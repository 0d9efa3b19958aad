"""medsynth release: data card, privacy audit, checksums and DICOMDIR from a real export; refusals;
SNOMED CT coding of DICOM SEG segments."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet, is_conformant_file_id

from medsynth.errors import ExportError, PrivacyError
from medsynth.export.seg_codes import segment_code, table
from tests.helpers_release import inputs


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return inputs(tmp_path_factory.getbasetemp() / "release-inputs")


@pytest.fixture(scope="module")
def release(built, tmp_path_factory) -> tuple[Path, str]:
    """The CLI's release of the export, with hold-out cases, the QC report, a utility report (the
    smallest real evaluation) and a licence; ``--out`` relative."""
    import os

    from medsynth.cli import main
    from medsynth.evaluate.classifier import Budget
    from medsynth.evaluate.utility import UtilityOptions, evaluate_utility

    base = tmp_path_factory.mktemp("rel")
    evaluate_utility(built["run"], built["train"], built["holdout"], base / "utility",
                     UtilityOptions(repeats=1, arms=["real", "synthetic"], budget=Budget(steps=2, batch_size=2),
                                    bootstrap=100, device="cpu", samples=built["samples"]))
    cwd = os.getcwd()
    os.chdir(base)
    try:
        code = main(["release", str(built["export"]), "--run", str(built["run"]), "--manifest", str(built["train"]),
                     "--holdout", str(built["holdout"]), "--qc", str(built["qc"]), "--licence", "CC-BY-4.0",
                     "--utility", str(base / "utility" / "utility.json"), "--out", "release"])
    finally:
        os.chdir(cwd)
    assert code == 0
    out = base / "release"
    return out, (out / "DATA_CARD.md").read_text()


# ---------------------------------------------------------------------------------------------
# SNOMED CT codes of SEG segments
# ---------------------------------------------------------------------------------------------


def test_every_code_of_the_table_is_the_dicom_standards():
    from pydicom.sr.codedict import codes

    def members(cid: str) -> dict[str, str]:
        group = getattr(codes, f"cid{cid}")
        return {c.value: c.meaning for c in (getattr(group, k) for k in group.dir()) if c.scheme_designator == "SCT"}

    categories = members("7150")
    for name, code in table().items():
        assert categories.get(code.category[0]) == code.category[1], name
        assert members(code.type_cid).get(code.type[0]) == code.type[1], name
    assert segment_code("Lung").type == ("39607008", "Lung")
    assert segment_code("tumour").type == ("108369006", "Neoplasm")
    assert segment_code("lesion").category == ("49755003", "Morphologically Abnormal Structure")


def test_unknown_label_keeps_generic_tissue_with_a_warning(caplog):
    code = segment_code("my_special_label")
    assert not code.known and code.type == ("85756007", "Tissue")
    assert "not in seg_codes.csv" in caplog.text


def test_exported_seg_segments_are_coded_in_snomed_ct(built):
    seg = dcmread(next((built["export"] / "dicom_seg").glob("*.dcm")))
    by_label = {s.SegmentLabel: s for s in seg.SegmentSequence}
    assert "lung" in by_label
    lung = by_label["lung"]
    assert lung.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"
    assert lung.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert lung.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"


# ---------------------------------------------------------------------------------------------
# the release
# ---------------------------------------------------------------------------------------------


def test_release_has_card_audit_checksums_and_a_conformant_dicomdir(built, release):
    out, md = release
    for f in ("DATA_CARD.md", "data_card.json", "privacy_audit.json", "SHA256SUMS", "DICOMDIR", "manifest.json"):
        assert (out / f).is_file(), f
    assert not (out / "dicom").exists() and not (out / "dicom_seg").exists()  # replaced by the File-set
    # SHA256SUMS covers every other file, and every line checks out
    listed = {}
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split("  ", 1)
        listed[rel] = digest
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(listed) == files
    assert all(hashlib.sha256((out / r).read_bytes()).hexdigest() == d for r, d in listed.items())
    # DICOMDIR: every exported DICOM file, conformant file IDs, SEG with its image series
    exp = built["export"]
    n_export = len(list((exp / "dicom").rglob("*.dcm"))) + len(list((exp / "dicom_seg").glob("*.dcm")))
    fs = FileSet(dcmread(out / "DICOMDIR"))
    assert len(fs) == n_export
    assert all(is_conformant_file_id(Path(i.path).relative_to(out)) for i in fs)
    assert {i.Modality for i in fs} == {"CT", "SEG"}
    card = json.loads((out / "data_card.json").read_text())
    assert sum(s["instances"] for s in card["files"]["dicom_series"]) == n_export


def test_card_states_what_a_privacy_officer_signs(release):
    out, md = release
    card = json.loads((out / "data_card.json").read_text())
    for heading in ("Intended use and limits", "Generator", "Training cohort", "Quality control",
                    "Memorisation screen", "Membership inference", "PHI scan", "Utility", "Licence", "How to cite"):
        assert f"## {heading}" in md
    assert [a["arm"] for a in card["utility"]["arms"]] == ["real only", "synthetic only"]
    assert card["utility"]["n_test"] == 8 and "| real only |" in md
    assert card["training_cohort"]["n_training"] == 4 and card["training_cohort"]["classes"] == {"no_lesion": 2,
                                                                                               "lesion": 2}
    assert card["qc"]["statement"].startswith("every released sample (4) has a passing QC verdict")
    assert card["memorisation"]["n_flagged"] == 0 and card["memorisation"]["calibration"] == "holdout_manifest"
    mia = card["membership_inference"]
    assert mia["run"] and mia["n_members"] == 4 and mia["n_nonmembers"] == 8
    assert "membership leaks" in mia["statement"]  # the over-fitted model is caught
    assert card["phi_scan"]["result"] == "clean" and "this card included" in card["phi_scan"]["statement"]
    assert card["licence"]["data"] == "CC-BY-4.0"
    assert "Lung (39607008)" in md and "initial weights | none" in md
    # no case id, hospital path or training file name anywhere in the card or the audit
    for text in (md, (out / "data_card.json").read_text(), (out / "privacy_audit.json").read_text()):
        assert "phantom-" not in text and "/tmp" not in text and "manifest.json" not in text.replace(
            '"manifest.json"', "")


def test_samples_without_passing_qc_are_refused_unless_forced(built, tmp_path, run_cli):
    from medsynth.export import export_samples
    from medsynth.qc.gate import load_qc_config, run_qc

    samples = tmp_path / "samples"
    shutil.copytree(built["samples"], samples)
    for v in samples.glob("*.qc.json"):
        v.unlink()
    verdict_of = samples / "synth-tiny-00001.qc.json"
    cfg, _ = load_qc_config(run_dir=built["run"])
    # calibrated on the hold-out cases: 4 reference cases leave no held-out lesion for the lesion
    # screen, which then fails the lesion samples closed (tests/test_lesion_screen.py)
    run_qc(samples, built["train"], tmp_path / "qc", cfg, holdout=built["holdout"], quarantine=False)
    verdict = json.loads(verdict_of.read_text())
    verdict_of.unlink()  # one sample without a verdict
    export_samples(samples, tmp_path / "export", formats="nifti", force=True)
    args = ["release", tmp_path / "export", "--run", built["run"], "--manifest", built["train"]]
    code, _, err = run_cli(*args, "--out", tmp_path / "refused")
    assert code == ExportError.exit_code and "1 of 4 sample(s) have no passing QC verdict (1 missing)" in err
    assert "pass --force" in err and not (tmp_path / "refused").exists() and "Traceback" not in err
    code, out, err = run_cli(*args, "--out", tmp_path / "forced", "--force")
    assert code == 0, err
    card = json.loads((tmp_path / "forced" / "data_card.json").read_text())
    assert "1 of the 4 released samples do NOT have a passing QC verdict" in card["qc"]["statement"]
    assert "(--force)" in card["qc"]["statement"] and card["qc"]["forced"]
    assert not card["membership_inference"]["run"] and "--holdout" in card["membership_inference"]["statement"]
    assert card["memorisation"]["calibration"] == "internal_split"
    assert not (tmp_path / "forced" / "DICOMDIR").exists()  # a NIfTI-only export has no DICOM
    assert verdict["passed"]


def test_possible_copy_of_a_training_case_is_never_released(built, tmp_path, run_cli):
    """A 'sample' whose image is a training phantom: QC flags it, export --force ships it, release refuses."""
    from medsynth.export import export_samples
    from medsynth.manifest import load_manifest
    from medsynth.privacy.audit import load_cases
    from medsynth.qc.gate import load_qc_config, run_qc
    from medsynth.volume import Volume

    samples = tmp_path / "samples"
    shutil.copytree(built["samples"], samples)
    cfg, _ = load_qc_config(run_dir=built["run"])
    real = load_cases(cfg, load_manifest(built["train"]).cases[:1], model_inputs=False).physical[0]  # on the grid
    fake = Volume.load_nifti(samples / "synth-tiny-00000.nii.gz", modality="CT")
    fake.with_array(real).save_nifti(samples / "synth-tiny-00000.nii.gz", dtype="float32")
    run_qc(samples, built["train"], tmp_path / "qc", cfg, holdout=built["holdout"], quarantine=False)
    assert "possible_copy" in " ".join(json.loads((samples / "synth-tiny-00000.qc.json").read_text())["reasons"])
    export_samples(samples, tmp_path / "export", formats="nifti", force=True)
    code, _, err = run_cli("release", tmp_path / "export", "--run", built["run"], "--manifest", built["train"],
                           "--holdout", built["holdout"], "--out", tmp_path / "out", "--force")
    assert code == PrivacyError.exit_code, err
    assert "1 released sample(s) are possible copies of a training case: synth-tiny-00000" in err
    assert "phantom-" not in err and not (tmp_path / "out").exists()


def test_bad_inputs_are_refused_with_the_file_and_the_fix(built, release, tmp_path, run_cli):
    out, _ = release
    base = ["--run", built["run"], "--manifest", built["train"]]
    code, _, err = run_cli("release", tmp_path / "nope", *base, "--out", tmp_path / "o")
    assert code == ExportError.exit_code and "export folder not found" in err
    code, _, err = run_cli("release", built["export"], *base, "--out", out)
    assert code == ExportError.exit_code and "already exists and is not empty" in err
    code, _, err = run_cli("release", built["export"], *base, "--out", built["export"] / "inside")
    assert code == ExportError.exit_code and "must not contain or be inside the export" in err
    changed = tmp_path / "changed"
    shutil.copytree(built["export"], changed)
    img = next((changed / "imagesTr").glob("*.nii.gz"))
    img.write_bytes(img.read_bytes() + b"\0")
    code, _, err = run_cli("release", changed, *base, "--out", tmp_path / "o2")
    assert code == ExportError.exit_code and "differ from what was exported" in err and "(image changed)" in err
    bad_qc = tmp_path / "qc.json"
    bad_qc.write_text("{}")
    code, _, err = run_cli("release", built["export"], *base, "--out", tmp_path / "o3", "--qc", bad_qc)
    assert code == ExportError.exit_code and "not a readable 'medsynth qc' report" in err
    assert not any(p.name.startswith(".o") for p in tmp_path.iterdir())  # no partial folder left
    assert "Traceback" not in err
