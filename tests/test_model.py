"""Stage 1 / stage 2 training, run directory, checkpoints, exact resume (tiny 16³ networks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medsynth.config import ConfigError, config_from_dict, load_config
from medsynth.errors import CheckpointError, ManifestError
from medsynth.model.checkpoint import CARD_FORMAT, INTENDED_USE, RunPaths, load_checkpoint
from medsynth.model.networks import build_autoencoder, build_unet, latent_shape
from medsynth.model.train import prepare_data, train
from tests.helpers import Interrupt, run_weights, tiny_config

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# networks and config rules
# --------------------------------------------------------------------------------------------


def test_networks_from_config_with_null_class_row():
    cfg = config_from_dict(tiny_config(None))
    ae, unet = build_autoencoder(cfg), build_unet(cfg)
    assert unet.class_embedding.num_embeddings == 3  # classes 0, 1 and the null class 2
    x = torch.zeros(1, 1, 16, 16, 16)
    mu, sigma = ae.encode(x)
    assert tuple(mu.shape[1:]) == latent_shape(cfg) == (2, 8, 8, 8)
    assert tuple(ae.decode(mu).shape) == (1, 1, 16, 16, 16)
    out = unet(mu, torch.tensor([5]), class_labels=torch.tensor([2]))
    assert out.shape == mu.shape


def test_maisi_networks_option():
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    cfg = config_from_dict(tiny_config(None, model={"autoencoder": {"kind": "maisi", "num_splits": 2},
                                                    "unet": {"kind": "maisi"}}))
    ae, unet = build_autoencoder(cfg), build_unet(cfg)
    assert isinstance(ae, AutoencoderKlMaisi) and isinstance(unet, DiffusionModelUNetMaisi)
    with torch.no_grad():
        mu, _ = ae.encode(torch.zeros(1, 1, 16, 16, 16))
        assert tuple(ae.decode(mu).shape) == (1, 1, 16, 16, 16)
        assert unet(mu, torch.tensor([3]), class_labels=torch.tensor([1])).shape == mu.shape


def test_large_latent_attention_is_refused_with_the_memory_it_would_need():
    raw = tiny_config(None, data={"shape": [256, 256, 256]},
                      model={"autoencoder": {"channels": [8, 8, 8], "attention_levels": [False, False, False],
                                             "with_nonlocal_attn": True}})
    with pytest.raises(ConfigError, match=r"with_nonlocal_attn: .*\[64, 64, 64\].*275 GB"):
        config_from_dict(raw)
    raw["model"]["autoencoder"]["use_flash_attention"] = True
    config_from_dict(raw)  # memory-efficient attention is allowed


def test_discriminator_depth_checked_against_grid():
    with pytest.raises(ConfigError, match=r"training.autoencoder.disc_layers: 3 stride-2 layers"):
        config_from_dict(tiny_config(None, training={"autoencoder": {"disc_layers": 3}}))


# --------------------------------------------------------------------------------------------
# training and the run directory
# --------------------------------------------------------------------------------------------


def test_train_writes_complete_run_directory(phantoms, tmp_path):
    cfg = config_from_dict(tiny_config(phantoms))
    res = train(cfg, tmp_path / "run")
    paths = RunPaths(tmp_path / "run")
    assert [s["stage"] for s in res.summaries] == ["autoencoder", "diffusion"]
    for f in (paths.config, paths.versions, paths.card, paths.checkpoint("autoencoder"),
              paths.checkpoint("diffusion"), paths.metrics("autoencoder"), paths.metrics("diffusion")):
        assert f.is_file(), f
    assert load_config(paths.config).name == "tiny"  # the resolved config is itself loadable

    ae = load_checkpoint(paths.checkpoint("autoencoder"), "autoencoder")
    assert ae["config"]["model"]["autoencoder"]["channels"] == [8, 8]  # config inside the checkpoint
    assert ae["step"] == ae["steps"] == 4
    assert {"model", "discriminator", "opt_g", "opt_d", "sched_g", "intensity_norm"} <= set(ae)
    diff = load_checkpoint(paths.checkpoint("diffusion"), "diffusion")
    assert {"model", "ema", "opt", "sched", "scale_factor", "autoencoder_sha256"} <= set(diff)
    assert diff["scale_factor"] > 0

    recs = [json.loads(line) for line in paths.metrics("autoencoder").read_text().splitlines()]
    val = [r["val"] for r in recs if "val" in r]
    assert val and {"psnr", "ssim"} <= set(val[-1])
    assert any("g_adv" in r for r in recs) and not any("g_adv" in r for r in recs if r["step"] <= 2)

    card = json.loads(paths.card.read_text())
    assert card["format"] == CARD_FORMAT and card["intended_use"] == INTENDED_USE
    ic = card["input_contract"]
    assert ic["shape"] == [16, 16, 16] and ic["spacing"] == [20.0, 20.0, 20.0] and ic["orientation"] == "RAS"
    assert ic["modality"] == "CT" and ic["units"] == "HU" and ic["value_range"] == [-1000.0, 1000.0]
    assert card["classes"]["num_classes"] == 2 and card["classes"]["names"] == {"0": "no_lesion", "1": "lesion"}
    assert card["latent"]["scale_factor"] == diff["scale_factor"]
    versions = json.loads(paths.versions.read_text())
    assert versions["torch"] and versions["monai"]


def test_resume_after_interruptions_reproduces_uninterrupted_weights_exactly(phantoms, tmp_path):
    """Killed after step 2 of each stage, resumed twice: every weight tensor (autoencoder,
    discriminator, UNet, EMA) is bitwise equal (torch.equal) to the uninterrupted run's."""
    cfg = config_from_dict(tiny_config(phantoms))
    train(cfg, tmp_path / "a")

    def stop_at(stage):
        def cb(s, step):
            if s == stage and step == 3:  # step 3 is done but not checkpointed: the resume redoes it
                raise Interrupt()
        return cb

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "b", callback=stop_at("autoencoder"))
    assert load_checkpoint(RunPaths(tmp_path / "b").checkpoint("autoencoder"), "autoencoder")["step"] == 2
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "b", resume=True, callback=stop_at("diffusion"))
    train(cfg, tmp_path / "b", resume=True)

    wa, wb = run_weights(tmp_path / "a"), run_weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the metrics log reads as if never interrupted: one record per logged step
    recs = [json.loads(x) for x in RunPaths(tmp_path / "b").metrics("autoencoder").read_text().splitlines()]
    steps = [r["step"] for r in recs if "val" not in r and "reconstruction_qc" not in r]
    assert steps == [1, 2, 3, 4]
    # stage 1's reconstruction check is written once, when the stage finishes
    assert [r["step"] for r in recs if "reconstruction_qc" in r] == [4]


def test_existing_run_refused_without_resume_and_changed_config_refused(phantoms, tmp_path):
    raw = tiny_config(phantoms, training={"diffusion": {"steps": 2}})
    train(config_from_dict(raw), tmp_path / "r", stage="autoencoder")
    with pytest.raises(CheckpointError, match=r"autoencoder/last.pt: exists.*\n  fix: pass `resume=True`"):
        train(config_from_dict(raw), tmp_path / "r", stage="autoencoder")
    changed = tiny_config(phantoms, training={"autoencoder": {"lr": 5e-4}})
    with pytest.raises(CheckpointError, match=r"different config \(training.autoencoder.lr: 0.001 -> 0.0005"):
        train(config_from_dict(changed), tmp_path / "r", stage="diffusion")
    with pytest.raises(CheckpointError, match="no run to resume"):
        train(config_from_dict(raw), tmp_path / "nothing", resume=True)


def test_diffusion_stage_needs_a_trained_autoencoder(phantoms, tmp_path):
    with pytest.raises(CheckpointError, match=r"stage 2 needs a trained autoencoder"):
        train(config_from_dict(tiny_config(phantoms)), tmp_path / "r", stage="diffusion")


def test_rectified_flow_and_gradient_accumulation_train(phantoms, tmp_path):
    raw = tiny_config(phantoms, training={"scheduler": "rflow", "autoencoder": {"steps": 2, "adv_weight": 0.0},
                                          "diffusion": {"steps": 2, "grad_accum": 2}},
                      sampling={"scheduler": "rflow"})
    res = train(config_from_dict(raw), tmp_path / "r")
    assert res.summaries[1]["steps"] == 2
    assert torch.isfinite(torch.tensor(res.summaries[1]["val"]["loss"]))


def test_autoencoder_mse_term_is_trained_and_logged(phantoms, tmp_path):
    """``l2_weight`` adds an MSE term to stage 1 (kept small structures); it is logged per step."""
    raw = tiny_config(phantoms, training={"autoencoder": {"steps": 2, "l2_weight": 1.0, "log_every": 1}})
    train(config_from_dict(raw), tmp_path / "r", stage="autoencoder")
    rows = [json.loads(x) for x in (tmp_path / "r" / "autoencoder" / "metrics.jsonl").read_text().splitlines()]
    l2 = [r["l2"] for r in rows if "l2" in r]
    assert len(l2) == 2 and all(v > 0 for v in l2)
    bad = tiny_config(phantoms, training={"autoencoder": {"l2_weight": -1.0}})
    with pytest.raises(ConfigError, match="l2_weight"):
        config_from_dict(bad)


def test_bad_case_is_reported_and_skipped(phantoms, tmp_path, caplog):
    from medsynth.manifest import load_manifest, save_manifest

    man = load_manifest(phantoms)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    man.cases[0].image = broken
    path = save_manifest(man, tmp_path / "manifest.json")
    cfg = config_from_dict(tiny_config(path, data={"val_fraction": 0.0}))
    with caplog.at_level("WARNING", logger="medsynth"):
        data = prepare_data(cfg)
    assert len(data.train) == 7 and data.info["skipped"] == [man.cases[0].id]
    assert f"skipping case {man.cases[0].id}" in caplog.text and "broken.nii.gz" in caplog.text


def test_class_label_outside_the_model_is_refused(phantoms):
    cfg = config_from_dict(tiny_config(phantoms))
    cfg.model.unet.num_class_embeds = 1  # bypasses the >= 2 rule on purpose: class 1 is now out of range
    with pytest.raises(ManifestError, match=r"class_label\(s\) \[1\] outside the model's classes 0..0"):
        prepare_data(cfg)


def test_training_needs_a_manifest():
    with pytest.raises(ConfigError, match=r"data.manifest: not set"):
        train(config_from_dict(tiny_config(None)), "/nonexistent/run")


def test_perceptual_loss_loads_only_a_local_weights_file(tmp_path):
    from monai.networks.nets import resnet10
    from medsynth.model.perceptual import LocalMedicalNetPerceptualLoss

    net = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type="B", bias_downsample=False)
    weights = tmp_path / "resnet10.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, weights)
    loss = LocalMedicalNetPerceptualLoss(weights, "resnet10")
    x = torch.randn(1, 1, 16, 16, 16, requires_grad=True)
    val = loss(x, torch.randn(1, 1, 16, 16, 16))
    val.backward()
    assert val.ndim == 0 and torch.isfinite(val) and x.grad is not None
    assert not any(p.requires_grad for p in loss.parameters())
    with pytest.raises(ConfigError, match=r"perceptual_weights: .*missing.pt not found"):
        LocalMedicalNetPerceptualLoss(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match=r"does not fit a MONAI resnet18"):
        LocalMedicalNetPerceptualLoss(weights, "resnet18")


def test_diffusion_targets_follow_the_objective():
    from medsynth.model.networks import build_scheduler
    from medsynth.model.objectives import diffusion_batch

    cfg = config_from_dict(tiny_config(None, training={"diffusion": {"prediction_type": "v_prediction"}}))
    mu, sigma = torch.randn(4, 2, 8, 8, 8), torch.zeros(4, 2, 8, 8, 8)
    classes, idx = torch.tensor([0, 1, -1, 1]), torch.arange(4)
    for kind in ("ddpm", "rflow"):
        sched = build_scheduler(kind, cfg.training.diffusion, 512)
        g = torch.Generator().manual_seed(0)
        x_t, t, target, labels = diffusion_batch(kind, sched, mu, sigma, classes, idx, 1.0, g, 0.0, 2)
        g = torch.Generator().manual_seed(0)
        torch.randn(mu.shape, generator=g)  # the (zero-sigma) posterior draw
        noise = torch.randn(mu.shape, generator=g)
        expect = sched.get_velocity(mu, noise, t) if kind == "ddpm" else mu - noise
        assert torch.allclose(target, expect, atol=1e-6)
        assert labels.tolist() == [0, 1, 2, 1]  # unlabelled cases train the null class
