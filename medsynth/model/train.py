"""Training: stage 1 (autoencoder) and stage 2 (latent diffusion) into a run directory.

The file reads top-down: the stage-1 loop, then the stage-2 loop, then the entry point
:func:`train`; the data (:mod:`.training_data`), the losses (:mod:`.objectives`) and the bookkeeping
every loop shares (:mod:`.bookkeeping`) live beside it.  Both loops count optimizer steps.  All randomness of step ``s`` (batch
order, KL sampling noise, diffusion noise and timesteps, label dropout) comes from generators
that are pure functions of ``(training.seed, stage, s)``: a resumed run needs only the weights,
optimizer, LR-scheduler and EMA states of its last checkpoint to continue exactly where the
uninterrupted run would be, and no global random state is ever touched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from medsynth.config import Config, as_config, dump_yaml
from medsynth.errors import CheckpointError, ConfigError
from medsynth.jobs import RunPaths, derive_seed, sha256_file, write_json, write_text
from medsynth.model.bookkeeping import (
    AE_KEYS,
    DIFFUSION_KEYS,
    StepBook,
    StepCallback,
    base_payload,
    check_compatible,
    existing_checkpoint,
)
from medsynth.model.checkpoint import (
    build_model_card,
    checkpoint_config,
    is_complete,
    load_checkpoint,
    save_checkpoint,
    versions,
    write_model_card,
)
from medsynth.model.distributed import (
    AEStep,
    allreduce_grads,
    barrier,
    check_batch,
    ddp,
    init_from_env,
    is_main,
    rank_part,
    shutdown,
)
from medsynth.model.ema import EMA
from medsynth.model.fastpath import memory_format, resolve_channels_last
from medsynth.model.init_weights import InitWeights, config_init, load_into
from medsynth.model.labels import label_values
from medsynth.model.networks import (
    autocast,
    build_autoencoder,
    build_discriminator,
    build_scheduler,
    build_unet,
    diffusion_loss,
    generator,
    latent_shape,
    lr_lambda,
    resolve_device,
    resolve_precision,
    seeded_init,
)
from medsynth.model.objectives import diffusion_batch, kl_loss, label_dice, recon_loss
from medsynth.model.training_data import TrainingData, batch_images, batch_indices, prepare_data
from medsynth.progress import progress
from medsynth.registry import LATENT_KINDS

log = logging.getLogger("medsynth.model.train")


# --------------------------------------------------------------------------------------------
# Stage 1: autoencoder
# --------------------------------------------------------------------------------------------


class _Resumable:
    """A stage's training state: ``STATE`` maps each checkpoint entry to the attribute whose
    ``state_dict`` it holds; :meth:`state` and :meth:`load` resume the stage exactly."""

    STATE: dict[str, str] = {}

    def state(self) -> dict[str, Any]:
        return {key: getattr(self, attr).state_dict() for key, attr in self.STATE.items()}

    def load(self, ck: dict[str, Any]) -> None:
        for key, attr in self.STATE.items():
            getattr(self, attr).load_state_dict(ck[key])


@dataclass
class _Stage1(_Resumable):
    """Stage 1's autoencoder, discriminator, their optimizers, LR schedulers and gradient scalers,
    the losses, and the initial weights it started from (None: random)."""

    ae: torch.nn.Module
    disc: torch.nn.Module
    ae_step: Any  # the autoencoder's training forward (DistributedDataParallel under torchrun)
    opt_g: Any
    opt_d: Any
    sched_g: Any
    sched_d: Any
    scaler_g: Any
    scaler_d: Any
    perceptual: Optional[torch.nn.Module]
    adv_loss: Any
    init: Optional[InitWeights]

    # checkpoint entry -> attribute, in the checkpoint's order
    STATE = {"model": "ae", "discriminator": "disc", "opt_g": "opt_g", "opt_d": "opt_d", "sched_g": "sched_g",
             "sched_d": "sched_d", "scaler_g": "scaler_g", "scaler_d": "scaler_d"}


def _build_stage1(cfg: Config, paths: RunPaths, device: torch.device, precision: str, resume: bool) -> _Stage1:
    from monai.losses import PatchAdversarialLoss

    t, stage = cfg.training.autoencoder, "autoencoder"
    with seeded_init(derive_seed(cfg.training.seed, "init", stage)):
        ae, disc = build_autoencoder(cfg), build_discriminator(cfg)
    init = _initial_weights(cfg, "autoencoder", paths.checkpoint(stage), resume)
    if init is not None:  # fine-tune from local weights
        load_into(ae, init)
    ae.to(device).train()
    disc.to(device).train()
    check_batch(t.batch_size, "training.autoencoder.batch_size")
    ae_step = ddp(AEStep(ae), device)  # DistributedDataParallel under torchrun, else the plain module
    opt_g = torch.optim.Adam(ae.parameters(), lr=t.lr)
    opt_d = torch.optim.Adam(disc.parameters(), lr=t.lr)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda(t.lr_schedule, t.warmup_steps, t.steps))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_lambda(t.lr_schedule, t.warmup_steps, t.steps))
    scaler_g = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    scaler_d = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    perceptual = None
    if t.perceptual_weight > 0:
        from medsynth.model.perceptual import LocalMedicalNetPerceptualLoss

        perceptual = LocalMedicalNetPerceptualLoss(t.perceptual_weights, t.perceptual_network).to(device)
    return _Stage1(ae, disc, ae_step, opt_g, opt_d, sched_g, sched_d, scaler_g, scaler_d, perceptual,
                   PatchAdversarialLoss(criterion="least_squares"), init)


def _generator_loss(s1: _Stage1, t: Any, recon: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                    x: torch.Tensor, adv_on: bool, device: torch.device, precision: str
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + KL, and the optional label Dice, L2, perceptual and adversarial terms; the loss and its parts."""
    l1 = recon_loss(F.l1_loss, recon, x, t.label_balance)
    kl = kl_loss(mu, sigma)
    loss = l1 + t.kl_weight * kl
    rec = {"l1": l1.item(), "kl": kl.item()}
    if t.label_dice_weight > 0 and x.shape[1] > 1:
        dice = label_dice(recon, x)
        loss = loss + t.label_dice_weight * dice
        rec["label_dice"] = dice.item()
    if t.l2_weight > 0:
        l2 = recon_loss(F.mse_loss, recon, x, t.label_balance)
        loss = loss + t.l2_weight * l2
        rec["l2"] = l2.item()
    if s1.perceptual is not None:
        p = s1.perceptual(recon[:, :1], x[:, :1])  # the image channel (label channels are one-hot)
        loss = loss + t.perceptual_weight * p
        rec["perceptual"] = p.item()
    if adv_on:
        with autocast(device, precision):
            g_adv = s1.adv_loss(s1.disc(recon.contiguous())[-1].float(), target_is_real=True, for_discriminator=False)
        loss = loss + t.adv_weight * g_adv
        rec["g_adv"] = g_adv.item()
    return loss, rec


def _discriminator_update(s1: _Stage1, recon: torch.Tensor, x: torch.Tensor, device: torch.device,
                          precision: str) -> float:
    with autocast(device, precision):
        d_fake = s1.adv_loss(s1.disc(recon.detach().contiguous())[-1].float(), target_is_real=False,
                             for_discriminator=True)
        d_real = s1.adv_loss(s1.disc(x)[-1].float(), target_is_real=True, for_discriminator=True)
        d_loss = 0.5 * (d_fake + d_real)
    s1.opt_d.zero_grad(set_to_none=True)
    s1.scaler_d.scale(d_loss).backward()
    allreduce_grads(s1.disc)
    s1.scaler_d.step(s1.opt_d)
    s1.scaler_d.update()
    s1.sched_d.step()
    return d_loss.item()


def _autoencoder_step(s1: _Stage1, cfg: Config, data: TrainingData, step: int, device: torch.device,
                      precision: str) -> dict[str, float]:
    """One optimizer step of stage 1 (generator, then discriminator once adversarial training is on)."""
    t, seed, stage = cfg.training.autoencoder, cfg.training.seed, "autoencoder"
    g = generator(seed, stage, "step", step)
    # the global batch is a function of (seed, step); each rank takes its part of it
    x = batch_images(data.train, rank_part(batch_indices(seed, stage, step, len(data.train), t.batch_size)), device)
    adv_on = t.adv_weight > 0 and step >= t.adv_start

    def eps(m: torch.Tensor) -> torch.Tensor:
        noise = torch.randn((t.batch_size, *m.shape[1:]), generator=g)
        return rank_part(noise).to(device=device, dtype=m.dtype)

    with autocast(device, precision):
        recon, mu, sigma = s1.ae_step(x, eps)
    recon, mu, sigma = recon.float(), mu.float(), sigma.float()
    loss, rec = _generator_loss(s1, t, recon, mu, sigma, x, adv_on, device, precision)
    s1.opt_g.zero_grad(set_to_none=True)
    s1.scaler_g.scale(loss).backward()
    s1.scaler_g.step(s1.opt_g)
    s1.scaler_g.update()
    if adv_on:
        rec["d_loss"] = _discriminator_update(s1, recon, x, device, precision)
    s1.sched_g.step()
    return rec


def train_autoencoder(cfg: Config, paths: RunPaths, data: TrainingData, device: torch.device, precision: str,
                      resume: bool, callback: Optional[StepCallback] = None,
                      max_steps: Optional[int] = None) -> dict[str, Any]:
    """Stage 1: L1 + KL, PatchGAN adversarial loss from ``adv_start``, optional local perceptual loss.

    Validation PSNR/SSIM (model space, data range 2) every ``val_every`` steps and at the end.
    Returns a summary dict; the weights are in ``RUN/autoencoder/last.pt``.
    """
    if not LATENT_KINDS[cfg.model.autoencoder.kind].trained:
        return fit_wavelet(cfg, paths, data, device, precision, resume)
    if cfg.training.autoencoder.steps == 0:  # initial weights used as they are (the config asks for an init)
        return use_initial_autoencoder(cfg, paths, data, device, precision, resume)
    t, stage = cfg.training.autoencoder, "autoencoder"
    s1 = _build_stage1(cfg, paths, device, precision, resume)
    ck_path = paths.checkpoint(stage)
    step, val = 0, None
    ck = existing_checkpoint(ck_path, stage, cfg, resume, AE_KEYS, "trained its autoencoder")
    if ck is not None:
        s1.load(ck)
        step, val = int(ck["step"]), ck.get("val_metrics")
        log.info("autoencoder: resuming at step %d of %d", step, t.steps)

    def save() -> None:
        save_checkpoint(ck_path, {
            **base_payload(cfg, stage, step, t.steps), **s1.state(),
            "intensity_norm": data.norm, "val_metrics": book.val, "data_info": data.info,
            "init": s1.init.provenance() if s1.init is not None else (ck or {}).get("init"),
        })

    validate = (lambda: _validate_autoencoder(s1.ae, data.val, device, precision, label_values(cfg))) \
        if len(data.val) else None
    book = StepBook(stage, cfg, t, paths, step, math.ceil(len(data.train) / t.batch_size), val, callback)
    start = step
    end = t.steps if max_steps is None else min(t.steps, start + max_steps)
    for _ in progress(range(start, end), desc=stage, total=end - start):
        rec = _autoencoder_step(s1, cfg, data, step, device, precision)
        step += 1
        book.after_step(step, end, rec, s1.sched_g.get_last_lr()[0], validate, save)
    if start == t.steps:
        log.info("autoencoder: already trained (%d steps)", step)
    return {"stage": stage, "steps": step, "val": book.val, "seconds": book.seconds}


@torch.no_grad()
def _validate_autoencoder(ae: torch.nn.Module, items: Any, device: torch.device, precision: str,
                          label_vals: Sequence[int] = ()) -> dict[str, float]:
    """PSNR/SSIM of the image channel; for paired models also ``label_dice_<value>``, the Dice of the
    argmax label map per label value over all validation cases."""
    from monai.metrics import PSNRMetric, SSIMMetric

    ae.eval()
    psnr, ssim = PSNRMetric(max_val=2.0), SSIMMetric(spatial_dims=3, data_range=2.0, win_size=7)
    inter, total = torch.zeros(len(label_vals)), torch.zeros(len(label_vals))
    for i in range(len(items)):
        x = batch_images(items, torch.tensor([i]), device)
        with autocast(device, precision):
            recon = ae.decode(ae.encode(x)[0]).float().clamp(-1.0, 1.0)
        psnr(recon[:, :1], x[:, :1])
        ssim(recon[:, :1], x[:, :1])
        if label_vals:  # paired: Dice of the argmax label map, per label value, over all cases
            pred, true = recon[:, 1:].argmax(1), x[:, 1:].argmax(1)
            for k in range(len(label_vals)):
                p, q = pred == k, true == k
                inter[k] += float((p & q).sum())
                total[k] += float(p.sum() + q.sum())
    out = {"psnr": float(psnr.aggregate().item()), "ssim": float(ssim.aggregate().item())}
    for k, v in enumerate(label_vals):
        if total[k] > 0:
            out[f"label_dice_{v}"] = float(2.0 * inter[k] / total[k])
    ae.train()
    return out


def _initial_weights(cfg: Config, role: str, ck_path: Path, resume: bool) -> Optional[InitWeights]:
    """The config's initial weights for ``role``, read only when the stage starts afresh (a resumed
    stage continues from its checkpoint, which records the file's sha256)."""
    if resume and ck_path.is_file():
        return None
    return config_init(cfg, role)


def use_initial_autoencoder(cfg: Config, paths: RunPaths, data: TrainingData, device: torch.device,
                            precision: str, resume: bool) -> dict[str, Any]:
    """Stage 1 with ``training.autoencoder.steps: 0``: the weights of ``model.autoencoder.init`` used
    as they are (frozen), validated on the local data and stored, with the intensity map and the
    file's sha256 and licence, as ``RUN/autoencoder/last.pt`` (step 0 of 0, so it counts as complete)."""
    stage = "autoencoder"
    ck_path = paths.checkpoint(stage)
    ck = existing_checkpoint(ck_path, stage, cfg, resume, AE_KEYS, "has its autoencoder")
    if ck is not None:
        log.info("autoencoder: initial weights already in place")
        return {"stage": stage, "steps": 0, "val": ck.get("val_metrics"), "seconds": 0.0}
    t0 = time.perf_counter()
    init = config_init(cfg, stage)
    ae = build_autoencoder(cfg)
    load_into(ae, init)
    ae.to(device)
    val = _validate_autoencoder(ae, data.val, device, precision, label_values(cfg)) if len(data.val) else None
    if is_main():
        save_checkpoint(ck_path, {**base_payload(cfg, stage, 0, 0), "model": ae.state_dict(),
                                  "intensity_norm": data.norm, "val_metrics": val, "data_info": data.info,
                                  "init": {**init.provenance(), "frozen": True}})
        write_text(paths.metrics(stage), json.dumps({"stage": stage, "step": 0, "val": val}) + "\n")
    log.info("autoencoder: %s used as it is (frozen, %s)%s", init.path.name, init.layout,
             f"; validation PSNR {val['psnr']:.1f} dB" if val else "")
    return {"stage": stage, "steps": 0, "val": val, "seconds": round(time.perf_counter() - t0, 1)}


def fit_wavelet(cfg: Config, paths: RunPaths, data: TrainingData, device: torch.device, precision: str,
                resume: bool) -> dict[str, Any]:
    """Stage 1 of a wavelet latent: nothing to train; the sub-band scales are fitted on the training
    set (``wavelet_band_scale``) and stored, with the intensity map, as ``RUN/autoencoder/last.pt``
    (step 0 of 0, so it counts as complete).  Validation records the reconstruction, which is exact."""
    from medsynth.model.wavelet import fit_band_scale

    stage = "autoencoder"
    ck_path = paths.checkpoint(stage)
    ck = existing_checkpoint(ck_path, stage, cfg, resume, AE_KEYS, "has its wavelet latent")
    if ck is not None:
        log.info("autoencoder: wavelet latent already fitted")
        return {"stage": stage, "steps": 0, "val": ck.get("val_metrics"), "seconds": 0.0}
    t0 = time.perf_counter()
    wav = build_autoencoder(cfg)
    a = cfg.model.autoencoder
    n_lab = len(label_values(cfg))
    unit = n_lab * (1 if a.wavelet_label_bands == "low" else 8 ** a.wavelet_levels) if a.wavelet_label_scale == "unit" else 0
    fit_band_scale(wav, (data.train[i]["image"] for i in range(len(data.train))),
                   scale=a.wavelet_band_scale, unit_channels=unit,
                   detail_gain=a.wavelet_detail_gain)
    val = _validate_autoencoder(wav, data.val, device, precision, label_values(cfg)) if len(data.val) else None
    if is_main():
        save_checkpoint(ck_path, {**base_payload(cfg, stage, 0, 0), "model": wav.state_dict(),
                                  "intensity_norm": data.norm, "val_metrics": val, "data_info": data.info})
        write_text(paths.metrics(stage), json.dumps({"stage": stage, "step": 0, "val": val}) + "\n")
    log.info("autoencoder: wavelet latent (%d level(s), %d channels), no training%s",
             cfg.model.autoencoder.wavelet_levels, wav.latent_channels,
             f"; validation PSNR {val['psnr']:.1f} dB" if val else "")
    return {"stage": stage, "steps": 0, "val": val, "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------------
# Stage 2: latent diffusion
# --------------------------------------------------------------------------------------------


@dataclass
class _Latents:
    """The training (and validation) latents of the frozen stage-1 autoencoder, and its checkpoint."""

    ae_ck: dict[str, Any]
    ae_sha: str
    mu: torch.Tensor
    sigma: torch.Tensor
    val_mu: torch.Tensor
    val_sigma: torch.Tensor
    val_classes: torch.Tensor


def _frozen_latents(cfg: Config, paths: RunPaths, data: TrainingData, device: torch.device,
                    precision: str) -> _Latents:
    """Encode the data with the finished stage-1 autoencoder (refused unless it is complete and of
    this config); without validation cases, the first 8 training latents validate."""
    ae_path = paths.checkpoint("autoencoder")
    ae_ck = load_checkpoint(ae_path, "autoencoder")
    if not is_complete(ae_ck):
        raise CheckpointError(f"{ae_path}: the autoencoder is not fully trained (step {ae_ck['step']} of "
                              f"{ae_ck['steps']})", hint="finish stage 1 first: --stage autoencoder --resume")
    check_compatible(ae_ck, cfg, ae_path, AE_KEYS)
    ae_sha = sha256_file(ae_path)
    ae = build_autoencoder(cfg)
    ae.load_state_dict(ae_ck["model"])
    ae.to(device).eval().requires_grad_(False)
    mu, sigma = encode_latents(ae, data.train, device, precision)
    vmu, vsig, vcls = (*encode_latents(ae, data.val, device, precision), data.val_classes) if len(data.val) \
        else (mu[:8], sigma[:8], data.classes[:8])
    return _Latents(ae_ck, ae_sha, mu, sigma, vmu, vsig, vcls)


@dataclass
class _Stage2(_Resumable):
    """Stage 2's UNet (and its training forward), EMA copy, optimizer, LR scheduler, gradient scaler,
    memory format, noise scheduler, and the initial weights it started from (None: random)."""

    unet: torch.nn.Module
    net: Any  # DistributedDataParallel under torchrun, else the UNet itself
    ema: EMA
    opt: Any
    sched: Any
    scaler: Any
    fmt: torch.memory_format
    noise_sched: Any
    init: Optional[InitWeights]

    STATE = {"model": "unet", "ema": "ema", "opt": "opt", "sched": "sched", "scaler": "scaler"}


def _build_stage2(cfg: Config, paths: RunPaths, device: torch.device, precision: str, resume: bool) -> _Stage2:
    t, stage = cfg.training.diffusion, "diffusion"
    with seeded_init(derive_seed(cfg.training.seed, "init", stage)):
        unet = build_unet(cfg)
    init = _initial_weights(cfg, "unet", paths.checkpoint(stage), resume)
    if init is not None:  # fine-tune (or, with steps: 0, use) local weights; EMA starts from them
        load_into(unet, init)
    unet.to(device).train()
    fmt = memory_format(resolve_channels_last(cfg.training.channels_last, device))
    unet.to(memory_format=fmt)
    check_batch(t.batch_size, "training.diffusion.batch_size")
    net = ddp(unet, device)
    ema = EMA(unet, t.ema_decay)
    opt = torch.optim.Adam(unet.parameters(), lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.lr_schedule, t.warmup_steps, t.steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    noise_sched = build_scheduler(cfg.training.scheduler, t, math.prod(latent_shape(cfg)[1:]))
    return _Stage2(unet, net, ema, opt, sched, scaler, fmt, noise_sched, init)


def _diffusion_loss(cfg: Config, pred: torch.Tensor, x_t: torch.Tensor, tt: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
    t = cfg.training.diffusion
    return diffusion_loss(cfg.training.scheduler, t.prediction_type, pred, x_t, tt, target, t.num_train_timesteps)


def _diffusion_step(s2: _Stage2, cfg: Config, lat: _Latents, classes: torch.Tensor, step: int, scale: float,
                    device: torch.device, precision: str) -> float:
    """One optimizer step of stage 2 over ``grad_accum`` micro-batches; returns the loss."""
    t, seed, stage = cfg.training.diffusion, cfg.training.seed, "diffusion"
    null_class = cfg.model.unet.num_class_embeds  # None for an unconditional model
    s2.opt.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(t.grad_accum):
        g = generator(seed, stage, "step", step, micro)
        idx = batch_indices(seed, stage, step * t.grad_accum + micro, len(lat.mu), t.batch_size)
        x_t, tt, target, labels = diffusion_batch(cfg.training.scheduler, s2.noise_sched, lat.mu, lat.sigma, classes,
                                                  idx, scale, g, t.cond_drop_prob, null_class, t.timestep_dist)
        # drawn for the global batch, then this rank's part (identical to one process)
        x_t, tt, target = rank_part(x_t), rank_part(tt), rank_part(target)
        labels = None if labels is None else rank_part(labels)
        with autocast(device, precision):
            pred = s2.net(x_t.to(device).contiguous(memory_format=s2.fmt), tt.to(device),
                          class_labels=None if labels is None else labels.to(device))
        loss = _diffusion_loss(cfg, pred.float(), x_t.to(device), tt.to(device), target.to(device)) / t.grad_accum
        s2.scaler.scale(loss).backward()
        total += loss.item()
    s2.scaler.step(s2.opt)
    s2.scaler.update()
    s2.sched.step()
    s2.ema.update(s2.unet)
    return total


@torch.no_grad()
def _validate_diffusion(s2: _Stage2, cfg: Config, lat: _Latents, scale: float, device: torch.device,
                        precision: str) -> dict[str, float]:
    """Loss of the EMA model on fixed validation noise and timesteps (comparable across steps)."""
    t = cfg.training.diffusion
    g = generator(cfg.training.seed, "diffusion", "validation")
    idx = torch.arange(min(len(lat.val_mu), 16))
    x_t, tt, target, labels = diffusion_batch(cfg.training.scheduler, s2.noise_sched, lat.val_mu, lat.val_sigma,
                                              lat.val_classes, idx, scale, g, 0.0, cfg.model.unet.num_class_embeds,
                                              t.timestep_dist)
    with autocast(device, precision):
        pred = s2.ema.model(x_t.to(device).contiguous(memory_format=s2.fmt), tt.to(device),
                            class_labels=None if labels is None else labels.to(device))
    return {"loss": float(_diffusion_loss(cfg, pred.float(), x_t.to(device), tt.to(device), target.to(device)))}


def train_diffusion(cfg: Config, paths: RunPaths, data: TrainingData, device: torch.device, precision: str,
                    resume: bool, callback: Optional[StepCallback] = None,
                    max_steps: Optional[int] = None) -> dict[str, Any]:
    """Stage 2: a class-conditional (or not) UNet on latents of the frozen autoencoder.

    Latents are scaled by 1/std (the factor is stored in the checkpoint); the objective follows
    ``training.scheduler``; label dropout (``cond_drop_prob``) trains the null class used by
    classifier-free guidance; EMA weights are kept; ``grad_accum`` batches make one step.
    """
    t, stage = cfg.training.diffusion, "diffusion"
    lat = _frozen_latents(cfg, paths, data, device, precision)
    s2 = _build_stage2(cfg, paths, device, precision, resume)
    main = is_main()
    ck_path = paths.checkpoint(stage)
    step, val, scale = 0, None, None
    ck = existing_checkpoint(ck_path, stage, cfg, resume, DIFFUSION_KEYS, "trained its diffusion model")
    if ck is not None:
        if ck.get("autoencoder_sha256") != lat.ae_sha:
            raise CheckpointError(f"{ck_path}: was trained on a different autoencoder than "
                                  f"{paths.checkpoint('autoencoder')}", hint="start stage 2 afresh in a new --run folder")
        s2.load(ck)
        step, val, scale = int(ck["step"]), ck.get("val_metrics"), float(ck["scale_factor"])
        log.info("diffusion: resuming at step %d of %d", step, t.steps)
    scale_source = (ck or {}).get("scale_factor_source", "data")
    if scale is None:
        scale, scale_source = initial_scale(s2.init, lat.ae_ck, lat.mu, lat.sigma, cfg.training.seed)
    log.info("diffusion: latent %s, scale factor %.4f (%s), objective %s", list(latent_shape(cfg)), scale,
             scale_source, cfg.training.scheduler)

    def save() -> None:
        save_checkpoint(ck_path, {
            **base_payload(cfg, stage, step, t.steps), **s2.state(), "scale_factor": scale,
            "autoencoder_sha256": lat.ae_sha, "intensity_norm": lat.ae_ck["intensity_norm"], "val_metrics": book.val,
            "data_info": data.info, "null_class": cfg.model.unet.num_class_embeds, "scale_factor_source": scale_source,
            "init": s2.init.provenance() if s2.init is not None else (ck or {}).get("init"),
        })

    def validate() -> dict[str, float]:
        return _validate_diffusion(s2, cfg, lat, scale, device, precision)

    book = StepBook(stage, cfg, t, paths, step, math.ceil(len(lat.mu) / (t.batch_size * t.grad_accum)), val,
                    callback)
    start = step
    end = t.steps if max_steps is None else min(t.steps, start + max_steps)
    for _ in progress(range(start, end), desc=stage, total=end - start):
        loss = _diffusion_step(s2, cfg, lat, data.classes, step, scale, device, precision)
        step += 1
        book.after_step(step, end, {"loss": loss}, s2.sched.get_last_lr()[0], validate, save)
    if t.steps == 0 and ck is None and main:  # the initial UNet used as it is: validated and stored
        book.val = validate()
        save()
        log.info("diffusion: %s used as it is (%s), validation loss %.4g", s2.init.path.name, s2.init.layout,
                 book.val["loss"])
    elif start == t.steps:
        log.info("diffusion: already trained (%d steps)", step)
    barrier()
    if main and step == t.steps:
        card = build_model_card(cfg, paths, lat.ae_ck, load_checkpoint(ck_path, stage), data.info)
        write_model_card(paths, card)
    return {"stage": stage, "steps": step, "val": book.val, "scale_factor": scale, "seconds": book.seconds}


@torch.no_grad()
def encode_latents(ae: torch.nn.Module, items: Any, device: torch.device, precision: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and sigma of every item under the frozen autoencoder (kept on the CPU)."""
    ae.eval()
    mus, sigmas = [], []
    for i in range(len(items)):
        with autocast(device, precision):
            mu, sigma = ae.encode(batch_images(items, torch.tensor([i]), device))
        mus.append(mu.float().cpu())
        sigmas.append(sigma.float().cpu())
    return torch.cat(mus), torch.cat(sigmas)


def scale_factor_of(mu: torch.Tensor, sigma: torch.Tensor, seed: int) -> float:
    """1 / std of the sampled training latents, so the diffusion model sees unit-variance inputs."""
    z = mu + sigma * torch.randn(mu.shape, generator=generator(seed, "scale_factor"))
    return float(1.0 / z.std().clamp_min(1e-8))


def initial_scale(unet_init: Optional[InitWeights], ae_ck: dict[str, Any], mu: torch.Tensor, sigma: torch.Tensor,
                  seed: int) -> tuple[float, str]:
    """The latent scale factor and where it came from: the one the initial UNet was trained with
    (NV-Generate stores it beside ``unet_state_dict``), else one the initial autoencoder's file
    carried, else 1 / std of the training latents (:func:`scale_factor_of`)."""
    if unet_init is not None and unet_init.scale_factor:
        return float(unet_init.scale_factor), "model.unet.init"
    ae_init = ae_ck.get("init") or {}
    if ae_init.get("scale_factor"):
        return float(ae_init["scale_factor"]), "model.autoencoder.init"
    return scale_factor_of(mu, sigma, seed), "data"


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` did: the run folder and one summary per stage trained."""

    run_dir: Path
    summaries: list[dict[str, Any]]
    seconds: float


def train(cfg: Config | str | Path | dict[str, Any], run_dir: str | Path, stage: str = "all", resume: bool = False,
          device: Optional[str] = None, callback: Optional[StepCallback] = None,
          max_steps: Optional[int] = None) -> TrainResult:
    """Train ``stage`` ("autoencoder", "diffusion" or "all") of ``cfg`` into ``run_dir``.

    ``cfg`` is a :class:`~medsynth.config.Config`, a YAML path or a plain mapping.

    Writes the resolved config, versions, checkpoints, metrics logs and, once stage 2 is done, the
    model card.  An existing stage is refused unless ``resume`` is set; resuming checks that the
    config still matches (only step budgets, logging intervals, device and data paths may change).
    ``callback(stage, step)`` is called after every optimizer step (tests use it to interrupt).
    """
    cfg = as_config(cfg)
    if stage not in ("autoencoder", "diffusion", "all"):
        raise ConfigError(f"--stage must be autoencoder, diffusion or all, got {stage!r}")
    paths = RunPaths(Path(run_dir))
    if resume and not paths.root.is_dir():
        raise CheckpointError(f"{paths.root}: no run to resume", hint="drop --resume to start a new run")
    paths.root.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device or cfg.training.device)
    started_dist = init_from_env(dev.type)  # torchrun: one process per device, gloo or nccl
    if started_dist and dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
    precision = resolve_precision(cfg.training.precision, dev)
    stages = ["autoencoder", "diffusion"] if stage == "all" else [stage]
    if stage == "diffusion" and not paths.checkpoint("autoencoder").is_file():
        raise CheckpointError(f"{paths.checkpoint('autoencoder')}: stage 2 needs a trained autoencoder",
                              hint="train it first: --stage autoencoder (or --stage all)")
    if resume and not any(paths.checkpoint(s).is_file() for s in stages):
        raise CheckpointError(f"{paths.root}: nothing to resume (no checkpoint of {' or '.join(stages)})",
                              hint="drop --resume to start training")
    log.info("training %s of '%s' on %s (%s) into %s", " + ".join(stages), cfg.name, dev, precision, paths.root)
    data = prepare_data(cfg)
    if cfg.data.use_labels and not cfg.data.labels:
        # the label set found in the data becomes part of the run's config (and of every checkpoint)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labels=data.info["labels"]))
    if is_main():
        write_text(paths.config, dump_yaml(cfg))
        write_json(paths.versions, versions())
    barrier()
    t0 = time.perf_counter()
    summaries = []
    try:
        for s in stages:
            fn = train_autoencoder if s == "autoencoder" else train_diffusion
            summaries.append(fn(cfg, paths, data, dev, precision, resume, callback, max_steps))
            barrier()
            if (s == "autoencoder" and LATENT_KINDS[cfg.model.autoencoder.kind].trained
                    and summaries[-1]["steps"] < cfg.training.autoencoder.steps):
                log.info("autoencoder stopped at step %d of %d (--max-steps); continue with --resume",
                         summaries[-1]["steps"], cfg.training.autoencoder.steps)
                break
    finally:
        if started_dist:
            shutdown()
    return TrainResult(paths.root, summaries, round(time.perf_counter() - t0, 1))


def load_stage_config(run_dir: Path) -> Config:
    """The config stored in a run's latest checkpoint (diffusion, else autoencoder)."""
    paths = RunPaths(Path(run_dir))
    for s in ("diffusion", "autoencoder"):
        if paths.checkpoint(s).is_file():
            return checkpoint_config(load_checkpoint(paths.checkpoint(s), s), paths.checkpoint(s))
    raise CheckpointError(f"{run_dir}: no checkpoint found")
