"""Two experts: ``medsynth generate RUN --low-noise-run RUN2 --handover T`` (``Sampler.hand_over``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medsynth.config import ConfigError, config_from_dict
from medsynth.errors import JobError
from medsynth.model.sample import Sampler, generate
from medsynth.model.train import train
from medsynth.samples import list_samples

from tests.helpers import tiny_config


def _cfg(phantoms, **unet):
    raw = tiny_config(phantoms, data={"use_labels": True}, model={"unet": unet},
                      training={"scheduler": "rflow"}, sampling={"scheduler": "rflow", "eta": 1.0})
    raw["model"]["autoencoder"] = {"kind": "wavelet", "wavelet_levels": 1, "wavelet_label_bands": "low"}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def experts(phantoms, tmp_path_factory):
    """A plain run and a gated-skip run trained on a copy of its latent."""
    root = tmp_path_factory.mktemp("experts")
    train(_cfg(phantoms), root / "high")
    (root / "low").mkdir()
    shutil.copytree(root / "high" / "autoencoder", root / "low" / "autoencoder")
    train(_cfg(phantoms, gated_skip=True), root / "low", stage="diffusion")
    return root / "high", root / "low"


def _arrays(folder):
    return {s.sidecar["index"]: s.load().array for s in list_samples(folder)}


def test_handover_uses_each_expert_on_its_own_times_and_is_per_sample(experts, tmp_path):
    high, low = experts
    generate(high, tmp_path / "h", range(3), seed=5, steps=4)
    generate(low, tmp_path / "l", range(3), seed=5, steps=4)
    generate(high, tmp_path / "x", range(3), seed=5, steps=4, batch_size=2, low_noise_run=low, handover=0.5)
    generate(high, tmp_path / "y", [2, 0, 1], seed=5, steps=4, batch_size=1, low_noise_run=low, handover=0.5)
    h, lo, x, y = (_arrays(tmp_path / d) for d in "hlxy")
    assert all(np.array_equal(x[i], y[i]) for i in range(3))       # sample i depends on (seed, i) only
    assert all(not np.array_equal(x[i], h[i]) and not np.array_equal(x[i], lo[i]) for i in range(3))
    side = json.loads(next((tmp_path / "x").glob("synth-*0.json")).read_text())
    assert side["low_noise_expert"]["below"] == 0.5
    assert side["low_noise_expert"]["checkpoint_sha256"] == Sampler.from_run(low).provenance["checkpoint_sha256"]
    # resuming the folder with another hand-over time is refused, not mixed
    with pytest.raises(JobError, match="different settings"):
        generate(high, tmp_path / "x", range(4), seed=5, steps=4, low_noise_run=low, handover=0.3)
    # a hand-over time below every sampling step leaves the high-noise expert alone
    generate(high, tmp_path / "z", range(1), seed=5, steps=4, low_noise_run=low, handover=1e-6)
    assert np.array_equal(_arrays(tmp_path / "z")[0], h[0])


def test_an_expert_on_another_latent_or_a_bad_time_is_refused(experts, phantoms, tmp_path):
    high, low = experts
    other = tmp_path / "other"
    raw = tiny_config(phantoms, data={"use_labels": True}, training={"scheduler": "rflow"},
                      sampling={"scheduler": "rflow"})
    train(config_from_dict(raw), other)  # the KL autoencoder: another latent
    with pytest.raises(ConfigError, match="cannot be the low-noise expert"):
        Sampler.from_run(high).hand_over(Sampler.from_run(other), 0.5)
    with pytest.raises(ConfigError, match="0 < value < 1"):
        Sampler.from_run(high).hand_over(Sampler.from_run(low), 1.0)


def test_cli_generates_with_two_experts_and_refuses_masks(experts, run_cli, tmp_path):
    high, low = experts
    code, out, err = run_cli("generate", high, "--low-noise-run", low, "--handover", "0.4", "--steps", "4", "-n", "2",
                             "--out", tmp_path / "s", "--no-progress")
    assert code == 0, err
    assert len(list_samples(tmp_path / "s")) == 2
    code, out, err = run_cli("generate", high, "--low-noise-run", low, "--masks", tmp_path, "-n", "1",
                             "--out", tmp_path / "m")
    assert code != 0 and "--low-noise-run does not combine" in err and "Traceback" not in err
