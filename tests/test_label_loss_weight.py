"""``training.diffusion.label_loss_weight``: per-latent-voxel loss weights from the training label maps."""

from __future__ import annotations

import pytest
import torch

from medsynth.config import ConfigError, config_from_dict
from medsynth.model.diffusion_training import label_loss_weights
from medsynth.model.labels import encode
from medsynth.model.networks import diffusion_loss
from medsynth.model.train import train

from tests.helpers import merge, run_weights, tiny_config

LABELS = {"background": 0, "lung": 1, "lesion": 2}


def _cfg(manifest=None, weights=None, **sections):
    data = {"use_labels": True, **({"labels": LABELS} if manifest is None else {})}
    sections["training"] = merge({"diffusion": {"label_loss_weight": weights or {}}}, sections.get("training", {}))
    raw = tiny_config(manifest, data=data, **sections)
    raw["model"]["autoencoder"] = {"kind": "wavelet", "wavelet_levels": 1, "wavelet_label_bands": "low"}
    return config_from_dict(raw)


def test_weights_are_the_block_share_of_each_weighted_label():
    lab = torch.zeros(1, 8, 8, 8)
    lab[0, 0:2, 0:2, 0:2] = 2          # one whole block of lesion
    lab[0, 2:4, 0:2, 0:2] = 1
    lab[0, 2, 0, 0] = 2                # one lesion voxel in a lung block
    items = [{"image": encode(torch.zeros(1, 8, 8, 8), lab, [0, 1, 2])}]
    w = label_loss_weights(_cfg(weights={"lesion": 9.0}), items, (4, 4, 4))
    assert w.shape == (1, 1, 4, 4, 4)
    assert w[0, 0, 0, 0, 0] == pytest.approx(9.0)          # all lesion: 1 + 8
    assert w[0, 0, 1, 0, 0] == pytest.approx(1.0 + 8.0 / 8)  # 1 of 8 voxels
    assert torch.all(w[0, 0, 2:] == 1.0)
    assert label_loss_weights(_cfg(), items, (4, 4, 4)) is None


def test_weighted_loss_is_normalised_by_the_mean_weight():
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g)
    t = torch.full((2,), 500.0)
    ones = torch.ones(2, 1, 4, 4, 4)
    plain = diffusion_loss("ddpm", "epsilon", out, out, t, target, 1000)
    assert torch.allclose(diffusion_loss("ddpm", "epsilon", out, out, t, target, 1000, ones * 5.0), plain)
    w = ones.clone()
    w[:, :, 0] = 10.0
    err = (out - target) ** 2
    want = (err * w).sum() / w.expand_as(err).sum()
    assert torch.allclose(diffusion_loss("ddpm", "epsilon", out, out, t, target, 1000, w), want)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"label_loss_weight\.lesion: a loss weight"):
        _cfg(weights={"lesion": 0.0})
    items = [{"image": encode(torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 8, 8), [0, 1, 2])}]
    with pytest.raises(ConfigError, match=r"unknown label\(s\) \['nodule'\]"):
        label_loss_weights(_cfg(weights={"nodule": 5.0}), items, (4, 4, 4))
    image_only = config_from_dict(tiny_config(None, training={"diffusion": {"label_loss_weight": {"lesion": 5.0}}}))
    with pytest.raises(ConfigError, match="needs a paired model"):
        label_loss_weights(image_only, items, (4, 4, 4))


def test_weighted_training_runs_resumes_exactly_and_changes_the_weights(phantoms, tmp_path):
    cfg = _cfg(phantoms, {"lesion": 20.0}, training={"scheduler": "rflow"}, sampling={"scheduler": "rflow"})
    train(cfg, tmp_path / "w")
    train(_cfg(phantoms, training={"scheduler": "rflow"}, sampling={"scheduler": "rflow"}), tmp_path / "u")
    a, b = run_weights(tmp_path / "w"), run_weights(tmp_path / "u")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # killed after step 2, resumed: the same weights as one run
    raw_cfg = _cfg(phantoms, {"lesion": 20.0}, training={"scheduler": "rflow", "diffusion": {"steps": 2}},
                   sampling={"scheduler": "rflow"})
    train(raw_cfg, tmp_path / "p")
    train(cfg, tmp_path / "p", resume=True)
    c = run_weights(tmp_path / "p")
    assert all(torch.equal(a[k], c[k]) for k in a)


def _bright_cfg(weight=None, **data):
    raw = tiny_config(None, data=data,
                      training={"diffusion": {"intensity_loss_weight": weight if weight is not None else {}}})
    return config_from_dict(raw)


def test_intensity_weight_is_the_block_share_of_voxels_above_the_threshold():
    # window [-1000, 1000] -> [-1, 1]: 300 HU is 0.3 in model space
    img = torch.full((1, 8, 8, 8), -0.86)
    img[0, 0:2, 0:2, 0:2] = 0.9        # a whole block of cortex (900 HU)
    img[0, 2, 0, 0] = 0.35             # one voxel of 350 HU in the next block
    img[0, 4, 0, 0] = 0.29             # 290 HU: below the threshold
    w = label_loss_weights(_bright_cfg({"above": 300.0, "weight": 3.0}), [{"image": img}], (4, 4, 4))
    assert w.shape == (1, 1, 4, 4, 4)
    assert w[0, 0, 0, 0, 0] == pytest.approx(3.0)
    assert w[0, 0, 1, 0, 0] == pytest.approx(1.0 + 2.0 / 8)
    assert torch.all(w[0, 0, 2:] == 1.0)
    # image-only models take it too (no label needed); with label weights the two add up
    lab = torch.zeros(1, 8, 8, 8)
    lab[0, 0:2, 0:2, 0:2] = 2
    paired = _cfg(weights={"lesion": 5.0}, training={"diffusion": {"intensity_loss_weight":
                                                                   {"above": 300.0, "weight": 3.0}}})
    wp = label_loss_weights(paired, [{"image": encode(img, lab, [0, 1, 2])}], (4, 4, 4))
    assert wp[0, 0, 0, 0, 0] == pytest.approx(1.0 + 4.0 + 2.0)


def test_intensity_weight_errors_name_the_key_and_the_fix():
    for bad, match in (({"above": 300.0}, r"intensity_loss_weight: two keys, above"),
                       ({"above": 300.0, "weight": 0.0}, r"intensity_loss_weight\.weight: a loss weight"),
                       ({"above": "bone", "weight": 2.0}, r"intensity_loss_weight\.above: an intensity")):
        with pytest.raises(ConfigError, match=match):
            _bright_cfg(bad)
    img = [{"image": torch.zeros(1, 8, 8, 8)}]
    with pytest.raises(ConfigError, match=r"above: 3000.0 is outside the intensity window \[-1000, 1000\]"):
        label_loss_weights(_bright_cfg({"above": 3000.0, "weight": 2.0}), img, (4, 4, 4))
    mr = _bright_cfg({"above": 300.0, "weight": 2.0}, modality="MR",
                     intensity={"window": None, "percentiles": [1.0, 99.0]})
    with pytest.raises(ConfigError, match="needs a fixed intensity window") as e:
        label_loss_weights(mr, img, (4, 4, 4))
    assert "data.intensity.window" in e.value.hint
