import json

import numpy as np
import pytest

from medsynth.data.phantoms import LABELS, draw_params, make_phantom, write_phantoms
from medsynth.manifest import load_manifest
from medsynth.volume import Volume


def test_phantom_is_deterministic_from_seed():
    a, la, ca = make_phantom(7, shape=(24, 24, 16), spacing=(12.0, 12.0, 20.0))
    b, lb, cb = make_phantom(7, shape=(24, 24, 16), spacing=(12.0, 12.0, 20.0))
    c, _, _ = make_phantom(8, shape=(24, 24, 16), spacing=(12.0, 12.0, 20.0))
    assert np.array_equal(a.array, b.array) and np.array_equal(la.array, lb.array) and ca == cb
    assert not np.array_equal(a.array, c.array)
    assert draw_params(7) == draw_params(7)


def test_phantom_anatomy_in_realistic_hu():
    img, lab, cls = make_phantom(3, lesion=True)
    hu = img.array.astype(float)
    assert img.array.dtype == np.int16 and img.units == "HU" and img.modality == "CT"
    assert hu.min() >= -1024 and hu.max() <= 3071
    lung = lab.array == LABELS["lung"]
    lesion = lab.array == LABELS["lesion"]
    assert cls == 1 and lesion.sum() > 10
    assert -950 < hu[lung].mean() < -750            # aerated lung
    assert -100 < hu[lesion].mean() < 120           # soft-tissue nodule
    assert (hu > 600).sum() > 50                    # bone (spine, ribs)
    outside = hu < -990
    assert 0.2 < outside.mean() < 0.8               # air around the body
    body = (hu > -500)
    assert 0 < np.median(hu[body & ~lesion]) < 80   # soft tissue dominates the body


def test_phantom_geometry_is_physical():
    img, lab, _ = make_phantom(1, shape=(32, 30, 20), spacing=(4.0, 5.0, 8.0))
    assert img.orientation == "LPS"
    assert np.allclose(img.spacing, (4.0, 5.0, 8.0))
    assert np.allclose(lab.affine, img.affine)
    centre = img.affine @ np.array([15.5, 14.5, 9.5, 1.0])
    assert np.allclose(centre[:3], 0.0)


def test_no_lesion_class_has_no_lesion_label():
    _, lab, cls = make_phantom(5, lesion=False)
    assert cls == 0 and not (lab.array == LABELS["lesion"]).any()


def test_write_phantoms_manifest(tmp_path):
    path = write_phantoms(tmp_path / "ph", 4, seed=2, shape=(20, 20, 12), spacing=(15.0, 15.0, 25.0))
    man = load_manifest(path)
    assert [c.class_label for c in man.cases] == [0, 1, 0, 1]
    raw = json.loads(path.read_text())
    assert raw["cases"][0]["image"] == "images/phantom-s2-000.nii.gz"   # relative to the manifest
    # another seed, other case ids: a held-out set never collides with a training set by id
    other = load_manifest(write_phantoms(tmp_path / "ho", 2, seed=0, shape=(20, 20, 12), spacing=(15.0, 15.0, 25.0)))
    assert [c.id for c in other.cases] == ["phantom-000", "phantom-001"]
    assert not {c.id for c in other.cases} & {c.id for c in man.cases}
    for c in man.cases:
        v = Volume.load_nifti(c.image)
        assert v.shape == (20, 20, 12) and c.label.is_file()
        assert np.allclose(v.spacing, (15.0, 15.0, 25.0))


def test_data_phantoms_cli(run_cli, tmp_path):
    code, out, err = run_cli("data", "phantoms", "--n", "2", "--out", tmp_path / "p", "--shape", "16", "16", "8")
    assert code == 0, err
    assert (tmp_path / "p" / "manifest.json").is_file()
    code, out, err = run_cli("data", "phantoms", "--n", "0", "--out", tmp_path / "q")
    assert code != 0 and "--n must be >= 1" in err and "Traceback" not in err
