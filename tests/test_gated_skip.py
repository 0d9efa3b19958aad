"""``model.unet.gated_skip``: the UNet's second output half is a gain on its input (``a + g * x``);
config checks; training, resume, sampling and the ControlNet with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from medsynth.config import ConfigError, config_from_dict
from medsynth.model.networks import build_unet
from medsynth.model.sample import Sampler, generate
from medsynth.model.train import train
from medsynth.samples import list_samples

from tests.helpers import run_weights, tiny_config

GATED = {"model": {"unet": {"gated_skip": True}}}


def _cfg(manifest=None, **extra):
    raw = tiny_config(manifest, **GATED)
    for k, v in extra.items():
        raw[k] = {**raw.get(k, {}), **v}
    return config_from_dict(raw)


def test_gated_unet_returns_offset_plus_gain_times_input_and_starts_at_zero():
    cfg = _cfg()
    net = build_unet(cfg)
    x = torch.randn(2, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    t, cls = torch.tensor([3.0, 11.0]), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.count_nonzero(net(x, t, class_labels=cls)) == 0  # MONAI zero-initialises the output layer
        for p in net.out.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        out = net(x, t, class_labels=cls)
        raw = DiffusionModelUNet.forward(net, x, t, None, cls)  # the network itself: 2 x 2 channels
    assert raw.shape[1] == 4 and out.shape == x.shape
    assert torch.allclose(out, raw[:, :2] + raw[:, 2:] * x, atol=1e-6)
    # the state dict is MONAI's own UNet's, with twice the output channels
    plain = DiffusionModelUNet(spatial_dims=3, in_channels=2, out_channels=4, num_res_blocks=1, channels=(8, 8),
                               attention_levels=(False, True), norm_num_groups=4, num_head_channels=8,
                               num_class_embeds=3)
    plain.load_state_dict(net.state_dict())


def test_gain_limited_to_low_noise_times_is_off_above_the_threshold():
    # gated_skip_below 0.5 of 1000 train timesteps: the gain acts at t < 500 only, per sample of the batch
    cfg = config_from_dict(tiny_config(None, model={"unet": {"gated_skip": True, "gated_skip_below": 0.5}},
                                       training={"diffusion": {"num_train_timesteps": 1000}}))
    net = build_unet(cfg)
    assert net.gate_below == 500.0
    x = torch.randn(3, 2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    t, cls = torch.tensor([100.0, 499.0, 500.0]), torch.tensor([0, 1, 0])
    with torch.no_grad():
        for p in net.out.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        out = net(x, t, class_labels=cls)
        raw = DiffusionModelUNet.forward(net, x, t, None, cls)
    assert torch.allclose(out[:2], raw[:2, :2] + raw[:2, 2:] * x[:2], atol=1e-6)
    assert torch.equal(out[2:], raw[2:, :2])


def test_gated_skip_config_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.unet\.gated_skip: only MONAI's UNet"):
        _cfg(model={"unet": {"kind": "maisi", "gated_skip": True, "channels": [8, 8],
                             "attention_levels": [False, True], "num_head_channels": 8, "norm_num_groups": 4}})
    with pytest.raises(ConfigError, match=r"model\.unet\.gated_skip: the gain outputs are new"):
        _cfg(model={"unet": {"gated_skip": True, "channels": [8, 8], "attention_levels": [False, True],
                             "num_head_channels": 8, "norm_num_groups": 4, "num_class_embeds": 2,
                             "init": "weights.pt", "init_license": "test"}})
    with pytest.raises(ConfigError, match=r"model\.unet\.gated_skip_below: needs gated_skip: true"):
        config_from_dict(tiny_config(None, model={"unet": {"gated_skip_below": 0.5}}))
    with pytest.raises(ConfigError, match=r"model\.unet\.gated_skip_below: a fraction of the noise schedule"):
        config_from_dict(tiny_config(None, model={"unet": {"gated_skip": True, "gated_skip_below": 0.0}}))


def test_gated_run_trains_resumes_exactly_and_samples_deterministically(phantoms, tmp_path):
    cfg = _cfg(phantoms, training={"scheduler": "rflow"}, sampling={"scheduler": "rflow", "eta": 1.0})
    whole = tmp_path / "whole"
    train(cfg, whole)
    # killed after stage-2 step 2 (a checkpoint), then resumed: the same weights as one run
    part = tmp_path / "part"
    raw = tiny_config(phantoms, **GATED)
    raw["training"] = {**raw["training"], "scheduler": "rflow"}
    raw["sampling"] = {**raw["sampling"], "scheduler": "rflow", "eta": 1.0}
    raw["training"]["diffusion"] = {**raw["training"]["diffusion"], "steps": 2}
    train(config_from_dict(raw), part)
    train(cfg, part, resume=True)
    a, b = run_weights(whole), run_weights(part)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    s = Sampler.from_run(whole)
    assert type(s.unet).__name__.startswith("DiffusionModelUNetGatedSkip")
    generate(whole, tmp_path / "x", range(3), seed=4, batch_size=2)
    generate(whole, tmp_path / "y", [2, 1, 0], seed=4, batch_size=1)
    vx = {v.sidecar["index"]: v.load().array for v in list_samples(tmp_path / "x")}
    vy = {v.sidecar["index"]: v.load().array for v in list_samples(tmp_path / "y")}
    assert sorted(vx) == [0, 1, 2]
    assert all(np.array_equal(vx[i], vy[i]) and np.isfinite(vx[i]).all() for i in vx)


def test_controlnet_on_a_gated_unet_starts_as_the_unet_and_trains(phantoms, tmp_path):
    from medsynth.model.controlnet import build_controlnet, controlled_prediction, train_controlnet

    cfg = _cfg()
    unet = build_unet(cfg).eval()
    with torch.no_grad():
        for p in unet.out.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    cn = build_controlnet(cfg, 3).eval()
    cn.load_state_dict(unet.state_dict(), strict=False)
    x, t = torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([5])
    mask = torch.zeros(1, 3, 16, 16, 16)
    mask[:, 1, 4:12] = 1
    with torch.no_grad():
        a = unet(x, t, class_labels=torch.tensor([1]))
        b = controlled_prediction(unet, cn, x, t, mask, torch.tensor([1]))
    assert torch.count_nonzero(a) > 0 and torch.allclose(a, b, atol=1e-6)
    run = tmp_path / "run"
    cfg = _cfg(phantoms, training={"controlnet": {"steps": 2, "batch_size": 2, "lr": 1e-3}})
    train(cfg, run)
    out = train_controlnet(cfg, run)
    assert out["steps"] == 2


def test_a_run_stored_before_a_config_key_existed_resumes_with_its_default():
    """A checkpoint whose stored config lacks a key added later (here ``model.unet.gated_skip``)
    is compared as if it had the default, which is the behaviour of the version that wrote it."""
    from medsynth.config import config_to_dict
    from medsynth.model.bookkeeping import DIFFUSION_KEYS, config_differences

    cfg = config_from_dict(tiny_config(None))
    stored = config_to_dict(cfg)
    del stored["model"]["unet"]["gated_skip"]
    assert config_differences(stored, cfg, DIFFUSION_KEYS) == []
    gated = config_from_dict(tiny_config(None, **GATED))
    assert config_differences(stored, gated, DIFFUSION_KEYS) == ["model.unet.gated_skip: False -> True"]
