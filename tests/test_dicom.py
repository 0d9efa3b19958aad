"""DICOM series reading: content sniffing, slice order by position, regular-grid checks, geometry
against SimpleITK's ImageSeriesReader (GDCM) and dcm2niix, and `manifest build` on DICOM input.

Series are written here with pydicom from a known HU volume, with PHI-like header values so tests
can check none of them leaks into manifests or messages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from medsynth.dicom_series import read_series, scan_dicom, series_sha256
from medsynth.errors import ImageReadError
from medsynth.volume import Volume
from tests.helpers import PHI, hu_volume, oblique_cosines, save_dicom, slice_dataset, write_series


def sitk_volume(folder: Path) -> Volume:
    """The reference: SimpleITK's ImageSeriesReader with GDCM's own file ordering."""
    import SimpleITK as sitk

    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    return Volume.from_sitk(reader.Execute())


MISNAMED = ["x7", "a.dcm", "IM0003", "zz.DCM", "noext", "b.ima", "7", "slice_final", "001.dcm", "q"]


# --------------------------------------------------------------------------------------------
# geometry and voxels against independent readers
# --------------------------------------------------------------------------------------------


def test_shuffled_misnamed_series_matches_simpleitk(tmp_path):
    hu = hu_volume()
    write_series(tmp_path / "s", hu, names=MISNAMED)
    vol = read_series(tmp_path / "s")
    ref = sitk_volume(tmp_path / "s")
    assert vol.shape == ref.shape == hu.shape
    assert np.array_equal(vol.array, hu)  # exact HU, in slice order despite names and InstanceNumbers
    assert np.array_equal(vol.array.astype(np.float64), ref.array.astype(np.float64))
    assert np.allclose(vol.affine, ref.affine, atol=1e-4)
    assert vol.array.dtype == np.int16 and vol.modality == "CT" and vol.units == "HU"


def test_oblique_series_matches_simpleitk_and_dcm2niix(tmp_path):
    import nibabel as nib

    row, col = oblique_cosines()
    hu = hu_volume((16, 12, 9), seed=1)
    write_series(tmp_path / "obl", hu, row=row, col=col, dz=3.0, names=MISNAMED[:9], seed=5)
    vol = read_series(tmp_path / "obl")
    ref = sitk_volume(tmp_path / "obl")
    assert vol.is_oblique()
    assert np.array_equal(vol.array.astype(np.float64), ref.array.astype(np.float64))
    assert np.allclose(vol.affine, ref.affine, atol=1e-4)
    assert np.allclose(vol.spacing, (0.7, 0.8, 3.0), atol=1e-5)

    exe = shutil.which("dcm2niix")
    if exe is None:
        if os.environ.get("MEDSYNTH_REQUIRE_TOOLS"):  # CI: a missing validator fails, never skips
            pytest.fail("dcm2niix not on PATH (pip install dcm2niix)")
        pytest.skip("dcm2niix not on PATH")
    out = tmp_path / "d2n"
    out.mkdir()
    subprocess.run([exe, "-z", "n", "-f", "conv", "-o", str(out), str(tmp_path / "obl")],
                   check=True, capture_output=True)
    img = nib.as_closest_canonical(nib.load(str(out / "conv.nii")))
    ours = nib.as_closest_canonical(nib.Nifti1Image(vol.array.astype(np.float32), vol.affine))
    assert np.allclose(img.affine, ours.affine, atol=1e-3)
    assert np.array_equal(np.asarray(img.dataobj, dtype=np.float64), np.asarray(ours.dataobj, dtype=np.float64))


def test_axial_lps_is_converted_to_ras(tmp_path):
    """DICOM x grows to the patient's left, y to posterior (LPS); RAS flips both."""
    hu = np.full((16, 12, 6), -1000, dtype=np.int16)
    hu[3, 5, 4] = 1500  # a marker at known indices
    ps_row, ps_col = 0.8, 0.7
    write_series(tmp_path / "ax", hu, pixel_spacing=(ps_row, ps_col), origin=(-100.0, -50.0, 20.0), dz=3.0)
    vol = read_series(tmp_path / "ax")
    expected = np.array([[-ps_col, 0, 0, 100.0],
                         [0, -ps_row, 0, 50.0],
                         [0, 0, 3.0, 20.0],
                         [0, 0, 0, 1]])
    assert np.allclose(vol.affine, expected, atol=1e-6)
    assert vol.orientation == "LPS"
    # the marker sits at LPS (-100 + 3*0.7, -50 + 5*0.8, 20 + 4*3) = RAS (97.9, 46.0, 32.0)
    ijk = np.argwhere(vol.array == 1500)[0]
    assert np.allclose(vol.affine @ np.r_[ijk, 1.0], [97.9, 46.0, 32.0, 1.0])


def test_slices_written_in_descending_position_are_sorted_along_normal(tmp_path):
    hu = hu_volume((8, 8, 6), seed=2)
    # write slice k at the position of slice (5 - k): file order and positions run backwards
    positions = [np.array([0.0, 0.0, 10.0 - 2.0 * k]) for k in range(6)]
    write_series(tmp_path / "desc", hu, positions=positions)
    vol = read_series(tmp_path / "desc")
    assert np.array_equal(vol.array, hu[:, :, ::-1])
    assert vol.affine[2, 2] == pytest.approx(2.0) and vol.affine[2, 3] == pytest.approx(0.0)


def test_enhanced_multiframe_reads_like_the_single_frame_series(tmp_path):
    import pydicom
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    row, col = oblique_cosines(7)
    hu = hu_volume((12, 10, 6), seed=3)
    files = write_series(tmp_path / "single", hu, row=row, col=col)
    mf = LegacyConvertedEnhancedCTImage([pydicom.dcmread(f) for f in files], series_instance_uid=generate_uid(),
                                        series_number=1, sop_instance_uid=generate_uid(), instance_number=1)
    (tmp_path / "multi").mkdir()
    mf.save_as(tmp_path / "multi" / "enhanced")
    a, b = read_series(tmp_path / "single"), read_series(tmp_path / "multi")
    assert np.array_equal(a.array, b.array) and np.allclose(a.affine, b.affine, atol=1e-6)
    series, problems = scan_dicom(tmp_path / "multi")
    assert problems == [] and series[0].n_frames == 6 and series[0].shape == (12, 10, 6)


def test_mr_rescale_gives_float_values(tmp_path):
    values = np.random.default_rng(4).integers(0, 800, size=(10, 8, 5)).astype(np.float64) * 0.5
    write_series(tmp_path / "mr", values, modality="MR", slope=0.5, intercept=0.0)
    vol = read_series(tmp_path / "mr")
    assert vol.modality == "MR" and vol.units == "a.u." and vol.array.dtype == np.float32
    assert np.array_equal(vol.array, values.astype(np.float32))


# --------------------------------------------------------------------------------------------
# finding files by content
# --------------------------------------------------------------------------------------------


def test_preamble_less_files_are_found_and_junk_is_skipped_quietly(tmp_path):
    hu = hu_volume((8, 8, 5), seed=5)
    names = ["p1", "p2", "p3", "p4", "p5"]
    write_series(tmp_path / "raw", hu, names=names, preamble_less={"p2", "p4"})
    assert (tmp_path / "raw" / "p2").read_bytes()[:2] == b"\x08\x00"  # really no preamble
    (tmp_path / "raw" / "notes.txt").write_text("not an image")
    (tmp_path / "raw" / "blob").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "raw" / "empty").write_bytes(b"")
    series, problems = scan_dicom(tmp_path)
    assert problems == []
    assert len(series) == 1 and len(series[0].files) == 5 and series[0].exclusive
    assert np.array_equal(read_series(tmp_path / "raw").array, hu)


def test_corrupt_dicom_is_reported_with_its_path(tmp_path):
    hu = hu_volume((8, 8, 4), seed=6)
    files = write_series(tmp_path / "s", hu)
    bad = tmp_path / "s" / "broken"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"garbage" * 3)
    series, problems = scan_dicom(tmp_path)
    assert [p.kind for p in problems] == ["corrupt"] and problems[0].path == bad
    assert len(series) == 1 and not series[0].exclusive  # the folder alone is now ambiguous
    with pytest.raises(ImageReadError, match="broken: not a readable DICOM file"):
        read_series(tmp_path / "s")
    assert read_series(files).shape == (8, 8, 4)  # the listed files still read

    # truncated pixel data: the header parses, the pixels do not
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - 40])
    with pytest.raises(ImageReadError, match=f"{files[2].name}: pixel data cannot be decoded"):
        read_series(files)


def test_non_image_dicom_is_skipped_with_reason(tmp_path):
    hu = hu_volume((8, 8, 4), seed=7)
    write_series(tmp_path / "s", hu)
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    sr.SOPClassUID, sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPClassUID, sr.file_meta.MediaStorageSOPInstanceUID
    sr.Modality, sr.PatientName, sr.SeriesInstanceUID = "SR", PHI["PatientName"], generate_uid()
    save_dicom(sr, tmp_path / "s" / "report")
    series, problems = scan_dicom(tmp_path)
    assert len(series) == 1 and series[0].exclusive
    assert [(p.kind, p.path.name) for p in problems] == [("skipped", "report")]
    assert "Basic Text SR Storage" in problems[0].message
    assert read_series(tmp_path / "s").shape == (8, 8, 4)


def test_two_series_in_one_folder_need_series_files(tmp_path):
    a, b = hu_volume((8, 8, 4), seed=8), hu_volume((8, 8, 5), seed=9)
    write_series(tmp_path / "mix", a, names=[f"a{k}" for k in range(4)])
    write_series(tmp_path / "mix", b, names=[f"b{k}" for k in range(5)], origin=(0.0, 0.0, 100.0))
    series, problems = scan_dicom(tmp_path)
    assert problems == [] and len(series) == 2 and not any(s.exclusive for s in series)
    with pytest.raises(ImageReadError, match="(?s)holds 2 DICOM series.*series_files"):
        read_series(tmp_path / "mix")
    for s, ref in zip(sorted(series, key=lambda s: s.shape[2]), (a, b), strict=True):
        vol = read_series(tmp_path / "mix", series_files=s.relative_files())
        assert np.array_equal(vol.array, ref)
        assert vol.meta["sha256"] == series_sha256(s.files)


# --------------------------------------------------------------------------------------------
# irregular series are refused with the reason
# --------------------------------------------------------------------------------------------


def _irregular(kind: str, folder: Path) -> None:
    hu = hu_volume((8, 6, 8), seed=10)
    base = [np.array([0.0, 0.0, 2.0 * k]) for k in range(8)]
    iop = np.array([1.0, 0, 0, 0, 1.0, 0])
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}

    def put(k, pixels=None, ipp=None, orient=None, ps=(0.8, 0.7)):
        px = hu[:, :, k].T if pixels is None else pixels
        save_dicom(slice_dataset(px, base[k] if ipp is None else ipp, iop if orient is None else orient, ps, uids),
              folder / f"f{(k * 5) % 8}")

    for k in range(8):
        if kind == "missing" and k == 4:
            continue
        if kind == "single" and k > 0:
            continue
        if kind == "nonuniform":
            put(k, ipp=np.array([0.0, 0.0, 2.0 * k + (0.5 if k >= 5 else 0.0)]))
        elif kind == "orientation" and k == 6:
            put(k, orient=np.array([1.0, 0, 0, 0, 0, -1.0]))  # a coronal slice in an axial series
        elif kind == "sizes" and k == 3:
            put(k, pixels=np.zeros((8, 8)))
        elif kind == "spacing" and k == 2:
            put(k, ps=(0.9, 0.7))
        elif kind == "duplicate" and k == 7:
            put(k, ipp=base[6])
        elif kind == "tilt":  # origin slides along y by tan(15 deg) * z: a gantry-tilted stack
            put(k, ipp=np.array([0.0, np.tan(np.radians(15)) * 2.0 * k, 2.0 * k]))
        else:
            put(k)


IRREGULAR = {
    "missing": r"missing slice\(s\): gap of 4 mm after slice 4 of 7 .*about 1 slice\(s\) missing",
    "nonuniform": r"non-uniform slice spacing: gaps from 2 to 2\.5 mm",
    "orientation": r"orientation varies between slices",
    "sizes": r"mixed image sizes 6x8, 8x8",
    "spacing": r"mixed pixel spacing",
    "duplicate": r"1 pair\(s\) of slices share a position",
    "single": r"a single slice is not a 3D volume",
    "tilt": r"gantry tilt of about 15 degrees",
}


@pytest.mark.parametrize("kind", sorted(IRREGULAR))
def test_irregular_series_is_rejected_with_reason(kind, tmp_path):
    folder = tmp_path / "ser"
    _irregular(kind, folder)
    with pytest.raises(ImageReadError, match=IRREGULAR[kind]) as ei:
        read_series(folder)
    assert str(folder) in str(ei.value)
    series, problems = scan_dicom(tmp_path)
    assert series == []
    assert len(problems) == 1 and problems[0].kind == "rejected" and problems[0].path == folder
    assert __import__("re").search(IRREGULAR[kind], problems[0].message)
    for text in (str(ei.value), str(problems[0])):
        assert not any(v in text for v in PHI.values())


def test_gantry_tilt_does_not_trip_on_a_plain_oblique_stack(tmp_path):
    row, col = oblique_cosines(11)
    write_series(tmp_path / "o", hu_volume((8, 8, 6), seed=12), row=row, col=col, dz=1.25)
    assert read_series(tmp_path / "o").shape == (8, 8, 6)


# --------------------------------------------------------------------------------------------
# manifest build / verify on DICOM input (the "must show")
# --------------------------------------------------------------------------------------------


def _phi_free(text: str, uids: list[str]) -> None:
    for v in list(PHI.values()) + uids + ["Doe", "Jane", "Elsewhere"]:
        assert v not in text, f"PHI value {v!r} leaked"


def test_build_on_nifti_plus_shuffled_dicom_series_verifies_and_matches_simpleitk(tmp_path, run_cli):
    import pydicom

    from medsynth.formats import read_image
    from medsynth.manifest import load_manifest

    src = tmp_path / "src"
    nifti = Volume(np.random.default_rng(0).integers(-1024, 1500, size=(12, 10, 8)).astype(np.int16),
                   np.diag([0.9, 0.9, 2.0, 1.0]))
    nifti.save_nifti(src / "chest-a.nii.gz")
    row, col = oblique_cosines(13)
    hu = hu_volume((16, 12, 10), seed=14)
    files = write_series(src, hu, row=row, col=col, names=MISNAMED, seed=3)  # same folder as the NIfTI
    (src / "README.txt").write_text("scans for project X\n")
    uids = sorted({str(pydicom.dcmread(f).get(t)) for f in files
                   for t in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")})

    out = tmp_path / "manifests" / "m.json"
    code, stdout, stderr = run_cli("manifest", "build", src, "-o", out)
    assert code == 0, stderr
    assert "2 case(s) (1 NIfTI, 1 DICOM series)" in stdout
    text = out.read_text()
    _phi_free(text + stdout + stderr, uids)
    raw = json.loads(text)
    assert [c["id"] for c in raw["cases"]] == ["chest-a", "series-0001"]
    assert raw["cases"][1]["image"] == "../src" and "series_files" not in raw["cases"][1]
    assert raw["cases"][1]["shape"] == [16, 12, 10] and raw["cases"][1]["modality"] == "CT"

    code, stdout, stderr = run_cli("manifest", "verify", out)
    assert code == 0, stdout + stderr
    assert "OK, 2 case(s) verified, no problems" in stdout

    case = load_manifest(out).cases[1]
    vol = read_image(case.image, case.modality, **case.extra)
    ref = sitk_volume(src)
    assert np.array_equal(vol.array.astype(np.float64), ref.array.astype(np.float64))
    assert np.allclose(vol.affine, ref.affine, atol=1e-4)
    assert np.array_equal(vol.array, hu)
    assert case.sha256 == series_sha256(sorted(files, key=lambda f: files.index(f)))


def test_build_writes_series_files_and_verify_catches_changed_or_missing_dicom(tmp_path, run_cli):
    src = tmp_path / "src"
    write_series(src / "study", hu_volume((8, 8, 4), seed=15), names=["a1", "a2", "a3", "a4"])
    write_series(src / "study", hu_volume((8, 8, 5), seed=16), names=[f"b{k}" for k in range(5)],
                 origin=(0.0, 0.0, 100.0))
    _irregular("missing", src / "other")
    out = src / "manifest.json"
    code, stdout, stderr = run_cli("manifest", "build", src, "-o", out)
    assert code == 0
    assert "missing slice(s)" in stderr and "rejected" in stderr  # the irregular series is named, not fatal
    raw = json.loads(out.read_text())
    jsonschema = pytest.importorskip("jsonschema") if not os.environ.get("MEDSYNTH_REQUIRE_TOOLS") else __import__(
        "jsonschema")
    schema = json.loads((Path(__file__).resolve().parents[1] / "data_manifests" / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(raw)
    assert [c["id"] for c in raw["cases"]] == ["series-0001", "series-0002"]
    assert all(c["image"] == "study" and len(c["series_files"]) in (4, 5) for c in raw["cases"])
    assert run_cli("manifest", "verify", out)[0] == 0

    # a header edit changes the series hash; a removed file is named
    import pydicom

    first = src / "study" / raw["cases"][0]["series_files"][0]
    ds = pydicom.dcmread(first)
    ds.StudyDescription = "edited"
    ds.save_as(first)
    (src / "study" / raw["cases"][1]["series_files"][2]).unlink()
    code, stdout, stderr = run_cli("manifest", "verify", out)
    assert code == 3 and "Traceback" not in stdout + stderr
    lines = stdout.strip().splitlines()
    assert any(l.startswith("series-0001: sha256:") and "content changed" in l for l in lines)
    assert any(l.startswith("series-0002: image:") and "1 of 5 series file(s) missing" in l for l in lines)
    assert lines[-1].endswith("2 problem(s) in 2 of 2 case(s)")


def test_build_reads_dicom_modality_and_matches_label_by_folder_name(tmp_path, run_cli):
    src, labels = tmp_path / "src", tmp_path / "labels"
    write_series(src / "brain_1", np.full((8, 8, 4), 100.0), modality="MR", intercept=0.0)
    lab = read_series(src / "brain_1")
    Volume(np.ones(lab.shape, np.uint8), lab.affine, modality="SEG", units="label").save_nifti(labels / "brain_1.nii.gz")
    out = tmp_path / "m.json"
    assert run_cli("manifest", "build", src, "-o", out, "--labels", labels)[0] == 0
    case = json.loads(out.read_text())["cases"][0]
    assert case["modality"] == "MR" and case["label"] == "labels/brain_1.nii.gz"
    assert run_cli("manifest", "verify", out)[0] == 0
    code, stdout, _ = run_cli("manifest", "build", src, "-o", out, "--modality", "CT")
    assert code == 3  # nothing left: the only series is MR


def test_jpeg_lossless_series_is_decoded(tmp_path):
    """JPEG Lossless (process 14) is the usual PACS export; pydicom alone may lack its codec, so
    reading falls back to GDCM.  The pixel data is compressed here by GDCM via SimpleITK."""
    import pydicom
    import SimpleITK as sitk
    from pydicom.uid import JPEGLosslessSV1

    hu = hu_volume((12, 8, 5), seed=20)
    files = write_series(tmp_path / "raw", hu, names=[f"r{k}" for k in range(5)])
    (tmp_path / "jpeg").mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        tmp = tmp_path / "jpeg_tmp.dcm"
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(tmp))
        writer.SetImageIO("GDCMImageIO")
        writer.UseCompressionOn()
        writer.SetCompressor("JPEG")
        writer.Execute(sitk.GetImageFromArray(ds.pixel_array[None].astype(np.uint16)))
        enc = pydicom.dcmread(tmp)
        assert enc.file_meta.TransferSyntaxUID == JPEGLosslessSV1
        ds["PixelData"] = enc["PixelData"]
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.save_as(tmp_path / "jpeg" / f.name, enforce_file_format=True)
    vol = read_series(tmp_path / "jpeg")
    assert np.array_equal(vol.array, hu) and vol.array.dtype == np.int16
    assert np.allclose(vol.affine, read_series(tmp_path / "raw").affine)


def test_unsupported_modality_is_rejected_with_reason(tmp_path):
    write_series(tmp_path / "pet", hu_volume((8, 8, 4), seed=21), modality="PT")
    series, problems = scan_dicom(tmp_path)
    assert series == [] and [p.kind for p in problems] == ["rejected"]
    assert "modality PT is not supported (CT and MR only)" in problems[0].message
    with pytest.raises(ImageReadError, match="modality PT is not supported"):
        read_series(tmp_path / "pet")


def _break_vr(path: Path, tag: tuple[int, int], vr: bytes = b"\x55\xce") -> None:
    import struct

    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<HH", *tag), 132)
    data[at + 4:at + 6] = vr
    path.write_bytes(bytes(data))


def test_undecodable_series_uid_is_a_corrupt_file_not_a_crash(tmp_path, run_cli):
    """Found by fuzzing: 'internal error: NotImplementedError: Unknown Value Representation '0x55 0xce'
    in tag (0020,000E)' from manifest build.  The file is now reported as corrupt by name and tag,
    the other series is still built, and read_series names the file."""
    good = write_series(tmp_path / "src" / "a", hu_volume((8, 8, 4), seed=1))
    bad = write_series(tmp_path / "src" / "b", hu_volume((8, 8, 4), seed=2))
    _break_vr(bad[1], (0x0020, 0x000E))  # Series Instance UID
    series, problems = scan_dicom(tmp_path / "src")
    corrupt = [p for p in problems if p.kind == "corrupt"]
    assert [p.path for p in corrupt] == [bad[1]]
    assert "malformed DICOM header (NotImplementedError in tag (0020,000E))" in corrupt[0].message
    assert [s.folder.name for s in series] == ["a"]
    with pytest.raises(ImageReadError, match=rf"{bad[1].name}: malformed DICOM header \(NotImplementedError in tag "
                                             r"\(0020,000E\)\)"):
        read_series(bad)
    code, out, err = run_cli("--no-progress", "manifest", "build", tmp_path / "src", "-o", tmp_path / "m.json")
    assert code == 0 and "Traceback" not in err and "internal error" not in err, err
    assert len(json.loads((tmp_path / "m.json").read_text())["cases"]) == 1
    _phi_free(out + err, [])
    assert read_series(good).shape == (8, 8, 4)


def test_impossible_size_is_a_named_error(tmp_path):
    files = write_series(tmp_path / "s", hu_volume((8, 8, 3), seed=3))
    import pydicom

    for f in files:  # every slice claims 65535 x 65535 pixels (a damaged header), pixel data unchanged
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = 65535
        ds.save_as(f)
    with pytest.raises(ImageReadError) as ei:
        read_series(tmp_path / "s")
    assert "Traceback" not in str(ei.value) and ("does not fit in memory" in str(ei.value)
                                                 or "pixel data" in str(ei.value))
