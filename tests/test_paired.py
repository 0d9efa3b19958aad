"""Paired image + label generation (data.use_labels): label channels through the autoencoder,
integer label maps written beside each sample, nnU-Net export of the pairs (tiny 16³ networks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.config import ConfigError, config_from_dict
from medsynth.errors import ManifestError
from medsynth.model.labels import decode, encode, label_values
from medsynth.model.networks import build_autoencoder, image_channels
from medsynth.model.train import prepare_data, train
from medsynth.samples import list_samples
from medsynth.volume import Volume
from tests.helpers import tiny_config

PHANTOM_LABELS = {"background": 0, "lung": 1, "lesion": 2}


@pytest.fixture(scope="module")
def paired_run(phantoms, tmp_path_factory) -> Path:
    cfg = config_from_dict(tiny_config(phantoms, data={"use_labels": True}))
    run = tmp_path_factory.mktemp("paired") / "run"
    train(cfg, run)
    return run


def test_encode_decode_round_trip():
    lab = torch.tensor([0, 1, 2, 2, 1, 0]).reshape(1, 1, 2, 3).float().expand(1, 2, 2, 3).reshape(1, 2, 2, 3)
    img = torch.rand(1, 2, 2, 3) * 2 - 1
    x = encode(img, lab, [0, 1, 2])
    assert x.shape == (4, 2, 2, 3) and torch.equal(x[0], img[0])
    assert set(torch.unique(x[1:]).tolist()) == {-1.0, 1.0}
    assert np.array_equal(decode(x, [0, 1, 2]), lab[0].numpy().astype(np.uint8))
    # non-contiguous label values map back to themselves
    assert set(np.unique(decode(encode(img, lab * 2, [0, 2, 4]), [0, 2, 4]))) == {0, 2, 4}


def test_label_channels_come_from_the_config():
    cfg = config_from_dict(tiny_config(None, data={"use_labels": True, "labels": PHANTOM_LABELS}))
    assert image_channels(cfg) == 4 and label_values(cfg) == [0, 1, 2]
    ae = build_autoencoder(cfg)
    assert ae.decode(ae.encode(torch.zeros(1, 4, 16, 16, 16))[0]).shape == (1, 4, 16, 16, 16)
    with pytest.raises(ConfigError, match="data.labels: not resolved"):
        image_channels(config_from_dict(tiny_config(None, data={"use_labels": True})))
    with pytest.raises(ConfigError, match=r"data\.labels: need a mapping"):
        config_from_dict(tiny_config(None, data={"use_labels": True, "labels": {"lung": 1}}))


def test_prepare_data_stacks_labels_and_checks_values(phantoms):
    cfg = config_from_dict(tiny_config(phantoms, data={"use_labels": True}))
    data = prepare_data(cfg)
    assert data.info["labels"] == PHANTOM_LABELS
    x = data.train[0]["image"]
    assert x.shape == (4, 16, 16, 16)
    assert torch.all((x[1:] == 1.0).sum(0) == 1)  # exactly one label channel on per voxel
    bad = config_from_dict(tiny_config(phantoms, data={"use_labels": True, "labels": {"background": 0, "lung": 1}}))
    with pytest.raises(ManifestError, match=r"label value\(s\) \[2\] are not in the label set"):
        prepare_data(bad)


def test_generate_writes_labels_on_the_image_grid(paired_run, tmp_path, run_cli):
    card = json.loads((paired_run / "model_card.json").read_text())
    assert card["labels"]["values"] == PHANTOM_LABELS
    code, out, err = run_cli("generate", paired_run, "-n", "2", "--out", tmp_path / "s", "--seed", "3")
    assert code == 0, err
    samples = list_samples(tmp_path / "s")
    assert len(samples) == 2
    for s in samples:
        img, lab = s.load(), s.load_label()
        assert lab is not None and s.label_path.name == f"{s.id}_label.nii.gz"
        assert lab.shape == img.shape and np.allclose(lab.affine, img.affine)
        assert s.sidecar["label_values"] == PHANTOM_LABELS
        assert set(np.unique(lab.array).tolist()) <= set(PHANTOM_LABELS.values())
        raw = Volume.load_nifti(s.label_path, modality="SEG")
        assert raw.array.dtype == np.uint8


def test_resume_keeps_the_resolved_label_set(paired_run, phantoms):
    from medsynth.config import load_config

    stored = load_config(paired_run / "config.yaml")
    assert stored.data.labels == PHANTOM_LABELS
    # resuming with the unresolved config resolves the same set and is accepted (nothing left to do)
    cfg = config_from_dict(tiny_config(phantoms, data={"use_labels": True}))
    train(cfg, paired_run, resume=True)


def test_exported_pairs_pass_nnunet_integrity_check(paired_run, tmp_path):
    """Samples of the paired model, exported, pass nnU-Net v2's own dataset integrity check."""
    pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity",
                        reason="nnunetv2 not installed (pip install --no-deps nnunetv2, see README)")
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    from medsynth.export.dataset import export_samples
    from medsynth.model.sample import generate

    generate(paired_run, tmp_path / "s", range(3), seed=1)
    out = tmp_path / "Dataset501_MedsynthPaired"  # nnU-Net's DatasetXXX_Name folder convention
    res = export_samples(tmp_path / "s", out, formats="nifti", force=True, name="MedsynthPaired")
    assert res.ok, res.summary()
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == PHANTOM_LABELS and ds["numTraining"] == 3
    assert len(list((out / "labelsTr").glob("*.nii.gz"))) == 3
    verify_dataset_integrity(str(out), num_processes=1)  # raises on any inconsistency
    # and it does catch a broken pair: a label value outside dataset.json's labels
    bad = next((out / "labelsTr").glob("*.nii.gz"))
    lab = Volume.load_nifti(bad, modality="SEG")
    lab.with_array(np.full(lab.shape, 7, dtype=np.uint8)).save_nifti(bad, dtype="uint8")
    with pytest.raises(RuntimeError):
        verify_dataset_integrity(str(out), num_processes=1)


def test_label_dice_is_zero_at_the_target_and_pulls_a_stuck_small_label():
    """The stage-1 label Dice: 0 for a perfect decode; a small label whose channel sits at -1 (where
    L1 leaves a 0.1 %-of-volume lesion) still gets a gradient and costs as much as a large one."""
    from medsynth.model.objectives import label_dice

    lab = torch.zeros(1, 1, 8, 8, 8)
    lab[0, 0, :4] = 1
    lab[0, 0, 5:7, 5:7, 5:7] = 2  # 8 voxels of "lesion"
    x = encode(torch.zeros(1, 8, 8, 8), lab[0], [0, 1, 2])[None]
    assert float(label_dice(x, x)) == pytest.approx(0.0, abs=1e-6)
    stuck = x.clone()
    stuck[0, 3] = -1.0  # the lesion channel never on
    stuck[0, 1, 5:7, 5:7, 5:7] = 1.0  # the lesion voxels decoded as background
    stuck.requires_grad_(True)
    loss = label_dice(stuck, x)
    loss.backward()
    assert float(loss) > 0.2  # about a third: one of three label values entirely missed
    assert float(stuck.grad[0, 3, 6, 6, 6]) < 0  # raising the lesion channel there lowers the loss


def test_paired_validation_reports_dice_per_label_value(paired_run):
    rows = [json.loads(line) for line in (paired_run / "autoencoder" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val"] for r in rows if "val" in r][-1]
    assert {"psnr", "ssim", "label_dice_0", "label_dice_1"} <= set(val)
    assert all(0.0 <= val[k] <= 1.0 for k in val if k.startswith("label_dice_"))
    steps = [r for r in rows if "label_dice" in r]
    assert steps, "the label Dice term is logged per step"
