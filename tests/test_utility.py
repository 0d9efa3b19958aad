"""Train-on-synthetic / test-on-real utility evaluation: split and leakage checks, statistics, every
arm trained and scored, report files, CLI, segmentation, generation through the engine + QC gate.

Tiny settings: 16³ grid, a handful of optimiser steps, 200 bootstrap resamples.  "Synthetic"
samples for the arm tests are phantoms drawn from seeds the real set does not use, written in the
samples format on the run's grid with QC verdicts; the last test generates real samples from a
tiny trained run and passes them through the real QC gate.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.config import config_from_dict, dump_yaml
from medsynth.data.phantoms import make_phantom, write_phantoms
from medsynth.errors import CheckpointError, ConfigError, ManifestError, MedsynthError
from medsynth.evaluate import stats
from medsynth.evaluate.classifier import Budget, build_classifier
from medsynth.evaluate.split import check_disjoint, split_manifest
from medsynth.evaluate.synthetic import select_samples
from medsynth.evaluate.utility import (
    ARMS,
    UtilityOptions,
    evaluate_utility,
    reduced_indices,
)
from medsynth.jobs import write_json
from medsynth.manifest import Case, Manifest, load_manifest, save_manifest
from medsynth.samples import write_sample

GRID = {"shape": [16, 16, 16], "spacing": [20.0, 20.0, 20.0], "orientation": "RAS",
        "intensity": {"window": [-1000.0, 1000.0]}, "cache": "memory"}
TINY_MODEL = {"autoencoder": {"channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 8,
                              "latent_channels": 2},
              "unet": {"channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 8,
                       "num_head_channels": 8, "num_class_embeds": 2}}


@pytest.fixture(autouse=True)
def one_thread():
    # two intra-op threads on a busy 2-core machine are many times slower than one for these tiny nets
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(manifest: Path | None, **data):
    raw = {"name": "ut", "data": {**GRID, "manifest": str(manifest) if manifest else None, **data},
           "model": TINY_MODEL,
           "training": {"device": "cpu", "precision": "fp32",
                        "autoencoder": {"steps": 2, "batch_size": 2, "disc_layers": 2, "adv_start": 1,
                                        "val_every": 1, "log_every": 1},
                        "diffusion": {"steps": 2, "batch_size": 2, "val_every": 1, "log_every": 1,
                                      "num_train_timesteps": 100}},
           "sampling": {"scheduler": "ddim", "steps": 2, "batch_size": 2, "guidance_scale": 1.0}}
    return config_from_dict(raw)


def _run_dir(root: Path, manifest: Path | None, **data) -> Path:
    run = root
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(dump_yaml(_config(manifest, **data)))
    return run


def _write_synthetic(out: Path, n: int, start_seed: int = 10**6, verdicts=None) -> Path:
    """Phantoms from unused seeds on the run's grid, in the samples format (float32 HU + label)."""
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, lab, cls = make_phantom(start_seed + i, (16, 16, 16), (20.0, 20.0, 20.0), lesion=bool(i % 2),
                                     orientation="RAS")
        sid = f"synth-ut-{i:05d}"
        write_sample(out, sid, img.with_array(img.array.astype(np.float32)),
                     {"index": i, "seed": start_seed + i, "class": cls}, label=lab)
        v = True if verdicts is None else verdicts(i)
        if v is not None:
            write_json(out / f"{sid}.qc.json", {"passed": v, "reasons": [] if v else ["artefact"]})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("utility")
    man = write_phantoms(root / "phantoms", 16, seed=0, shape=(32, 32, 24), spacing=(10.0, 10.0, 14.0))
    train, test = split_manifest(man, root / "split", 0.25, seed=0)
    # sample 0 fails QC, sample 2 has no verdict: neither may be used
    samples = _write_synthetic(root / "samples", 10,
                               verdicts=lambda i: False if i == 0 else (None if i == 2 else True))
    run = _run_dir(root / "run", train)
    return {"root": root, "manifest": man, "train": train, "test": test, "samples": samples, "run": run}


def _opts(**kw) -> UtilityOptions:
    base = dict(n_synthetic=3, repeats=2, seed=0, budget=Budget(steps=3, batch_size=4), bootstrap=200)
    base.update(kw)
    return UtilityOptions(**base)


# --------------------------------------------------------------------------------------------
# split and leakage
# --------------------------------------------------------------------------------------------


def test_split_is_stratified_deterministic_and_disjoint(data, tmp_path):
    full = load_manifest(data["manifest"])
    train, test = load_manifest(data["train"]), load_manifest(data["test"])
    assert {c.id for c in train.cases}.isdisjoint({c.id for c in test.cases})
    assert {c.sha256 for c in train.cases}.isdisjoint({c.sha256 for c in test.cases})
    assert len(train.cases) + len(test.cases) == len(full.cases)
    assert sorted(c.class_label for c in test.cases) == [0, 0, 1, 1]  # 25% of 8 per class
    # same split from a reordered manifest (order-independent), and images are not copied
    rev = Manifest(list(reversed(full.cases)), name=full.name, modality=full.modality)
    _, test2 = split_manifest(rev, tmp_path / "again", 0.25, seed=0)
    assert sorted(c.id for c in load_manifest(test2).cases) == sorted(c.id for c in test.cases)
    assert {c.image for c in load_manifest(test2).cases} == {c.image for c in test.cases}
    # another seed gives another split
    _, test3 = split_manifest(full, tmp_path / "seed1", 0.25, seed=1)
    assert {c.id for c in load_manifest(test3).cases} != {c.id for c in test.cases}


def test_split_keeps_duplicate_images_on_one_side(data, tmp_path):
    full = load_manifest(data["manifest"])
    dup = [Case(id=f"copy-of-{c.id}", image=c.image, label=c.label, class_label=c.class_label,
                sha256=c.sha256) for c in full.cases[:4]]
    m = Manifest(full.cases + dup, name="with-dups", modality="CT")
    for seed in range(4):
        tr, te = split_manifest(m, tmp_path / f"s{seed}", 0.3, seed=seed)
        check_disjoint(load_manifest(tr), load_manifest(te))  # raises on a shared image


def test_overlapping_manifests_are_refused(data, tmp_path):
    train, test = load_manifest(data["train"]), load_manifest(data["test"])
    with pytest.raises(ManifestError, match=r"case id\(s\) in both"):
        check_disjoint(load_manifest(data["manifest"]), test)
    # the same image under another id, without a recorded sha256 (hashed from the file)
    sneaky = Case(id="renamed-case", image=test.cases[0].image, class_label=test.cases[0].class_label)
    leaky = save_manifest(Manifest([*train.cases, sneaky], name="leaky", modality="CT"), tmp_path / "leaky.json")
    with pytest.raises(ManifestError, match=r"1 test case\(s\) whose image is also in the train manifest"):
        check_disjoint(load_manifest(leaky), test)
    run = _run_dir(tmp_path / "run", data["train"])
    with pytest.raises(ManifestError, match="overlaps the train manifest"):
        evaluate_utility(run, leaky, data["test"], tmp_path / "out", _opts(samples=data["samples"]))


def test_generator_trained_on_test_cases_is_refused(data, tmp_path):
    run = _run_dir(tmp_path / "run", data["manifest"])  # the generator saw every case, test included
    with pytest.raises(ManifestError, match="generator's training manifest"):
        evaluate_utility(run, data["train"], data["test"], tmp_path / "out", _opts(samples=data["samples"]))
    # without synthetic arms the generator plays no part and is not checked
    res = evaluate_utility(run, data["train"], data["test"], tmp_path / "out2",
                           _opts(arms=["real"], repeats=1, budget=Budget(steps=1, batch_size=2)))
    assert res.report["leakage"]["generator"] == "not used"


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def test_classifier_stem_keeps_the_full_resolution_and_shift_defaults_per_task():
    # a 2-4 voxel finding (a 2.4-4.4 cm lesion at 10 mm) must reach the first block un-strided:
    # conv1 keeps the grid, only the max-pool halves it (the stride-2 stem quartered it)
    net = build_classifier(2)
    x = torch.zeros(1, 1, 16, 16, 12)
    assert net.conv1(x).shape[2:] == (16, 16, 12)
    assert net.maxpool(net.act(net.bn1(net.conv1(x)))).shape[2:] == (8, 8, 6)
    assert net.eval()(x).shape == (1, 2)
    assert Budget().shift_voxels("classify") == 3 and Budget().shift_voxels("segment") == 0
    assert Budget(shift=0).shift_voxels("classify") == 0 and Budget(shift=2).shift_voxels("segment") == 2
    assert Budget().to_dict("segment")["shift"] == 0 and Budget().to_dict()["shift"] is None


def test_auc_matches_monai_and_handles_ties():
    from monai.metrics import compute_roc_auc

    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 40)
        s = np.round(rng.random(40), 1)  # many ties
        want = compute_roc_auc(torch.tensor(s), torch.tensor(y))
        assert stats.binary_auc(s, y == 1) == pytest.approx(want)
    p = rng.random((30, 3))
    p /= p.sum(1, keepdims=True)
    y = rng.integers(0, 3, 30)
    want = compute_roc_auc(torch.tensor(p), torch.nn.functional.one_hot(torch.tensor(y), 3))
    assert stats.auc(p, y) == pytest.approx(want)
    assert stats.auc(np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([0, 1])) == 1.0
    assert math.isnan(stats.binary_auc(np.array([0.1, 0.2]), np.array([True, True])))
    # accuracy uses the fixed 0.5 threshold (arg-max), nothing tuned
    assert stats.accuracy(np.array([[0.6, 0.4], [0.49, 0.51], [0.5, 0.5]]), np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_dice_per_case():
    t = np.zeros((3, 4, 4, 4), int)
    p = np.zeros_like(t)
    t[0, :2] = 2
    p[0, :1] = 2           # half of the lesion found: 2*16/(16+32)
    p[1, 0, 0, 0] = 2      # false alarm where there is no lesion: 0
    d = stats.dice_per_case(p, t, [2])   # case 2: nothing anywhere -> undefined
    assert d[0] == pytest.approx(2 / 3) and d[1] == 0.0 and math.isnan(d[2])
    assert stats.mean_score(d, None) == pytest.approx(1 / 3)


def test_bootstrap_is_stratified_and_paired():
    rng = np.random.default_rng(0)
    y = np.array([0] * 6 + [1] * 4)
    idx = stats.bootstrap_indices(10, 300, rng, strata=y)
    assert idx.shape == (300, 10)
    assert (np.sum(y[idx] == 1, axis=1) == 4).all()  # class counts kept in every resample
    good = [np.stack([1 - y * 0.8 - 0.1, y * 0.8 + 0.1], 1).astype(float)] * 2   # perfect ranking
    bad = [np.full((10, 2), 0.5)] * 2                                             # chance
    e_good, d_good = stats.estimate(stats.auc, good, y, idx)
    e_bad, d_bad = stats.estimate(stats.auc, bad, y, idx)
    assert e_good.mean == 1.0 and e_good.ci == (1.0, 1.0) and e_good.std == 0.0
    assert e_bad.mean == 0.5
    diff = stats.difference(e_good, d_good, e_bad, d_bad, "bad")
    assert diff.mean == 0.5 and diff.ci == (0.5, 0.5) and diff.frac_not_better == 0.0
    assert stats.derive_seed(0, "a", 1) == stats.derive_seed(0, "a", 1) != stats.derive_seed(0, "a", 2)


def test_reduced_subset_is_stratified_and_seeded():
    y = np.array([0] * 12 + [1] * 8)
    a = reduced_indices(y, 20, 0.25, seed=3)
    assert sorted(np.bincount(y[a]).tolist()) == [2, 3]
    assert a == reduced_indices(y, 20, 0.25, seed=3) != reduced_indices(y, 20, 0.25, seed=4)


# --------------------------------------------------------------------------------------------
# the arms
# --------------------------------------------------------------------------------------------


def test_every_arm_trains_and_is_scored_on_the_real_test_set(data, tmp_path):
    res = evaluate_utility(data["run"], data["train"], data["test"], tmp_path / "out",
                           _opts(samples=data["samples"], reduced_fraction=0.25))
    rep = json.loads(res.json_path.read_text())
    assert rep["format"] == "medsynth-utility/1" and rep["task"] == "classify"
    assert [a["name"] for a in rep["arms"]] == list(ARMS)
    n = {a["name"]: a["n_train"] for a in rep["arms"]}
    # 12 real; 3 QC-passed synthetic per class (sample 0 failed QC, sample 2 had no verdict)
    assert n == {"real": [12, 12], "synthetic": [6, 6], "real+synthetic": [18, 18],
                 "reduced": [4, 4], "reduced+synthetic": [10, 10]}
    syn = rep["data"]["synthetic"]
    assert syn["used_per_class"] == {"0": 3, "1": 3} and syn["failed_qc"] == 1 and syn["no_qc_verdict"] == 1
    assert syn["qc_filter"] is True and syn["used_without_passing_verdict"] == 0
    used = {p.id for v in select_samples(data["samples"], [0, 1], 3).by_class.values() for p in v}
    assert used == {f"synth-ut-{i:05d}" for i in (1, 3, 5, 4, 6, 8)}  # class = index % 2
    # with the explicit bypass the failed (0) and unjudged (2) samples are taken, lowest index first
    bypass = select_samples(data["samples"], [0, 1], 3, include_failed=True)
    assert {p.id for v in bypass.by_class.values() for p in v} == {f"synth-ut-{i:05d}" for i in range(6)}
    test_ids = {c.id for c in load_manifest(data["test"]).cases}
    assert set(rep["predictions"]["test_case_ids"]) == test_ids
    assert rep["data"]["test"] == {"n": 4, "per_class": {"0": 2, "1": 2}}
    for a in rep["arms"]:
        for m in ("auc", "accuracy"):
            e = a["metrics"][m]
            assert len(e["per_repeat"]) == 2 and all(0.0 <= v <= 1.0 for v in e["per_repeat"])
            assert e["mean"] == pytest.approx(np.mean(e["per_repeat"]), abs=1e-5)
            assert e["ci95"][0] <= e["ci95"][1]
        probs = np.asarray(rep["predictions"]["per_arm"][a["name"]])
        assert probs.shape == (2, 4, 2) and np.allclose(probs.sum(-1), 1.0, atol=1e-4)
    vs = {a["name"]: set(a["vs"]) for a in rep["arms"]}
    assert vs == {"real": set(), "synthetic": {"real"}, "real+synthetic": {"real"}, "reduced": {"real"},
                  "reduced+synthetic": {"reduced", "real"}}
    d = rep["arms"][1]["vs"]["real"]["auc"]
    assert d["mean"] == pytest.approx(rep["arms"][1]["metrics"]["auc"]["mean"] - rep["arms"][0]["metrics"]["auc"]["mean"],
                                      abs=1e-5)
    assert rep["leakage"]["train_vs_test"].startswith("disjoint")
    assert rep["leakage"]["generator"].startswith("disjoint")
    assert rep["budget"]["shift"] == 3 and rep["budget"]["flip"] is True  # the classification default, recorded
    page = res.html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "25% real + synthetic" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    svg = ET.fromstring(page[page.index("<svg"):page.index("</svg>") + 6])
    bars = [e for e in svg if e.tag.endswith("rect") and e.find("{http://www.w3.org/2000/svg}title") is not None]
    assert len(bars) == 5 * 2  # one bar per arm and metric (the legend swatches carry no title)
    table = res.table()
    assert "synthetic only" in table and "paired differences" in table


def test_same_seed_same_figures(data, tmp_path):
    o = _opts(samples=data["samples"], arms=["real", "synthetic"], repeats=1)
    a = evaluate_utility(data["run"], data["train"], data["test"], tmp_path / "a", o).report
    b = evaluate_utility(data["run"], data["train"], data["test"], tmp_path / "b", o).report
    assert a["predictions"]["per_arm"] == b["predictions"]["per_arm"]
    assert a["arms"] == b["arms"]


def test_bad_inputs_fail_before_training(data, tmp_path):
    o = _opts(samples=data["samples"])
    with pytest.raises(CheckpointError, match="run directory not found"):
        evaluate_utility(tmp_path / "nope", data["train"], data["test"], tmp_path / "o", o)
    with pytest.raises(CheckpointError, match=r"no config\.yaml"):
        evaluate_utility(tmp_path, data["train"], data["test"], tmp_path / "o", o)
    with pytest.raises(ConfigError, match="reduced arms need `reduced_fraction`"):
        evaluate_utility(data["run"], data["train"], data["test"], tmp_path / "o", _opts(arms=["reduced"]))
    with pytest.raises(ConfigError, match="unknown arm"):
        evaluate_utility(data["run"], data["train"], data["test"], tmp_path / "o", _opts(arms=["fake"]))
    with pytest.raises(ConfigError, match="`shift`: 0 to 16 voxels, got -1"):
        evaluate_utility(data["run"], data["train"], data["test"], tmp_path / "o",
                         _opts(budget=Budget(steps=1, batch_size=2, shift=-1)))
    # one class only in the test set
    test = load_manifest(data["test"])
    one = save_manifest(Manifest([c for c in test.cases if c.class_label == 1], name="t1", modality="CT"),
                        tmp_path / "one.json")
    with pytest.raises(ManifestError, match="one class only"):
        evaluate_utility(data["run"], data["train"], one, tmp_path / "o", o)
    # missing class labels
    nolab = save_manifest(Manifest([Case(id=c.id, image=c.image) for c in test.cases], name="t2"),
                          tmp_path / "nolab.json")
    with pytest.raises(ManifestError, match="no class_label"):
        evaluate_utility(data["run"], data["train"], nolab, tmp_path / "o", o)
    # an unconditional generator has no classes to offer
    uncond = tmp_path / "uncond"
    uncond.mkdir()
    cfg = _config(data["train"])
    cfg.model.unet.num_class_embeds = None
    (uncond / "config.yaml").write_text(dump_yaml(cfg))
    with pytest.raises(ConfigError, match="unconditional"):
        evaluate_utility(uncond, data["train"], data["test"], tmp_path / "o", o)
    # no QC-passed sample of one class
    only0 = _write_synthetic(tmp_path / "only0", 4, verdicts=lambda i: i % 2 == 0)
    with pytest.raises(MedsynthError, match=r"no QC-passed synthetic sample of class\(es\) \[1\]"):
        evaluate_utility(data["run"], data["train"], data["test"], tmp_path / "o", _opts(samples=only0))


# --------------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------------


def test_segment_real_and_reduced_arms(data, tmp_path):
    res = evaluate_utility(data["run"], data["train"], data["test"], tmp_path / "seg",
                           _opts(task="segment", arms=["real", "reduced"], reduced_fraction=0.5,
                                 seg_labels=[1, 2]))
    rep = res.report
    assert rep["metrics"] == ["dice"] and rep["seg_labels"] == [1, 2] and rep["model"]["outputs"] == 3
    assert rep["budget"]["shift"] == 0  # segmentation: no shift unless asked for
    for a in rep["arms"]:
        e = a["metrics"]["dice"]
        assert all(0.0 <= v <= 1.0 for v in e["per_repeat"])
    assert rep["arms"][1]["n_train"] == [6, 6]
    assert "Dice" in res.table()


def test_segment_synthetic_needs_a_label_generating_run(data, tmp_path):
    with pytest.raises(ConfigError, match="does not generate labels"):
        evaluate_utility(data["run"], data["train"], data["test"], tmp_path / "o",
                         _opts(task="segment", samples=data["samples"]))
    # a run that generates labels: the synthetic label maps are used as ground truth
    run = _run_dir(tmp_path / "run", data["train"], use_labels=True)
    res = evaluate_utility(run, data["train"], data["test"], tmp_path / "seg",
                           _opts(task="segment", samples=data["samples"], arms=["real", "real+synthetic"],
                                 repeats=1))
    assert [a["n_train"] for a in res.report["arms"]] == [[12], [18]]
    assert res.report["seg_labels"] == [1, 2]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_split_and_utility(data, tmp_path, run_cli):
    code, out, err = run_cli("evaluate", "split", data["manifest"], "--test-fraction", "0.25", "--out", tmp_path / "sp")
    assert code == 0, err
    assert "12 cases" in out and "4 cases" in out
    # the same split as the library call with the same seed
    assert [c.id for c in load_manifest(tmp_path / "sp" / "test.json").cases] == \
        [c.id for c in load_manifest(data["test"]).cases]
    code, out, err = run_cli("evaluate", "utility", data["run"], "--manifest", data["train"],
                             "--test-manifest", data["test"], "--out", tmp_path / "u", "--samples", data["samples"],
                             "--n-synthetic", "2", "--repeats", "1", "--steps", "2", "--batch-size", "2",
                             "--bootstrap", "200", "--arms", "real,synthetic", "--threads", "1", "--shift", "1")
    assert code == 0, err
    assert json.loads((tmp_path / "u" / "utility.json").read_text())["budget"]["shift"] == 1
    assert "real only" in out and "synthetic only" in out and "utility.html" in out
    assert (tmp_path / "u" / "utility.json").is_file() and (tmp_path / "u" / "utility.html").is_file()
    code, out, err = run_cli("evaluate", "utility", data["run"], "--manifest", data["manifest"],
                             "--test-manifest", data["test"], "--out", tmp_path / "x", "--samples", data["samples"])
    assert code == ManifestError.exit_code and "overlaps" in err and "Traceback" not in err
    code, out, err = run_cli("evaluate", "utility", data["run"], "--manifest", data["train"],
                             "--test-manifest", data["test"], "--out", tmp_path / "x", "--seg-labels", "a")
    assert code == ConfigError.exit_code and "--seg-labels" in err


# --------------------------------------------------------------------------------------------
# generation through the engine and the QC gate
# --------------------------------------------------------------------------------------------


def test_generation_goes_through_the_qc_gate(data, tmp_path):
    pytest.importorskip("medsynth.model.sample")
    pytest.importorskip("medsynth.qc.gate")
    from medsynth.evaluate.synthetic import generate_set
    from medsynth.model.train import train

    run = tmp_path / "run"
    train(_config(data["train"]), run)
    out = tmp_path / "out"
    s = generate_set(run, out / "synthetic", [0, 1], 2, seed=0, qc_reference=data["train"])
    # every sample generated got a verdict: passed ones stay, failed ones are in quarantine/
    kept = sorted((out / "synthetic").glob("synth-ut-*.json"))
    kept = [p for p in kept if not p.name.endswith(".qc.json")]
    quarantined = [p for p in (out / "synthetic" / "quarantine").glob("*.json") if not p.name.endswith(".qc.json")] \
        if (out / "synthetic" / "quarantine").is_dir() else []
    assert s.n_failed_qc == len(quarantined)
    for p in kept:
        assert json.loads(p.with_name(p.name.replace(".json", ".qc.json")).read_text())["passed"] is True
    for k, chosen in s.by_class.items():
        assert all(c.sidecar["class"] == k for c in chosen)
    # class k's indices start at k * n * rounds; a shortfall after QC triggers another round
    for p in kept + quarantined:
        side = json.loads(p.read_text())
        assert side["class"] == side["index"] // 6
    assert (out / "synthetic_qc" / "qc.json").is_file()
    # a rerun generates nothing new (existing and quarantined indices are skipped)
    before = sorted(p.name for p in (out / "synthetic").rglob("*"))
    generate_set(run, out / "synthetic", [0, 1], 2, seed=0, qc_reference=data["train"])
    assert sorted(p.name for p in (out / "synthetic").rglob("*")) == before
    # an evaluation with too few QC-passed samples says so (or runs, when the gate passed some)
    if not all(s.by_class.values()):
        with pytest.raises(MedsynthError, match="no QC-passed synthetic sample"):
            evaluate_utility(run, data["train"], data["test"], out, _opts(n_synthetic=2, arms=["synthetic"]))
    # the explicit bypass uses the failed samples too, and says so in the report
    res = evaluate_utility(run, data["train"], data["test"], out,
                           _opts(n_synthetic=2, arms=["synthetic"], repeats=1, include_qc_failed=True))
    syn = res.report["data"]["synthetic"]
    assert syn["used_per_class"] == {"0": 2, "1": 2} and syn["qc_filter"] is False
    assert syn["used_without_passing_verdict"] == 4 - sum(len(v) for v in s.by_class.values())
    assert any("QC filter bypassed" in n for n in res.report["notes"])
    # a sampling-step count the run cannot take is named as this function's parameter, not the sampler's
    with pytest.raises(MedsynthError, match=r"^`sampling_steps` must be between") as bad:
        evaluate_utility(run, data["train"], data["test"], tmp_path / "bad", _opts(arms=["synthetic"], sampling_steps=10**6))
    assert bad.value.param == "sampling_steps"


def test_segment_arms_with_a_label_generating_run(data, tmp_path):
    """Paired image + label synthesis (data.use_labels): generated label maps are the synthetic ground truth."""
    pytest.importorskip("medsynth.model.sample")
    from medsynth.model.train import train

    run = tmp_path / "run"
    train(_config(data["train"], use_labels=True), run)
    res = evaluate_utility(run, data["train"], data["test"], tmp_path / "out",
                           _opts(task="segment", n_synthetic=2, repeats=1, arms=["real", "synthetic", "real+synthetic"],
                                 budget=Budget(steps=2, batch_size=2), include_qc_failed=True))
    rep = res.report
    assert [a["n_train"] for a in rep["arms"]] == [[12], [4], [16]]
    assert rep["data"]["synthetic"]["used_per_class"] == {"0": 2, "1": 2}
    assert rep["model"]["outputs"] == 3 and rep["model"]["network"].startswith("monai.networks.nets.UNet (channels 8-16")
    labels = sorted((tmp_path / "out" / "synthetic").rglob("*_label.nii.gz"))
    assert len(labels) == 4
    for a in rep["arms"]:
        assert all(0.0 <= v <= 1.0 for v in a["metrics"]["dice"]["per_repeat"])
