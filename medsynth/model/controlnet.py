"""Mask-conditioned generation: a MONAI ``ControlNet`` on the trained diffusion UNet.

``medsynth train CONFIG --run RUN --stage controlnet`` builds a ``monai.networks.nets.ControlNet``
with the UNet's architecture, copies the trained UNet's weights into it (as the MONAI ControlNet
tutorial does; its zero-initialised output convolutions make it start as a no-op), and trains it
with the autoencoder and UNet frozen.  Its condition is the one-hot label map at image resolution
(one channel per label value, in [0, 1]); the ControlNet's conditioning embedding downsamples it
onto the latent grid.  The weights are in ``RUN/controlnet/last.pt``.

``medsynth generate RUN --masks MANIFEST_OR_DIR`` then samples one image per given mask (resampled
onto the run's grid with nearest neighbour) and writes the mask as the sample's label.

The training forward pass is the one of MONAI's ``ControlNetDiffusionInferer`` (noise the latent,
ControlNet residuals, UNet with the residuals), written out here because the inferer passes no
class labels (medsynth's UNets are class-conditional) and draws noise from the global RNG;
``ControlNetLatentDiffusionInferer`` would also interpolate the mask down to the latent grid.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from medsynth.config import Config, config_hash
from medsynth.errors import CheckpointError, ConfigError, ManifestError, MedsynthError
from medsynth.jobs import RunPaths, derive_seed, sha256_file, write_json
from medsynth.model.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint, versions
from medsynth.model.init_weights import load_into, read_init
from medsynth.model.fastpath import adam, prepare_stage_for_training, resolve_training_precision
from medsynth.model.networks import (
    autocast,
    build_autoencoder,
    build_scheduler,
    build_unet,
    diffusion_loss,
    downsample_factor,
    generator,
    latent_channels,
    latent_shape,
    resolve_device,
    seeded_init,
)
from medsynth.progress import progress
from medsynth.volume import Volume

log = logging.getLogger("medsynth.model.controlnet")

STAGE = "controlnet"


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


def conditioning_channels(cfg: Config) -> tuple[int, ...]:
    """Channels of the ControlNet's mask embedding: one level per autoencoder downsampling, so a
    mask at image resolution lands on the latent grid."""
    levels = int(round(math.log2(downsample_factor(cfg)))) + 1
    return tuple(min(16 * 2 ** i, 64) for i in range(levels))


def build_controlnet(cfg: Config, n_labels: int) -> nn.Module:
    """A MONAI ``ControlNet`` (MAISI's ``ControlNetMaisi`` for a MAISI UNet) matching ``cfg.model.unet``,
    so the UNet's weights can be copied in."""
    from medsynth.model.networks import class_rows, with_fixed_class

    u = cfg.model.unet
    n_emb = class_rows(cfg)
    if u.kind == "maisi":
        from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi

        return with_fixed_class(ControlNetMaisi(
            spatial_dims=3, in_channels=latent_channels(cfg), num_res_blocks=u.num_res_blocks,
            num_channels=list(u.channels), attention_levels=list(u.attention_levels),
            norm_num_groups=u.norm_num_groups, resblock_updown=u.resblock_updown,
            num_head_channels=u.num_head_channels, num_class_embeds=n_emb, use_flash_attention=u.use_flash_attention,
            conditioning_embedding_in_channels=n_labels,
            conditioning_embedding_num_channels=conditioning_channels(cfg), use_checkpointing=False, include_fc=True,
        ), cfg)
    from monai.networks.nets import ControlNet

    return with_fixed_class(ControlNet(
        spatial_dims=3, in_channels=latent_channels(cfg), num_res_blocks=u.num_res_blocks,
        channels=tuple(u.channels), attention_levels=tuple(u.attention_levels), norm_num_groups=u.norm_num_groups,
        num_head_channels=u.num_head_channels, num_class_embeds=n_emb, use_flash_attention=u.use_flash_attention,
        conditioning_embedding_in_channels=n_labels, conditioning_embedding_num_channels=conditioning_channels(cfg),
        resblock_updown=u.resblock_updown,
    ), cfg)


def mask_condition(label: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """Integer label map ``[..., X, Y, Z]`` -> one-hot condition ``[K, X, Y, Z]`` in {0, 1}."""
    lab = torch.as_tensor(label).as_subclass(torch.Tensor).round().long().reshape(label.shape[-3:])
    return torch.stack([(lab == v) for v in values]).to(torch.float32)


def controlled_prediction(unet: nn.Module, controlnet: nn.Module, x: torch.Tensor, t: torch.Tensor,
                          cond: torch.Tensor, class_labels: Optional[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """The UNet output with the ControlNet's residuals added (MONAI ``ControlNetDiffusionInferer``)."""
    down, mid = controlnet(x=x, timesteps=t, controlnet_cond=cond, conditioning_scale=scale,
                           class_labels=class_labels)
    return unet(x=x, timesteps=t, class_labels=class_labels, down_block_additional_residuals=down,
                mid_block_additional_residual=mid)


class ControlledUNet(nn.Module):
    """The frozen UNet steered by a ControlNet towards the mask in ``cond`` (set per sample).

    It has the UNet's call signature, so :class:`medsynth.model.sample.Sampler` samples with it
    unchanged (classifier-free guidance included: both branches see the same mask)."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module, scale: float = 1.0):
        super().__init__()
        self.unet, self.controlnet, self.scale = unet, controlnet, float(scale)
        self.cond: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        if self.cond is None:
            raise MedsynthError("ControlledUNet: no mask set")
        cond = self.cond.to(device=x.device, dtype=x.dtype)
        if len(cond) != len(x):
            cond = cond.expand(len(x), *cond.shape[1:])
        return controlled_prediction(self.unet, self.controlnet, x, timesteps, cond, class_labels, self.scale)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _label_set(run_cfg: Config, cfg: Config) -> dict[str, int]:
    if run_cfg.data.use_labels and run_cfg.data.labels:
        return dict(run_cfg.data.labels)
    if cfg.data.labels:
        return dict(cfg.data.labels)
    from medsynth.manifest import load_manifest
    from medsynth.model.labels import resolve_label_set

    m = load_manifest(cfg.data.manifest)
    lab = m.extra.get("labels")
    if not isinstance(lab, dict):
        raise ManifestError(f"{cfg.data.manifest}: ControlNet training needs the label set: the manifest has no "
                            "'labels' mapping", hint="add 'labels': {name: value} to the manifest or set data.labels")
    return resolve_label_set(m.extra, None, str(cfg.data.manifest))


def _latents_and_masks(run: Any, cfg: Config, values: Sequence[int], labels: dict[str, int],
                       dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior (mu, sigma) of every training case under the run's frozen autoencoder, its one-hot
    mask in {0, 1} at image resolution, and its class (-1: none)."""
    from medsynth.model.training_data import prepare_data

    rc = run.cfg
    data_cfg = dataclasses.replace(rc, data=dataclasses.replace(
        rc.data, manifest=cfg.data.manifest, use_labels=True, labels=labels, cache=cfg.data.cache,
        cache_dir=cfg.data.cache_dir))
    data = prepare_data(data_cfg)
    paired = rc.data.use_labels
    ae = build_autoencoder(rc)
    ae.load_state_dict(run.autoencoder_state)
    ae.to(dev).eval().requires_grad_(False)
    mus, sigmas, conds = [], [], []
    with torch.no_grad():
        for i in range(len(data.train)):
            x = torch.as_tensor(data.train[i]["image"]).as_subclass(torch.Tensor).float()[None]
            mu, sigma = ae.encode((x if paired else x[:, :1]).to(dev))
            mus.append(mu.float().cpu())
            sigmas.append(sigma.float().cpu())
            conds.append((x[0, 1:] + 1.0) / 2.0)  # the one-hot label channels, back to {0, 1}
    return torch.cat(mus), torch.cat(sigmas), torch.stack(conds), data.classes


def denoising_gain(run_dir: str | Path, cfg: Config, n_batches: int = 4, device: Optional[str] = None
                   ) -> dict[str, float]:
    """Denoising loss of the frozen UNet alone and with the trained ControlNet (given each case's
    mask), on the same latents, noise and timesteps of ``cfg.data.manifest``'s cases.  A ControlNet
    that uses the mask predicts the noise better: ``controlnet`` < ``unet``."""
    from medsynth.model.checkpoint import load_run
    from medsynth.model.objectives import diffusion_batch
    from medsynth.model.training_data import batch_indices

    run = load_run(run_dir)
    rc = run.cfg
    ck = load_checkpoint(RunPaths(run.root).checkpoint(STAGE), STAGE)
    labels = {str(k): int(v) for k, v in ck["labels"].items()}
    values = sorted(labels.values())
    dev = resolve_device(device or "cpu")
    mu, sigma, cond, classes = _latents_and_masks(run, cfg, values, labels, dev)
    unet = build_unet(rc)
    unet.load_state_dict(run.ema_state if ck.get("use_ema") else run.unet_state)
    cn = build_controlnet(rc, len(values))
    cn.load_state_dict(ck["model"])
    unet.to(dev).eval()
    cn.to(dev).eval()
    noise_sched = build_scheduler(rc.training.scheduler, rc.training.diffusion, math.prod(latent_shape(rc)[1:]))
    plain, controlled = [], []
    with torch.no_grad():
        for b in range(n_batches):
            g = generator(rc.training.seed, STAGE, "gain", b)
            idx = batch_indices(rc.training.seed, "gain", b, len(mu), min(4, len(mu)))
            d = rc.training.diffusion
            x_t, tt, target, cls = diffusion_batch(rc.training.scheduler, noise_sched, mu, sigma, classes, idx,
                                                    run.scale_factor, g, 0.0, rc.model.unet.num_class_embeds,
                                                    d.timestep_dist)
            x_t, tt, target = x_t.to(dev), tt.to(dev), target.to(dev)
            cls = None if cls is None else cls.to(dev)

            def loss(out: torch.Tensor) -> float:
                return float(diffusion_loss(rc.training.scheduler, d.prediction_type, out, x_t, tt, target,
                                            d.num_train_timesteps))

            plain.append(loss(unet(x_t, tt, class_labels=cls)))
            controlled.append(loss(controlled_prediction(
                unet, cn, x_t, tt, cond[idx].to(dev), cls, float(ck.get("conditioning_scale", 1.0)))))
    return {"unet": float(np.mean(plain)), "controlnet": float(np.mean(controlled)), "batches": n_batches}


@dataclass
class _ControlNetTraining:
    """The frozen UNet, the ControlNet being trained, its optimizer, gradient scaler (fp16 only) and
    the noise scheduler, and the training fast path: precision, memory format of 5-D inputs."""

    unet: nn.Module
    cn: nn.Module
    opt: Any
    noise_sched: Any
    ema: bool               # the frozen UNet's weights are its EMA weights
    init: Any               # the ControlNet's initial weights (None: copied from the UNet)
    precision: str = "fp32"
    fmt: torch.memory_format = torch.contiguous_format
    scaler: Any = None


def _build_controlnet_training(run: Any, cfg: Config, n_values: int, dev: torch.device, ck_path: Path,
                               resume: bool) -> _ControlNetTraining:
    rc, t = run.cfg, cfg.training.controlnet
    unet = build_unet(rc)
    ema = rc.sampling.use_ema and run.ema_state is not None
    unet.load_state_dict(run.ema_state if ema else run.unet_state)
    unet.to(dev).eval().requires_grad_(False)
    with seeded_init(derive_seed(rc.training.seed, "init", STAGE)):
        cn = build_controlnet(rc, n_values)
    cn_init = None if (resume and ck_path.is_file()) else _controlnet_init(cfg)
    if cn_init is not None:  # local ControlNet weights (training.controlnet.init), matched strictly
        load_into(cn, cn_init)
    else:  # copy the trained UNet where names and shapes agree (MONAI tutorial, MAISI's copy_model_state)
        from monai.networks.utils import copy_model_state

        _, copied, kept = copy_model_state(cn, unet.state_dict())
        log.debug("controlnet: %d tensors copied from the UNet, %d kept", len(copied), len(kept))
    cn.to(dev).train()
    # the training fast path (medsynth.model.fastpath) of this config's `training` section
    tc = cfg.training
    precision = resolve_training_precision(tc.precision, dev, math.prod(latent_shape(rc)[1:]))
    fmt = prepare_stage_for_training((unet, cn), dev, tc, STAGE, precision)
    opt = adam(cn.parameters(), t.lr, tc, dev)
    noise_sched = build_scheduler(rc.training.scheduler, rc.training.diffusion, math.prod(latent_shape(rc)[1:]))
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    log.info("controlnet: training in %s, %s", precision,
             "channels-last" if fmt == torch.channels_last_3d else "channels-first")
    return _ControlNetTraining(unet, cn, opt, noise_sched, bool(ema), cn_init, precision, fmt, scaler)


def _resume_controlnet(ck_path: Path, run: Any, tr: _ControlNetTraining, resume: bool) -> tuple[int, Any]:
    """(step, checkpoint) to continue from; (0, None) for a fresh stage."""
    if not ck_path.is_file():
        if resume:
            raise CheckpointError(f"{ck_path}: no ControlNet to resume", hint="drop `resume=True`")
        return 0, None
    if not resume:
        raise CheckpointError(f"{ck_path}: exists; this run already trained its ControlNet",
                              hint="pass `resume=True` to continue it")
    ck = load_checkpoint(ck_path, STAGE)
    if ck.get("diffusion_sha256") != run.diffusion_sha256:
        raise CheckpointError(f"{ck_path}: was trained on a different diffusion model",
                              hint="remove RUN/controlnet and train it again")
    tr.cn.load_state_dict(ck["model"])
    tr.opt.load_state_dict(ck["opt"])
    if "scaler" in ck:
        tr.scaler.load_state_dict(ck["scaler"])
    return int(ck["step"]), ck


def _controlnet_step(tr: _ControlNetTraining, run: Any, cfg: Config, data: tuple, step: int,
                     dev: torch.device) -> float:
    """One optimizer step of the ControlNet on the frozen UNet; returns the loss."""
    from medsynth.model.objectives import diffusion_batch
    from medsynth.model.training_data import batch_indices

    rc, t = run.cfg, cfg.training.controlnet
    mu, sigma, cond, classes = data
    seed, kind, d = rc.training.seed, rc.training.scheduler, rc.training.diffusion
    g = generator(seed, STAGE, "step", step)
    idx = batch_indices(seed, STAGE, step, len(mu), t.batch_size)
    x_t, tt, target, cls = diffusion_batch(kind, tr.noise_sched, mu, sigma, classes, idx, run.scale_factor,
                                           g, t.cond_drop_prob, rc.model.unet.num_class_embeds, d.timestep_dist)
    with autocast(dev, tr.precision):
        pred = controlled_prediction(tr.unet, tr.cn, x_t.to(dev).contiguous(memory_format=tr.fmt), tt.to(dev),
                                     cond[idx].to(dev).contiguous(memory_format=tr.fmt),
                                     None if cls is None else cls.to(dev), t.conditioning_scale)
    loss = diffusion_loss(kind, d.prediction_type, pred.float(), x_t.to(dev), tt.to(dev), target.to(dev),
                          d.num_train_timesteps)
    tr.opt.zero_grad(set_to_none=True)
    tr.scaler.scale(loss).backward()
    tr.scaler.step(tr.opt)
    tr.scaler.update()
    return float(loss.item())


def train_controlnet(cfg: Config, run_dir: str | Path, resume: bool = False, device: Optional[str] = None,
                     callback: Optional[Any] = None) -> dict[str, Any]:
    """Train the ControlNet of a finished run on the cases (image + label) of ``cfg.data.manifest``.

    The run's own config fixes the grid and networks; ``cfg`` gives the manifest and
    ``training.controlnet``.  All randomness of step ``s`` comes from generators seeded by
    (training.seed, "controlnet", s), so a resumed stage continues exactly.
    """
    from medsynth.model.bookkeeping import MetricsLog
    from medsynth.model.checkpoint import load_run

    run = load_run(run_dir)
    paths = RunPaths(run.root)
    rc = run.cfg
    if not cfg.data.manifest:
        raise ConfigError("data.manifest: not set; ControlNet training needs a manifest with label maps",
                          hint="set data.manifest in the config (or pass it to 'medsynth train ... --manifest PATH')")
    labels = _label_set(rc, cfg)
    values = sorted(labels.values())
    t = cfg.training.controlnet
    dev = resolve_device(device or cfg.training.device)
    data = _latents_and_masks(run, cfg, values, labels, dev)
    ck_path = paths.checkpoint(STAGE)
    tr = _build_controlnet_training(run, cfg, len(values), dev, ck_path, resume)
    step, ck = _resume_controlnet(ck_path, run, tr, resume)

    def save() -> None:
        save_checkpoint(ck_path, {
            "format": CHECKPOINT_FORMAT, "stage": STAGE, "config": _plain(rc), "config_hash": config_hash(rc),
            "step": step, "steps": t.steps, "model": tr.cn.state_dict(), "opt": tr.opt.state_dict(),
            "labels": labels, "conditioning_channels": list(conditioning_channels(rc)),
            "conditioning_scale": t.conditioning_scale, "diffusion_sha256": run.diffusion_sha256,
            "use_ema": tr.ema, "train": dataclasses.asdict(t), "versions": versions(),
            "n_train": len(data[0]), **({"scaler": tr.scaler.state_dict()} if tr.scaler.is_enabled() else {}),
            "init": tr.init.provenance() if tr.init is not None else (ck or {}).get("init"),
        })

    metrics = MetricsLog(paths.metrics(STAGE), step)
    t0, last = time.perf_counter(), None
    for _ in progress(range(step, t.steps), desc=STAGE, total=t.steps - step):
        last = _controlnet_step(tr, run, cfg, data, step, dev)
        step += 1
        if step % t.log_every == 0 or step == t.steps:
            metrics.write({"stage": STAGE, "step": step, "loss": last, "time_s": round(time.perf_counter() - t0, 3)})
        if step % cfg.training.checkpoint_every == 0 or step == t.steps:
            save()
        if callback is not None:
            callback(STAGE, step)
    if not ck_path.is_file():
        save()
    if tr.init is not None:  # the model card names every network's initial weights and licence
        from medsynth.model.checkpoint import write_model_card

        inits = {**(run.card.get("initial_weights") or {}),
                 "controlnet": {**tr.init.provenance(), "frozen": False, "fine_tuned_steps": t.steps}}
        write_model_card(paths, {**run.card, "initial_weights": inits})
    log.info("controlnet: %d steps, last loss %s", step, last)
    return {"stage": STAGE, "steps": step, "val": {"loss": last} if last is not None else None,
            "seconds": round(time.perf_counter() - t0, 1), "labels": labels}


def _controlnet_init(cfg: Config) -> Any:
    """The ControlNet's initial weights of ``training.controlnet.init`` (None when not given)."""
    t = cfg.training.controlnet
    return read_init(t.init, "controlnet", t.init_license) if t.init else None


def _plain(cfg: Config) -> dict[str, Any]:
    from medsynth.config import config_to_dict

    return config_to_dict(cfg)


# --------------------------------------------------------------------------------------------
# Sampling from masks
# --------------------------------------------------------------------------------------------


@dataclass
class MaskSource:
    """One given mask: where it came from (no PHI: manifest case id or a short file hash) and its path."""

    ref: str
    path: Path


def list_masks(source: str | Path) -> list[MaskSource]:
    """Masks of a data manifest (each case's ``label``) or of a folder (every ``*.nii``/``*.nii.gz``)."""
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.name.endswith((".nii", ".nii.gz")))
        if not files:
            raise ManifestError(f"{src}: no NIfTI masks (*.nii, *.nii.gz) in the folder")
        return [MaskSource(f"sha256:{sha256_file(p)[:16]}", p) for p in files]
    if not src.is_file():
        raise ManifestError(f"{src}: `masks` must be a data manifest or a folder of NIfTI masks")
    from medsynth.manifest import load_manifest

    m = load_manifest(src)
    out = [MaskSource(c.id, Path(c.label)) for c in m.cases if c.label is not None]
    if not out:
        raise ManifestError(f"{src}: no case of the manifest has a label map", hint="add 'label' to its cases")
    return out


def load_mask(path: Path, cfg: Config, values: Sequence[int]) -> Volume:
    """A mask resampled (nearest neighbour) onto the run's grid; values outside the label set refused."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, ResizeWithPadOrCrop, Spacing

    from medsynth.data.io import MedsynthReader
    from medsynth.data.transforms import target_affine

    tf = Compose([LoadImage(reader=MedsynthReader(), image_only=True),
                  EnsureChannelFirst(channel_dim="no_channel"),
                  Orientation(axcodes=cfg.data.orientation.upper(), labels=None),
                  Spacing(pixdim=cfg.data.spacing, mode="nearest", padding_mode="zeros"),
                  ResizeWithPadOrCrop(spatial_size=cfg.data.shape)])
    try:
        arr = np.asarray(tf(str(path))[0]).round().astype(np.int64)
    except Exception as exc:  # noqa: BLE001 - MONAI wraps the reader's error
        raise ManifestError(f"{path}: not a readable mask ({type(exc).__name__})") from None
    extra = sorted(set(np.unique(arr).tolist()) - set(int(v) for v in values))
    if extra:
        raise ManifestError(f"{path}: mask value(s) {extra} are not in the ControlNet's label set {list(values)}")
    return Volume(arr.astype(np.uint8), target_affine(cfg.data), modality="SEG", units="label")


@dataclass
class MaskGenerateResult:
    out_dir: Path
    written: list[str]
    skipped: list[str]
    failed: dict[str, str]


def generate_from_masks(run_dir: str | Path, masks: str | Path, out_dir: str | Path, seed: int = 0, start: int = 0,
                        class_label: Optional[int] = None, steps: Optional[int] = None,
                        guidance: Optional[float] = None, scheduler: Optional[str] = None,
                        use_ema: Optional[bool] = None, device: Optional[str] = None,
                        limit: Optional[int] = None) -> MaskGenerateResult:
    """Sample one image per given mask (sample ``start + k`` for mask ``k``) and write the mask as its label.

    A mask that cannot be read or holds unknown values is reported in ``failed`` and skipped.
    """
    from medsynth.jobs import sample_id, sample_seed
    from medsynth.model.fastpath import prepare_for_inference
    from medsynth.model.sample import Sampler
    from medsynth.samples import write_sample

    sampler = Sampler.from_run(run_dir, device=device, use_ema=use_ema)
    if sampler.low_noise is not None:
        raise ConfigError(f"{run_dir}: has a low-noise expert (model.low_noise_expert); mask-conditioned "
                          f"sampling with two experts is not supported yet", hint="sample without masks ('medsynth generate RUN -n N')")
    # the given mask is the sample's label map and says where a lesion is: nothing is painted in
    sampler.lesion = None
    sampler.provenance.pop("lesion_inpainter", None)
    ck_path = RunPaths(Path(run_dir)).checkpoint(STAGE)
    ck = load_checkpoint(ck_path, STAGE)
    if ck.get("diffusion_sha256") != sampler.provenance.get("checkpoint_sha256"):
        raise CheckpointError(f"{ck_path}: the ControlNet was trained on a different diffusion model",
                              hint="retrain it: 'medsynth train CONFIG --run RUN --stage controlnet'")
    labels = {str(k): int(v) for k, v in ck["labels"].items()}
    values = sorted(labels.values())
    cn = build_controlnet(sampler.cfg, len(values))
    cn.load_state_dict(ck["model"])
    fast = sampler.cfg.sampling
    cn = prepare_for_inference(cn, sampler.device, sampler.channels_last, fast.onednn_conv)
    controlled = ControlledUNet(sampler.unet, cn, float(ck.get("conditioning_scale", 1.0)))
    sampler.unet = controlled
    st = sampler.settings(seed, steps, guidance, scheduler, None)
    sampler.check_class(class_label)
    sources = list_masks(masks)[: limit if limit else None]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = MaskGenerateResult(out, [], [], {})
    cn_sha = sha256_file(ck_path)
    for k, src in enumerate(progress(sources, desc="generate (masks)", total=len(sources))):
        i = start + k
        sid = sample_id(sampler.run, i)
        if (out / f"{sid}.json").is_file():
            res.skipped.append(sid)
            continue
        try:
            mask = load_mask(src.path, sampler.cfg, values)
        except MedsynthError as exc:
            log.warning("mask %d skipped: %s", k, exc.message if hasattr(exc, "message") else exc)
            res.failed[src.ref] = str(exc)
            continue
        controlled.cond = mask_condition(torch.from_numpy(mask.array.astype(np.int64)), values)[None]
        images = sampler.sample_model_space([i], st, class_label)
        vol = sampler.to_volume(images[0])
        side = {"index": i, "seed": st.seed, "sample_seed": sample_seed(st.seed, i),
                "class": sampler.class_of(i, class_label), "steps": st.steps, "scheduler": st.scheduler,
                "guidance": st.guidance, "eta": st.eta, "run": sampler.run, **sampler.provenance,
                "controlnet_sha256": cn_sha, "mask_source": src.ref, "label_values": labels}
        write_sample(out, sid, vol, side, label=mask)
        res.written.append(sid)
    if res.failed:
        write_json(out / "masks_failed.json", res.failed)
    log.info("generate --masks: %d written, %d kept, %d failed", len(res.written), len(res.skipped), len(res.failed))
    return res


# --------------------------------------------------------------------------------------------
# How well images follow their masks
# --------------------------------------------------------------------------------------------


def mask_agreement(image: Volume, mask: Volume, labels: dict[str, int], threshold_hu: float = -400.0
                   ) -> dict[str, Any]:
    """Agreement of a CT image with its mask: mean HU inside each label, and the Dice of a simple
    threshold segmentation (``HU < threshold`` inside the mask's body) with the label named ``lung``
    (when present).  The body is everything within 2 voxels of a non-background label."""
    from scipy import ndimage

    img, lab = np.asarray(image.array, dtype=np.float64), np.asarray(mask.array)
    out: dict[str, Any] = {"mean_hu": {n: (float(img[lab == v].mean()) if (lab == v).any() else None)
                                       for n, v in labels.items()}}
    if "lung" in labels:
        lung = lab == labels["lung"]
        if "lesion" in labels:  # a lesion inside the lung belongs to the lung region
            lung |= lab == labels["lesion"]
        region = ndimage.binary_dilation(lung, iterations=2)
        seg = (img < threshold_hu) & region
        denom = seg.sum() + lung.sum()
        out["lung_dice"] = float(2.0 * (seg & lung).sum() / denom) if denom else None
    return out
