"""Stage 1's reconstruction check (medsynth.model.recon_check): the QC gate run on the autoencoder's
own reconstructions, stored in the checkpoint, the metrics log and the model card."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from scipy import ndimage

from medsynth.config import config_from_dict
from medsynth.jobs import RunPaths
from medsynth.model.checkpoint import load_checkpoint
from medsynth.model.networks import build_autoencoder
from medsynth.model.recon_check import reconstruction_qc
from medsynth.model.train import train
from medsynth.model.training_data import prepare_data

from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """8 phantoms on the demo's grid (32 x 32 x 24 at 10 x 10 x 14 mm): at the tests' usual 20 mm the
    fat layer is thinner than a voxel, so lung labels touch the air even in the real cases."""
    from medsynth.data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("chest"), 8, 0, (32, 32, 24), (10.0, 10.0, 14.0))


def _paired_wavelet(manifest):
    raw = tiny_config(manifest, data={"use_labels": True, "val_fraction": 0.25, "shape": [32, 32, 24],
                                      "spacing": [10.0, 10.0, 14.0],
                                      "labels": {"background": 0, "lung": 1, "lesion": 2}})
    raw["model"]["autoencoder"] = {"kind": "wavelet", "wavelet_levels": 1}
    return config_from_dict(raw)


class _Blurred(torch.nn.Module):
    """An exact autoencoder whose decoder blurs the image channel (what an under-trained one does)."""

    def __init__(self, exact: torch.nn.Module):
        super().__init__()
        self.exact = exact

    def encode(self, x):
        return self.exact.encode(x)

    def decode(self, z):
        out = self.exact.decode(z).clone()
        out[:, 0] = torch.from_numpy(ndimage.gaussian_filter(out[:, 0].numpy(), (0, 1.5, 1.5, 1.5)))
        return out


def test_exact_reconstructions_of_the_training_cases_pass(chest):
    cfg = _paired_wavelet(chest)
    data = prepare_data(cfg)
    res = reconstruction_qc(build_autoencoder(cfg), cfg, data, torch.device("cpu"), "fp32")
    assert res["n_cases"] == len(data.train) + len(data.val) == 8
    assert res["reference_cases"] == len(data.train)
    train_cases = [c for c in res["cases"] if c["split"] == "train"]
    # a lossless latent reproduces each reference case, so every one of them passes the gate
    assert train_cases and all(c["passed"] for c in train_cases), train_cases
    # validation cases come first (held out from the ranges)
    assert [c["split"] for c in res["cases"][:len(data.val)]] == ["val"] * len(data.val)


def test_a_blurring_decoder_fails_and_warns(chest, caplog):
    cfg = _paired_wavelet(chest)
    data = prepare_data(cfg)
    with caplog.at_level(logging.WARNING, logger="medsynth.model.train"):
        from medsynth.model.recon_check import report

        res = reconstruction_qc(_Blurred(build_autoencoder(cfg)), cfg, data, torch.device("cpu"), "fp32",
                                max_cases=4)
        report(res)
    assert res["n_cases"] == 4 and res["n_passed"] == 0
    assert res["reasons"].get("body_p99_out_of_range") == 4  # bone blurred away
    assert all(c["body_p99"] < 500 for c in res["cases"])
    assert "0 of 4 reconstructions pass the QC gate" in caplog.text and "body_p99_out_of_range 4" in caplog.text


def test_training_stores_the_verdict_in_checkpoint_metrics_and_card(phantoms, tmp_path):
    out = tmp_path / "run"
    train(config_from_dict(tiny_config(phantoms, data={"use_labels": True})), out)
    paths = RunPaths(out)
    rq = load_checkpoint(paths.checkpoint("autoencoder"), "autoencoder")["reconstruction_qc"]
    assert rq["n_cases"] == 8 and 0 <= rq["n_passed"] <= 8 and len(rq["cases"]) == 8
    assert all(set(c) == {"split", "index", "passed", "reasons", "body_p99"} for c in rq["cases"])
    lines = [json.loads(x) for x in paths.metrics("autoencoder").read_text().splitlines()]
    assert [x["reconstruction_qc"] for x in lines if "reconstruction_qc" in x] == [rq]
    card = json.loads(paths.card.read_text())
    assert card["metrics"]["autoencoder_reconstruction_qc"] == {k: rq[k] for k in ("n_cases", "n_passed", "reasons")}
