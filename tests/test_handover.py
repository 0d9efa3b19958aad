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


# -- experts trained on part of the schedule (training.diffusion.time_range) --------------------------


def test_time_range_draws_the_truncated_distribution_and_leaves_the_whole_schedule_as_before():
    import torch
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

    from medsynth.model.networks import sample_train_timesteps

    flow, ddpm = RFlowScheduler(num_train_timesteps=1000), DDPMScheduler(num_train_timesteps=20)
    g = lambda: torch.Generator().manual_seed(3)
    # the whole schedule draws bit for bit what it drew before the option existed
    assert torch.equal(sample_train_timesteps("rflow", flow, 64, g(), "logit-normal", 0.2, 1.5, 0.0, 1.0),
                       torch.sigmoid(0.2 + 1.5 * torch.randn(64, generator=g())) * 1000)
    assert torch.equal(sample_train_timesteps("ddpm", ddpm, 64, g(), "logit-normal", 0.0, 1.0, 0.0, 1.0),
                       torch.randint(0, 20, (64,), generator=g()))
    # a part of it: every draw inside, distributed as the whole schedule's draws that fall there
    low = sample_train_timesteps("rflow", flow, 40000, g(), "logit-normal", 0.0, 1.0, 0.0, 0.3) / 1000
    ref = torch.sigmoid(torch.randn(400000, generator=g()))
    ref = ref[ref < 0.3][:40000]
    assert 0.0 <= float(low.min()) and float(low.max()) < 0.3
    q = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(torch.quantile(low, q), torch.quantile(ref, q), atol=0.005)
    high = sample_train_timesteps("rflow", flow, 1000, g(), "uniform", 0.0, 1.0, 0.5, 1.0) / 1000
    assert float(high.min()) >= 0.5 and float(high.max()) <= 1.0 and float(high.std()) > 0.1
    ints = sample_train_timesteps("ddpm", ddpm, 1000, g(), "logit-normal", 0.0, 1.0, 0.25, 0.5)
    assert set(ints.tolist()) == {5, 6, 7, 8, 9}


def test_stratified_times_keep_the_distribution_and_cover_every_batch_evenly():
    """``training.diffusion.timestep_stratified``: one uniform draw per batch, ``(u0 + i / B) mod 1``,
    through the same (truncated) distribution: pooled over batches it is that distribution, and each
    batch has one draw in each 1/B of its quantiles (a batch of 4 drawn independently often has none
    above the median)."""
    import torch
    from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

    from medsynth.model.networks import sample_train_timesteps

    flow, ddpm = RFlowScheduler(num_train_timesteps=1000), DDPMScheduler(num_train_timesteps=20)
    g = torch.Generator().manual_seed(5)
    for lo, hi in ((0.0, 1.0), (0.0, 0.5)):
        batches = [sample_train_timesteps("rflow", flow, 4, g, "logit-normal", 0.0, 1.0, lo, hi, True) / 1000
                   for _ in range(5000)]
        pooled = torch.cat(batches)
        ref = torch.sigmoid(torch.randn(800000, generator=torch.Generator().manual_seed(6)))
        ref = ref[(ref >= lo) & (ref < hi)][:200000]
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        assert torch.allclose(torch.quantile(pooled, q), torch.quantile(ref.double(), q.double()).float(), atol=0.01)
        assert lo <= float(pooled.min()) and float(pooled.max()) <= hi
        # every batch: one time in each quarter of the distribution (its quantile by the exact CDF)
        normal = torch.distributions.Normal(0.0, 1.0)
        cdf = lambda t: normal.cdf(torch.logit(t.double().clamp(1e-9, 1 - 1e-9)))
        top = 1.0 if hi >= 1.0 else float(cdf(torch.tensor(hi)))
        for b in batches[:200]:
            assert sorted(torch.floor(4 * cdf(b) / top).long().tolist()) == [0, 1, 2, 3]
    # the same generator state draws the same times (a run replays); uniform and DDPM integers too
    a = sample_train_timesteps("rflow", flow, 8, torch.Generator().manual_seed(1), "uniform", 0.0, 1.0, 0.5, 1.0, True)
    b = sample_train_timesteps("rflow", flow, 8, torch.Generator().manual_seed(1), "uniform", 0.0, 1.0, 0.5, 1.0, True)
    assert torch.equal(a, b) and float(a.min()) >= 500 and float(a.max()) <= 1000
    assert sorted(torch.floor((a - 500) / 62.5).long().tolist()) == list(range(8))
    ints = sample_train_timesteps("ddpm", ddpm, 4, torch.Generator().manual_seed(2), "logit-normal", 0.0, 1.0,
                                  0.0, 1.0, True)
    assert ints.dtype == torch.long and sorted((ints // 5).tolist()) == [0, 1, 2, 3]


def test_a_stratified_run_trains_and_replays(phantoms, tmp_path):
    import torch

    from medsynth.model.checkpoint import load_run

    raw = tiny_config(phantoms, data={"use_labels": True}, training={"scheduler": "rflow"},
                      sampling={"scheduler": "rflow", "eta": 1.0})
    raw["model"]["autoencoder"] = {"kind": "wavelet", "wavelet_levels": 1, "wavelet_label_bands": "low"}
    raw["training"]["diffusion"]["timestep_stratified"] = True
    cfg = config_from_dict(raw)
    assert cfg.training.diffusion.timestep_dist[-1] is True
    for name in ("a", "b"):
        train(cfg, tmp_path / name)
    raw["training"]["diffusion"]["timestep_stratified"] = False
    train(config_from_dict(raw), tmp_path / "c")
    a, b, c = (load_run(tmp_path / n).unet_state for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)          # a run replays bit for bit
    assert not all(torch.equal(a[k], c[k]) for k in a)      # and draws other times than the default


def test_a_bad_time_range_is_refused_naming_the_key(phantoms):
    for bad in ([0.5, 0.2], [0.0], [-0.1, 0.5], [0.0, 1.5], "low"):
        raw = tiny_config(phantoms, training={"diffusion": {"time_range": bad}})
        with pytest.raises(ConfigError, match=r"training\.diffusion\.time_range"):
            config_from_dict(raw)


def test_an_expert_of_part_of_the_schedule_samples_only_beside_its_partner(experts, phantoms, tmp_path, run_cli,
                                                                           capsys):
    high, _ = experts
    low = tmp_path / "low"
    low.mkdir()
    shutil.copytree(high / "autoencoder", low / "autoencoder")
    cfg = _cfg(phantoms, gated_skip=True)
    cfg.training.diffusion.time_range = [0.0, 0.5]
    train(cfg, low, stage="diffusion")
    # alone it is refused, with the way to sample it (its untrained baseline, as the demo's fidelity uses, is not)
    base = Sampler.untrained(Sampler.from_run(low).cfg)
    assert len(base.sample([0], base.settings(steps=2))) == 1
    with pytest.raises(ConfigError, match="one of two experts"):
        generate(low, tmp_path / "alone", range(1), seed=5, steps=4)
    capsys.readouterr()  # what the in-process training above logged is not the CLI's
    code, out, err = run_cli("generate", low, "-n", "1", "--out", tmp_path / "cli", "--no-progress")
    assert code != 0 and "--low-noise-run" in err and "Traceback" not in err
    assert not list((tmp_path / "cli").glob("*.nii.gz")) if (tmp_path / "cli").exists() else True
    # below a hand-over it covers: accepted; above what it was trained on: refused
    generate(high, tmp_path / "pair", range(2), seed=5, steps=4, low_noise_run=low, handover=0.5)
    assert len(list_samples(tmp_path / "pair")) == 2
    with pytest.raises(ConfigError, match="cannot denoise 0-0.7"):
        Sampler.from_run(high).hand_over(Sampler.from_run(low), 0.7)
    # and as the high-noise expert a [0, 0.5] run is refused
    with pytest.raises(ConfigError, match="cannot denoise 0.3-1"):
        Sampler.from_run(low).hand_over(Sampler.from_run(high), 0.3)


# -- a run with its own low-noise expert (model.low_noise_expert) ------------------------------------------


def _expert_cfg(phantoms, **expert):
    raw = tiny_config(phantoms, data={"use_labels": True}, training={"scheduler": "rflow"},
                      sampling={"scheduler": "rflow", "eta": 1.0})
    raw["model"]["autoencoder"] = {"kind": "wavelet", "wavelet_levels": 1, "wavelet_label_bands": "low"}
    raw["model"]["low_noise_expert"] = {"handover": 0.5, "unet": {"gated_skip": True}, **expert}
    return config_from_dict(raw)


def test_a_run_with_its_own_expert_trains_it_resumes_exactly_and_every_sampler_hands_over(phantoms, tmp_path,
                                                                                           run_cli, capsys):
    import torch

    from tests.helpers import Interrupt, run_weights

    # trained after the run's stage 2 (side by side, the thread count differs between the two runs, and
    # with it oneDNN's float order; the side-by-side resume is the next test's)
    cfg = _expert_cfg(phantoms, side_by_side=False)
    whole = tmp_path / "whole"
    res = train(cfg, whole)
    assert [s.get("expert") for s in res.summaries] == [None, None, "low_noise"]
    ecfg = Sampler.from_run(whole / "low_noise").cfg  # a run folder of its own, on the run's latent
    assert ecfg.model.unet.gated_skip and ecfg.training.diffusion.time_range == [0.0, 0.5]
    assert ecfg.model.low_noise_expert is None and not cfg.model.unet.gated_skip
    # killed in the expert's stage 2 (after its checkpoint at step 2), resumed: the same weights as one run
    calls = []

    def kill(stage, step):
        calls.append(step)
        if len(calls) == 7:  # the run's 4 steps, then the expert's third
            raise Interrupt()

    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        train(cfg, part, callback=kill)
    assert (part / "low_noise" / "diffusion" / "last.pt").is_file()
    train(cfg, part, resume=True)
    for sub in ("", "low_noise"):
        a, b = run_weights(whole / sub), run_weights(part / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # sampling the run hands over to its expert: recorded, per sample, and not to be doubled
    generate(whole, tmp_path / "x", range(2), seed=3, steps=4, batch_size=2)
    generate(whole, tmp_path / "y", [1, 0], seed=3, steps=4, batch_size=1)
    x, y = _arrays(tmp_path / "x"), _arrays(tmp_path / "y")
    assert all(np.array_equal(x[i], y[i]) for i in range(2))
    side = json.loads(next((tmp_path / "x").glob("synth-*0.json")).read_text())
    assert side["low_noise_expert"]["below"] == 0.5
    assert side["low_noise_expert"]["checkpoint_sha256"] == \
        Sampler.from_run(whole / "low_noise").provenance["checkpoint_sha256"]
    with pytest.raises(ConfigError, match="has a low-noise expert of its own"):
        generate(whole, tmp_path / "z", range(1), seed=3, steps=4, low_noise_run=whole / "low_noise")
    # a run whose expert is missing says how to finish it; the bundle export refuses a run it cannot hold
    shutil.rmtree(part / "low_noise" / "diffusion")
    capsys.readouterr()
    code, out, err = run_cli("generate", part, "-n", "1", "--out", tmp_path / "m", "--no-progress")
    assert code != 0 and "--resume" in err and "Traceback" not in err
    code, out, err = run_cli("export-bundle", whole, "--out", tmp_path / "bundle")
    assert code != 0 and "low-noise expert" in err and not (tmp_path / "bundle").exists()


def test_the_experts_keys_are_checked_naming_them(phantoms):
    with pytest.raises(ConfigError, match=r"model\.low_noise_expert\.unet\.gated_skipp: unknown key"):
        _expert_cfg(phantoms, unet={"gated_skipp": True})
    with pytest.raises(ConfigError, match=r"model\.low_noise_expert\.handover"):
        _expert_cfg(phantoms, handover=1.0)
    with pytest.raises(ConfigError, match=r"model\.low_noise_expert\.diffusion\.time_range"):
        _expert_cfg(phantoms, diffusion={"time_range": [0.5, 0.2]})


def test_the_expert_trains_beside_stage_2_in_a_second_process_as_it_would_after_it(phantoms, tmp_path):
    """``model.low_noise_expert.side_by_side`` (auto: on a CPU with >= 2 threads) trains the expert in a
    second process while this one trains the run's own stage 2: the same checkpoints as training it
    after (up to the float order of another thread count), the threads given back, and an error of
    the expert's process raised here with its kind and fix."""
    import torch

    from medsynth.model.train import _expert_side_by_side
    from tests.helpers import run_weights

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = _expert_cfg(phantoms, side_by_side=True)
        assert _expert_side_by_side(_expert_cfg(phantoms), torch.device("cpu"), False, None)  # auto, 2 threads
        assert not _expert_side_by_side(cfg, torch.device("cpu"), False, lambda s, n: None)  # a callback: after
        assert not _expert_side_by_side(_expert_cfg(phantoms, side_by_side=False), torch.device("cpu"), False, None)
        beside, after = tmp_path / "beside", tmp_path / "after"
        res = train(cfg, beside)
        assert torch.get_num_threads() == 2
        assert [s.get("expert") for s in res.summaries] == [None, None, "low_noise"]
        assert res.summaries[-1]["steps"] == cfg.training.diffusion.steps
        train(_expert_cfg(phantoms, side_by_side=False), after)
        for sub in ("", "low_noise"):
            a, b = run_weights(beside / sub), run_weights(after / sub)
            assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), sub
        # how the expert is scheduled may change on resume (runs stored before the key existed lack it)
        from medsynth.config import config_to_dict
        from medsynth.model.bookkeeping import DIFFUSION_KEYS, config_differences

        stored = config_to_dict(cfg)
        del stored["model"]["low_noise_expert"]["side_by_side"]
        assert config_differences(stored, _expert_cfg(phantoms, side_by_side=False), DIFFUSION_KEYS) == []
        # stopped after 2 steps of each (both checkpointed), resumed beside each other: exactly one run
        part = tmp_path / "part"
        res = train(cfg, part, max_steps=2)
        assert [s["steps"] for s in res.summaries[1:]] == [2, 2]
        train(cfg, part, resume=True)
        for sub in ("", "low_noise"):
            a, b = run_weights(beside / sub), run_weights(part / sub)
            assert all(torch.equal(a[k], b[k]) for k in a), sub
        # the expert's own problem, found in its process at its stage-2 start, is raised here
        bad = _expert_cfg(phantoms, side_by_side=True, diffusion={"intensity_loss_weight": {"above": 5000.0,
                                                                                          "weight": 2.0}})
        with pytest.raises(ConfigError, match="outside the intensity window") as exc:
            train(bad, tmp_path / "bad")
        assert exc.value.hint and torch.get_num_threads() == 2
        assert (tmp_path / "bad" / "diffusion" / "last.pt").is_file()  # the run's own stage 2 finished
    finally:
        torch.set_num_threads(threads)


def test_a_label_conditioned_expert_learns_the_image_to_clean_label_bands_and_samples_as_a_cascade(phantoms, tmp_path):
    """``training.diffusion.label_condition`` (a low-noise expert): trained with the label map's latent
    channels clean and its loss on the image channels only; sampled after the high-noise expert has
    run to the end and drawn the label map, which the expert's image then follows (a cascade)."""
    import torch

    from medsynth.model.diffusion_training import _diffusion_loss, cond_channels
    from medsynth.model.networks import build_scheduler, label_latent_channels
    from medsynth.model.objectives import diffusion_batch
    from tests.helpers import run_weights

    cfg = _expert_cfg(phantoms, side_by_side=False, diffusion={"label_condition": True})
    run = tmp_path / "run"
    train(cfg, run)
    low = Sampler.from_run(run / "low_noise")
    c = cond_channels(low.cfg)
    assert c == label_latent_channels(low.cfg) == len(low.label_values) and cond_channels(cfg) == 0
    # training: the label channels of the noisy latents are the clean ones; the draws are those of a plain model
    mu = torch.randn(3, 8 + c, 4, 4, 4)
    sched = build_scheduler("rflow", low.cfg.training.diffusion, 64)
    plain = diffusion_batch("rflow", sched, mu, torch.zeros_like(mu), torch.tensor([0, 1, 0]), torch.arange(3), 1.0,
                            torch.Generator().manual_seed(0), 0.1, 2)
    cond = diffusion_batch("rflow", sched, mu, torch.zeros_like(mu), torch.tensor([0, 1, 0]), torch.arange(3), 1.0,
                           torch.Generator().manual_seed(0), 0.1, 2, cond_channels=c)
    assert torch.equal(cond[0][:, -c:], mu[:, -c:]) and torch.equal(cond[0][:, :-c], plain[0][:, :-c])
    assert all(torch.equal(a, b) for a, b in zip(cond[1:], plain[1:]))
    # ... and its loss does not see the label channels of the output
    x_t, tt, target = cond[0], cond[1], cond[2]
    out = torch.randn_like(target)
    other = out.clone()
    other[:, -c:] += 5.0
    assert torch.equal(_diffusion_loss(low.cfg, out, x_t, tt, target), _diffusion_loss(low.cfg, other, x_t, tt, target))
    assert not torch.equal(_diffusion_loss(cfg, out, x_t, tt, target), _diffusion_loss(cfg, other, x_t, tt, target))
    # resumed after 2 steps: the same expert as one run
    part = tmp_path / "part"
    train(cfg, part, max_steps=2)
    train(cfg, part, resume=True)
    a, b = run_weights(run / "low_noise"), run_weights(part / "low_noise")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # sampling: the label channels are those the high-noise expert drew alone, made clean; the image is the expert's
    both = Sampler.from_run(run)
    high = Sampler.from_run(run)
    high.low_noise = None
    st = both.settings(seed=4, steps=6)
    noise = both.initial_noise([0, 1], 4)

    def gens():
        return [torch.Generator().manual_seed(10 + i) for i in range(2)]

    labels = torch.tensor([0, 1])
    z_high = high.denoise(noise, labels, gens(), st)
    z = both.denoise(noise, labels, gens(), st)
    assert torch.equal(z[:, -c:], both.label_condition_bands(z_high, low))
    assert not torch.allclose(z[:, :-c], z_high[:, :-c])
    # per sample: the same bytes in any batch and order
    generate(run, tmp_path / "x", range(3), seed=2, steps=4, batch_size=3)
    generate(run, tmp_path / "y", [2, 0, 1], seed=2, steps=4, batch_size=1)
    x, y = _arrays(tmp_path / "x"), _arrays(tmp_path / "y")
    assert all(np.array_equal(x[i], y[i]) for i in range(3))
    # the expert is no sampler by itself, nor a high-noise expert
    with pytest.raises(ConfigError, match="only as a low-noise expert"):
        generate(run / "low_noise", tmp_path / "z", range(1), seed=2, steps=4)
    with pytest.raises(ConfigError, match="can only be the low-noise expert"):
        low.hand_over(high, 0.5)


def test_label_condition_needs_a_paired_wavelet_latent(phantoms):
    raw = tiny_config(phantoms, data={"use_labels": True}, training={"diffusion": {"label_condition": True}})
    with pytest.raises(ConfigError, match=r"training\.diffusion\.label_condition: .*wavelet"):
        config_from_dict(raw)
