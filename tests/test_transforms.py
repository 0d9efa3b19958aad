import numpy as np
import pytest
import torch

from medsynth.config import config_from_dict
from medsynth.data.phantoms import write_phantoms
from medsynth.data.transforms import (
    IntensityNorm,
    build_transforms,
    case_dict,
    intensity_norm,
    make_dataset,
    split_cases,
    target_affine,
)
from medsynth.manifest import load_manifest
from medsynth.volume import Volume, affine_from_spacing


def _cfg(**data):
    base = {"shape": [16, 16, 16], "spacing": [20.0, 20.0, 20.0], "orientation": "RAS", "cache": "none"}
    base.update(data)
    return config_from_dict({"data": base, "model": {"autoencoder": {"channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 8},
                                                       "unet": {"channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 8}},
                            "training": {"autoencoder": {"disc_layers": 1}}})


@pytest.fixture(scope="module")
def phantom_manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("ph")
    return load_manifest(write_phantoms(d, 3, seed=0, shape=(32, 32, 20), spacing=(10.0, 10.0, 16.0)))


def test_intensity_norm_exact_inverse():
    n = IntensityNorm(-1000.0, 1000.0)
    x = np.linspace(-1000, 1000, 2001)
    assert np.allclose(n.inverse(n.forward(x)), x, atol=1e-9)
    assert n.forward(np.array([-3000.0, 3000.0])).tolist() == [-1.0, 1.0]  # clipped outside the window
    t = torch.linspace(-1000, 1000, 11, dtype=torch.float64)
    assert torch.allclose(n.inverse(n.forward(t)), t)
    assert IntensityNorm.from_dict(n.to_dict()) == n


def test_mr_needs_reference():
    cfg = _cfg(modality="MR", intensity={"window": None, "percentiles": [1.0, 99.0]})
    with pytest.raises(ValueError):
        intensity_norm(cfg.data)
    assert intensity_norm(cfg.data, (10.0, 500.0)).inverse(1.0) == 500.0


def test_chain_reorients_resamples_and_crops(phantom_manifest):
    cfg = _cfg()
    tf = build_transforms(cfg.data, with_label=True)
    out = tf(case_dict(phantom_manifest.cases[1], with_label=True))
    img, lab = out["image"], out["label"]
    assert tuple(img.shape) == (1, 16, 16, 16) and tuple(lab.shape) == (1, 16, 16, 16)
    assert img.min() >= -1.0 and img.max() <= 1.0
    # labels follow with nearest-neighbour: only the original label values appear
    assert set(torch.unique(lab).tolist()) <= {0.0, 1.0, 2.0}
    aff = img.affine.numpy()
    v = Volume(np.zeros((16, 16, 16)), aff)
    assert v.orientation == "RAS" and np.allclose(v.spacing, (20, 20, 20))
    assert np.allclose(aff[:3, :3], target_affine(cfg.data)[:3, :3])
    assert out["class_label"] == 1


def test_physical_position_preserved(phantom_manifest, tmp_path):
    """A bright blob at a known world position stays at that world position after the chain."""
    aff = affine_from_spacing((4.0, 5.0, 6.0), (40, 36, 30), "LPS", center=(3.0, -4.0, 5.0))
    arr = np.full((40, 36, 30), -1000.0, np.float32)
    target_world = np.array([30.0, -20.0, 40.0, 1.0])
    ijk = np.rint(np.linalg.solve(aff, target_world)[:3]).astype(int)
    arr[ijk[0] - 1:ijk[0] + 2, ijk[1] - 1:ijk[1] + 2, ijk[2] - 1:ijk[2] + 2] = 1000.0
    p = Volume(arr, aff).save_nifti(tmp_path / "blob.nii.gz")
    cfg = _cfg(spacing=[4.0, 4.0, 4.0], shape=[48, 48, 48])
    out = build_transforms(cfg.data)({"image": str(p)})
    img = out["image"][0].numpy()
    w = np.clip(img + 1.0, 0, None)  # background is -1 after normalisation
    peak = (np.stack(np.meshgrid(*[np.arange(n) for n in img.shape], indexing="ij")) * w).reshape(3, -1).sum(1) / w.sum()
    world = out["image"].affine.numpy() @ np.r_[peak, 1.0]
    blob_world = (aff @ np.r_[ijk, 1.0])[:3]
    assert np.linalg.norm(world[:3] - blob_world) < 1.0  # centre of mass within 1 mm


def test_split_is_deterministic_and_disjoint(phantom_manifest):
    tr, va = split_cases(phantom_manifest.cases, 0.34, seed=0)
    tr2, va2 = split_cases(list(reversed(phantom_manifest.cases)), 0.34, seed=0)
    assert [c.id for c in tr] == [c.id for c in tr2] and [c.id for c in va] == [c.id for c in va2]
    assert not {c.id for c in tr} & {c.id for c in va}
    assert len(va) == 1


def test_cached_dataset(phantom_manifest):
    cfg = _cfg(cache="memory")
    ds = make_dataset(phantom_manifest.cases, cfg.data)
    assert len(ds) == 3 and tuple(ds[0]["image"].shape) == (1, 16, 16, 16)


def test_loader_reads_one_series_out_of_a_shared_dicom_folder(tmp_path, run_cli):
    """A manifest case with series_files (two series in one folder) loads through LoadImaged."""
    from tests.helpers import hu_volume, write_series

    a, b = hu_volume((16, 16, 6), seed=1), hu_volume((16, 16, 8), seed=2)
    write_series(tmp_path / "src" / "mix", a, names=[f"a{k}" for k in range(6)])
    write_series(tmp_path / "src" / "mix", b, names=[f"b{k}" for k in range(8)], origin=(0.0, 0.0, 100.0))
    code, out, err = run_cli("manifest", "build", tmp_path / "src", "-o", tmp_path / "m.json")
    assert code == 0, err
    man = load_manifest(tmp_path / "m.json")
    assert len(man.cases) == 2 and all(c.extra.get("series_files") for c in man.cases)
    cfg = _cfg(spacing=[0.8, 0.7, 2.5], shape=[16, 16, 8], intensity={"window": [-1000.0, 2000.0]})
    ds = make_dataset(man.cases, cfg.data)
    shapes = sorted(tuple(ds[i]["image"].shape) for i in range(2))
    assert shapes == [(1, 16, 16, 8), (1, 16, 16, 8)]
