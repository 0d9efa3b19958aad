"""The lesion inpainter (``model.lesion_inpainter``, medsynth.model.lesion): config checks, crop
geometry, training (deterministic, exact resume, onto a finished run), painting (per sample, inside
its ball and the host label only) and its use by every sampler of the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medsynth.config import config_from_dict
from medsynth.errors import CheckpointError, ConfigError
from medsynth.jobs import RunPaths
from medsynth.model.checkpoint import load_checkpoint
from medsynth.model.lesion import (
    LesionPainter,
    ball,
    crop_shape,
    lesion_cases,
    mirror_axis,
    take,
    training_batch,
)
from medsynth.model.sample import Sampler, generate
from medsynth.model.train import train
from medsynth.model.training_data import prepare_data
from medsynth.samples import list_samples

from tests.helpers import Interrupt, load_benchmarks, tiny_config

LESION = {"channels": [8, 8], "norm_num_groups": 4, "steps": 4, "batch_size": 2, "log_every": 1, "sample_steps": 3}


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    """8 phantoms on the demo's grid (32 x 32 x 24 at 10 x 10 x 14 mm): lesions of 5-30 voxels."""
    from medsynth.data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("chest"), 8, 0, (32, 32, 24), (10.0, 10.0, 14.0))


def _raw(manifest, lesion=LESION):
    raw = tiny_config(manifest, data={"use_labels": True, "shape": [32, 32, 24], "spacing": [10.0, 10.0, 14.0],
                                      "val_fraction": 0.0},
                      training={"scheduler": "rflow"}, sampling={"scheduler": "rflow", "eta": 1.0})
    raw["model"]["autoencoder"] = {"kind": "wavelet", "wavelet_levels": 1, "wavelet_label_bands": "low"}
    if lesion is not None:
        raw["model"]["lesion_inpainter"] = dict(lesion)
    return raw


@pytest.fixture(scope="module")
def lesion_run(chest, tmp_path_factory):
    run = tmp_path_factory.mktemp("lesion") / "run"
    res = train(config_from_dict(_raw(chest)), run)
    return run, res


def test_the_config_names_what_a_lesion_inpainter_needs(chest):
    raw = _raw(chest)
    raw["data"]["use_labels"] = False
    with pytest.raises(ConfigError, match=r"model.lesion_inpainter: paints a lesion label"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match=r"jitter_mm: must be below radius_mm"):
        config_from_dict(_raw(chest, {**LESION, "jitter_mm": 40.0}))
    with pytest.raises(ConfigError, match=r"classes: \[5\] has classes the model does not know"):
        config_from_dict(_raw(chest, {**LESION, "classes": [5]}))
    with pytest.raises(ConfigError, match=r"host: must differ"):
        config_from_dict(_raw(chest, {**LESION, "host": "lesion"}))
    raw = _raw(chest)
    raw["data"]["labels"] = {"background": 0, "lung": 1, "nodule": 2}
    with pytest.raises(ConfigError, match=r"label\(s\) \['lesion'\] are not in data.labels"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="no model.lesion_inpainter"):
        train(config_from_dict(_raw(chest, None)), chest.parent / "never", stage="lesion")


def test_crop_geometry_is_in_millimetres():
    cfg = config_from_dict(_raw(None, {}))
    les = cfg.model.lesion_inpainter
    assert crop_shape(les, (10.0, 10.0, 14.0)) == (10, 10, 8)   # 2 x (35 + 15) mm, to the UNet's multiple of 2
    assert crop_shape(les, (5.0, 5.0, 7.0)) == (20, 20, 16)
    b = ball((10, 10, 8), (10.0, 10.0, 14.0), 35.0)
    assert b.dtype == bool and b[4:6, 4:6, 3:5].all() and not b[0, 0, 0]
    assert np.array_equal(b, b[::-1, ::-1, ::-1])               # centred on the crop
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    c = take(x, (-1, 2, 0), (3, 3, 3))
    assert torch.equal(c[:, 1:, :2, :], x[:, :2, 2:4, :3]) and (c[:, 0] == -1).all() and (c[:, :, 2] == -1).all()
    assert mirror_axis("RAS") == 0 and mirror_axis("PLS") == 1 and mirror_axis("SAP") is None


def test_training_crops_hold_the_lesions_and_are_a_function_of_the_step(chest):
    cfg = config_from_dict(_raw(chest))
    cfg = _labelled(cfg)
    data = prepare_data(cfg)
    cases = lesion_cases(cfg, data.train)  # paired: the image, then one channel per label value
    assert len(cases.images) == 4                                  # the 4 class-1 phantoms
    assert all(5.0 <= w <= 80.0 for w in cases.wall_mm)            # inside the lung, in mm
    shape = crop_shape(cfg.model.lesion_inpainter, cfg.data.spacing)
    a = training_batch(cfg, cases, 3, shape)
    b = training_batch(cfg, cases, 3, shape)
    c = training_batch(cfg, cases, 4, shape)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and not torch.equal(a[0], c[0])
    assert a[0].shape == (2, 2, *shape) and a[1].shape == (2, 1, *shape)
    # every crop holds lesion voxels, all of them inside the ball the model repaints
    region = torch.from_numpy(ball(shape, cfg.data.spacing, cfg.model.lesion_inpainter.radius_mm))
    for crop in _clean_crops(cfg, cases, 3, shape):
        les = crop[1] > 0
        assert les.any() and bool(region[les].all())


def _labelled(cfg):
    """``cfg`` with the phantoms' label set resolved (training fills it in)."""
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels={"background": 0, "lung": 1, "lesion": 2}))


def _clean_crops(cfg, cases, step, shape):
    """The clean crops of a step: the noisy batch is ``(1 - t) x0 + t noise`` and the target
    ``x0 - noise``, so ``x0 = x_t + t target``."""
    x_t, _, t, target = training_batch(cfg, cases, step, shape)
    tt = (t / 1000).view(-1, 1, 1, 1, 1)
    return x_t + tt * target


def test_training_runs_after_stage_2_and_resumes_exactly(lesion_run, chest, tmp_path):
    run, res = lesion_run
    assert [s["stage"] for s in res.summaries] == ["autoencoder", "diffusion", "lesion"]
    ck = load_checkpoint(RunPaths(run).checkpoint("lesion"), "lesion")
    assert ck["step"] == ck["steps"] == 4 and ck["crop"] == [10, 10, 8] and len(ck["wall_mm"]) == 4

    def stop(stage, step):
        if stage == "lesion" and step == 2:
            raise Interrupt

    other = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(config_from_dict(_raw(chest)), other, callback=stop)
    assert load_checkpoint(RunPaths(other).checkpoint("lesion"), "lesion")["step"] == 2
    with pytest.raises(CheckpointError, match="lesion inpainter training is incomplete"):
        Sampler.from_run(other)
    train(config_from_dict(_raw(chest)), other, resume=True)
    again = load_checkpoint(RunPaths(other).checkpoint("lesion"), "lesion")
    for part in ("model",):
        assert all(torch.equal(ck[part][k], again[part][k]) for k in ck[part])
    assert all(torch.equal(ck["ema"]["model"][k], again["ema"]["model"][k]) for k in ck["ema"]["model"])


def test_painting_is_per_sample_inside_the_ball_and_the_host():
    cfg = config_from_dict(_raw(None, LESION))
    cfg = _labelled(cfg)
    from medsynth.model.lesion import build_inpainter

    torch.manual_seed(0)
    painter = LesionPainter(cfg, build_inpainter(cfg.model.lesion_inpainter), [20.0, 30.0], torch.device("cpu"),
                            {"checkpoint_sha256": "x"})
    x = -torch.ones(4, 32, 32, 24)
    x[0] = -0.2
    x[1] = 1.0
    x[1, 8:24, 8:24, 6:18] = -1.0
    x[2, 8:24, 8:24, 6:18] = 1.0      # a box of lung
    a, _ = painter.paint(x.clone(), 11)
    b, _ = painter.paint(x.clone(), 11)
    c, _ = painter.paint(x.clone(), 12)
    assert torch.equal(a, b) and not torch.equal(a, c)     # a function of the sample's seed only
    changed = np.argwhere((a != x).any(0).numpy()) * np.array([10.0, 10.0, 14.0])
    assert len(changed)
    span = np.sqrt(((changed[:, None] - changed[None]) ** 2).sum(-1)).max()
    assert span <= 2 * 35.0 + 1e-6                           # one ball of radius_mm
    from medsynth.model.labels import decode

    lab = decode(a, [0, 1, 2])
    assert set(np.unique(lab)) <= {0, 1, 2}
    assert ((lab == 2) <= ((x[2] > 0) | (x[1] > 0)).numpy()).all() or (lab == 2).sum() == 0
    # no host voxels: nothing painted, and the caller is told
    y = x.clone()
    y[2] = -1.0
    y[1] = 1.0
    out, ok = painter.paint(y, 11)
    assert not ok and torch.equal(out, y)


def test_every_sampler_of_the_run_paints_its_classes(lesion_run, tmp_path):
    run, _ = lesion_run
    s = Sampler.from_run(run)
    assert s.lesion is not None and s.provenance["lesion_inpainter"]["classes"] == [1]
    s.lesion.host_ch = 1  # a 4-step model draws no lung yet: paint into its background instead
    generate(None, tmp_path / "a", range(4), seed=3, batch_size=2, sampler=s)
    generate(None, tmp_path / "b", [3, 1, 0, 2], seed=3, batch_size=1, sampler=s)
    a = {x.sidecar["index"]: x for x in list_samples(tmp_path / "a")}
    b = {x.sidecar["index"]: x for x in list_samples(tmp_path / "b")}
    for i in range(4):
        assert np.array_equal(a[i].load().array, b[i].load().array)   # sample i: (seed, i) only
    side = json.loads(next((tmp_path / "a").glob("*1.json")).read_text())
    sha = side["lesion_inpainter"]["checkpoint_sha256"]
    assert sha and sha == s.provenance["lesion_inpainter"]["checkpoint_sha256"]
    # without the painter, class-0 samples are the same and class-1 samples differ only in one ball
    s.lesion = None
    st = s.settings(3)
    plain = s.sample_pairs([0, 1], st)
    assert np.array_equal(plain[0][0].array, a[0].load().array)
    diff = np.argwhere(plain[1][0].array != a[1].load().array) * np.array([10.0, 10.0, 14.0])
    assert len(diff) and np.sqrt(((diff[:, None] - diff[None]) ** 2).sum(-1)).max() <= 70.0 + 1e-6


def test_a_lesion_inpainter_trains_onto_a_finished_run(chest, tmp_path):
    with pytest.raises(CheckpointError, match="paints a trained run's samples"):
        train(config_from_dict(_raw(chest)), tmp_path / "none", stage="lesion")
    assert not (tmp_path / "none").exists()                   # refused before anything is written
    run = tmp_path / "run"
    train(config_from_dict(_raw(chest, None)), run)
    assert Sampler.from_run(run).lesion is None
    cfg = config_from_dict(_raw(chest))
    res = train(cfg, run, stage="lesion")
    assert [s["stage"] for s in res.summaries] == ["lesion"]
    assert Sampler.from_run(run).lesion is not None          # its own checkpoint says how it paints
    # the other stages do not depend on the lesion block: resuming the run with it is no change
    res = train(cfg, run, resume=True)
    assert {s["stage"]: s["steps"] for s in res.summaries if s["stage"] != "autoencoder"} == \
        {"diffusion": 4, "lesion": 4}
    with pytest.raises(CheckpointError, match="already trained its lesion inpainter"):
        train(cfg, run, stage="lesion")


def test_a_monai_bundle_refuses_a_run_with_a_lesion_inpainter(lesion_run, tmp_path):
    from medsynth.export.bundle import export_bundle

    run, _ = lesion_run
    with pytest.raises(CheckpointError, match="has a lesion inpainter"):
        export_bundle(run, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


def test_precision_auto_follows_the_cpu_by_a_batch_of_crops(monkeypatch):
    """The demo's inpainter (10 x 10 x 8 crops, batch 16: 12800 voxels) trains in bf16 where the CPU has
    it natively (95 vs 152 ms a step measured) and in fp32 on AVX2; MEDSYNTH_CPU_BF16 plays either."""
    import dataclasses

    from medsynth.model.lesion import lesion_precision

    cfg = config_from_dict(_raw(None, {}))
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, precision="auto"))
    monkeypatch.setenv("MEDSYNTH_CPU_BF16", "1")
    assert lesion_precision(cfg, torch.device("cpu")) == "bf16"
    monkeypatch.setenv("MEDSYNTH_CPU_BF16", "0")
    assert lesion_precision(cfg, torch.device("cpu")) == "fp32"
    small = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, lesion_inpainter=dataclasses.replace(cfg.model.lesion_inpainter, batch_size=1)))
    monkeypatch.setenv("MEDSYNTH_CPU_BF16", "1")
    assert lesion_precision(small, torch.device("cpu")) == "fp32"   # 800 voxels: below bf16's break-even


def test_the_bf16_fidelity_benchmark_sets_the_precision_of_every_network_of_the_run(lesion_run, tmp_path):
    """benchmarks/run.py --bf16-fidelity samples a run in fp32, then bf16: its low-noise expert and its
    lesion inpainter resolve a precision of their own when loaded, so the benchmark must set theirs too
    (it once set the sampler's alone, leaving them in ``auto``'s choice: bf16 on native-bf16 CPUs)."""
    bench = load_benchmarks()
    run, _ = lesion_run
    s = Sampler.from_run(run).hand_over(Sampler.from_run(run), 0.5)
    s.lesion.host_ch = 1  # a 4-step model draws no lung yet: paint into its background instead
    for prec in ("fp32", "bf16"):
        for part in (s, s.low_noise, s.lesion):
            part.precision = "bf16" if prec == "fp32" else "fp32"  # the other one: the benchmark must set it
        _, samples = bench._sample_in(s, prec, tmp_path / prec, 2, 0)
        assert (s.precision, s.low_noise.precision, s.lesion.precision) == (prec, prec, prec)
        assert len(samples) == 2 and all(x.sidecar["sampling_path"]["precision"] == prec for x in samples)
