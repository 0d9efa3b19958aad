"""Stage 2: the latent diffusion UNet on the frozen autoencoder's latents (scaled to unit variance),
with EMA weights, label dropout for classifier-free guidance and gradient accumulation, into
``RUN/diffusion/last.pt``; the model card is written when the stage completes.  All randomness of
step ``s`` comes from generators seeded by (training.seed, "diffusion", s)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from medsynth.config import Config
from medsynth.errors import CheckpointError, ConfigError
from medsynth.jobs import RunPaths, derive_seed, sha256_file
from medsynth.model.bookkeeping import (
    AE_KEYS,
    DIFFUSION_KEYS,
    Resumable,
    StepBook,
    StepCallback,
    base_payload,
    check_compatible,
    existing_checkpoint,
    initial_weights_for,
)
from medsynth.model.checkpoint import build_model_card, is_complete, load_checkpoint, save_checkpoint, write_model_card
from medsynth.model.distributed import barrier, check_batch, ddp, is_main, rank_part
from medsynth.model.ema import EMA
from medsynth.model.fastpath import adam, prepare_stage_for_training
from medsynth.model.init_weights import InitWeights, load_into
from medsynth.model.networks import (
    autocast,
    build_autoencoder,
    build_scheduler,
    build_unet,
    diffusion_loss,
    generator,
    label_latent_channels,
    latent_shape,
    lr_lambda,
    seeded_init,
)
from medsynth.model.objectives import diffusion_batch
from medsynth.model.training_data import TrainingData, batch_images, batch_indices
from medsynth.progress import progress

log = logging.getLogger("medsynth.model.train")


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
    loss_weight: Optional[torch.Tensor] = None  # [N, 1, *latent grid] (label_/intensity_loss_weight)


def _frozen_latents(cfg: Config, paths: RunPaths, data: TrainingData, device: torch.device,
                    precision: str) -> _Latents:
    """Encode the data with the finished stage-1 autoencoder (refused unless it is complete and of
    this config); without validation cases, the first 8 training latents validate."""
    ae_path = paths.checkpoint("autoencoder")
    ae_ck = load_checkpoint(ae_path, "autoencoder")
    if not is_complete(ae_ck):
        raise CheckpointError(f"{ae_path}: the autoencoder is not fully trained (step {ae_ck['step']} of "
                              f"{ae_ck['steps']})",
                              hint="finish stage 1 first: `stage='autoencoder'` with `resume=True`")
    check_compatible(ae_ck, cfg, ae_path, AE_KEYS)
    ae_sha = sha256_file(ae_path)
    ae = build_autoencoder(cfg)
    ae.load_state_dict(ae_ck["model"])
    ae.to(device).eval().requires_grad_(False)
    mu, sigma = encode_latents(ae, data.train, device, precision)
    vmu, vsig, vcls = (*encode_latents(ae, data.val, device, precision), data.val_classes) if len(data.val) \
        else (mu[:8], sigma[:8], data.classes[:8])
    return _Latents(ae_ck, ae_sha, mu, sigma, vmu, vsig, vcls, label_loss_weights(cfg, data.train, mu.shape[2:]))


def label_loss_weights(cfg: Config, items: Any, grid: Sequence[int]) -> Optional[torch.Tensor]:
    """Per-latent-voxel loss weights ``[N, 1, *grid]`` of the training ``items``:
    ``1 + sum_l (w_l - 1) * share_l + (w_i - 1) * share_i``, ``share_l`` being the share of label
    ``l`` in each latent voxel's block (``training.diffusion.label_loss_weight``) and ``share_i``
    the share of its voxels brighter than ``intensity_loss_weight.above`` (None when no weights
    are configured)."""
    from medsynth.model.labels import label_names, label_shares

    want = cfg.training.diffusion.label_loss_weight or {}
    bright = cfg.training.diffusion.intensity_loss_weight or {}
    if not want and not bright:
        return None
    names = label_names(cfg)
    if want and not names:
        raise ConfigError("training.diffusion.label_loss_weight: needs a paired model (data.use_labels: true)",
                          hint="set data.use_labels: true, or remove label_loss_weight")
    unknown = sorted(set(want) - set(names))
    if unknown:
        raise ConfigError(f"training.diffusion.label_loss_weight: unknown label(s) {unknown}; "
                          f"the model's labels are {list(names)}", hint="use the label names of data.labels")
    threshold = None
    if bright:
        if cfg.data.intensity.window is None:
            raise ConfigError("training.diffusion.intensity_loss_weight: needs a fixed intensity window "
                              "(data.intensity.window, as for CT); with per-volume percentiles an intensity "
                              "means something else in every case",
                              hint="set data.intensity.window, or remove intensity_loss_weight")
        from medsynth.data.transforms import intensity_norm

        lo, hi = (float(v) for v in cfg.data.intensity.window)
        if not lo < float(bright["above"]) < hi:
            raise ConfigError(f"training.diffusion.intensity_loss_weight.above: {bright['above']} is outside the "
                              f"intensity window [{lo:g}, {hi:g}], so it weighs every voxel or none",
                              hint="choose an intensity inside data.intensity.window")
        threshold = float(intensity_norm(cfg.data).forward(torch.tensor(float(bright["above"]), dtype=torch.float64)))
    k, order = len(names), list(names)  # channel order = value order
    out = []
    for i in range(len(items)):
        img = torch.as_tensor(items[i]["image"]).as_subclass(torch.Tensor).float()
        w = torch.ones_like(img[:1])
        if want:
            share = label_shares(img[-k:])
            for name, weight in want.items():
                w = w + (float(weight) - 1.0) * share[order.index(name)][None]
        if threshold is not None:
            w = w + (float(bright["weight"]) - 1.0) * (img[:1] > threshold).float()
        out.append(torch.nn.functional.adaptive_avg_pool3d(w[None], tuple(int(g) for g in grid))[0])
    return torch.stack(out)


@dataclass
class _Stage2(Resumable):
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
    init = initial_weights_for(cfg, "unet", paths.checkpoint(stage), resume)
    if init is not None:  # fine-tune (or, with steps: 0, use) local weights; EMA starts from them
        load_into(unet, init)
    unet.to(device).train()
    # the training fast path (medsynth.model.fastpath): channels-last and fused attention
    fmt = prepare_stage_for_training((unet,), device, cfg.training, stage, precision)
    check_batch(t.batch_size, "training.diffusion.batch_size")
    net = ddp(unet, device)
    ema = EMA(unet, t.ema_decay)
    opt = adam(unet.parameters(), t.lr, cfg.training, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.lr_schedule, t.warmup_steps, t.steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    noise_sched = build_scheduler(cfg.training.scheduler, t, math.prod(latent_shape(cfg)[1:]))
    return _Stage2(unet, net, ema, opt, sched, scaler, fmt, noise_sched, init)


def cond_channels(cfg: Config) -> int:
    """Latent channels a ``label_condition`` model is given clean (the label map's), else 0."""
    return label_latent_channels(cfg) if cfg.training.diffusion.label_condition else 0


def _diffusion_loss(cfg: Config, pred: torch.Tensor, x_t: torch.Tensor, tt: torch.Tensor,
                    target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The stage-2 loss; a ``label_condition`` model's on the image channels only (its label
    channels are the condition, not predicted)."""
    t = cfg.training.diffusion
    c = cond_channels(cfg)
    if c:
        keep = torch.ones(1, pred.shape[1], *([1] * (pred.dim() - 2)), device=pred.device)
        keep[:, -c:] = 0.0
        weight = keep if weight is None else weight.to(pred.device) * keep
    return diffusion_loss(cfg.training.scheduler, t.prediction_type, pred, x_t, tt, target, t.num_train_timesteps,
                          weight)


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
                                                  idx, scale, g, t.cond_drop_prob, null_class, t.timestep_dist,
                                                  cond_channels(cfg))
        # drawn for the global batch, then this rank's part (identical to one process)
        x_t, tt, target = rank_part(x_t), rank_part(tt), rank_part(target)
        labels = None if labels is None else rank_part(labels)
        with autocast(device, precision):
            pred = s2.net(x_t.to(device).contiguous(memory_format=s2.fmt), tt.to(device),
                          class_labels=None if labels is None else labels.to(device))
        weight = None if lat.loss_weight is None else rank_part(lat.loss_weight[idx]).to(device)
        loss = _diffusion_loss(cfg, pred.float(), x_t.to(device), tt.to(device), target.to(device),
                               weight) / t.grad_accum
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
                                              t.timestep_dist, cond_channels(cfg))
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
                                  f"{paths.checkpoint('autoencoder')}",
                                  hint="start stage 2 afresh in a new `run_dir` folder")
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
