"""Stage 1: the autoencoder (trained with L1 + KL, adversarial, optional L2, Dice and perceptual terms),
or initial weights used as they are, or the wavelet latent's fitted band scales, into
``RUN/autoencoder/last.pt``.  All randomness of step ``s`` comes from generators seeded by
(training.seed, "autoencoder", s), so a resumed stage continues exactly."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from medsynth.config import Config
from medsynth.jobs import RunPaths, derive_seed, write_text
from medsynth.model.bookkeeping import (
    AE_KEYS,
    Resumable,
    StepBook,
    StepCallback,
    base_payload,
    existing_checkpoint,
    initial_weights_for,
)
from medsynth.model.checkpoint import save_checkpoint
from medsynth.model.distributed import AEStep, allreduce_grads, check_batch, ddp, is_main, rank_part
from medsynth.model.fastpath import adam, prepare_stage_for_training
from medsynth.model.init_weights import InitWeights, config_init, load_into
from medsynth.model.labels import label_values
from medsynth.model.networks import (
    autocast,
    build_autoencoder,
    build_discriminator,
    generator,
    lr_lambda,
    seeded_init,
)
from medsynth.model.objectives import kl_loss, label_dice, recon_loss
from medsynth.model.training_data import TrainingData, batch_images, batch_indices
from medsynth.progress import progress
from medsynth.registry import LATENT_KINDS

log = logging.getLogger("medsynth.model.train")


@dataclass
class _Stage1(Resumable):
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
    init = initial_weights_for(cfg, "autoencoder", paths.checkpoint(stage), resume)
    if init is not None:  # fine-tune from local weights
        load_into(ae, init)
    ae.to(device).train()
    disc.to(device).train()
    # the training fast path (medsynth.model.fastpath): channels-last and fused attention
    prepare_stage_for_training((ae, disc), device, cfg.training, stage, precision)
    check_batch(t.batch_size, "training.autoencoder.batch_size")
    ae_step = ddp(AEStep(ae), device)  # DistributedDataParallel under torchrun, else the plain module
    opt_g = adam(ae.parameters(), t.lr, cfg.training, device)
    opt_d = adam(disc.parameters(), t.lr, cfg.training, device)
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

    recon_qc = (ck or {}).get("reconstruction_qc")

    def save() -> None:
        save_checkpoint(ck_path, {
            **base_payload(cfg, stage, step, t.steps), **s1.state(),
            "intensity_norm": data.norm, "val_metrics": book.val, "data_info": data.info,
            "init": s1.init.provenance() if s1.init is not None else (ck or {}).get("init"),
            "reconstruction_qc": recon_qc,
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
    elif step == t.steps and book.main:  # finished here: judge its reconstructions, then store the verdict
        recon_qc = _judge_reconstructions(s1.ae, cfg, data, device, precision, book.metrics, step)
        save()
    return {"stage": stage, "steps": step, "val": book.val, "seconds": book.seconds, "reconstruction_qc": recon_qc}


def _judge_reconstructions(ae: torch.nn.Module, cfg: Config, data: TrainingData, device: torch.device,
                           precision: str, metrics: Any = None, step: int = 0) -> dict[str, Any]:
    """:func:`medsynth.model.recon_check.reconstruction_qc`, logged, and written to ``metrics`` (a
    MetricsLog) when given."""
    from medsynth.model.recon_check import reconstruction_qc, report

    result = reconstruction_qc(ae, cfg, data, device, precision)
    report(result)
    if metrics is not None:
        metrics.write({"stage": "autoencoder", "step": step, "reconstruction_qc": result})
    return result


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


def _already_stored(cfg: Config, paths: RunPaths, resume: bool, done: str, note: str) -> Optional[dict[str, Any]]:
    """The summary of an untrained stage 1 that is already stored (None: it is not; refused without
    ``resume``)."""
    ck = existing_checkpoint(paths.checkpoint("autoencoder"), "autoencoder", cfg, resume, AE_KEYS, done)
    if ck is None:
        return None
    log.info("autoencoder: %s", note)
    return {"stage": "autoencoder", "steps": 0, "val": ck.get("val_metrics"), "seconds": 0.0}


def _store_untrained(cfg: Config, paths: RunPaths, data: TrainingData, net: torch.nn.Module,
                     device: torch.device, precision: str, **extra: Any) -> Optional[dict[str, float]]:
    """Validate a stage-1 network that is not trained here and store it as step 0 of 0 (so the stage
    counts as complete), with its one-line metrics log; returns the validation metrics."""
    stage = "autoencoder"
    val = _validate_autoencoder(net, data.val, device, precision, label_values(cfg)) if len(data.val) else None
    if is_main():
        rq = _judge_reconstructions(net, cfg, data, device, precision)
        save_checkpoint(paths.checkpoint(stage), {**base_payload(cfg, stage, 0, 0), "model": net.state_dict(),
                                                  "intensity_norm": data.norm, "val_metrics": val,
                                                  "data_info": data.info, "reconstruction_qc": rq, **extra})
        write_text(paths.metrics(stage), json.dumps({"stage": stage, "step": 0, "val": val}) + "\n"
                   + json.dumps({"stage": stage, "step": 0, "reconstruction_qc": rq}) + "\n")
    return val


def use_initial_autoencoder(cfg: Config, paths: RunPaths, data: TrainingData, device: torch.device,
                            precision: str, resume: bool) -> dict[str, Any]:
    """Stage 1 with ``training.autoencoder.steps: 0``: the weights of ``model.autoencoder.init`` used
    as they are (frozen), validated on the local data and stored, with the intensity map and the
    file's sha256 and licence, as ``RUN/autoencoder/last.pt`` (step 0 of 0, so it counts as complete)."""
    done = _already_stored(cfg, paths, resume, "has its autoencoder", "initial weights already in place")
    if done is not None:
        return done
    t0, stage = time.perf_counter(), "autoencoder"
    init = config_init(cfg, stage)
    ae = build_autoencoder(cfg)
    load_into(ae, init)
    ae.to(device)
    val = _store_untrained(cfg, paths, data, ae, device, precision, init={**init.provenance(), "frozen": True})
    log.info("autoencoder: %s used as it is (frozen, %s)%s", init.path.name, init.layout,
             f"; validation PSNR {val['psnr']:.1f} dB" if val else "")
    return {"stage": stage, "steps": 0, "val": val, "seconds": round(time.perf_counter() - t0, 1)}


def fit_wavelet(cfg: Config, paths: RunPaths, data: TrainingData, device: torch.device, precision: str,
                resume: bool) -> dict[str, Any]:
    """Stage 1 of a wavelet latent: nothing to train; the sub-band scales are fitted on the training
    set (``wavelet_band_scale``) and stored, with the intensity map, as ``RUN/autoencoder/last.pt``
    (step 0 of 0, so it counts as complete).  Validation records the reconstruction, which is exact."""
    from medsynth.model.wavelet import fit_band_scale, fit_label_weights

    done = _already_stored(cfg, paths, resume, "has its wavelet latent", "wavelet latent already fitted")
    if done is not None:
        return done
    t0, stage = time.perf_counter(), "autoencoder"
    wav = build_autoencoder(cfg)
    a = cfg.model.autoencoder
    n_lab = len(label_values(cfg))
    unit = n_lab * (1 if a.wavelet_label_bands == "low" else 8 ** a.wavelet_levels) if a.wavelet_label_scale != "bands" else 0
    # "span": a label present in a whole block vs absent (one-hot +-1, so +-2^(1.5 L) in a low-pass
    # band) differs by 4 latent units, whatever the label's frequency in the training set
    factor = 2.0 / 2.0 ** (1.5 * a.wavelet_levels) if a.wavelet_label_scale == "span" else 1.0
    fit_band_scale(wav, (data.train[i]["image"] for i in range(len(data.train))),
                   scale=a.wavelet_band_scale, unit_channels=unit,
                   detail_gain=a.wavelet_detail_gain, unit_factor=factor)
    weights = fit_label_weights(wav, (data.train[i]["image"] for i in range(len(data.train))))
    if wav.low_labels:
        log.info("autoencoder: label decoding weights %s (fitted on the training label maps)",
                 [round(float(w), 2) for w in weights])
    val = _store_untrained(cfg, paths, data, wav, device, precision)
    log.info("autoencoder: wavelet latent (%d level(s), %d channels), no training%s",
             cfg.model.autoencoder.wavelet_levels, wav.latent_channels,
             f"; validation PSNR {val['psnr']:.1f} dB" if val else "")
    return {"stage": stage, "steps": 0, "val": val, "seconds": round(time.perf_counter() - t0, 1)}
