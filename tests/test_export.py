"""Export: NIfTI, DICOM series and SEG, dataset folders — proved with tools nobody here wrote.

Samples are crafted with ``medsynth.samples.write_sample``: a 24x20x12 CT with HU structure and
anisotropic spacing (0.8, 1.1, 2.5) mm in RAS, LPS, ASL (left-handed, permuted), PIR (permuted)
and an oblique orientation.  The DICOM series are validated with dciodvfy and read back with
SimpleITK and dcm2niix; the NIfTI with nibabel and MONAI; the SEG with highdicom; the datalist
with MONAI's load_decathlon_datalist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth import __version__
from medsynth.samples import write_sample
from medsynth.volume import Volume, affine_from_spacing

SHAPE = (24, 20, 12)
SPACING = (0.8, 1.1, 2.5)
ORIENTATIONS = ("RAS", "LPS", "ASL", "PIR", "oblique")
LABELS = {"background": 0, "lung": 1, "lesion": 2}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def tool(name: str) -> str:
    """Path of an external validator; fail in CI (MEDSYNTH_REQUIRE_TOOLS), skip elsewhere."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        if os.environ.get("MEDSYNTH_REQUIRE_TOOLS"):
            pytest.fail(f"{name} is not installed (pip install -e '.[test]')")
        pytest.skip(f"{name} not installed")
    return path


def oblique_affine() -> np.ndarray:
    from scipy.spatial.transform import Rotation

    aff = affine_from_spacing(SPACING, SHAPE, "RAS", center=(5.0, -12.0, 40.0))
    rot = Rotation.from_euler("xyz", [20, -10, 15], degrees=True).as_matrix()
    out = aff.copy()
    out[:3, :3] = rot @ aff[:3, :3]
    out[:3, 3] = rot @ aff[:3, 3]
    return out


def affine_for(orientation: str) -> np.ndarray:
    if orientation == "oblique":
        return oblique_affine()
    return affine_from_spacing(SPACING, SHAPE, orientation, center=(10.0, -20.0, 30.0))


def ct_phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A float HU volume (air, soft tissue, lung, bone, a lesion, noise) and its label map."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    body = ((i - 11.5) / 10) ** 2 + ((j - 9.5) / 8) ** 2 <= 1
    lung = body & (((i - 7) / 3.5) ** 2 + ((j - 9.5) / 4) ** 2 <= 1) & (k > 1) & (k < 10)
    bone = body & ((i - 16) ** 2 + (j - 12) ** 2 <= 4)
    lesion = lung & ((i - 7) ** 2 + (j - 9) ** 2 + ((k - 5) * 2) ** 2 <= 6)
    hu = np.full(SHAPE, -1000.0)
    hu[body] = 40.0
    hu[lung] = -820.0
    hu[bone] = 900.0
    hu[lesion] = 30.0
    hu += rng.normal(0, 12, SHAPE)  # fractional values: export must round, not truncate or rescale
    label = np.zeros(SHAPE, np.uint8)
    label[lung] = 1
    label[lesion] = 2
    return hu.astype(np.float32), label


def make_sample(out: Path, index: int, orientation: str, modality: str = "CT", qc: bool | None = True,
                run: str = "t") -> str:
    sid = f"synth-{run}-{index:05d}"
    hu, label = ct_phantom(index)
    aff = affine_for(orientation)
    if modality == "MR":
        hu = (hu + 1000.0) / 1900.0  # arbitrary float units, about 0..1
    write_sample(out, sid, Volume(hu, aff, modality, "HU" if modality == "CT" else "a.u."),
                 {"index": index, "seed": 1000 + index, "class": index % 2, "checkpoint_hash": "c0ffee" * 4,
                  "config_hash": "abc123", "label_values": LABELS},
                 label=Volume(label, aff, "SEG", "label"))
    if qc is not None:
        (out / f"{sid}.qc.json").write_text(json.dumps({"passed": qc, "reasons": [] if qc else ["too noisy"]}))
    return sid


def canonical(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine reoriented to the closest RAS grid: equal for two images of one grid."""
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(arr), affine))
    return np.asarray(img.dataobj), img.affine


def assert_same_grid(arr_a, aff_a, arr_b, aff_b, atol_value=0.0, what=""):
    """Same voxel values (within atol_value) and same origin, spacing and direction within 1e-3."""
    ca, fa = canonical(arr_a, aff_a)
    cb, fb = canonical(arr_b, aff_b)
    assert ca.shape == cb.shape, what
    va, vb = Volume(ca, fa), Volume(cb, fb)
    np.testing.assert_allclose(va.origin, vb.origin, atol=1e-3, err_msg=f"{what} origin")
    np.testing.assert_allclose(va.spacing, vb.spacing, atol=1e-3, err_msg=f"{what} spacing")
    np.testing.assert_allclose(va.direction, vb.direction, atol=1e-3, err_msg=f"{what} direction")
    np.testing.assert_allclose(ca.astype(np.float64), cb.astype(np.float64), atol=atol_value, rtol=0,
                               err_msg=f"{what} voxels")


def read_series_sitk(folder: Path) -> Volume:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return Volume.from_sitk(reader.Execute())


def dcm2niix(folder: Path, out: Path) -> nib.Nifti1Image:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([tool("dcm2niix"), "-z", "y", "-b", "n", "-f", "%f", "-o", str(out), str(folder)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(out.glob("*.nii.gz"))
    assert len(files) == 1, (files, proc.stdout)
    return nib.load(str(files[0]))


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    proc = subprocess.run([tool("dciodvfy"), "-new", str(path)], capture_output=True, text=True, timeout=60,
                          check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")], [ln for ln in lines if ln.startswith("Warning")]


# ---------------------------------------------------------------------------------------------
# fixtures: one export shared by the read-back tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from medsynth.export import export_samples

    root = tmp_path_factory.mktemp("export")
    samples = root / "samples"
    ids = {o: make_sample(samples, n, o) for n, o in enumerate(ORIENTATIONS)}
    before = {p.name: p.read_bytes() for p in samples.iterdir()}
    result = export_samples(samples, root / "out", formats="nifti,dicom,seg")
    after = {p.name: p.read_bytes() for p in samples.iterdir()}
    assert before == after, "export modified its input"
    return root, samples, root / "out", ids, result


# ---------------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------------


def test_export_result_and_layout(exported):
    _, _, out, ids, result = exported
    assert result.ok and sorted(result.exported) == sorted(ids.values())
    assert result.n_dicom_files == len(ORIENTATIONS) * SHAPE[2] and result.n_seg == len(ORIENTATIONS)
    for sid in ids.values():
        assert (out / "imagesTr" / f"{sid}_0000.nii.gz").is_file()
        assert (out / "labelsTr" / f"{sid}.nii.gz").is_file()
        assert len(list((out / "dicom" / sid).glob("*.dcm"))) == SHAPE[2]
        assert (out / "dicom_seg" / f"{sid}.dcm").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_nifti_geometry_dtype_and_values(exported, orientation):
    _, samples, out, ids, _ = exported
    sid = ids[orientation]
    src = nib.load(str(samples / f"{sid}.nii.gz"))
    img = nib.load(str(out / "imagesTr" / f"{sid}_0000.nii.gz"))
    assert img.get_data_dtype() == np.int16
    qform, qcode = img.get_qform(coded=True)
    sform, scode = img.get_sform(coded=True)
    assert qcode == 1 and scode == 1
    np.testing.assert_allclose(qform, sform, atol=1e-4)
    np.testing.assert_allclose(img.affine, affine_for(orientation), atol=1e-4)
    assert "".join(nib.aff2axcodes(img.affine)) == "".join(nib.aff2axcodes(affine_for(orientation)))
    descrip = img.header["descrip"].tobytes().decode()
    assert "SYNTHETIC" in descrip and f"medsynth {__version__}" in descrip
    stored = np.asanyarray(img.dataobj)
    assert stored.dtype == np.int16  # no scl_slope: the stored integers are HU
    np.testing.assert_array_equal(stored, np.rint(np.asanyarray(src.dataobj)).astype(np.int16))
    lab = nib.load(str(out / "labelsTr" / f"{sid}.nii.gz"))
    assert lab.get_data_dtype() == np.uint8
    np.testing.assert_allclose(lab.affine, img.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(lab.dataobj), ct_phantom(list(ORIENTATIONS).index(orientation))[1])


@pytest.mark.parametrize("orientation", ["RAS", "ASL", "oblique"])
def test_monai_loadimage_reads_intended_affine(exported, orientation):
    from monai.transforms import LoadImage

    _, _, out, ids, _ = exported
    sid = ids[orientation]
    img = LoadImage(image_only=True)(str(out / "imagesTr" / f"{sid}_0000.nii.gz"))
    np.testing.assert_allclose(np.asarray(img.affine), affine_for(orientation), atol=1e-4)
    ref = np.asanyarray(nib.load(str(out / "imagesTr" / f"{sid}_0000.nii.gz")).dataobj)
    np.testing.assert_array_equal(np.asarray(img), ref)


# ---------------------------------------------------------------------------------------------
# DICOM: validator, read-back with SimpleITK and dcm2niix, attributes, UIDs
# ---------------------------------------------------------------------------------------------


def test_dciodvfy_zero_errors_on_every_file(exported):
    _, _, out, _, _ = exported
    files = sorted(out.glob("dicom/*/*.dcm")) + sorted(out.glob("dicom_seg/*.dcm"))
    assert len(files) == len(ORIENTATIONS) * (SHAPE[2] + 1)
    from concurrent.futures import ThreadPoolExecutor

    warnings: set[str] = set()
    with ThreadPoolExecutor(max_workers=4) as pool:
        for f, (errors, warns) in zip(files, pool.map(dciodvfy, files)):
            assert not errors, f"{f.relative_to(out)}: {errors}"
            warnings.update(w.split(" - attribute")[0] for w in warns)
    # The one warning we accept: Laterality is present and empty because it is genuinely unknown.
    assert all("Laterality" in w for w in warnings), warnings
    # dcentvfy: patient/study/series attributes agree across every file of a case (images + SEG)
    for series in sorted((out / "dicom").iterdir()):
        case_files = sorted(series.glob("*.dcm")) + [out / "dicom_seg" / f"{series.name}.dcm"]
        proc = subprocess.run([tool("dcentvfy"), *map(str, case_files)], capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0 and "Error" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_dicom_series_reads_back_with_simpleitk(exported, orientation):
    _, _, out, ids, _ = exported
    sid = ids[orientation]
    back = read_series_sitk(out / "dicom" / sid)
    ref = nib.load(str(out / "imagesTr" / f"{sid}_0000.nii.gz"))
    assert_same_grid(back.array, back.affine, np.asanyarray(ref.dataobj), ref.affine, what=f"sitk {orientation}")
    if np.linalg.det(affine_for(orientation)[:3, :3]) > 0:
        # right-handed grids come back voxel for voxel, without any reorientation
        np.testing.assert_allclose(back.affine, ref.affine, atol=1e-3)
        np.testing.assert_array_equal(back.array, np.asanyarray(ref.dataobj))


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_dicom_series_converted_by_dcm2niix(exported, orientation, tmp_path):
    _, _, out, ids, _ = exported
    sid = ids[orientation]
    conv = dcm2niix(out / "dicom" / sid, tmp_path)
    ref = nib.load(str(out / "imagesTr" / f"{sid}_0000.nii.gz"))
    assert_same_grid(np.asanyarray(conv.dataobj), conv.affine, np.asanyarray(ref.dataobj), ref.affine,
                     what=f"dcm2niix {orientation}")
    np.testing.assert_array_equal(conv.get_fdata(), np.asanyarray(conv.dataobj))  # no hidden rescale


def test_dicom_attributes_mark_synthetic_origin(exported):
    import pydicom

    _, _, out, ids, _ = exported
    sid = ids["LPS"]
    files = sorted((out / "dicom" / sid).glob("*.dcm"))
    dss = [pydicom.dcmread(f) for f in files]
    ds = dss[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and ds.Modality == "CT"
    assert str(ds.PatientName) == f"SYNTHETIC^{sid}" and ds.PatientID == f"SYNTHETIC-{sid}"
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
    assert ds.SyntheticData == "YES"
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert ds.Manufacturer == "medsynth" and ds.SoftwareVersions == __version__
    assert f"medsynth {__version__}" in ds.ImageComments and "SYNTHETIC" in ds.ImageComments
    assert ds.RescaleType == "HU" and float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == 0
    assert float(ds.WindowWidth) > 0
    # (between rows, between columns) = (spacing j, spacing i); NIfTI stores the affine as float32
    np.testing.assert_allclose([float(x) for x in ds.PixelSpacing], [SPACING[1], SPACING[0]], atol=1e-6)
    np.testing.assert_allclose([float(ds.SliceThickness), float(ds.SpacingBetweenSlices)], SPACING[2], atol=1e-6)
    # LPS input: voxel axes i, j, k point to L, P, S, which is DICOM's own frame
    np.testing.assert_allclose([float(x) for x in ds.ImageOrientationPatient], [1, 0, 0, 0, 1, 0], atol=1e-9)
    z = [float(d.ImagePositionPatient[2]) for d in dss]
    np.testing.assert_allclose(np.diff(z), SPACING[2])
    uids = {d.StudyInstanceUID for d in dss} | {d.SeriesInstanceUID for d in dss} | {d.FrameOfReferenceUID for d in dss}
    assert len(uids) == 3
    sops = [d.SOPInstanceUID for d in dss]
    assert len(set(sops)) == len(sops)
    for uid in uids | set(sops):
        assert uid.startswith("2.25.") and len(uid) <= 64 and uid.replace(".", "").isdigit()
    # no date relates to anyone: a fixed synthetic date, empty birth date
    assert ds.StudyDate == "20000101" and ds.PatientBirthDate == ""


def test_seg_reads_back_with_highdicom(exported):
    import highdicom as hd
    import pydicom

    _, _, out, ids, _ = exported
    for orientation in ("RAS", "ASL", "oblique"):
        sid = ids[orientation]
        seg = hd.seg.segread(str(out / "dicom_seg" / f"{sid}.dcm"))
        image = pydicom.dcmread(next((out / "dicom" / sid).glob("*.dcm")))
        assert seg.SyntheticData == "YES" and seg.PatientID == image.PatientID
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == image.SeriesInstanceUID
        assert seg.FrameOfReferenceUID == image.FrameOfReferenceUID
        assert [d.SegmentLabel for d in seg.SegmentSequence] == ["lung", "lesion"]
        vol = seg.get_volume(combine_segments=True, relabel=False)
        # every SEG voxel, mapped through the SEG's own (LPS) affine, lands on the same label value
        lab = nib.load(str(out / "labelsTr" / f"{sid}.nii.gz"))
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in vol.array.shape], indexing="ij"), -1).reshape(-1, 3)
        lps = vol.affine @ np.c_[idx, np.ones(len(idx))].T
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        ijk = np.rint(np.linalg.inv(lab.affine) @ ras)[:3].astype(int)
        ref = np.asanyarray(lab.dataobj)[ijk[0], ijk[1], ijk[2]]
        np.testing.assert_array_equal(vol.array.reshape(-1), ref)
        assert int((np.asanyarray(lab.dataobj) > 0).sum()) == int((vol.array > 0).sum())


def test_reexport_is_byte_identical_and_uid_root_is_used(exported, tmp_path):
    import pydicom

    from medsynth.export import export_samples

    _, samples, out, ids, _ = exported
    export_samples(samples, tmp_path / "again", formats="nifti,dicom,seg")
    for rel in ("dicom/{}/IM00003.dcm", "dicom_seg/{}.dcm", "imagesTr/{}_0000.nii.gz"):
        a = (out / rel.format(ids["PIR"])).read_bytes()
        b = (tmp_path / "again" / rel.format(ids["PIR"])).read_bytes()
        assert a == b, rel
    root = "1.2.826.0.1.3680043.10.999"
    export_samples(samples, tmp_path / "rooted", formats="dicom", uid_root=root + ".")
    ds = pydicom.dcmread(next((tmp_path / "rooted" / "dicom" / ids["RAS"]).glob("*.dcm")))
    for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID):
        assert uid.startswith(root + ".") and len(uid) <= 64
        assert pydicom.uid.UID(uid).is_valid
    # a different image gets different UIDs
    other = pydicom.dcmread(next((out / "dicom" / ids["LPS"]).glob("*.dcm")))
    ref = pydicom.dcmread(next((out / "dicom" / ids["RAS"]).glob("*.dcm")))
    assert other.StudyInstanceUID != ref.StudyInstanceUID


# ---------------------------------------------------------------------------------------------
# dataset folders
# ---------------------------------------------------------------------------------------------


def test_nnunet_dataset_json(exported):
    _, _, out, ids, _ = exported
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT"}
    assert ds["labels"] == LABELS
    assert ds["numTraining"] == len(ids) == len(list((out / "imagesTr").glob("*_0000.nii.gz")))
    assert ds["file_ending"] == ".nii.gz"
    # nnU-Net v2 pairs imagesTr/<case>_0000<ending> with labelsTr/<case><ending>
    for img in (out / "imagesTr").iterdir():
        assert (out / "labelsTr" / img.name.replace("_0000.nii.gz", ".nii.gz")).is_file()


def test_decathlon_datalist_loads_with_monai(exported):
    from monai.data import load_decathlon_datalist

    _, _, out, ids, _ = exported
    items = load_decathlon_datalist(str(out / "datalist.json"), is_segmentation=True, data_list_key="training")
    assert len(items) == len(ids)
    for it in items:
        assert Path(it["image"]).is_file() and Path(it["label"]).is_file()
        assert it["class_label"] in (0, 1)


def test_manifest_has_provenance_and_loads(exported):
    from medsynth.jobs import sha256_file
    from medsynth.manifest import load_manifest

    _, samples, out, ids, _ = exported
    m = load_manifest(out / "manifest.json")
    assert m.modality == "CT" and len(m.cases) == len(ids)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == "medsynth-manifest/1"
    for case, rc in zip(m.cases, raw["cases"]):
        assert case.image.is_file() and case.label.is_file() and case.sha256 == sha256_file(case.image)
        assert rc["synthetic"] is True and tuple(case.shape) == SHAPE
        np.testing.assert_allclose(case.spacing, SPACING, atol=1e-6)
        prov = rc["provenance"]
        assert prov["checkpoint_hash"] == "c0ffee" * 4 and prov["seed"] == 1000 + prov["index"]
        assert prov["class"] == case.class_label and prov["qc"]["passed"] is True
        assert prov["source_image_sha256"] == sha256_file(samples / f"{case.id}.nii.gz")
    from medsynth.manifest import verify_manifest

    assert verify_manifest(m) == []
    schema_path = Path(__file__).resolve().parents[1] / "data_manifests" / "manifest.schema.json"
    if schema_path.is_file():
        jsonschema = pytest.importorskip("jsonschema")
        jsonschema.validate(raw, json.loads(schema_path.read_text()))
    # the nnU-Net dataset.json reads as a manifest too
    assert sorted(c.id for c in load_manifest(out / "dataset.json").cases) == sorted(ids.values())


def test_dicom_only_export_manifest_points_at_series(exported, tmp_path):
    from medsynth.manifest import load_manifest, verify_manifest

    _, samples, _, _ids, _ = exported
    from medsynth.export import export_samples

    result = export_samples(samples, tmp_path / "dcm", formats="dicom")
    assert result.dataset_files == ["manifest.json"]
    assert not (tmp_path / "dcm" / "imagesTr").exists()
    m = load_manifest(tmp_path / "dcm" / "manifest.json")
    assert all(c.image.is_dir() and c.label is None for c in m.cases)
    assert verify_manifest(m) == []


def test_manifest_verify_cli_accepts_export(exported, run_cli):
    from medsynth.cli import build_parser

    _, _, out, _, _ = exported
    assert "manifest" in build_parser()._subparsers._group_actions[0].choices
    code, stdout, stderr = run_cli("manifest", "verify", out / "manifest.json")
    assert code == 0, stdout + stderr


# ---------------------------------------------------------------------------------------------
# MR
# ---------------------------------------------------------------------------------------------


def test_mr_export_float_nifti_and_rescaled_dicom(tmp_path):
    import pydicom

    from medsynth.export import export_samples

    samples = tmp_path / "samples"
    sid = make_sample(samples, 0, "PIR", modality="MR")
    export_samples(samples, tmp_path / "out", formats="nifti,dicom,seg")
    out = tmp_path / "out"
    src = np.asanyarray(nib.load(str(samples / f"{sid}.nii.gz")).dataobj)
    img = nib.load(str(out / "imagesTr" / f"{sid}_0000.nii.gz"))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), src)
    ds = pydicom.dcmread(next((out / "dicom" / sid).glob("*.dcm")))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.Modality == "MR"
    slope = float(ds.RescaleSlope)
    tol = slope / 2 + 1e-6
    back = read_series_sitk(out / "dicom" / sid)
    assert_same_grid(back.array, back.affine, src, img.affine, atol_value=tol, what="sitk MR")
    conv = dcm2niix(out / "dicom" / sid, tmp_path / "d2n")
    assert_same_grid(conv.get_fdata(), conv.affine, src, img.affine, atol_value=tol, what="dcm2niix MR")
    for f in [*sorted((out / "dicom" / sid).glob("*.dcm"))[:3], out / "dicom_seg" / f"{sid}.dcm"]:
        errors, _ = dciodvfy(f)
        assert not errors, errors
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "MR"}


# ---------------------------------------------------------------------------------------------
# CLI, QC gate, bad input
# ---------------------------------------------------------------------------------------------


def test_cli_export_and_qc_gate(tmp_path, run_cli):
    samples = tmp_path / "samples"
    ok = make_sample(samples, 0, "RAS")
    no_qc = make_sample(samples, 1, "LPS", qc=None)
    failed = make_sample(samples, 2, "ASL", qc=False)
    code, out, err = run_cli("export", samples, "--out", tmp_path / "out", "--format", "nifti")
    assert code == 0, err
    assert "refused 2 sample(s)" in out and "1 without a QC verdict" in out and "1 that failed QC" in out
    assert sorted(p.name for p in (tmp_path / "out" / "imagesTr").iterdir()) == [f"{ok}_0000.nii.gz"]
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert set(report["refused"]) == {no_qc, failed} and report["exported"] == [ok]

    code, out, err = run_cli("export", samples, "--out", tmp_path / "out", "--format", "nifti")
    assert code == 5 and "already exists" in err and "Traceback" not in err

    code, out, err = run_cli("export", samples, "--out", tmp_path / "out", "--format", "nifti,dicom",
                             "--force", "--overwrite")
    assert code == 0, err
    assert len(list((tmp_path / "out" / "imagesTr").iterdir())) == 3
    assert len(list((tmp_path / "out" / "dicom").iterdir())) == 3
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {c["id"]: c["provenance"]["qc"]["status"] for c in man["cases"]} == {
        ok: "passed", no_qc: "missing", failed: "failed"}


def test_cli_all_refused_is_an_error(tmp_path, run_cli):
    samples = tmp_path / "samples"
    make_sample(samples, 0, "RAS", qc=None)
    code, _out, err = run_cli("export", samples, "--out", tmp_path / "out")
    assert code == 5 and "nothing to export" in err and "--force" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_not_a_samples_dir(tmp_path, run_cli):
    junk = tmp_path / "junk"
    junk.mkdir()
    Volume(np.zeros(SHAPE, np.float32), affine_for("RAS")).save_nifti(junk / "scan.nii.gz")
    (junk / "notes.json").write_text(json.dumps({"hello": "world"}))
    code, _out, err = run_cli("export", junk, "--out", tmp_path / "out")
    assert code == 5 and "holds no medsynth samples" in err and "fix:" in err and "Traceback" not in err
    code, _out, err = run_cli("export", tmp_path / "missing", "--out", tmp_path / "out")
    assert code == 5 and "samples folder not found" in err and "Traceback" not in err
    code, _out, err = run_cli("export", junk / "scan.nii.gz", "--out", tmp_path / "out")
    assert code == 5 and "is a file, not a samples folder" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_one_bad_sample_does_not_sink_the_batch(tmp_path, run_cli):
    samples = tmp_path / "samples"
    good = make_sample(samples, 0, "RAS")
    corrupt = make_sample(samples, 1, "LPS")
    (samples / f"{corrupt}.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    sheared = make_sample(samples, 2, "RAS")
    aff = affine_for("RAS")
    aff[0, 1] = 0.5  # a shear: representable in neither DICOM nor a NIfTI qform
    hu, label = ct_phantom(2)
    write_sample(samples, sheared, Volume(hu, aff), {"index": 2, "seed": 2, "class": 0},
                 label=Volume(label, aff, "SEG", "label"))
    missing = make_sample(samples, 3, "RAS")
    (samples / f"{missing}.nii.gz").unlink()
    pet = make_sample(samples, 4, "RAS")
    side = json.loads((samples / f"{pet}.json").read_text())
    (samples / f"{pet}.json").write_text(json.dumps({**side, "modality": "PET"}))
    code, out, err = run_cli("export", samples, "--out", tmp_path / "out", "--format", "nifti,dicom,seg")
    assert code == 5, out + err
    assert "4 sample(s) failed" in out and "Traceback" not in out + err
    assert f"{corrupt}: " in out and "not a readable NIfTI" in out
    assert f"{sheared}: " in out and "not orthogonal" in out
    assert "is missing" in out and "modality 'PET' cannot be exported" in out
    out_dir = tmp_path / "out"
    assert [p.name for p in (out_dir / "imagesTr").iterdir()] == [f"{good}_0000.nii.gz"]
    assert [p.name for p in (out_dir / "dicom").iterdir()] == [good]
    assert json.loads((out_dir / "dataset.json").read_text())["numTraining"] == 1
    assert set(json.loads((out_dir / "export.json").read_text())["failed"]) == {corrupt, sheared, missing, pet}


@pytest.mark.parametrize("argv, message", [
    (["--format", "nifti,dicm"], "did you mean 'dicom'"),
    (["--format", "nifti,seg"], "seg needs dicom"),
    (["--uid-root", "1.02.3"], "not a DICOM UID root"),
    (["--uid-root", "1.2." + "3" * 50], "leave room"),
])
def test_cli_bad_arguments(tmp_path, run_cli, argv, message):
    samples = tmp_path / "samples"
    make_sample(samples, 0, "RAS")
    code, _out, err = run_cli("export", samples, "--out", tmp_path / "out", *argv)
    assert code == 5 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_out_inside_samples_is_refused(tmp_path, run_cli):
    samples = tmp_path / "samples"
    make_sample(samples, 0, "RAS")
    code, _out, err = run_cli("export", samples, "--out", samples / "export")
    assert code == 5 and "must not contain or be inside" in err


def make_reference(tmp_path: Path) -> Path:
    """A 'real patient' DICOM series and a manifest listing it, as the PHI scan's reference."""
    import pydicom

    from medsynth.export import dicom as dcm

    hu, _ = ct_phantom(9)
    vol = Volume(hu, affine_for("RAS"))
    info, _ = dcm.write_series(vol, dcm.encode_ct(hu), tmp_path / "ref" / "series", case_id="x", uid_key="ref")
    for f in info.files:
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.AccessionNumber = "Oakenshield^Thorina", "PAT83731", "ACC55123"
        ds.PatientBirthDate, ds.InstitutionName = "19580317", "Erebor General Hospital"
        ds.StudyID, ds.StudyInstanceUID = "ST7781", "1.2.826.0.1.3680043.10.999.4.7781"
        ds.save_as(f)
    ref = tmp_path / "ref" / "manifest.json"
    ref.write_text(json.dumps({"format": "medsynth-manifest/1", "name": "ref", "modality": "CT", "cases": [
        {"id": "case-000", "image": "series", "label": None, "class_label": None, "modality": "CT"}]}))
    return ref


def test_reference_phi_scan_runs_before_publishing(tmp_path, run_cli):
    """With --reference the privacy stage's PHI scan must be clean before the export is published."""
    pytest.importorskip("medsynth.privacy.phi_scan")
    ref = make_reference(tmp_path)
    clean = tmp_path / "clean"
    make_sample(clean, 0, "RAS")
    code, out, err = run_cli("export", clean, "--out", tmp_path / "out", "--format", "nifti,dicom,seg",
                             "--reference", ref)
    assert code == 0, err
    assert "PHI scan against the reference: clean" in out
    assert json.loads((tmp_path / "out" / "export.json").read_text())["phi_scan"].endswith("clean")

    leaky = tmp_path / "leaky"
    make_sample(leaky, 0, "RAS", run="PAT83731")  # a patient ID smuggled into the sample id
    code, out, err = run_cli("export", leaky, "--out", tmp_path / "out2", "--reference", ref)
    assert code == 6 and "PHI scan found" in err and "nothing was published" in err
    assert "PAT83731" not in err and "Traceback" not in err  # hits are masked
    assert not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out2")]


def test_reference_must_exist(tmp_path, run_cli):
    samples = tmp_path / "samples"
    make_sample(samples, 0, "RAS")
    code, _out, err = run_cli("export", samples, "--out", tmp_path / "out", "--reference", tmp_path / "nope.json")
    assert code == 5 and "reference manifest not found" in err


def test_cli_config_export_section_gives_defaults(tmp_path, run_cli):
    import pydicom

    samples = tmp_path / "samples"
    sid = make_sample(samples, 0, "RAS")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text('export:\n  formats: [dicom]\n  uid_root: "1.2.826.0.1.3680043.10.999"\n')
    code, _out, err = run_cli("export", samples, "--out", tmp_path / "out", "--config", cfg)
    assert code == 0, err
    assert not (tmp_path / "out" / "imagesTr").exists()
    ds = pydicom.dcmread(next((tmp_path / "out" / "dicom" / sid).glob("*.dcm")))
    assert ds.SeriesInstanceUID.startswith("1.2.826.0.1.3680043.10.999.")
    # command-line flags win over the config
    code, _out, err = run_cli("export", samples, "--out", tmp_path / "out2", "--config", cfg, "--format", "nifti")
    assert code == 0 and (tmp_path / "out2" / "imagesTr").is_dir() and not (tmp_path / "out2" / "dicom").exists()


def test_image_changed_after_qc_is_refused(tmp_path, run_cli):
    """A verdict that records the image's sha256 binds to those bytes: a changed image is not exported."""
    from medsynth.jobs import sha256_file

    samples = tmp_path / "samples"
    ok, changed = make_sample(samples, 0, "RAS"), make_sample(samples, 1, "RAS")
    for sid in (ok, changed):
        verdict = {"passed": True, "reasons": [], "image_sha256": sha256_file(samples / f"{sid}.nii.gz")}
        (samples / f"{sid}.qc.json").write_text(json.dumps(verdict))
    hu, _ = ct_phantom(7)
    Volume(hu, affine_for("RAS")).save_nifti(samples / f"{changed}.nii.gz")  # replaced after QC
    code, out, err = run_cli("export", samples, "--out", tmp_path / "out", "--format", "nifti")
    assert code == 0, err
    assert "1 whose image changed after its QC verdict (rerun 'medsynth qc')" in out
    report = json.loads((tmp_path / "out" / "export.json").read_text())
    assert report["exported"] == [ok] and set(report["refused"]) == {changed}


def test_damaged_sidecar_is_reported_not_hidden(tmp_path, run_cli):
    samples = tmp_path / "samples"
    good, bad = make_sample(samples, 0, "RAS"), make_sample(samples, 1, "RAS")
    (samples / f"{bad}.json").write_bytes((samples / f"{bad}.json").read_bytes()[:40])
    code, out, _err = run_cli("export", samples, "--out", tmp_path / "out", "--format", "nifti")
    assert code == 5 and f"{bad}: sidecar is not readable JSON (JSONDecodeError)" in out
    assert json.loads((tmp_path / "out" / "export.json").read_text())["exported"] == [good]


def test_unreadable_reference_file_stops_publishing(tmp_path, run_cli):
    """The embedded PHI scan fails closed: a reference file whose identifiers cannot be read means
    the export cannot be shown clean, so it is not published (exit 6), and the message says why."""
    import struct

    ref = make_reference(tmp_path)
    victim = min((ref.parent / "series").iterdir())
    data = bytearray(victim.read_bytes())
    at = data.index(struct.pack("<HH", 0x0020, 0x000D), 132)  # Study Instance UID
    data[at + 4:at + 6] = b"\x55\x0c"  # the unknown VR of the issue
    victim.write_bytes(bytes(data))
    samples = tmp_path / "samples"
    make_sample(samples, 0, "RAS")
    code, out, err = run_cli("export", samples, "--out", tmp_path / "out", "--format", "nifti,dicom",
                             "--reference", ref)
    assert code == 6, out + err
    assert "PHI scan could not search 1 place(s) (not scanned), so nothing was published" in err
    assert f"reference series/{victim.name}: identifiers: not scanned (not read: unknown value representation " \
           "at (0020,000D)" in err
    assert "repair or remove what is listed as not scanned" in err
    assert "internal error" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
