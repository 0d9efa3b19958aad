"""Data manifests: format and schema, `manifest verify` (all problems at once), `manifest build` on
NIfTI input (ids, modality guess, labels, classes), Decathlon / nnU-Net dataset.json reading."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from medsynth.errors import ManifestError
from medsynth.manifest import (Case, Manifest, build_manifest, guess_modality, load_manifest, save_manifest,
                               verify_manifest)
from medsynth.volume import Volume, affine_from_spacing

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "data_manifests" / "manifest.schema.json"


def ct(shape=(12, 10, 8), seed=0, spacing=(2.0, 2.0, 3.0)) -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.integers(-1000, 1200, size=shape).astype(np.int16)
    return Volume(arr, affine_from_spacing(spacing, shape, "LPS", center=(5.0, -3.0, 10.0)))


def mr(shape=(12, 10, 8), seed=0) -> Volume:
    arr = np.random.default_rng(seed).uniform(0, 900, size=shape).astype(np.float32)
    return Volume(arr, affine_from_spacing((1.0, 1.0, 1.2), shape, "RAS"), modality="MR", units="a.u.")


def label_for(vol: Volume, shape=None, affine=None, dtype=np.uint8) -> Volume:
    shape = shape or vol.shape
    arr = np.zeros(shape, dtype=dtype)
    arr[2:5, 2:5, 2:5] = 1
    return Volume(arr, vol.affine if affine is None else affine, modality="SEG", units="label")


def validate_schema(obj) -> None:
    # CI (MEDSYNTH_REQUIRE_TOOLS) must fail, not skip, without the validator.
    jsonschema = __import__("jsonschema") if os.environ.get("MEDSYNTH_REQUIRE_TOOLS") else pytest.importorskip(
        "jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(obj)


# --------------------------------------------------------------------------------------------
# format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["example_ct.json", "example_mri.json"])
def test_example_manifests_follow_the_schema_and_load(name):
    path = REPO / "data_manifests" / name
    validate_schema(json.loads(path.read_text()))
    m = load_manifest(path)
    assert m.cases and m.modality in ("CT", "MR")
    assert all(c.image.is_relative_to(path.parent) for c in m.cases)  # relative paths, resolved
    assert len({c.id for c in m.cases}) == len(m.cases)


def test_example_manifests_are_templates_that_verify_reports_missing():
    m = load_manifest(REPO / "data_manifests" / "example_ct.json")
    problems = verify_manifest(m)
    assert {p.case for p in problems if "not found" in p.message} == {c.id for c in m.cases}


def test_configs_point_at_the_example_manifests():
    from medsynth.config import load_config

    for cfg_name, man in (("ct_chest.yaml", "example_ct.json"), ("mri_brain.yaml", "example_mri.json")):
        cfg = load_config(REPO / "configs" / cfg_name)
        assert Path(cfg.data.manifest) == (REPO / "data_manifests" / man).resolve()
        assert load_manifest(cfg.data.manifest).modality == cfg.data.modality


def test_structure_errors_are_all_reported_at_once(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"format": "medsynth-manifest/0", "cases": [
        {"id": "", "image": "a.nii.gz"},
        {"id": "b", "image": 5},
        {"id": "c", "image": "c.nii.gz", "class_label": "yes", "shape": [1, 2], "spacing": [1, 0, 1],
         "sha256": "abc", "modality": "PET", "series_files": []},
    ]}))
    with pytest.raises(ManifestError) as ei:
        load_manifest(p)
    msg = str(ei.value)
    assert "9 problem(s)" in msg
    for part in ("'format' must be 'medsynth-manifest/1'", "cases[0].id", "cases[1] (b).image",
                 "cases[2] (c).class_label", "(c).shape", "(c).spacing", "(c).sha256", "(c).modality",
                 "(c).series_files"):
        assert part in msg, part


def test_bad_json_is_one_clear_error_without_traceback(tmp_path, run_cli):
    p = tmp_path / "m.json"
    p.write_text('{"format": "medsynth-manifest/1", "cases": [ {"id": "a",, } ]}')
    code, out, err = run_cli("manifest", "verify", p)
    assert code == 3 and "not valid JSON" in err and "line 1" in err and "Traceback" not in err
    code, out, err = run_cli("manifest", "verify", tmp_path / "absent.json")
    assert code == 3 and "manifest not found" in err


def test_save_and_load_round_trip_with_relative_paths(tmp_path):
    v = ct()
    img = v.save_nifti(tmp_path / "data" / "images" / "a.nii.gz")
    case = Case("a", img, class_label=1, modality="CT", shape=v.shape, spacing=v.spacing,
                extra={"note": "kept"})
    path = save_manifest(Manifest([case], name="t", modality="CT"), tmp_path / "data" / "m.json")
    raw = json.loads(path.read_text())
    assert raw["cases"][0]["image"] == "images/a.nii.gz" and raw["cases"][0]["note"] == "kept"
    validate_schema(raw)
    back = load_manifest(path).cases[0]
    assert back.image == img.resolve() and back.extra == {"note": "kept"} and back.shape == v.shape


# --------------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------------


def test_verify_reports_missing_corrupt_2d_and_wrong_label_shape_at_once(tmp_path, run_cli):
    """The issue's 'must show': four broken cases, four lines, exit non-zero, no traceback."""
    import nibabel as nib

    d = tmp_path / "data"
    good = ct(seed=1)
    good.save_nifti(d / "ok.nii.gz")
    (d / "corrupt.nii.gz").parent.mkdir(parents=True, exist_ok=True)
    full = (d / "ok.nii.gz").read_bytes()
    (d / "corrupt.nii.gz").write_bytes(full[: len(full) // 2])  # truncated gzip stream
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), str(d / "flat.nii.gz"))
    wl = ct(seed=2)
    wl.save_nifti(d / "wl.nii.gz")
    label_for(wl, shape=(12, 10, 7)).save_nifti(d / "wl_label.nii.gz")
    cases = [
        {"id": "good", "image": "data/ok.nii.gz"},
        {"id": "gone", "image": "data/missing.nii.gz"},
        {"id": "broken", "image": "data/corrupt.nii.gz"},
        {"id": "slice", "image": "data/flat.nii.gz"},
        {"id": "badlabel", "image": "data/wl.nii.gz", "label": "data/wl_label.nii.gz"},
    ]
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"format": "medsynth-manifest/1", "modality": "CT", "cases": cases}))
    code, out, err = run_cli("manifest", "verify", m)
    assert code == 3
    assert "Traceback" not in out + err and "internal error" not in err
    lines = out.strip().splitlines()
    assert len(lines) == 5, out
    assert lines[0].startswith("gone: image:") and "not found" in lines[0]
    assert lines[1].startswith("broken: image:") and "not a readable NIfTI file" in lines[1]
    assert lines[2].startswith("slice: image:") and "3D" in lines[2]
    assert lines[3].startswith("badlabel: label:") and "shape [12, 10, 7] differs from the image's [12, 10, 8]" in lines[3]
    assert all("(fix: " in line for line in lines[:4])
    assert lines[4].endswith("4 problem(s) in 4 of 5 case(s)")


def test_verify_cross_case_and_content_problems(tmp_path):
    d = tmp_path
    a = ct(seed=3)
    a.save_nifti(d / "a.nii.gz")
    mr(seed=4).save_nifti(d / "m.nii.gz")
    nan = ct(seed=5).with_array(np.where(np.arange(12 * 10 * 8).reshape(12, 10, 8) == 7, np.nan, 1.0))
    nan.save_nifti(d / "nan.nii.gz", dtype=np.float32)
    shifted = a.affine.copy()
    shifted[0, 3] += 1.5
    label_for(a, affine=shifted).save_nifti(d / "shift_label.nii.gz")
    label_for(a, dtype=np.float32).with_array(np.full(a.shape, 0.5, np.float32)).save_nifti(d / "frac_label.nii.gz")
    two = affine_from_spacing((2.0, 2.0, 3.0), (1, 10, 8), "LPS")
    Volume(np.zeros((1, 10, 8), np.int16), two).save_nifti(d / "one.nii.gz")
    m = Manifest([
        Case("a", d / "a.nii.gz", label=d / "shift_label.nii.gz", modality="CT", class_label=0,
             sha256="0" * 64, shape=(12, 10, 9), spacing=(2.0, 2.0, 3.0)),
        Case("a", d / "a.nii.gz", label=d / "frac_label.nii.gz", modality="CT", class_label=1),
        Case("m", d / "m.nii.gz", modality="MR", class_label=0),
        Case("nan", d / "nan.nii.gz", modality="CT"),
        Case("one", d / "one.nii.gz", modality="CT", class_label=1),
    ], modality=None)
    problems = verify_manifest(m)
    text = "\n".join(map(str, problems))
    expect = [
        ("a", "sha256", "content changed since the manifest was built"),
        ("a", "shape", "recorded [12, 10, 9] but the image is [12, 10, 8]"),
        ("a", "label", "affine differs from the image's (by up to 1.5 mm)"),
        ("a", "id", "id already used by case #1"),
        ("a", "image", "same image as case 'a'"),
        ("a", "label", "values are not integers"),
        ("m", "modality", "MR in a CT manifest (mixed modality: 4 CT, 1 MR)"),
        ("nan", "image", "1 voxel(s) are NaN or infinite"),
        ("nan", "class_label", "missing while 4 other case(s) have one"),
        ("one", "image", "a 2D image (shape [1, 10, 8])"),
    ]
    for case, field, phrase in expect:
        assert any(p.case == case and p.field == field and phrase in p.message for p in problems), (case, field, text)
    assert len(problems) == len(expect), text
    assert all("\n" not in str(p) for p in problems)


def test_verify_clean_manifest_and_moved_folder(tmp_path, run_cli):
    d = tmp_path / "proj"
    v = ct(seed=6)
    v.save_nifti(d / "images" / "x.nii.gz")
    label_for(v).save_nifti(d / "labels" / "x.nii.gz")
    out = d / "manifest.json"
    assert run_cli("manifest", "build", d / "images", "-o", out, "--labels", d / "labels")[0] == 0
    shutil.move(str(d), str(tmp_path / "moved"))  # relative paths travel with the folder
    code, stdout, _ = run_cli("manifest", "verify", tmp_path / "moved" / "manifest.json")
    assert code == 0 and "OK, 1 case(s) verified, no problems" in stdout


def test_verify_unknown_modality_and_empty_manifest(tmp_path):
    ct(seed=7).save_nifti(tmp_path / "a.nii.gz")
    probs = verify_manifest(Manifest([Case("a", tmp_path / "a.nii.gz")]))
    assert [(p.case, p.field) for p in probs] == [("a", "modality")]
    assert verify_manifest(Manifest([]))[0].field == "cases"


# --------------------------------------------------------------------------------------------
# build (NIfTI)
# --------------------------------------------------------------------------------------------


def test_guess_modality():
    assert guess_modality(ct().array) == "CT"
    assert guess_modality(mr().array) == "MR"
    padded = ct().array.copy()
    padded[:3] = -3024  # scanner padding outside the field of view
    assert guess_modality(padded) == "CT"
    assert guess_modality(np.full((4, 4, 4), -2.0)) == "MR"          # z-scored MR
    assert guess_modality(np.linspace(-900, 20000, 64).reshape(4, 4, 4)) == "MR"  # not HU-like


def test_build_nifti_ids_modality_labels_and_classes(tmp_path, run_cli):
    src = tmp_path / "src"
    ct(seed=8).save_nifti(src / "a" / "case-1.nii.gz")
    v2 = ct(seed=9, shape=(10, 10, 6))
    v2.save_nifti(src / "b" / "case-2.nii")
    v2.save_nifti(src / "b" / "deeper" / "case-1.nii.gz")  # same stem: gets a suffix
    label_for(v2).save_nifti(src / "labels" / "case-2.nii")  # inside SRC: excluded from images
    (src / ".hidden.nii.gz").write_bytes(b"x")
    csv = tmp_path / "classes.csv"
    csv.write_text("id,class,comment\ncase-1,1,by id\ncase-2.nii,0,by file name\nb/deeper/case-1.nii.gz,1,by path\nzzz,1,stray\n")
    out = tmp_path / "out" / "m.json"
    code, stdout, stderr = run_cli("manifest", "build", src, "-o", out, "--labels", src / "labels",
                                   "--classes", csv, "--name", "demo")
    assert code == 0, stderr
    raw = json.loads(out.read_text())
    validate_schema(raw)
    by_id = {c["id"]: c for c in raw["cases"]}
    assert sorted(by_id) == ["case-1", "case-1-2", "case-2"] and raw["name"] == "demo"
    assert by_id["case-2"]["label"] == "../src/labels/case-2.nii"
    assert by_id["case-1"]["image"] == "../src/a/case-1.nii.gz" and by_id["case-1"]["label"] is None
    assert [by_id[k]["class_label"] for k in ("case-1", "case-1-2", "case-2")] == [1, 1, 0]
    assert by_id["case-2"]["shape"] == [10, 10, 6] and by_id["case-2"]["spacing"] == [2.0, 2.0, 3.0]
    assert by_id["case-1"]["modality"] == "CT" and raw["modality"] == "CT"
    from medsynth.jobs import sha256_file

    assert by_id["case-2"]["sha256"] == sha256_file(src / "b" / "case-2.nii")
    assert "1 row(s) of" in stderr and "zzz" in stderr           # stray CSV row reported
    assert "2 of 3 case(s) have no label" in stderr
    assert "modality guessed from intensities for NIfTI/NRRD/MetaImage files: 3 CT" in stderr
    assert run_cli("manifest", "verify", out)[0] == 0


def test_build_modality_option_filters_and_guess(tmp_path):
    mr(seed=10).save_nifti(tmp_path / "s" / "t1.nii.gz")
    rep = build_manifest(tmp_path / "s")
    assert rep.manifest.cases[0].modality == "MR" and rep.manifest.modality == "MR"
    assert build_manifest(tmp_path / "s", modality="MR").manifest.cases[0].modality == "MR"
    # --modality is a filter: an MR-looking volume is never written into a CT manifest
    with pytest.raises(ManifestError, match=r"no readable CT volume file .*t1\.nii\.gz: skipped: looks like MR, "
                                            r"not CT \(values are not Hounsfield units; --modality CT\)"):
        build_manifest(tmp_path / "s", modality="CT")


def test_build_skips_unreadable_and_2d_nifti_but_keeps_the_rest(tmp_path):
    import nibabel as nib

    ct(seed=11).save_nifti(tmp_path / "s" / "good.nii.gz")
    (tmp_path / "s" / "bad.nii.gz").write_bytes(b"\x1f\x8b" + b"\0" * 50)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 1), np.int16), np.eye(4)), str(tmp_path / "s" / "flat.nii.gz"))
    rep = build_manifest(tmp_path / "s")
    assert [c.id for c in rep.manifest.cases] == ["good"]
    assert any("bad.nii.gz: skipped" in n for n in rep.notes)
    assert any("flat.nii.gz: skipped: a 2D image" in n for n in rep.notes)


@pytest.mark.parametrize("text,match", [
    ("name,label\na,1\n", "must name the columns 'id' and 'class'"),
    ("id,class\na,one\nb,-1\n,2\n", r"(?s)3 problem\(s\).*line 2.*line 3.*line 4: empty id"),
])
def test_build_rejects_bad_classes_csv(tmp_path, run_cli, text, match):
    ct().save_nifti(tmp_path / "s" / "a.nii.gz")
    (tmp_path / "c.csv").write_text(text)
    with pytest.raises(ManifestError, match=match):
        build_manifest(tmp_path / "s", classes=tmp_path / "c.csv")
    code, _, err = run_cli("manifest", "build", tmp_path / "s", "-o", tmp_path / "m.json", "--classes", tmp_path / "c.csv")
    assert code == 3 and "Traceback" not in err and not (tmp_path / "m.json").exists()


def test_build_on_folder_without_images_fails_clearly(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    code, _, err = run_cli("manifest", "build", tmp_path / "empty", "-o", tmp_path / "m.json")
    assert code == 3 and "no readable volume file (NIfTI, NRRD, MetaImage) or DICOM series found" in err
    code, _, err = run_cli("manifest", "build", tmp_path / "nope", "-o", tmp_path / "m.json")
    assert code == 3 and "not a folder" in err


def _mixed_folder(src: Path) -> None:
    """One CT and one MR NIfTI, and one MR DICOM series (written with pydicom)."""
    from tests.helpers import write_series

    ct(seed=20).save_nifti(src / "chest.nii.gz")
    mr(seed=21).save_nifti(src / "brain.nii.gz")
    mr_values = np.random.default_rng(22).integers(0, 900, size=(8, 8, 4)).astype(np.int16)
    write_series(src / "dicom" / "t2", mr_values, modality="MR", intercept=0.0)


def test_build_splits_a_mixed_folder_by_modality_and_verify_accepts_each(tmp_path, run_cli):
    src = tmp_path / "src"
    _mixed_folder(src)
    out = tmp_path / "m" / "study.json"
    code, stdout, stderr = run_cli("manifest", "build", src, "-o", out)
    assert code == 0, stderr
    ct_path, mr_path = tmp_path / "m" / "study-CT.json", tmp_path / "m" / "study-MR.json"
    assert not out.exists() and ct_path.is_file() and mr_path.is_file()
    lines = stdout.strip().splitlines()
    assert lines[0].startswith(f"wrote {ct_path}: 1 case(s) (1 NIfTI, 0 DICOM series), modality CT")
    assert lines[1].startswith(f"wrote {mr_path}: 2 case(s) (1 NIfTI, 1 DICOM series), modality MR")
    assert "mixed modalities: written as one manifest per modality (1 CT, 2 MR)" in stderr
    ct_raw, mr_raw = json.loads(ct_path.read_text()), json.loads(mr_path.read_text())
    validate_schema(ct_raw)
    validate_schema(mr_raw)
    assert (ct_raw["modality"], [c["id"] for c in ct_raw["cases"]]) == ("CT", ["chest"])
    assert (mr_raw["modality"], [c["id"] for c in mr_raw["cases"]]) == ("MR", ["brain", "series-0001"])
    assert ct_raw["name"] == "src-CT" and mr_raw["name"] == "src-MR"
    for path in (ct_path, mr_path):
        code, stdout, stderr = run_cli("manifest", "verify", path)
        assert code == 0 and "no problems" in stdout, stdout + stderr


@pytest.mark.parametrize("modality,ids", [("CT", ["chest"]), ("MR", ["brain", "series-0001"])])
def test_build_modality_filter_writes_one_manifest(tmp_path, run_cli, modality, ids):
    src = tmp_path / "src"
    _mixed_folder(src)
    out = tmp_path / "m.json"
    code, stdout, stderr = run_cli("manifest", "build", src, "-o", out, "--modality", modality)
    assert code == 0, stderr
    raw = json.loads(out.read_text())
    assert raw["modality"] == modality and [c["id"] for c in raw["cases"]] == ids
    assert all(c["modality"] == modality for c in raw["cases"])
    assert not list(tmp_path.glob("m-*.json"))
    if modality == "CT":
        assert "brain.nii.gz: skipped: looks like MR, not CT" in stderr
        assert "skipped: a MR series (--modality CT)" in stderr
    else:
        assert "chest.nii.gz: skipped: looks like CT, not MR (values are Hounsfield units" in stderr
    assert run_cli("manifest", "verify", out)[0] == 0


def test_build_leaves_out_what_verify_would_reject(tmp_path, run_cli):
    """NaN voxels, a label off the image grid and a case without a class among classed cases: build
    notes each and writes a manifest that verify accepts."""
    src, labels = tmp_path / "src", tmp_path / "labels"
    a, b, c = ct(seed=30), ct(seed=31), ct(seed=32)
    for name, v in (("a", a), ("b", b), ("c", c)):
        v.save_nifti(src / f"{name}.nii.gz")
    nan = ct(seed=33).with_array(np.where(np.arange(12 * 10 * 8).reshape(12, 10, 8) == 5, np.nan, -1000.0))
    nan.save_nifti(src / "nan.nii.gz", dtype=np.float32)
    label_for(a).save_nifti(labels / "a.nii.gz")
    shifted = b.affine.copy()
    shifted[1, 3] += 2.0
    label_for(b, affine=shifted).save_nifti(labels / "b.nii.gz")
    label_for(c, shape=(12, 10, 7)).save_nifti(labels / "c.nii.gz")
    (tmp_path / "classes.csv").write_text("id,class\na,0\nb,1\nnan,1\n")
    out = tmp_path / "m.json"
    code, _, stderr = run_cli("manifest", "build", src, "-o", out, "--labels", labels,
                              "--classes", tmp_path / "classes.csv")
    assert code == 0, stderr
    assert "nan.nii.gz: skipped: 1 voxel(s) are NaN or infinite" in stderr
    assert "b.nii.gz: label not used for case b: affine differs from the image's (by up to 2 mm)" in stderr
    assert "c.nii.gz: label not used for case c: shape [12, 10, 7] differs" in stderr
    assert "1 case(s) have no row in" in stderr and "left out" in stderr and "1 row(s) of" in stderr
    raw = json.loads(out.read_text())
    assert [(x["id"], x["class_label"], x["label"] is not None) for x in raw["cases"]] == \
        [("a", 0, True), ("b", 1, False)]
    code, stdout, _ = run_cli("manifest", "verify", out)
    assert code == 0, stdout


# --------------------------------------------------------------------------------------------
# Decathlon / nnU-Net
# --------------------------------------------------------------------------------------------


def test_decathlon_dataset_json_loads_and_verifies(tmp_path, run_cli):
    v = ct(seed=12)
    v.save_nifti(tmp_path / "imagesTr" / "lung_001.nii.gz")
    label_for(v).save_nifti(tmp_path / "labelsTr" / "lung_001.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "name": "Lung", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "cancer"},
        "numTraining": 1, "training": [{"image": "./imagesTr/lung_001.nii.gz", "label": "./labelsTr/lung_001.nii.gz"}],
        "test": ["./imagesTs/lung_002.nii.gz"]}))
    m = load_manifest(tmp_path / "dataset.json")
    assert [c.id for c in m.cases] == ["lung_001"] and m.modality == "CT" and m.cases[0].label is not None
    code, out, _ = run_cli("manifest", "verify", tmp_path / "dataset.json")
    assert code == 0, out


def test_nnunet_v2_dataset_json_loads_and_multichannel_is_refused(tmp_path):
    v = mr(seed=13)
    v.save_nifti(tmp_path / "imagesTr" / "brain_007_0000.nii.gz")
    label_for(v).save_nifti(tmp_path / "labelsTr" / "brain_007.nii.gz")
    ds = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "tumour": 1}, "numTraining": 1,
          "file_ending": ".nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    m = load_manifest(tmp_path / "dataset.json")
    assert [c.id for c in m.cases] == ["brain_007"] and m.modality == "MR"
    assert verify_manifest(m) == []
    ds["channel_names"] = {"0": "T1", "1": "FLAIR"}
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(ManifestError, match="2 channels"):
        load_manifest(tmp_path / "dataset.json")
