"""Mask-conditioned generation: ControlNet training on a finished run and 'generate --masks'
(tiny 16³ networks; the quality figure is in the slow test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.config import config_from_dict
from medsynth.data.transforms import target_affine
from medsynth.errors import CheckpointError, ManifestError
from medsynth.model.checkpoint import load_checkpoint
from medsynth.model.controlnet import (
    build_controlnet,
    controlled_prediction,
    generate_from_masks,
    mask_agreement,
    train_controlnet,
)
from medsynth.model.networks import build_unet
from medsynth.model.train import train
from medsynth.samples import list_samples
from medsynth.volume import Volume
from tests.helpers import tiny_config

LABELS = {"background": 0, "lung": 1, "lesion": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from medsynth.data.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("controlnet")
    man = write_phantoms(root / "ph", 8, 0, (16, 16, 16), (20.0, 20.0, 20.0))
    raw = tiny_config(man, training={"controlnet": {"steps": 3, "batch_size": 2, "lr": 1e-3}})
    cfg_path = root / "cfg.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(raw))
    train(config_from_dict(raw), root / "run")
    return {"root": root, "manifest": man, "cfg": cfg_path, "raw": raw, "run": root / "run"}


def test_controlnet_starts_as_the_unet():
    """Weights copied from the UNet and zero-initialised residual convs: before training the
    controlled prediction equals the plain UNet's, whatever the mask."""
    cfg = config_from_dict(tiny_config(None))
    unet = build_unet(cfg).eval()
    cn = build_controlnet(cfg, 3).eval()
    cn.load_state_dict(unet.state_dict(), strict=False)
    x, t = torch.randn(1, 2, 8, 8, 8), torch.tensor([5])
    mask = torch.zeros(1, 3, 16, 16, 16)
    mask[:, 1, 4:12] = 1
    with torch.no_grad():
        a = unet(x, t, class_labels=torch.tensor([1]))
        b = controlled_prediction(unet, cn, x, t, mask, torch.tensor([1]))
    assert torch.allclose(a, b, atol=1e-6)


def test_train_and_generate_from_masks_cli(setup, tmp_path, run_cli):
    run, man = setup["run"], setup["manifest"]
    code, out, err = run_cli("train", setup["cfg"], "--run", run, "--stage", "controlnet", "--manifest", man)
    assert code == 0, err
    assert "controlnet: 3 steps" in out
    ck = load_checkpoint(run / "controlnet" / "last.pt", "controlnet")
    assert ck["labels"] == LABELS and ck["step"] == 3
    # a second time without --resume is refused, with a hint
    code, out, err = run_cli("train", setup["cfg"], "--run", run, "--stage", "controlnet", "--manifest", man)
    assert code == CheckpointError.exit_code and "--resume" in err and "Traceback" not in err

    # masks from a folder: a real mask, the same mask moved 2 voxels, and one with unknown values
    masks = tmp_path / "masks"
    masks.mkdir()
    from medsynth.manifest import load_manifest

    src = Volume.load_nifti(load_manifest(man).cases[0].label, modality="SEG")
    assert src.orientation == "LPS"  # the phantoms are LPS; given in RAS on the run's grid they are unchanged
    lab = Volume(np.ascontiguousarray(np.flip(src.array, (0, 1))), target_affine(config_from_dict(setup["raw"]).data),
                 modality="SEG", units="label")
    lab.save_nifti(masks / "a.nii.gz", dtype="uint8")
    src.save_nifti(masks / "a_lps.nii.gz", dtype="uint8")  # the same mask in LPS: reoriented to the same map
    moved = np.roll(lab.array, 2, axis=1)
    lab.with_array(moved).save_nifti(masks / "b.nii.gz", dtype="uint8")
    lab.with_array(np.full(lab.shape, 9, np.uint8)).save_nifti(masks / "c_bad.nii.gz", dtype="uint8")
    code, out, err = run_cli("generate", run, "--masks", masks, "--out", tmp_path / "s", "--seed", "2")
    assert code != 0 and "wrote 3 mask-conditioned samples" in out and "1 mask(s) failed" in out
    failed = json.loads((tmp_path / "s" / "masks_failed.json").read_text())
    assert len(failed) == 1 and "not in the ControlNet's label set" in next(iter(failed.values()))
    samples = list_samples(tmp_path / "s")
    assert [s.sidecar["index"] for s in samples] == [0, 1, 2]
    for s, want in zip(samples, (lab.array, lab.array, moved)):
        img, m = s.load(), s.load_label()
        assert m.shape == img.shape and np.allclose(m.affine, img.affine)
        assert np.array_equal(m.array, want)  # same grid here: the given mask, unchanged
        assert s.sidecar["label_values"] == LABELS and s.sidecar["mask_source"].startswith("sha256:")
        assert np.isfinite(img.array).all()
        fig = mask_agreement(img, m, LABELS)
        assert set(fig["mean_hu"]) == set(LABELS) and 0.0 <= fig["lung_dice"] <= 1.0
    # rerun: existing samples kept (resume)
    res = generate_from_masks(run, masks, tmp_path / "s", seed=2, limit=3)
    assert res.skipped == [s.id for s in samples] and not res.written


def test_generate_masks_needs_a_controlnet(tmp_path, setup, run_cli):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run, ignore=shutil.ignore_patterns("controlnet"))
    code, out, err = run_cli("generate", run, "--masks", setup["manifest"], "--out", tmp_path / "s")
    assert code == CheckpointError.exit_code and "controlnet" in err and "Traceback" not in err
    with pytest.raises(ManifestError, match="`masks` must be a data manifest or a folder"):
        generate_from_masks(setup["run"], tmp_path / "nowhere", tmp_path / "s2")


@pytest.mark.slow
def test_controlnet_samples_follow_their_masks_better_than_unconditioned(tmp_path):
    """The quality figure: a small model (16³, 60 diffusion steps) plus 200 ControlNet steps.
    On held-out phantom masks, and the same masks moved 3 voxels, the lung Dice of a threshold
    segmentation is higher for ControlNet samples than for unconditioned samples of the same seed,
    and the denoising loss on held-out cases is lower with the mask than without."""
    from medsynth.data.phantoms import write_phantoms
    from medsynth.manifest import load_manifest
    from medsynth.model.controlnet import denoising_gain
    from medsynth.model.sample import generate

    man = write_phantoms(tmp_path / "ph", 12, 0, (16, 16, 16), (20.0, 20.0, 20.0))
    held = write_phantoms(tmp_path / "held", 6, 100, (16, 16, 16), (20.0, 20.0, 20.0))
    raw = tiny_config(man, training={"autoencoder": {"steps": 40, "lr": 2e-3},
                                     "diffusion": {"steps": 60, "lr": 2e-3, "num_train_timesteps": 100},
                                     "controlnet": {"steps": 200, "batch_size": 4, "lr": 3e-3},
                                     "checkpoint_every": 1000},
                      sampling={"steps": 10, "guidance_scale": 1.0})
    cfg = config_from_dict(raw)
    train(cfg, tmp_path / "run")
    train_controlnet(cfg, tmp_path / "run")
    masks = tmp_path / "masks"
    masks.mkdir()
    for c in load_manifest(held).cases:
        v = Volume.load_nifti(c.label, modality="SEG")
        v.save_nifti(masks / f"{c.id}.nii.gz", dtype="uint8")
        a = np.roll(v.array, 3, axis=0)
        a[:3] = 0
        v.with_array(a).save_nifti(masks / f"{c.id}_moved.nii.gz", dtype="uint8")
    res = generate_from_masks(tmp_path / "run", masks, tmp_path / "cn")
    generate(tmp_path / "run", tmp_path / "un", range(len(res.written)))
    un = {s.sidecar["index"]: s.load() for s in list_samples(tmp_path / "un")}
    cn_d, un_d = [], []
    for s in list_samples(tmp_path / "cn"):
        m = s.load_label()
        cn_d.append(mask_agreement(s.load(), m, LABELS)["lung_dice"])
        un_d.append(mask_agreement(un[s.sidecar["index"]], m, LABELS)["lung_dice"])
    print(f"lung Dice: controlnet {np.mean(cn_d):.3f}, unconditioned {np.mean(un_d):.3f}")
    assert np.mean(cn_d) > np.mean(un_d)
    assert sum(a > b for a, b in zip(cn_d, un_d)) >= 0.75 * len(cn_d)
    gain = denoising_gain(tmp_path / "run", config_from_dict({**raw, "data": {**raw["data"], "manifest": str(held)}}))
    print(f"held-out denoising loss: unet {gain['unet']:.3f}, with ControlNet {gain['controlnet']:.3f}")
    assert gain["controlnet"] < gain["unet"]
