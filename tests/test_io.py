"""Volume files other than NIfTI: NRRD (.nrrd, .nhdr) and MetaImage (.mha, .mhd) read through
SimpleITK, checked against SimpleITK's own world coordinates, in the reader, the MONAI chain, the
QC reference resampling and `manifest build` / `verify`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medsynth.data.io import MedsynthReader
from medsynth.errors import ImageReadError
from medsynth.formats import read_image, read_text_header, volume_sha256
from medsynth.manifest import Case, Manifest, load_manifest, verify_manifest
from medsynth.volume import Volume

SUFFIXES = [".nrrd", ".nhdr", ".mha", ".mhd"]
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _direction() -> np.ndarray:
    """An oblique direction with a flipped axis (determinant -1): nothing is an identity or diagonal."""
    a, b = 0.4, -0.25
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx @ np.diag([1.0, -1.0, 1.0])


def _sitk_image(size=(7, 6, 5), dtype=np.int16, seed=0) -> sitk.Image:
    """An image made by SimpleITK alone (not by medsynth) with non-trivial spacing, origin, direction."""
    arr = np.random.default_rng(seed).integers(-1000, 1500, size=size[::-1]).astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.9, 2.5))
    img.SetOrigin((-12.5, 30.25, 81.0))
    img.SetDirection(tuple(_direction().ravel()))
    return img


def _indices(size) -> list[tuple[int, int, int]]:
    corners = [(i, j, k) for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)]
    return corners + [tuple(s // 2 for s in size), tuple(max(s - 2, 0) for s in size)]


def _assert_same_world(vol: Volume, path: Path) -> None:
    """Every tested voxel sits where SimpleITK (reading the same file) says, and holds the same value."""
    ref = sitk.ReadImage(str(path))
    ref_arr = sitk.GetArrayFromImage(ref)
    assert vol.shape == tuple(ref.GetSize())
    for idx in _indices(ref.GetSize()):
        lps = np.asarray(ref.TransformIndexToPhysicalPoint(idx))
        ras = vol.affine @ np.array([*idx, 1.0])
        np.testing.assert_allclose(ras[:3], lps * _LPS_TO_RAS, atol=1e-6)
        assert vol.array[idx] == ref_arr[idx[::-1]]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("compress", [False, True])
def test_simpleitk_written_file_gives_simpleitks_world_coordinates(tmp_path, suffix, compress):
    img = _sitk_image()
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(img, str(path), compress)
    vol = read_image(path)
    _assert_same_world(vol, path)
    np.testing.assert_allclose(vol.spacing, (0.7, 0.9, 2.5), atol=1e-9)
    np.testing.assert_allclose(vol.origin, np.array([-12.5, 30.25, 81.0]) * _LPS_TO_RAS, atol=1e-9)
    assert vol.array.dtype == np.int16 and vol.modality == "CT" and vol.units == "HU"
    assert not np.allclose(vol.affine[:3, :3], np.diag(np.diag(vol.affine[:3, :3])))  # oblique, not diagonal


def test_hand_written_ras_space_nrrd_matches_its_header_and_simpleitk(tmp_path):
    """An NRRD in 'right-anterior-superior' space (as some tools write): the header itself is the
    reference for the RAS affine, SimpleITK the second one."""
    dirs = np.array([[0.6, 0.1, 0.0], [-0.1, 0.8, 0.0], [0.0, 0.2, 2.0]])  # rows: axis i, j, k in RAS
    origin = np.array([5.0, -7.0, 11.0])
    arr = np.arange(2 * 3 * 4, dtype="<i2").reshape(2, 3, 4)  # (k, j, i): i fastest on disk
    header = ("NRRD0004\n# written by hand for the test\ntype: short\ndimension: 3\n"
              "space: right-anterior-superior\nsizes: 4 3 2\n"
              "space directions: " + " ".join("(" + ",".join(repr(float(x)) for x in d) + ")" for d in dirs) + "\n"
              "endian: little\nencoding: raw\nspace origin: (5,-7,11)\n\n")
    path = tmp_path / "ras.nrrd"
    path.write_bytes(header.encode() + arr.tobytes())
    vol = read_image(path)
    expected = np.eye(4)
    expected[:3, :3] = dirs.T
    expected[:3, 3] = origin
    np.testing.assert_allclose(vol.affine, expected, atol=1e-9)
    assert vol.array[1, 2, 0] == arr[0, 2, 1]
    _assert_same_world(vol, path)


def test_detached_headers_name_their_data_and_hash_covers_it(tmp_path):
    img = _sitk_image(seed=1)
    for suffix in (".nhdr", ".mhd"):
        path = tmp_path / f"d{suffix}"
        sitk.WriteImage(img, str(path))
        header = read_text_header(path)
        assert header.data_offset is None and len(header.data_files) == 1 and header.data_files[0].is_file()
        before = volume_sha256(path)
        data = header.data_files[0]
        raw = bytearray(data.read_bytes())
        raw[0] ^= 0xFF
        data.write_bytes(bytes(raw))
        assert volume_sha256(path) != before  # editing the voxels changes the case's hash
    attached = tmp_path / "a.nrrd"
    sitk.WriteImage(img, str(attached))
    assert read_text_header(attached).data_offset > 0 and read_text_header(attached).data_files == []


@pytest.mark.parametrize("field", ["LIST 2\ns0.raw\ns1.raw", "s%d.raw 0 1 1 2"])
def test_multi_file_nrrd_names_every_data_file(tmp_path, field):
    """NRRD 'data file: LIST' and the numbered pattern: read (by SimpleITK) and hashed over all files."""
    arr = np.arange(2 * 3 * 4, dtype="<i2").reshape(2, 3, 4)
    for k in range(2):
        (tmp_path / f"s{k}.raw").write_bytes(arr[k].tobytes())
    (tmp_path / "m.nhdr").write_text("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
                                     "sizes: 4 3 2\nspace directions: (1,0,0) (0,1,0) (0,0,2)\nendian: little\n"
                                     f"encoding: raw\nspace origin: (3,4,5)\ndata file: {field}\n")
    assert [f.name for f in read_text_header(tmp_path / "m.nhdr").data_files] == ["s0.raw", "s1.raw"]
    vol = read_image(tmp_path / "m.nhdr")
    np.testing.assert_array_equal(vol.array, arr.transpose(2, 1, 0))
    _assert_same_world(vol, tmp_path / "m.nhdr")
    before = volume_sha256(tmp_path / "m.nhdr")
    (tmp_path / "s1.raw").write_bytes(arr[1].tobytes()[::-1])
    assert volume_sha256(tmp_path / "m.nhdr") != before


def test_trailing_singleton_axis_is_dropped(tmp_path):
    arr = np.random.default_rng(2).integers(0, 100, size=(5, 4, 3)).astype(np.uint8)  # (z, y, x)
    img = sitk.JoinSeries([sitk.GetImageFromArray(arr)])  # 4D, time axis of size 1
    assert img.GetDimension() == 4 and img.GetSize()[-1] == 1
    path = tmp_path / "t.nrrd"
    sitk.WriteImage(img, str(path))
    vol = read_image(path, "SEG")
    assert vol.shape == (3, 4, 5) and vol.units == "label"
    np.testing.assert_array_equal(vol.array, arr.transpose(2, 1, 0))


def _bad_files(d: Path) -> dict[str, tuple[Path, str]]:
    out: dict[str, tuple[Path, str]] = {}
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 5), np.int16)), str(d / "flat.nrrd"))
    out["2d"] = (d / "flat.nrrd", r"expected a 3D image, got a 2D image")
    vec = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    sitk.WriteImage(vec, str(d / "rgb.mha"))
    out["vector"] = (d / "rgb.mha", r"3 values per voxel")
    three = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    sitk.WriteImage(sitk.JoinSeries([three, three]), str(d / "series.nrrd"))
    out["4d"] = (d / "series.nrrd", r"expected a 3D image, got a 4D image")
    sitk.WriteImage(_sitk_image(), str(d / "cut.nrrd"))
    (d / "cut.nrrd").write_bytes((d / "cut.nrrd").read_bytes()[:-40])
    out["cut"] = (d / "cut.nrrd", r"not a readable NRRD file")
    sitk.WriteImage(_sitk_image(), str(d / "lost.mhd"))
    (d / "lost.raw").unlink()
    out["lost"] = (d / "lost.mhd", r"data file lost\.raw not found")
    (d / "junk.mha").write_bytes(b"\x00\x01 not a header")
    out["junk"] = (d / "junk.mha", r"not an NRRD or MetaImage file")
    return out


@pytest.mark.parametrize("kind", ["2d", "vector", "4d", "cut", "lost", "junk"])
def test_bad_files_raise_one_line_naming_the_file(tmp_path, kind):
    path, match = _bad_files(tmp_path)[kind]
    with pytest.raises(ImageReadError, match=match) as info:
        read_image(path)
    assert str(path) in info.value.message and "\n" not in info.value.message


def test_verify_reports_bad_nrrd_and_mha_cases_without_a_traceback(tmp_path, run_cli):
    bad = _bad_files(tmp_path)
    cases = [{"id": k, "image": p.name, "modality": "CT"} for k, (p, _) in bad.items()]
    (tmp_path / "m.json").write_text(json.dumps({"format": "medsynth-manifest/1", "cases": cases}))
    code, stdout, stderr = run_cli("manifest", "verify", tmp_path / "m.json")
    assert code == 3 and "Traceback" not in stdout + stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == len(bad) + 1 and f"{len(bad)} problem(s) in {len(bad)} of {len(bad)} case(s)" in lines[-1]
    assert "use one 3D volume per case" in stdout


# --------------------------------------------------------------------------------------------
# the MONAI chain and QC reference reading use the same reader
# --------------------------------------------------------------------------------------------


def _data_cfg():
    from medsynth.config import config_from_dict

    tiny = {"channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 8}
    return config_from_dict({"data": {"shape": [16, 16, 16], "spacing": [1.5, 1.5, 3.0], "orientation": "RAS",
                                      "cache": "none", "modality": "CT"},
                             "model": {"autoencoder": tiny, "unet": tiny},
                             "training": {"autoencoder": {"disc_layers": 1}}}).data


def _same_case_three_ways(tmp_path: Path) -> dict[str, Case]:
    """One oblique CT with a label, as NIfTI (nibabel), NRRD and a detached MetaImage (SimpleITK).

    NIfTI stores its affine in float32, so the NRRD and MetaImage files are written from the NIfTI
    as read back: all three then hold the same grid and the chain must give the same tensors."""
    img = _sitk_image(size=(9, 8, 6), seed=3)
    lab = sitk.Cast(sitk.BinaryThreshold(img, 200, 1500, 1, 0), sitk.sitkUInt8)
    Volume.from_sitk(img).save_nifti(tmp_path / "c.nii.gz")
    Volume.from_sitk(lab, modality="SEG", units="label").save_nifti(tmp_path / "c_label.nii.gz")
    out = {"nifti": Case("c", tmp_path / "c.nii.gz", label=tmp_path / "c_label.nii.gz", modality="CT")}
    vol, lvol = read_image(tmp_path / "c.nii.gz"), read_image(tmp_path / "c_label.nii.gz", "SEG")
    for suffix in (".nrrd", ".mhd"):
        sitk.WriteImage(vol.to_sitk(), str(tmp_path / f"c{suffix}"), True)
        sitk.WriteImage(lvol.to_sitk(), str(tmp_path / f"c_label{suffix}"), True)
        out[suffix] = Case("c", tmp_path / f"c{suffix}", label=tmp_path / f"c_label{suffix}", modality="CT")
    return out


def test_monai_loader_and_qc_reference_read_nrrd_and_metaimage_like_nifti(tmp_path):
    from monai.transforms import LoadImaged

    from medsynth.data.transforms import build_transforms, case_dict
    from medsynth.qc.gate import resample_cases

    cases = _same_case_three_ways(tmp_path)
    cfg = _data_cfg()
    ref = read_image(cases["nifti"].image)
    for kind, case in cases.items():
        loaded = LoadImaged(keys=["image"], reader=MedsynthReader(), image_only=True)({"image": str(case.image)})
        np.testing.assert_allclose(np.asarray(loaded["image"].affine), ref.affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(loaded["image"]), ref.array.astype(np.float32))
        d = build_transforms(cfg, with_label=True)(case_dict(case, with_label=True))
        d0 = build_transforms(cfg, with_label=True)(case_dict(cases["nifti"], with_label=True))
        np.testing.assert_allclose(d["image"].numpy(), d0["image"].numpy(), atol=1e-5, err_msg=kind)
        np.testing.assert_array_equal(d["label"].numpy(), d0["label"].numpy())
        np.testing.assert_allclose(np.asarray(d["image"].affine), np.asarray(d0["image"].affine), atol=1e-5)
        assert float(d["label"].max()) == 1.0
    r = resample_cases(list(cases.values()), cfg, with_labels=True)
    arrays, skipped, labels = r.arrays, r.skipped, r.labels
    assert skipped == [] and len(arrays) == 3
    for arr, lab in zip(arrays[1:], labels[1:]):
        np.testing.assert_allclose(arr, arrays[0], atol=1e-3)
        np.testing.assert_array_equal(lab, labels[0])


# --------------------------------------------------------------------------------------------
# manifest build / verify
# --------------------------------------------------------------------------------------------


def test_build_and_verify_nrrd_and_metaimage_cases_with_labels(tmp_path, run_cli):
    src, labels = tmp_path / "src", tmp_path / "labels"
    src.mkdir()
    labels.mkdir()
    names = {}
    for seed, suffix in enumerate(SUFFIXES):
        img = _sitk_image(seed=10 + seed)
        lab = sitk.Cast(sitk.BinaryThreshold(img, 0, 1500, 1, 0), sitk.sitkUInt8)
        sitk.WriteImage(img, str(src / f"case{seed}{suffix}"), seed % 2 == 0)
        sitk.WriteImage(lab, str(labels / f"case{seed}{suffix}"))
        names[f"case{seed}"] = suffix
    out = tmp_path / "m.json"
    code, stdout, stderr = run_cli("manifest", "build", src, "-o", out, "--labels", labels)
    assert code == 0, stderr
    assert "4 case(s) (0 NIfTI, 2 NRRD, 2 MetaImage, 0 DICOM series), modality CT, 4 with label" in stdout
    raw = json.loads(out.read_text())
    assert [c["id"] for c in raw["cases"]] == sorted(names)
    for c in raw["cases"]:
        path = src / f"{c['id']}{names[c['id']]}"
        assert c["image"] == f"src/{path.name}" and c["label"] == f"labels/{path.name}"
        assert c["sha256"] == volume_sha256(path) and c["shape"] == [7, 6, 5]
        np.testing.assert_allclose(c["spacing"], [0.7, 0.9, 2.5])
    code, stdout, _ = run_cli("manifest", "verify", out)
    assert code == 0 and "OK, 4 case(s) verified" in stdout, stdout
    # a changed detached data file is caught by the hash
    data = src / "case1.raw"
    raw_bytes = bytearray(data.read_bytes())
    raw_bytes[10] ^= 0x01
    data.write_bytes(bytes(raw_bytes))
    probs = verify_manifest(load_manifest(out))
    assert [(p.case, p.field) for p in probs] == [("case1", "sha256")]


def test_nrrd_label_off_the_image_grid_is_reported(tmp_path):
    img = _sitk_image(seed=20)
    sitk.WriteImage(img, str(tmp_path / "a.nrrd"))
    lab = sitk.Cast(sitk.BinaryThreshold(img, 0, 1500, 1, 0), sitk.sitkUInt8)
    lab.SetOrigin((-12.5, 33.25, 81.0))
    sitk.WriteImage(lab, str(tmp_path / "a_label.nrrd"))
    m = Manifest([Case("a", tmp_path / "a.nrrd", label=tmp_path / "a_label.nrrd", modality="CT")])
    probs = verify_manifest(m)
    assert [(p.case, p.field) for p in probs] == [("a", "label")] and "affine differs" in probs[0].message
