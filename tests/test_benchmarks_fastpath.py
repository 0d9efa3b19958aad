"""The sampling fast path the benchmarks measure: oneDNN convolutions, channels-last, fused attention,
precision choice, decode tiles; and the exact path that reproduces MONAI bit for bit."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from medsynth.config import ConfigError, config_from_dict
from medsynth.model.fastpath import (
    CPU_BF16_MIN_LATENT_VOXELS,
    OneDNNConv3d,
    plan_tiles,
    resolve_channels_last,
    resolve_sampling_precision,
    use_fused_attention,
    use_onednn_convolutions,
)
from medsynth.model.networks import (
    build_autoencoder,
    build_unet,
    cpu_has_native_bf16,
    seeded_init,
)
from medsynth.model.sample import Sampler
from tests.helpers import tiny_config

CPU = torch.device("cpu")


def _cfg(**sampling):
    raw = tiny_config(None, data={"shape": [16, 16, 16]},
                      model={"unet": {"num_class_embeds": None}}, sampling={"guidance_scale": 1.0, **sampling})
    return config_from_dict(raw)


def _nets(cfg):
    with seeded_init(0):
        ae, unet = build_autoencoder(cfg), build_unet(cfg)
    # MONAI zero-initialises the UNet's output layer; give it weights so outputs are not all zero
    for m in unet.modules():
        ps = list(m.parameters(recurse=False))
        if ps and hasattr(m, "reset_parameters") and all(bool((p == 0).all()) for p in ps):
            with seeded_init(1):
                m.reset_parameters()
    return ae, unet


def test_onednn_conv_matches_conv3d_and_only_changes_fp32_cpu_inference():
    torch.manual_seed(0)
    conv = nn.Conv3d(8, 8, 3, padding=1)
    fast = copy.deepcopy(conv)
    assert use_onednn_convolutions(nn.Sequential(fast)) == 1 and type(fast) is OneDNNConv3d
    assert fast.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(1, 8, 6, 6, 6)
    with torch.inference_mode():
        assert torch.allclose(fast(x), conv(x), atol=1e-5)
        xc = x.contiguous(memory_format=torch.channels_last_3d)
        assert torch.allclose(fast(xc), conv(x), atol=1e-5)
    # with gradients (training) it is nn.Conv3d itself, bit for bit, and differentiable
    y = fast(x.requires_grad_())
    assert torch.equal(y, conv(x))
    y.sum().backward()
    assert x.grad is not None


def test_fused_attention_switch_keeps_the_unet_output():
    cfg = _cfg()
    _, unet = _nets(cfg)
    fused = copy.deepcopy(unet)
    assert use_fused_attention(fused) >= 1
    assert use_fused_attention(fused) == 0  # already switched
    x, t = torch.randn(1, 2, 8, 8, 8), torch.tensor([7.0])
    with torch.inference_mode():
        a, b = unet(x, t), fused(x, t)
    assert a.abs().max() > 0 and torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("grid,cap,overlap", [((64, 64, 64), (32, 32, 32), 0.25), ((16, 16, 16), (12, 12, 12), 0.5),
                                              ((40, 24, 16), (32, 32, 8), 0.25), ((16, 16, 16), (16, 16, 16), 0.5)])
def test_planned_tiles_cover_the_grid_within_the_cap_and_monai_places_them(grid, cap, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    roi, ov = plan_tiles(grid, cap, overlap)
    assert all(r <= min(c, g) for r, c, g in zip(roi, cap, grid))
    slices = dense_patch_slices(grid, roi, _get_scan_interval(grid, roi, 3, ov))
    covered = torch.zeros(grid, dtype=torch.bool)
    for sl in slices:
        covered[tuple(sl)] = True
    assert bool(covered.all())
    naive_roi = tuple(min(c, g) for c, g in zip(cap, grid))
    naive = dense_patch_slices(grid, naive_roi, _get_scan_interval(grid, naive_roi, 3, (overlap,) * 3))
    # never more tiles, never more decoded voxels than fixed-size tiles
    assert len(slices) <= len(naive)
    assert len(slices) * math.prod(roi) <= len(naive) * math.prod(naive_roi)


def test_precision_auto_and_explicit(monkeypatch):
    assert resolve_sampling_precision("auto", CPU) == ("bf16" if cpu_has_native_bf16() else "fp32")
    monkeypatch.setenv("MEDSYNTH_CPU_BF16", "0")
    assert not cpu_has_native_bf16() and resolve_sampling_precision("auto", CPU) == "fp32"
    monkeypatch.setenv("MEDSYNTH_CPU_BF16", "1")
    assert cpu_has_native_bf16() and resolve_sampling_precision("auto", CPU) == "bf16"
    # bf16 is slower than fp32 at tiny latents on the CPU: auto keeps fp32 below the measured size
    small, large = CPU_BF16_MIN_LATENT_VOXELS - 1, CPU_BF16_MIN_LATENT_VOXELS
    assert resolve_sampling_precision("auto", CPU, small) == "fp32"
    assert resolve_sampling_precision("auto", CPU, large) == "bf16"
    assert resolve_sampling_precision("bf16", CPU, small) == "bf16"  # an explicit choice wins
    monkeypatch.setenv("MEDSYNTH_CPU_BF16", "0")
    assert resolve_sampling_precision("auto", CPU, large) == "fp32"
    monkeypatch.delenv("MEDSYNTH_CPU_BF16")
    assert resolve_sampling_precision("fp32", CPU) == "fp32"
    assert resolve_sampling_precision("fp16", CPU) == "fp32"  # fp16 autocast needs CUDA
    with pytest.raises(ConfigError, match=r"sampling.precision: must be one of .*got 'bf61'"):
        _cfg(precision="bf61")


def test_channels_last_auto_is_cpu_only_and_an_explicit_choice_wins():
    assert _cfg().sampling.channels_last == "auto"
    assert resolve_channels_last("auto", CPU) is True
    assert resolve_channels_last("auto", torch.device("cuda")) is False  # cuDNN 3D convs: slower (H200)
    assert resolve_channels_last(True, torch.device("cuda")) is True
    assert resolve_channels_last(False, CPU) is False
    assert _cfg(channels_last=False).sampling.channels_last is False
    with pytest.raises(ConfigError, match=r"sampling.channels_last"):
        _cfg(channels_last="sometimes")


def test_exact_path_reproduces_monai_latent_diffusion_inferer_bit_for_bit():
    from monai.inferers import LatentDiffusionInferer

    from medsynth.data.transforms import intensity_norm
    from medsynth.model.networks import build_scheduler

    cfg = _cfg(precision="fp32", channels_last=False, onednn_conv=False, fused_attention=False)
    ae, unet = _nets(cfg)
    sampler = Sampler(cfg, copy.deepcopy(ae), copy.deepcopy(unet), 1.0, intensity_norm(cfg.data).to_dict(), CPU, {}, "t")
    st = sampler.settings(seed=3, steps=3, scheduler="ddim")
    noise = sampler.initial_noise([0], 3)
    ours = sampler.decode(sampler.denoise(noise, None, [torch.Generator()], st))
    sched = build_scheduler("ddim", cfg.training.diffusion, math.prod(noise.shape[2:]))
    sched.set_timesteps(3)
    theirs = LatentDiffusionInferer(sched, scale_factor=1.0).sample(
        input_noise=noise, autoencoder_model=ae.eval(), diffusion_model=unet.eval(), scheduler=sched, verbose=False)
    assert torch.equal(ours, theirs)


# max |HU| difference of the fast path from the exact fp32 path on the untrained 16³ networks:
# fp32 differs by rounding only; bf16 (measured 25.7 HU on a Xeon with AMX) by bf16's 8-bit mantissa.
FAST_PATH_TOLERANCE_HU = {"fp32": 0.5, "bf16": 80.0}


@pytest.mark.parametrize("cpu_bf16", ["0", "1"])
def test_fast_path_is_close_to_exact_deterministic_and_recorded(monkeypatch, cpu_bf16):
    """Both CPU kinds on any machine: MEDSYNTH_CPU_BF16=0 behaves as an AVX2 CPU (auto -> fp32),
    =1 as one with AMX/AVX512-BF16 (auto -> bf16, emulated where the CPU lacks it)."""
    monkeypatch.setenv("MEDSYNTH_CPU_BF16", cpu_bf16)
    precision = resolve_sampling_precision("auto", CPU)
    assert precision == ("bf16" if cpu_bf16 == "1" else "fp32")
    exact_cfg = _cfg(precision="fp32", channels_last=False, onednn_conv=False, fused_attention=False)
    # this test's latent is below CPU_BF16_MIN_LATENT_VOXELS, where auto keeps fp32: ask for what
    # auto gives at scale, so the bf16 path is exercised
    fast_cfg = _cfg(precision=precision)
    ae, unet = _nets(fast_cfg)
    from medsynth.data.transforms import intensity_norm

    norm = intensity_norm(fast_cfg.data).to_dict()
    exact = Sampler(exact_cfg, copy.deepcopy(ae), copy.deepcopy(unet), 1.0, norm, CPU, {}, "t")
    fast = Sampler(fast_cfg, copy.deepcopy(ae), copy.deepcopy(unet), 1.0, norm, CPU, {}, "t")
    assert fast.provenance["sampling_path"] == {"precision": precision,
                                                "channels_last": True, "onednn_conv": True, "fused_attention": True}
    assert any(type(m) is OneDNNConv3d for m in fast.unet.modules())
    assert not any(type(m) is OneDNNConv3d for m in exact.unet.modules())
    st = fast.settings(seed=1, steps=3, scheduler="ddim")
    a = exact.sample([0, 1], st)
    b = fast.sample([0, 1], st)
    b_again = fast.sample([1], st)
    for va, vb in zip(a, b):
        assert vb.array.flags["C_CONTIGUOUS"] and vb.array.shape == (16, 16, 16)
        assert abs(va.array - vb.array).max() < FAST_PATH_TOLERANCE_HU[precision]
    assert (b_again[0].array == b[1].array).all()  # sample 1 alone == sample 1 in a batch, to the byte
