"""Sampling: reproducibility, batch independence, geometry, sidecars, resume, refusals, tiled decode."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth.config import config_from_dict
from medsynth.data.transforms import target_affine
from medsynth.errors import CheckpointError, ConfigError, JobError
from medsynth.jobs import sample_seed, write_json
from medsynth.model.checkpoint import RunPaths
from medsynth.model.sample import Sampler, generate
from medsynth.model.train import train
from medsynth.samples import list_samples

from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def run(phantoms, tmp_path_factory) -> Path:
    """A trained class-conditional tiny run (DDPM objective, 20 timesteps)."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(config_from_dict(tiny_config(phantoms)), out)
    return out


def _voxels(folder: Path) -> dict[int, np.ndarray]:
    return {s.sidecar["index"]: np.asarray(nib.load(s.image_path).dataobj) for s in list_samples(folder)}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(run, tmp_path):
    generate(run, tmp_path / "a", range(2), seed=3)
    generate(run, tmp_path / "b", range(2), seed=3)
    generate(run, tmp_path / "c", range(2), seed=4)
    for name in ("synth-tiny-00000.nii.gz", "synth-tiny-00001.nii.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


@pytest.mark.parametrize("scheduler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_sample_i_is_identical_whatever_the_batch_size_or_other_indices(run, tmp_path, scheduler, eta):
    """Exact equality of the saved voxels: batch 1 vs 2 vs 3, and index 2 sampled alone.
    DDPM (all 20 steps) and DDIM with eta=1 add noise at every step: per-sample generators."""
    from medsynth.model.sample import Sampler

    sampler = Sampler.from_run(run)
    steps = 20 if scheduler == "ddpm" else 2
    kw = dict(seed=7, scheduler=scheduler, steps=steps, eta=eta, sampler=sampler)
    generate(run, tmp_path / "b1", range(3), batch_size=1, **kw)
    generate(run, tmp_path / "b2", range(3), batch_size=2, **kw)
    generate(run, tmp_path / "b3", range(3), batch_size=3, **kw)
    generate(run, tmp_path / "alone", [2], batch_size=1, **kw)
    a, b, c, alone = (_voxels(tmp_path / d) for d in ("b1", "b2", "b3", "alone"))
    for i in range(3):
        assert np.array_equal(a[i], b[i]) and np.array_equal(a[i], c[i])
    assert np.array_equal(alone[2], a[2])
    assert not np.array_equal(a[0], a[1])


def test_saved_geometry_units_and_sidecar(run, tmp_path):
    generate(run, tmp_path / "s", range(3), seed=5)
    cfg = config_from_dict(tiny_config(None))
    expected = target_affine(cfg.data)
    samples = list_samples(tmp_path / "s")
    diffusion_sha = json.loads((run / "model_card.json").read_text())["checkpoints"]["diffusion"]["sha256"]
    for s in samples:
        img = nib.load(s.image_path)
        assert np.allclose(img.affine, expected) and not np.allclose(img.affine, np.eye(4))
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert img.header.get_zooms() == (20.0, 20.0, 20.0) and img.shape == (16, 16, 16)
        assert img.get_data_dtype() == np.float32
        arr = np.asarray(img.dataobj)
        assert arr.min() >= -1000.0 and arr.max() <= 1000.0  # HU, inside the training window
        side = s.sidecar
        i = side["index"]
        assert side["seed"] == 5 and side["sample_seed"] == sample_seed(5, i)
        assert side["class"] == i % 2 and side["steps"] == 2 and side["scheduler"] == "ddim"
        assert side["guidance"] == 2.0 and side["checkpoint_sha256"] == diffusion_sha
        assert side["config_hash"] and side["versions"]["torch"] and side["run"] == "tiny"
        assert side["units"] == "HU" and side["modality"] == "CT" and side["spacing"] == [20.0, 20.0, 20.0]


def test_class_option_and_resume_skips_existing_samples(run, tmp_path):
    out = tmp_path / "s"
    res = generate(run, out, range(2), seed=1, class_label=1)
    assert [s.sidecar["class"] for s in list_samples(out)] == [1, 1]
    before = (out / "synth-tiny-00000.nii.gz").stat().st_mtime_ns
    res = generate(run, out, range(3), seed=1, class_label=1)
    assert res.skipped == ["synth-tiny-00000", "synth-tiny-00001"] and res.written == ["synth-tiny-00002"]
    assert (out / "synth-tiny-00000.nii.gz").stat().st_mtime_ns == before
    with pytest.raises(JobError, match=r"sample 0 exists with different settings \(seed"):
        generate(run, out, range(1), seed=2, class_label=1)


def test_refusals_before_any_compute(run, tmp_path):
    with pytest.raises(CheckpointError, match=r"`class_label=2`: this model knows classes 0..1"):
        generate(run, tmp_path / "x", range(1), class_label=2)
    with pytest.raises(ConfigError, match=r"DDPM samples with all 20 training timesteps"):
        generate(run, tmp_path / "x", range(1), scheduler="ddpm", steps=10)
    steps_0 = r"^`steps` must be between 1 and 20 \(the training timesteps\), got 0$"
    with pytest.raises(ConfigError, match=steps_0) as exc:
        generate(run, tmp_path / "x", range(1), steps=0)
    assert exc.value.param == "steps" and "--steps" not in str(exc.value)  # a Python caller reads the parameter
    with pytest.raises(ConfigError, match=r"trained with objective 'ddpm'"):
        generate(run, tmp_path / "x", range(1), scheduler="rflow")
    with pytest.raises(CheckpointError, match=r"run directory not found"):
        generate(tmp_path / "nope", tmp_path / "x", range(1))
    assert not (tmp_path / "x").exists()


def _copy_run(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst)
    return dst


def test_damaged_or_inconsistent_run_is_refused(run, tmp_path):
    r = _copy_run(run, tmp_path / "r1")
    (r / "diffusion" / "last.pt").unlink()
    with pytest.raises(CheckpointError, match=r"diffusion/last.pt: diffusion checkpoint not found"):
        Sampler.from_run(r)

    r = _copy_run(run, tmp_path / "r2")
    (r / "diffusion" / "last.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"not a readable checkpoint"):
        Sampler.from_run(r)

    r = _copy_run(run, tmp_path / "r3")
    card = json.loads((r / "model_card.json").read_text())
    card["input_contract"]["spacing"] = [1.0, 1.0, 1.0]
    write_json(r / "model_card.json", card)
    with pytest.raises(CheckpointError, match=r"model card inconsistent .*input_contract.spacing"):
        Sampler.from_run(r)

    r = _copy_run(run, tmp_path / "r4")
    ck = torch.load(r / "diffusion" / "last.pt", weights_only=True)
    ck["step"] = 1
    torch.save(ck, r / "diffusion" / "last.pt")
    with pytest.raises(CheckpointError, match=r"diffusion training is incomplete \(step 1 of 4\)"):
        Sampler.from_run(r)

    r = _copy_run(run, tmp_path / "r5")
    (r / "model_card.json").unlink()
    with pytest.raises(CheckpointError, match=r"model card missing"):
        Sampler.from_run(r)


def test_unconditional_model_refuses_class_and_guidance(phantoms, tmp_path):
    raw = tiny_config(phantoms, model={"unet": {"num_class_embeds": None}},
                      training={"autoencoder": {"steps": 1, "adv_weight": 0.0}, "diffusion": {"steps": 1}},
                      sampling={"guidance_scale": 1.0})
    train(config_from_dict(raw), tmp_path / "u")
    with pytest.raises(CheckpointError, match=r"`class_label=0`: this model is unconditional"):
        generate(tmp_path / "u", tmp_path / "s", range(1), class_label=0)
    with pytest.raises(CheckpointError, match=r"classifier-free guidance needs a class-conditional model"):
        generate(tmp_path / "u", tmp_path / "s", range(1), guidance=3.0)
    generate(tmp_path / "u", tmp_path / "s", range(1))
    assert list_samples(tmp_path / "s")[0].sidecar["class"] is None


def test_tiled_decode_approximates_full_decode():
    """Sliding-window decode over a 16³ latent (gaussian blending) against one whole-volume decode,
    tiny random-init autoencoder at 32³.  Tiles see less context and their own GroupNorm
    statistics, so the difference shrinks as tiles grow; a tile covering the latent is exact."""
    cfg = config_from_dict(tiny_config(None, data={"shape": [32, 32, 32]}))
    sampler = Sampler.untrained(cfg, seed=0)
    z = torch.randn((1, 2, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    tiling = sampler.cfg.sampling.tiling
    tiling.enabled = False
    full = sampler.decode(z)
    tiling.enabled, tiling.overlap = True, 0.5
    errs = {}
    for roi in (6, 12, 16):
        tiling.latent_roi = (roi, roi, roi)
        tiled = sampler.decode(z)
        assert tiled.shape == full.shape == (1, 1, 32, 32, 32)
        errs[roi] = (float((full - tiled).abs().max()), float((full - tiled).abs().mean()))
    print("tiled vs full decode (max, mean |diff|; output std %.3f): %s" % (float(full.std()), errs))
    assert errs[16] == (0.0, 0.0)
    assert errs[12][1] < errs[6][1] and errs[12][1] < 0.15 * float(full.std())


def test_cli_train_then_generate_end_to_end(phantoms, tmp_path, run_cli):
    import yaml

    cfg = tmp_path / "tiny.yaml"
    raw = tiny_config(None, training={"autoencoder": {"steps": 2}, "diffusion": {"steps": 2}})
    cfg.write_text(yaml.safe_dump(raw))
    code, out, err = run_cli("--no-progress", "train", cfg, "--run", tmp_path / "run", "--manifest", phantoms)
    assert code == 0, err
    assert "autoencoder: 2 steps" in out and "diffusion: 2 steps" in out and "model_card.json" in out
    assert "autoencoder epoch 1/" in err  # one summary line per epoch
    code, out, err = run_cli("generate", tmp_path / "run", "-n", "2", "--out", tmp_path / "s", "--seed", "1")
    assert code == 0, err
    assert "wrote 2 samples" in out
    assert len(list_samples(tmp_path / "s")) == 2
    code, out, err = run_cli("generate", tmp_path / "run", "-n", "1", "--out", tmp_path / "s", "--class", "5")
    assert code == 4 and err.startswith("medsynth: error: --class 5") and "Traceback" not in err
    code, out, err = run_cli("generate", tmp_path / "run", "-n", "1", "--out", tmp_path / "s", "--steps", "0")
    assert code == ConfigError.exit_code and err.startswith("medsynth: error: --steps must be between 1 and ")
    assert "`" not in err and "Traceback" not in err  # a CLI user reads the flag
    code, out, err = run_cli("train", cfg, "--run", tmp_path / "run2")
    assert code == 2 and "data.manifest: not set" in err
