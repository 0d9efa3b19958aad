"""``medsynth export-bundle``: a MONAI bundle that ``python -m monai.bundle run`` samples from, giving
the volumes ``medsynth generate`` gives; licences of initial weights travel to bundles and exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medsynth.config import config_from_dict
from medsynth.model.networks import build_autoencoder, seeded_init
from medsynth.model.train import train
from medsynth.samples import read_sample
from tests.helpers import tiny_config

LICENSE = "NVIDIA Open Model License"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, phantoms) -> Path:
    """A paired tiny run whose autoencoder is a pretrained file used as is (licence recorded)."""
    root = tmp_path_factory.mktemp("bundle_run")
    paired = {"use_labels": True, "labels": {"background": 0, "lung": 1, "lesion": 2}}
    raw = tiny_config(phantoms, data=paired, training={"autoencoder": {"steps": 0}, "diffusion": {"steps": 2}})
    with seeded_init(7):
        ae = build_autoencoder(config_from_dict(tiny_config(phantoms, data=paired)))
    torch.save(ae.state_dict(), root / "autoencoder_v1.pt")
    raw["model"]["autoencoder"].update(init=str(root / "autoencoder_v1.pt"), init_license=LICENSE)
    train(config_from_dict(raw), root / "run")
    return root / "run"


def test_monai_bundle_run_samples_what_generate_samples(run_dir, tmp_path, run_cli):
    code, out, err = run_cli("generate", run_dir, "-n", 2, "--start", 1, "--seed", 3, "--out", tmp_path / "gen")
    assert code == 0, err
    code, out, err = run_cli("export-bundle", run_dir, "--out", tmp_path / "bundle")
    assert code == 0, err
    assert "python -m monai.bundle run --config_file configs/inference.json" in out
    bundle = tmp_path / "bundle"
    for rel in ("configs/metadata.json", "configs/inference.json", "configs/medsynth.yaml", "configs/model_card.json",
                "models/autoencoder.pt", "models/diffusion_unet.pt", "docs/README.md"):
        assert (bundle / rel).is_file(), rel
    assert "$" not in (bundle / "configs" / "inference.json").read_text()  # no code in the config

    # the same thread count as this process's generate: a different one changes fp32 summation order
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                           "--meta_file", "configs/metadata.json", "--num_samples", "2", "--start", "1",
                           "--seed", "3", "--device", "cpu"],
                          cwd=bundle, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    gen = sorted((tmp_path / "gen").glob("*.json"))
    assert [p.name for p in gen] == ["synth-tiny-00001.json", "synth-tiny-00002.json"]
    for side in gen:
        a, b = read_sample(side), read_sample(bundle / "samples" / side.name)
        assert b.sidecar["index"] == a.sidecar["index"] and b.sidecar["class"] == a.sidecar["class"]
        va, vb = a.load(), b.load()
        np.testing.assert_array_equal(va.affine, vb.affine)
        assert vb.units == "HU"
        # HU; fp32 rounding at most (0.0026 HU measured when the two ran with 1 vs 2 threads)
        np.testing.assert_allclose(vb.array, va.array, rtol=0, atol=1e-2)
        la, lb = a.load_label(), b.load_label()
        np.testing.assert_array_equal(la.array, lb.array)
        assert b.sidecar["checkpoint_sha256"] == a.sidecar["checkpoint_sha256"]


def test_bundle_metadata_carries_the_model_card(run_dir, tmp_path):
    from medsynth.export.bundle import export_bundle
    from medsynth.model.init_weights import read_init

    res = export_bundle(run_dir, tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text())
    card = json.loads((run_dir / "model_card.json").read_text())
    assert meta["input_contract"] == card["input_contract"]
    assert meta["intended_use"] == "research only, not for clinical use"
    assert "medsynth" in meta["optional_packages_version"]
    assert meta["network_data_format"]["outputs"]["pred"]["spatial_shape"] == [16, 16, 16]
    assert meta["licenses"] == [{"component": "autoencoder", "license": LICENSE, "file": "autoencoder_v1.pt",
                                 "sha256": card["initial_weights"]["autoencoder"]["sha256"]}]
    assert LICENSE in (tmp_path / "b" / "docs" / "README.md").read_text()
    shared = yaml.safe_load((tmp_path / "b" / "configs" / "medsynth.yaml").read_text())
    assert shared["data"]["manifest"] is None and shared["model"]["autoencoder"]["init"] == "autoencoder_v1.pt"
    assert str(tmp_path.parent) not in (tmp_path / "b" / "configs" / "medsynth.yaml").read_text()
    # the bundle's weights are NV-Generate-style files: a new run can start from the bundle folder
    unet = read_init(tmp_path / "b", "unet")
    assert unet.path.name == "diffusion_unet.pt" and unet.scale_factor == pytest.approx(card["latent"]["scale_factor"])
    assert "models/autoencoder.pt" in res.files


def test_export_bundle_refusals(run_dir, tmp_path, run_cli):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, _, err = run_cli("export-bundle", run_dir, "--out", tmp_path / "full")
    assert code == 5 and "already exists and is not empty" in err and "Traceback" not in err
    code, _, err = run_cli("export-bundle", tmp_path / "no_run", "--out", tmp_path / "b")
    assert code == 4 and "run directory not found" in err


def test_export_carries_the_initial_weights_licence(run_dir, tmp_path, run_cli):
    assert run_cli("generate", run_dir, "-n", 1, "--out", tmp_path / "s")[0] == 0
    code, _, err = run_cli("export", tmp_path / "s", "--out", tmp_path / "ds", "--format", "nifti", "--force",
                             "--run", run_dir)
    assert code == 0, err
    ds = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert LICENSE in ds["licence"] and ds["weights_licenses"][0]["component"] == "autoencoder"
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["weights_licenses"] == ds["weights_licenses"] and LICENSE in manifest["licence"]
