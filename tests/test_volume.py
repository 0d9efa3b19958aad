import numpy as np
import pytest

from medsynth.errors import VolumeError
from medsynth.volume import Volume, affine_from_spacing


def _rot(axis: int, deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def test_spacing_from_column_norms_for_oblique_affine():
    aff = np.eye(4)
    aff[:3, :3] = _rot(2, 30) @ np.diag([0.7, 0.9, 2.5])
    aff[:3, 3] = [10, -20, 30]
    v = Volume(np.zeros((4, 5, 6), np.float32), aff)
    assert np.allclose(v.spacing, (0.7, 0.9, 2.5))
    assert not np.allclose(np.abs(np.diag(aff)[:3]), v.spacing)  # the diagonal would be wrong
    assert v.is_oblique()
    assert np.allclose(np.linalg.norm(v.direction, axis=0), 1.0)


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PLI", "SRA"])
def test_orientation_codes(codes):
    aff = affine_from_spacing((1.0, 2.0, 3.0), (4, 4, 4), codes)
    v = Volume(np.zeros((4, 4, 4)), aff)
    assert v.orientation == codes
    assert np.allclose(v.spacing, (1.0, 2.0, 3.0))


def test_affine_from_spacing_is_centred():
    aff = affine_from_spacing((2.0, 2.0, 2.0), (10, 10, 10), "LPS", center=(5, 6, 7))
    centre = aff @ np.array([4.5, 4.5, 4.5, 1.0])
    assert np.allclose(centre[:3], (5, 6, 7))


@pytest.mark.parametrize(
    "arr,aff,match",
    [
        (np.zeros((4, 4)), np.eye(4), "must be 3D"),
        (np.zeros((4, 4, 4)), np.eye(3), "affine must be 4x4"),
        (np.zeros((4, 4, 4)), np.diag([1, 1, 0, 1.0]), "singular"),
        (np.zeros((4, 4, 4)), np.full((4, 4), np.nan), "NaN"),
    ],
)
def test_invalid_volumes_rejected(arr, aff, match):
    with pytest.raises(VolumeError, match=match):
        Volume(arr, aff)


def test_bad_modality():
    with pytest.raises(VolumeError, match="modality must be one of"):
        Volume(np.zeros((2, 2, 2)), np.eye(4), modality="PET")


@pytest.mark.parametrize("codes", ["RAS", "LPS", "ASL"])
def test_sitk_roundtrip_is_lps(codes):
    aff = np.eye(4)
    aff[:3, :3] = affine_from_spacing((0.8, 1.1, 3.0), (5, 6, 7), codes)[:3, :3] @ np.eye(3)
    aff[:3, :3] = _rot(0, 10) @ aff[:3, :3]
    aff[:3, 3] = [12.0, -7.0, 40.0]
    arr = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    v = Volume(arr, aff)
    img = v.to_sitk()
    # physical point of voxel (1, 2, 3) agrees (ITK is LPS: flip x, y)
    p_lps = np.array(img.TransformIndexToPhysicalPoint((1, 2, 3)))
    p_ras = (aff @ [1, 2, 3, 1])[:3]
    assert np.allclose(p_lps * [-1, -1, 1], p_ras)
    assert img.GetPixel(1, 2, 3) == pytest.approx(float(arr[1, 2, 3]))
    back = Volume.from_sitk(img)
    assert np.allclose(back.affine, aff, atol=1e-6)
    assert np.array_equal(back.array, arr)


def test_nifti_roundtrip_sets_qform_and_sform(tmp_path):
    import nibabel as nib

    aff = affine_from_spacing((0.5, 0.75, 2.0), (6, 7, 8), "LPS", center=(1, 2, 3))
    v = Volume(np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8), aff)
    p = v.save_nifti(tmp_path / "x.nii.gz", dtype="int16", description="test")
    img = nib.load(str(p))
    assert np.allclose(img.get_qform(), aff, atol=1e-5)
    assert np.allclose(img.get_sform(), aff)
    assert img.get_data_dtype() == np.int16
    back = Volume.load_nifti(p)
    assert np.allclose(back.affine, aff, atol=1e-5)
    assert np.array_equal(back.array, v.array.astype(np.int16))
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind
