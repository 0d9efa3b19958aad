"""The training fast path (issue 16 item 3): which precision ``training.precision: auto`` resolves to
on each kind of CPU, channels-last and fused attention in all three trained networks, and exact
resume of the ControlNet with them on (tiny 16³ networks; no timing assertions)."""

from __future__ import annotations

import pytest
import torch

from medsynth.config import ConfigError, config_from_dict
from medsynth.jobs import RunPaths
from medsynth.model.fastpath import (CPU_BF16_MIN_TRAINING_VOXELS, resolve_training_channels_last,
                                     resolve_training_precision)
from medsynth.model.networks import CPU_BF16_ENV
from medsynth.model.train import train, training_precision
from tests.helpers import Interrupt, run_weights, tiny_config

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", ["0", "1"])
def test_training_precision_auto_is_bf16_only_on_native_bf16_cpus_and_large_grids(monkeypatch, native):
    """``auto`` on a CPU without native bf16 (MEDSYNTH_CPU_BF16=0) is fp32 for every stage; with it
    (=1) bf16 from CPU_BF16_MIN_TRAINING_VOXELS (2048) voxels of the stage's grid, fp32 below; explicit fp32 stays fp32 on both."""
    monkeypatch.setenv(CPU_BF16_ENV, native)
    big = "bf16" if native == "1" else "fp32"
    assert resolve_training_precision("auto", CPU, CPU_BF16_MIN_TRAINING_VOXELS) == big
    assert resolve_training_precision("auto", CPU, 16 * 16 * 12) == big       # the wavelet demo's latent
    assert resolve_training_precision("auto", CPU, CPU_BF16_MIN_TRAINING_VOXELS - 1) == "fp32"
    assert resolve_training_precision("auto", CPU, 8 * 8 * 6) == "fp32"        # the KL demo's latent
    assert resolve_training_precision("fp32", CPU, 64 ** 3) == "fp32"
    # the autoencoder sees the 32³ image grid, the UNet its 8³ latent (4x downsampling)
    cfg = config_from_dict(tiny_config(None, data={"shape": [32, 32, 32]}, training={"precision": "auto"},
                                       model={"autoencoder": {"channels": [8, 8, 8],
                                                              "attention_levels": [False, False, False]}}))
    assert training_precision(cfg, "autoencoder", CPU) == big
    assert training_precision(cfg, "diffusion", CPU) == "fp32"


def test_training_precision_auto_is_accepted_and_a_typo_named():
    assert config_from_dict(tiny_config(None, training={"precision": "auto"})).training.precision == "auto"
    assert config_from_dict(tiny_config(None)).training.fused_attention == "auto"
    with pytest.raises(ConfigError, match=r"training.precision"):
        config_from_dict(tiny_config(None, training={"precision": "bfloat"}))


def test_training_layout_auto_is_per_stage_and_an_explicit_choice_wins():
    """``auto`` as measured on an AVX2 CPU in fp32: channels-last for stage 1 and the ControlNet,
    not for stage 2; under bf16 (measured on both native-bf16 CPU kinds) channels-last for stage 2
    and the ControlNet, channels-first for stage 1; channels-first on CUDA; fused attention on CUDA
    and in bf16 only."""
    from medsynth.model.fastpath import resolve_training_fused_attention

    cuda = torch.device("cuda")
    assert [resolve_training_channels_last("auto", CPU, s, "fp32") for s in ("autoencoder", "diffusion", "controlnet")] \
        == [True, False, True]
    assert [resolve_training_channels_last("auto", CPU, s, "bf16") for s in ("autoencoder", "diffusion", "controlnet")] \
        == [False, True, True]
    assert not resolve_training_channels_last("auto", cuda, "autoencoder", "bf16")
    assert resolve_training_channels_last(True, CPU, "diffusion", "fp32") is True
    assert resolve_training_channels_last(False, CPU, "autoencoder", "bf16") is False
    assert resolve_training_fused_attention("auto", CPU, "fp32") is False
    assert resolve_training_fused_attention("auto", CPU, "bf16") is True
    assert resolve_training_fused_attention("auto", cuda, "fp32") is True
    assert resolve_training_fused_attention(True, CPU, "fp32") is True


def _channels_last(net: torch.nn.Module) -> bool:
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    return bool(convs) and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convs)


def _fused(net: torch.nn.Module) -> list[bool]:
    return [m.use_flash_attention for m in net.modules() if hasattr(m, "use_flash_attention")
            and hasattr(m, "rel_positional_embedding")]


LAYOUTS = {  # training settings -> (stage 1 channels-last, stage 2 channels-last, attention fused)
    "defaults": ({}, (True, False, False)),  # auto, auto in fp32 on the CPU
    "fast": ({"channels_last": True, "fused_attention": True}, (True, True, True)),
    "plain": ({"channels_last": False, "fused_attention": False}, (False, False, False)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_both_stages_build_in_the_configured_layout_and_attention(tmp_path, name):
    """fp32 (this test's precision on any CPU): the autoencoder, discriminator, UNet and its EMA copy
    in the layout and attention the training settings resolve to."""
    from medsynth.model.autoencoder_training import _build_stage1
    from medsynth.model.diffusion_training import _build_stage2

    extra, (cl1, cl2, fused) = LAYOUTS[name]
    cfg = config_from_dict(tiny_config(None, training=extra))
    paths = RunPaths(tmp_path / "run")
    s1 = _build_stage1(cfg, paths, CPU, "fp32", False)
    s2 = _build_stage2(cfg, paths, CPU, "fp32", False)
    assert _channels_last(s1.ae) is cl1 and _channels_last(s1.disc) is cl1
    for net in (s2.unet, s2.ema.model):
        assert _channels_last(net) is cl2
        flags = _fused(net)
        assert flags and all(f is fused for f in flags)
    assert s2.fmt == (torch.channels_last_3d if cl2 else torch.contiguous_format)


def test_both_stages_resume_exactly_on_the_fast_path(tmp_path):
    """fp32 on any CPU: with channels-last and fused attention forced on, a run interrupted in each
    stage and resumed ends with every weight bitwise equal to the uninterrupted run's."""
    from medsynth.data.phantoms import write_phantoms

    man = write_phantoms(tmp_path / "ph", 8, 0, (16, 16, 16), (20.0, 20.0, 20.0))
    cfg = config_from_dict(tiny_config(man, training={"channels_last": True, "fused_attention": True}))
    train(cfg, tmp_path / "a")

    def stop_at(stage):
        def cb(s, step):
            if s == stage and step == 3:
                raise Interrupt()
        return cb

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "b", callback=stop_at("autoencoder"))
    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "b", resume=True, callback=stop_at("diffusion"))
    train(cfg, tmp_path / "b", resume=True)
    wa, wb = run_weights(tmp_path / "a"), run_weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from medsynth.data.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("cn-fast")
    man = write_phantoms(root / "ph", 8, 0, (16, 16, 16), (20.0, 20.0, 20.0))
    raw = tiny_config(man, training={"controlnet": {"steps": 4, "batch_size": 2, "lr": 1e-3}})
    train(config_from_dict(raw), root / "run")
    return root, raw


def test_controlnet_trains_fast_and_resumes_to_the_uninterrupted_weights(finished_run, tmp_path):
    """fp32 on any CPU (the tiny config's precision): the ControlNet trains channels-last with fused
    attention (forced on: ``auto`` keeps MONAI's attention in fp32 on the CPU), and one interrupted after step 3 (checkpoint at step 2) and resumed ends bitwise equal
    (weights and optimizer state) to the uninterrupted one."""
    import shutil

    from medsynth.model.checkpoint import load_checkpoint
    from medsynth.model.controlnet import STAGE, _build_controlnet_training, train_controlnet

    root, raw = finished_run
    cfg = config_from_dict({**raw, "training": {**raw["training"], "channels_last": True, "fused_attention": True}})
    runs = {}
    for name in ("a", "b"):
        runs[name] = tmp_path / name
        shutil.copytree(root / "run", runs[name])

    from medsynth.model.checkpoint import load_run

    tr = _build_controlnet_training(load_run(runs["a"]), cfg, 3, CPU, tmp_path / "none.pt", False)
    assert _channels_last(tr.cn) and _channels_last(tr.unet) and tr.fmt == torch.channels_last_3d
    assert tr.precision == "fp32" and all(_fused(tr.cn)) and all(_fused(tr.unet))

    train_controlnet(cfg, runs["a"])

    def stop(stage, step):
        if step == 3:
            raise Interrupt()

    with pytest.raises(Interrupt):
        train_controlnet(cfg, runs["b"], callback=stop)
    assert load_checkpoint(RunPaths(runs["b"]).checkpoint(STAGE), STAGE)["step"] == 2
    train_controlnet(cfg, runs["b"], resume=True)
    ca, cb = (load_checkpoint(RunPaths(runs[n]).checkpoint(STAGE), STAGE) for n in ("a", "b"))
    assert ca["step"] == cb["step"] == 4
    assert ca["model"].keys() == cb["model"].keys()
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    sa, sb = ca["opt"]["state"], cb["opt"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


@pytest.mark.parametrize("setting, fused", [("auto", True), (True, True), (False, False)])
def test_every_stage_steps_adam_fused_as_configured(tmp_path, finished_run, setting, fused):
    """``training.fused_optimizer`` (precision-independent): ``auto`` is PyTorch's fused Adam on the
    CPU for stage 1 (both optimizers), stage 2 and the ControlNet; ``false`` its per-parameter loop."""
    from medsynth.model.autoencoder_training import _build_stage1
    from medsynth.model.checkpoint import load_run
    from medsynth.model.controlnet import _build_controlnet_training
    from medsynth.model.diffusion_training import _build_stage2
    from medsynth.model.fastpath import resolve_training_fused_optimizer

    assert resolve_training_fused_optimizer(setting, CPU) is fused
    root, raw = finished_run
    cfg = config_from_dict({**raw, "training": {**raw["training"], "fused_optimizer": setting}})
    paths = RunPaths(tmp_path / "run")
    s1 = _build_stage1(cfg, paths, CPU, "fp32", False)
    s2 = _build_stage2(cfg, paths, CPU, "fp32", False)
    tr = _build_controlnet_training(load_run(root / "run"), cfg, 3, CPU, tmp_path / "none.pt", False)
    for opt in (s1.opt_g, s1.opt_d, s2.opt, tr.opt):
        assert bool(opt.defaults.get("fused")) is fused


def test_an_adam_state_saved_looped_resumes_fused_and_takes_the_same_step():
    """fp32: the checkpoint format is the same; a looped Adam's state loaded into a fused one gives
    the looped update to float rounding (the two kernels order the arithmetic differently)."""
    torch.manual_seed(0)
    w = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    grads = [[torch.randn_like(p) for p in w] for _ in range(4)]

    def run(opt_kw_first, opt_kw_then):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in w]
        opt = torch.optim.Adam(ps, lr=1e-2, **opt_kw_first)
        for g in grads[:2]:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()
        opt2 = torch.optim.Adam(ps, lr=1e-2, **opt_kw_then)
        opt2.load_state_dict(opt.state_dict())
        for g in grads[2:]:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt2.step()
        return ps

    looped, mixed = run({}, {}), run({}, {"fused": True})
    for a, b in zip(looped, mixed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
