"""Membership-inference audit: an over-fitted tiny model is caught, the same model with noise-only
weights is not, reports carry no case ids, and bad inputs are refused with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medsynth.errors import ConfigError, ManifestError
from medsynth.privacy.audit import (
    AuditSettings,
    auc_with_ci,
    audit_membership,
    control_audit,
    load_audit_inputs,
)
from tests.helpers_release import inputs

FAST = AuditSettings(timesteps=(0.05, 0.2, 0.5), draws=2, n_synthetic=4, bootstrap=500)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return inputs(tmp_path_factory.getbasetemp() / "release-inputs")


@pytest.fixture(scope="module")
def loaded(built):
    return load_audit_inputs(built["run"], built["train"], built["holdout"])


def test_auc_and_bootstrap_interval():
    auc, ci = auc_with_ci([3.0, 4.0, 5.0], [0.0, 1.0, 2.0], 500, 0)
    assert auc == 1.0 and ci == (1.0, 1.0)
    auc, ci = auc_with_ci([1.0, 4.0, 2.0], [2.0, 3.0], 500, 0)  # 2 wins and a tie of 6 pairs
    assert auc == pytest.approx(2.5 / 6) and ci[0] < auc < ci[1]
    from medsynth.evaluate.stats import binary_auc

    rng = np.random.default_rng(1)
    a, b = rng.normal(0.3, 1, 9), rng.normal(0, 1, 13)
    assert auc_with_ci(a, b, 100, 0)[0] == pytest.approx(binary_auc(np.r_[a, b], np.r_[[True] * 9, [False] * 13]))


def test_overfitted_model_gives_a_high_auc_and_noise_weights_about_half(loaded):
    sampler, members, nonmembers, notes = loaded
    assert len(members) == 4 and len(nonmembers) == 8
    rep = audit_membership(sampler, members, nonmembers, FAST)
    loss = rep["attacks"]["denoising_loss"]
    assert loss["auc"] >= 0.9 and loss["ci95"][0] > 0.5, loss
    assert rep["verdict"].startswith("membership leaks") and rep["worst"]["attack"] == "denoising loss"
    assert len(loss["per_timestep"]) == 3
    # the same model with noise-only weights: the attacks should not beat chance
    ctl = control_audit(sampler, members, nonmembers, FAST)
    for key, a in ctl["attacks"].items():
        assert len(a["per_draw"]) == 3
        assert abs(a["mean_auc"] - 0.5) <= 0.2, (key, a)


def test_report_holds_sorted_figures_and_no_case_id(built, tmp_path, run_cli):
    code, out, err = run_cli("audit", built["run"], "--manifest", built["train"], "--holdout", built["holdout"],
                             "--out", tmp_path, "--n-synthetic", "2", "--draws", "1")
    assert code == 0, err
    assert "membership inference: 4 training vs 8 held-out real cases" in out and "denoising loss" in out
    text = (tmp_path / "audit.json").read_text()
    rep = json.loads(text)
    near = rep["attacks"]["nearest_synthetic"]
    assert near["n_synthetic"] == 2 and len(near["member_distance"]) == 4
    assert near["member_distance"] == sorted(near["member_distance"])
    assert rep["cases"]["members"].startswith("the run's training split")
    assert "phantom-" not in text and str(built["root"]) not in text  # no case id, no path


def test_wrong_manifest_too_few_cases_and_bad_settings_are_refused(built, tmp_path, run_cli):
    # the hold-out manifest is not what the run trained on
    code, _, err = run_cli("audit", built["run"], "--manifest", built["holdout"], "--holdout", built["holdout"])
    assert code == ManifestError.exit_code and "gives 8 readable training cases, the run trained on 4" in err
    assert "Traceback" not in err
    # every hold-out case is a training file: nothing unseen remains
    code, _, err = run_cli("audit", built["run"], "--manifest", built["train"], "--holdout", built["train"])
    assert code == ManifestError.exit_code and "at least 2 readable training cases and 2 hold-out cases" in err
    with pytest.raises(ConfigError, match="fractions strictly between 0 and 1"):
        AuditSettings(timesteps=(0.0, 0.5)).check()
    code, _, err = run_cli("audit", tmp_path / "nope", "--manifest", built["train"], "--holdout", built["holdout"])
    assert code == 4 and "run directory not found" in err


def test_samples_folder_off_the_grid_is_refused(built, loaded, tmp_path):
    from medsynth.privacy.audit import load_synthetic
    from medsynth.samples import write_sample
    from medsynth.volume import Volume, affine_from_spacing

    write_sample(tmp_path, "synth-x-00000", Volume(np.zeros((8, 8, 8), np.float32),
                                                   affine_from_spacing((20.0,) * 3, (8, 8, 8), "RAS"), "CT", "HU"),
                 {"index": 0})
    with pytest.raises(ManifestError, match=r"not on the run's grid \[16, 16, 16\]"):
        load_synthetic(tmp_path, loaded[0].cfg)
    shutil.rmtree(tmp_path)
