"""Training: stage 1 (autoencoder) and stage 2 (latent diffusion) into a run directory.

The file reads top-down: data, then the stage-1 loop, then the stage-2 loop, then the entry
point :func:`train`.  Both loops count optimizer steps.  All randomness of step ``s`` (batch
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from medsynth.config import Config, as_config, config_hash, config_to_dict, dump_yaml
from medsynth.errors import CheckpointError, ConfigError, ManifestError, MedsynthError
from medsynth.jobs import RunPaths, derive_seed, sha256_file, write_json, write_text
from medsynth.model.checkpoint import (
    CHECKPOINT_FORMAT,
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
    is_flow,
    latent_shape,
    lr_lambda,
    resolve_device,
    resolve_precision,
    sample_train_timesteps,
    seeded_init,
)
from medsynth.progress import progress
from medsynth.registry import LATENT_KINDS

log = logging.getLogger("medsynth.model.train")

StepCallback = Callable[[str, int], None]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """The cases of the manifest in model space, split into training and validation."""

    train: Any  # indexable: item i is a dict with "image" [C, X, Y, Z] and "class_label"
    val: Any
    classes: torch.Tensor  # class per training item; -1 = unlabelled
    val_classes: torch.Tensor
    norm: dict[str, Any]  # IntensityNorm.to_dict(): the exact map back to physical units
    info: dict[str, Any] = field(default_factory=dict)


def prepare_data(cfg: Config) -> TrainingData:
    """Load the manifest's cases through the config's MONAI transform chain.

    With ``data.cache: memory`` every case is loaded once up front; a case that cannot be read is
    reported (by manifest id) and skipped rather than ending the run.  Class labels are checked
    against ``model.unet.num_class_embeds``.  For MR the dataset reference intensities are the
    medians of the per-case percentile values, as the model card records.
    """
    from medsynth.data.transforms import build_transforms, case_dict, intensity_norm, make_dataset, split_cases
    from medsynth.manifest import load_manifest

    if not cfg.data.manifest:
        raise ConfigError("data.manifest: not set; training needs a data manifest",
                          hint="set data.manifest in the config or pass --manifest PATH")
    manifest = load_manifest(cfg.data.manifest)
    if not manifest.cases:
        raise ManifestError(f"{cfg.data.manifest}: the manifest has no cases")
    train_cases, val_cases = split_cases(manifest.cases, cfg.data.val_fraction, cfg.training.seed)

    skipped: list[str] = []
    paired = cfg.data.use_labels
    if paired:
        unlabelled = [c for c in train_cases + val_cases if c.label is None]
        for c in unlabelled:
            log.warning("skipping case %s: no label map (data.use_labels is true)", c.id)
            skipped.append(c.id)
        train_cases = [c for c in train_cases if c.label is not None]
        val_cases = [c for c in val_cases if c.label is not None]
        if not train_cases:
            raise ManifestError(f"{cfg.data.manifest}: data.use_labels is true but no training case has a label",
                                hint="add 'label' to the cases or set data.use_labels: false")
    if cfg.data.cache == "memory":
        tf = build_transforms(cfg.data, with_label=paired)

        def load(cases):
            out = []
            for c in cases:
                try:
                    out.append(tf(case_dict(c, paired)))
                except Exception as exc:  # noqa: BLE001 - one bad case never sinks the run
                    log.warning("skipping case %s: %s", c.id, _reason(exc, c.image))
                    skipped.append(c.id)
            return out

        train, val = load(train_cases), load(val_cases)
    else:
        train = make_dataset(train_cases, cfg.data, with_label=paired)
        val = make_dataset(val_cases, cfg.data, with_label=paired) if val_cases else []
    if len(train) == 0:
        raise ManifestError(f"{cfg.data.manifest}: no readable training case", hint="run 'medsynth manifest verify'")
    label_set = None
    if paired:  # image + one-hot label channels (medsynth.model.labels)
        from medsynth.model.labels import check_label_values, pair_items, resolve_label_set, unique_values

        seen = unique_values(train) + (unique_values(val) if len(val) else [])
        label_set = dict(cfg.data.labels) if cfg.data.labels else \
            resolve_label_set(manifest.extra, seen, str(cfg.data.manifest))
        check_label_values(seen, label_set.values(), str(cfg.data.manifest))
        values = sorted(label_set.values())
        train = pair_items(train, values)
        val = pair_items(val, values) if len(val) else []

    classes = torch.tensor([int(train[i]["class_label"]) for i in range(len(train))], dtype=torch.long)
    val_classes = torch.tensor([int(val[i]["class_label"]) for i in range(len(val))], dtype=torch.long)
    k = cfg.model.unet.num_class_embeds
    if k is not None:
        bad = sorted({int(c) for c in torch.cat([classes, val_classes]) if c >= k})
        if bad:
            raise ManifestError(f"{cfg.data.manifest}: class_label(s) {bad} outside the model's classes 0..{k - 1}",
                                hint="raise model.unet.num_class_embeds or fix the manifest's class_label values")
        if bool((classes < 0).all()):
            raise ManifestError(f"{cfg.data.manifest}: model.unet.num_class_embeds is {k} but no training case "
                                "has a class_label", hint="add class_label to the cases or set num_class_embeds: null")

    if cfg.data.intensity.window is not None:
        norm = intensity_norm(cfg.data).to_dict()
    else:
        los = torch.tensor([float(train[i]["intensity_lo"]) for i in range(len(train))])
        his = torch.tensor([float(train[i]["intensity_hi"]) for i in range(len(train))])
        norm = intensity_norm(cfg.data, (float(los.median()), float(his.median()))).to_dict()

    names = manifest.extra.get("classes") if isinstance(manifest.extra.get("classes"), dict) else None
    counts = {str(int(c)): int((classes == c).sum()) for c in classes.unique() if c >= 0}
    info = {"manifest_name": manifest.name, "n_train": len(train), "n_val": len(val), "skipped": skipped,
            "class_names": names, "class_counts": counts or None, "labels": label_set}
    log.info("data: %d training and %d validation cases from %s%s", len(train), len(val), manifest.name,
             f" ({len(skipped)} skipped)" if skipped else "")
    return TrainingData(train, val, classes, val_classes, norm, info)


def _reason(exc: BaseException, image: Path) -> str:
    """The most useful one-line reason of a (possibly MONAI-wrapped) loading failure.

    MONAI's ``LoadImage`` hides the reader's own error behind "cannot find a suitable reader", so
    the file is read once more with medsynth's reader, whose errors name the file and the fix.
    """
    from medsynth.formats import read_image

    try:
        read_image(image)
    except MedsynthError as own:
        return own.message
    except Exception:  # noqa: BLE001 - fall back to MONAI's innermost message
        pass
    inner = exc
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}"


def batch_indices(seed: int, stage: str, batch: int, n: int, batch_size: int) -> torch.Tensor:
    """Item indices of batch number ``batch``: epochs are seeded permutations of the ``n`` items,
    so the order is a pure function of (seed, stage, batch)."""
    per_epoch = math.ceil(n / batch_size)
    epoch, pos = divmod(batch, per_epoch)
    perm = torch.randperm(n, generator=generator(seed, stage, "epoch", epoch))
    # a short last batch is filled from the start of the same permutation
    perm = perm.repeat(math.ceil(batch_size / n) + 1)
    return perm[pos * batch_size: pos * batch_size + batch_size]


def _images(items: Any, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = torch.stack([torch.as_tensor(items[int(i)]["image"]).as_subclass(torch.Tensor) for i in idx])
    return x.to(device=device, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Shared helpers: metrics log, resume checks
# --------------------------------------------------------------------------------------------


class MetricsLog:
    """Append-only JSONL of training records; on resume, records after the checkpoint are dropped
    so the log reads as if the run had never been interrupted."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if int(rec.get("step", 0)) <= resume_step:
                    keep.append(line)
        write_text(path, "".join(k + "\n" for k in keep))

    def write(self, rec: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


# Keys that may change between an interrupted run and its resumption (budget, bookkeeping, paths).
_RESUMABLE = {"name", "data.manifest", "data.cache", "data.cache_dir", "data.num_workers", "training.device",
              "training.checkpoint_every", "training.autoencoder.steps", "training.autoencoder.val_every",
              "training.autoencoder.log_every", "training.diffusion.steps", "training.diffusion.val_every",
              "training.diffusion.log_every",
              # initial weights only seed a fresh stage (their sha256 is in the checkpoint): they may move
              "model.autoencoder.init", "model.unet.init", "training.controlnet.init"}


# What each stage's weights depend on: a resumed stage (or stage 2 on top of stage 1) must agree.
_AE_KEYS = ("data", "model.autoencoder", "training.seed", "training.precision", "training.autoencoder")
_DIFFUSION_KEYS = ("data", "model", "training.seed", "training.precision", "training.scheduler",
                   "training.diffusion")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: d}


def config_differences(stored: dict[str, Any], current: Config, sections: tuple[str, ...]) -> list[str]:
    """Keys under ``sections`` (key prefixes) whose values differ between a stored config and ``current``,
    ignoring the keys that may legitimately change on resume."""
    a, b = _flatten(stored), _flatten(config_to_dict(current))
    keys = sorted(k for k in set(a) | set(b)
                  if any(k == s or k.startswith(s + ".") for s in sections) and k not in _RESUMABLE)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _check_compatible(ck: dict[str, Any], cfg: Config, path: Path, sections: tuple[str, ...]) -> None:
    diffs = config_differences(ck["config"], cfg, sections)
    if diffs:
        raise CheckpointError(f"{path}: was trained with a different config ({'; '.join(diffs[:6])}"
                              f"{' ...' if len(diffs) > 6 else ''})",
                              hint="use the run's own config (RUN/config.yaml) or start a new --run folder")


def _existing_checkpoint(ck_path: Path, stage: str, cfg: Config, resume: bool, keys: tuple[str, ...],
                         done: str) -> Optional[dict[str, Any]]:
    """The stage's checkpoint to resume from (None when there is none); refused without ``resume``
    or when it was made with another config."""
    if not ck_path.is_file():
        return None
    if not resume:
        raise CheckpointError(f"{ck_path}: exists; this run already {done}",
                              hint="pass --resume to continue it, or choose a new --run folder")
    ck = load_checkpoint(ck_path, stage)
    _check_compatible(ck, cfg, ck_path, keys)
    return ck


def _base_payload(cfg: Config, stage: str, step: int, steps: int) -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "stage": stage, "config": config_to_dict(cfg),
            "config_hash": config_hash(cfg), "step": step, "steps": steps, "versions": versions(),
            "rng": {"scheme": "per-step torch.Generator seeded from (training.seed, stage, step)",
                    "seed": cfg.training.seed}}


def _epoch_line(stage: str, step: int, steps: int, per_epoch: int, sums: dict[str, float], count: int,
                val: Optional[dict[str, float]], seconds: float) -> None:
    epoch = math.ceil(step / per_epoch)
    parts = " ".join(f"{k} {v / max(count, 1):.4g}" for k, v in sums.items())
    vtxt = (" | val " + " ".join(f"{k} {v:.4g}" for k, v in val.items())) if val else ""
    log.info("%s epoch %d/%d step %d/%d | %s%s | %.1f s", stage, epoch, math.ceil(steps / per_epoch),
             step, steps, parts, vtxt, seconds)


class StepBook:
    """What both training loops do after an optimizer step: the metrics log every ``log_every``
    steps, validation every ``val_every`` steps, a checkpoint every ``training.checkpoint_every``
    steps and at the last step of this call, the one-line epoch summary, then the callback.
    Rank 0 alone logs, validates and saves; ``val`` holds the latest validation metrics (saved in
    checkpoints)."""

    def __init__(self, stage: str, cfg: Config, t: Any, paths: RunPaths, step: int, per_epoch: int,
                 val: Optional[dict[str, float]], callback: Optional[StepCallback]):
        self.stage, self.t, self.per_epoch, self.callback = stage, t, per_epoch, callback
        self.checkpoint_every = cfg.training.checkpoint_every
        self.main = is_main()
        self.metrics = MetricsLog(paths.metrics(stage), step) if self.main else None
        self.val = val
        self.sums: dict[str, float] = {}
        self.count = 0
        self.t0 = self.t_epoch = time.perf_counter()

    def after_step(self, step: int, end: int, rec: dict[str, float], lr: float,
                   validate: Optional[Callable[[], dict[str, float]]], save: Callable[[], None]) -> None:
        t = self.t
        for k, v in rec.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if self.main:
            if step % t.log_every == 0 or step == t.steps:
                self.metrics.write({"stage": self.stage, "step": step, "lr": lr, **rec,
                                    "time_s": round(time.perf_counter() - self.t0, 3)})
            if validate is not None and (step % t.val_every == 0 or step == t.steps):
                self.val = validate()
                self.metrics.write({"stage": self.stage, "step": step, "val": self.val})
            if step % self.checkpoint_every == 0 or step == end:
                save()
            if step % self.per_epoch == 0 or step == t.steps:
                _epoch_line(self.stage, step, t.steps, self.per_epoch, self.sums, self.count, self.val,
                            time.perf_counter() - self.t_epoch)
                self.sums, self.count, self.t_epoch = {}, 0, time.perf_counter()
        if self.callback is not None:
            self.callback(self.stage, step)

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


# --------------------------------------------------------------------------------------------
# Stage 1: autoencoder
# --------------------------------------------------------------------------------------------


def _kl(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) || N(0, 1)) summed over the latent, averaged over the batch."""
    var = sigma.pow(2)
    return (0.5 * (mu.pow(2) + var - torch.log(var) - 1.0)).flatten(1).sum(1).mean()


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
        x = _images(items, torch.tensor([i]), device)
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


def _recon_loss(loss: Callable[..., torch.Tensor], recon: torch.Tensor, x: torch.Tensor,
                balance: float = 0.0) -> torch.Tensor:
    """A reconstruction loss (``F.l1_loss``, ``F.mse_loss``); with label channels (paired models)
    the image channel weighs as much as all label channels together, so adding K one-hot channels
    does not dilute the image's share of the loss to 1 / (1 + K).

    ``balance`` (paired only) is the share of each term that is averaged per label value instead
    of per voxel: every label value present in the batch then weighs the same, so the voxels of a
    lesion covering 0.1 % of the volume count as much as the background's, in the image channel
    too (the image is what makes the encoder keep a lesion)."""
    if x.shape[1] == 1:
        return loss(recon, x)
    if balance <= 0:
        return 0.5 * (loss(recon[:, :1], x[:, :1]) + loss(recon[:, 1:], x[:, 1:]))
    per = loss(recon, x, reduction="none")  # [B, 1 + K, ...]
    img, lab = per[:, :1], per[:, 1:]
    img_k, lab_k = [], []
    for k in range(lab.shape[1]):
        m = x[:, 1 + k:2 + k] > 0  # voxels of label value k, [B, 1, ...]
        if bool(m.any()):
            img_k.append(img[m].mean())
            lab_k.append(lab[m.expand_as(lab)].mean())
    img_term = (1 - balance) * img.mean() + balance * torch.stack(img_k).mean()
    lab_term = (1 - balance) * lab.mean() + balance * torch.stack(lab_k).mean()
    return 0.5 * (img_term + lab_term)


def label_dice(recon: torch.Tensor, x: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of the decoded label channels ``recon[:, 1:]`` against the one-hot ``x[:, 1:]``
    (both in [-1, 1], mapped to [0, 1]), per label value over the whole batch, averaged over the
    values.  The squared denominator (V-Net's form) is minimal exactly at the target for any real
    output and never saturates: a softmax across the channels did, once the L1 term had pushed them
    to +-1, and a lesion channel stuck at -1 then got no gradient at all.  A value absent from the
    batch and not predicted costs nothing (``eps``)."""
    prob = (recon[:, 1:] + 1.0) * 0.5
    target = (x[:, 1:] + 1.0) * 0.5
    dims = (0, *range(2, x.dim()))
    inter = (prob * target).sum(dims)
    denom = (prob * prob).sum(dims) + target.sum(dims)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def train_autoencoder(cfg: Config, paths: RunPaths, data: TrainingData, device: torch.device, precision: str,
                      resume: bool, callback: Optional[StepCallback] = None,
                      max_steps: Optional[int] = None) -> dict[str, Any]:
    """Stage 1: L1 + KL, PatchGAN adversarial loss from ``adv_start``, optional local perceptual loss.

    Validation PSNR/SSIM (model space, data range 2) every ``val_every`` steps and at the end.
    Returns a summary dict; the weights are in ``RUN/autoencoder/last.pt``.
    """
    from monai.losses import PatchAdversarialLoss

    if cfg.model.autoencoder.kind == "wavelet":
        return fit_wavelet(cfg, paths, data, device, precision, resume)
    if cfg.training.autoencoder.steps == 0:  # initial weights used as they are (the config asks for an init)
        return use_initial_autoencoder(cfg, paths, data, device, precision, resume)
    t, seed, stage = cfg.training.autoencoder, cfg.training.seed, "autoencoder"
    with seeded_init(derive_seed(seed, "init", stage)):
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
    adv_loss = PatchAdversarialLoss(criterion="least_squares")

    ck_path = paths.checkpoint(stage)
    step, val = 0, None
    ck = _existing_checkpoint(ck_path, stage, cfg, resume, _AE_KEYS, "trained its autoencoder")
    if ck is not None:
        ae.load_state_dict(ck["model"])
        disc.load_state_dict(ck["discriminator"])
        opt_g.load_state_dict(ck["opt_g"])
        opt_d.load_state_dict(ck["opt_d"])
        sched_g.load_state_dict(ck["sched_g"])
        sched_d.load_state_dict(ck["sched_d"])
        scaler_g.load_state_dict(ck["scaler_g"])
        scaler_d.load_state_dict(ck["scaler_d"])
        step, val = int(ck["step"]), ck.get("val_metrics")
        log.info("autoencoder: resuming at step %d of %d", step, t.steps)

    def save() -> None:
        save_checkpoint(ck_path, {
            **_base_payload(cfg, stage, step, t.steps),
            "model": ae.state_dict(), "discriminator": disc.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
            "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict(),
            "scaler_g": scaler_g.state_dict(), "scaler_d": scaler_d.state_dict(),
            "intensity_norm": data.norm, "val_metrics": book.val, "data_info": data.info,
            "init": init.provenance() if init is not None else (ck or {}).get("init"),
        })

    n = len(data.train)
    book = StepBook(stage, cfg, t, paths, step, math.ceil(n / t.batch_size), val, callback)
    start = step
    end = t.steps if max_steps is None else min(t.steps, start + max_steps)
    for _ in progress(range(start, end), desc=stage, total=end - start):
        g = generator(seed, stage, "step", step)
        # the global batch is a function of (seed, step); each rank takes its part of it
        x = _images(data.train, rank_part(batch_indices(seed, stage, step, n, t.batch_size)), device)
        adv_on = t.adv_weight > 0 and step >= t.adv_start

        def eps(m: torch.Tensor) -> torch.Tensor:
            noise = torch.randn((t.batch_size, *m.shape[1:]), generator=g)
            return rank_part(noise).to(device=device, dtype=m.dtype)

        with autocast(device, precision):
            recon, mu, sigma = ae_step(x, eps)
        recon, mu, sigma = recon.float(), mu.float(), sigma.float()
        l1 = _recon_loss(F.l1_loss, recon, x, t.label_balance)
        kl = _kl(mu, sigma)
        loss = l1 + t.kl_weight * kl
        rec = {"l1": l1.item(), "kl": kl.item()}
        if t.label_dice_weight > 0 and x.shape[1] > 1:
            dice = label_dice(recon, x)
            loss = loss + t.label_dice_weight * dice
            rec["label_dice"] = dice.item()
        if t.l2_weight > 0:
            l2 = _recon_loss(F.mse_loss, recon, x, t.label_balance)
            loss = loss + t.l2_weight * l2
            rec["l2"] = l2.item()
        if perceptual is not None:
            p = perceptual(recon[:, :1], x[:, :1])  # the image channel (label channels are one-hot)
            loss = loss + t.perceptual_weight * p
            rec["perceptual"] = p.item()
        if adv_on:
            with autocast(device, precision):
                g_adv = adv_loss(disc(recon.contiguous())[-1].float(), target_is_real=True, for_discriminator=False)
            loss = loss + t.adv_weight * g_adv
            rec["g_adv"] = g_adv.item()
        opt_g.zero_grad(set_to_none=True)
        scaler_g.scale(loss).backward()
        scaler_g.step(opt_g)
        scaler_g.update()
        if adv_on:
            with autocast(device, precision):
                d_fake = adv_loss(disc(recon.detach().contiguous())[-1].float(), target_is_real=False,
                                  for_discriminator=True)
                d_real = adv_loss(disc(x)[-1].float(), target_is_real=True, for_discriminator=True)
                d_loss = 0.5 * (d_fake + d_real)
            opt_d.zero_grad(set_to_none=True)
            scaler_d.scale(d_loss).backward()
            allreduce_grads(disc)
            scaler_d.step(opt_d)
            scaler_d.update()
            sched_d.step()
            rec["d_loss"] = d_loss.item()
        sched_g.step()
        step += 1
        book.after_step(step, end, rec, sched_g.get_last_lr()[0],
                        (lambda: _validate_autoencoder(ae, data.val, device, precision, label_values(cfg)))
                        if len(data.val) else None,
                        save)
    if start == t.steps:
        log.info("autoencoder: already trained (%d steps)", step)
    return {"stage": stage, "steps": step, "val": book.val, "seconds": book.seconds}


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
    ck = _existing_checkpoint(ck_path, stage, cfg, resume, _AE_KEYS, "has its autoencoder")
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
        save_checkpoint(ck_path, {**_base_payload(cfg, stage, 0, 0), "model": ae.state_dict(),
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
    ck = _existing_checkpoint(ck_path, stage, cfg, resume, _AE_KEYS, "has its wavelet latent")
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
        save_checkpoint(ck_path, {**_base_payload(cfg, stage, 0, 0), "model": wav.state_dict(),
                                  "intensity_norm": data.norm, "val_metrics": val, "data_info": data.info})
        write_text(paths.metrics(stage), json.dumps({"stage": stage, "step": 0, "val": val}) + "\n")
    log.info("autoencoder: wavelet latent (%d level(s), %d channels), no training%s",
             cfg.model.autoencoder.wavelet_levels, wav.latent_channels,
             f"; validation PSNR {val['psnr']:.1f} dB" if val else "")
    return {"stage": stage, "steps": 0, "val": val, "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------------
# Stage 2: latent diffusion
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latents(ae: torch.nn.Module, items: Any, device: torch.device, precision: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and sigma of every item under the frozen autoencoder (kept on the CPU)."""
    ae.eval()
    mus, sigmas = [], []
    for i in range(len(items)):
        with autocast(device, precision):
            mu, sigma = ae.encode(_images(items, torch.tensor([i]), device))
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


def diffusion_batch(kind: str, scheduler: Any, mu: torch.Tensor, sigma: torch.Tensor, classes: torch.Tensor,
                     idx: torch.Tensor, scale: float, g: torch.Generator, drop_prob: float,
                     null_class: Optional[int], timestep_dist: tuple = ("logit-normal", 0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(noisy latents, timesteps, target, class labels) of one batch, all drawn from ``g``."""
    z0 = (mu[idx] + sigma[idx] * torch.randn(mu[idx].shape, generator=g)) * scale
    noise = torch.randn(z0.shape, generator=g)
    t = sample_train_timesteps(kind, scheduler, len(idx), g, *timestep_dist)
    x_t = scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
    if is_flow(kind):
        target = z0 - noise  # the flow's velocity (a clean-latent model is judged on it too)
    elif scheduler.prediction_type == "v_prediction":
        target = scheduler.get_velocity(z0, noise, t)
    elif scheduler.prediction_type == "sample":
        target = z0
    else:
        target = noise
    labels = None
    if null_class is not None:
        labels = classes[idx].clone()
        drop = torch.rand(len(idx), generator=g) < drop_prob
        labels[(labels < 0) | drop] = null_class
    return x_t, t, target, labels


def train_diffusion(cfg: Config, paths: RunPaths, data: TrainingData, device: torch.device, precision: str,
                    resume: bool, callback: Optional[StepCallback] = None,
                    max_steps: Optional[int] = None) -> dict[str, Any]:
    """Stage 2: a class-conditional (or not) UNet on latents of the frozen autoencoder.

    Latents are scaled by 1/std (the factor is stored in the checkpoint); the objective follows
    ``training.scheduler``; label dropout (``cond_drop_prob``) trains the null class used by
    classifier-free guidance; EMA weights are kept; ``grad_accum`` batches make one step.
    """
    t, seed, stage = cfg.training.diffusion, cfg.training.seed, "diffusion"
    kind = cfg.training.scheduler
    ae_path = paths.checkpoint("autoencoder")
    ae_ck = load_checkpoint(ae_path, "autoencoder")
    if not is_complete(ae_ck):
        raise CheckpointError(f"{ae_path}: the autoencoder is not fully trained (step {ae_ck['step']} of "
                              f"{ae_ck['steps']})", hint="finish stage 1 first: --stage autoencoder --resume")
    _check_compatible(ae_ck, cfg, ae_path, _AE_KEYS)
    ae_sha = sha256_file(ae_path)
    ae = build_autoencoder(cfg)
    ae.load_state_dict(ae_ck["model"])
    ae.to(device).eval().requires_grad_(False)
    norm = ae_ck["intensity_norm"]

    mu, sigma = encode_latents(ae, data.train, device, precision)
    vmu, vsig, vcls = (*encode_latents(ae, data.val, device, precision), data.val_classes) if len(data.val) \
        else (mu[:8], sigma[:8], data.classes[:8])
    del ae

    with seeded_init(derive_seed(seed, "init", stage)):
        unet = build_unet(cfg)
    unet_init = _initial_weights(cfg, "unet", paths.checkpoint(stage), resume)
    if unet_init is not None:  # fine-tune (or, with steps: 0, use) local weights; EMA starts from them
        load_into(unet, unet_init)
    unet.to(device).train()
    fmt = memory_format(resolve_channels_last(cfg.training.channels_last, device))
    unet.to(memory_format=fmt)
    check_batch(t.batch_size, "training.diffusion.batch_size")
    main = is_main()
    net = ddp(unet, device)  # DistributedDataParallel under torchrun, else the plain module
    ema = EMA(unet, t.ema_decay)
    opt = torch.optim.Adam(unet.parameters(), lr=t.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.lr_schedule, t.warmup_steps, t.steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    noise_sched = build_scheduler(kind, t, math.prod(latent_shape(cfg)[1:]))
    k = cfg.model.unet.num_class_embeds
    null_class = k  # None for an unconditional model

    def loss_of(pred: torch.Tensor, x_t: torch.Tensor, tt: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return diffusion_loss(kind, t.prediction_type, pred, x_t, tt, target, t.num_train_timesteps)

    ck_path = paths.checkpoint(stage)
    step, val, scale = 0, None, None
    ck = _existing_checkpoint(ck_path, stage, cfg, resume, _DIFFUSION_KEYS, "trained its diffusion model")
    if ck is not None:
        if ck.get("autoencoder_sha256") != ae_sha:
            raise CheckpointError(f"{ck_path}: was trained on a different autoencoder than {ae_path}",
                                  hint="start stage 2 afresh in a new --run folder")
        unet.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        scaler.load_state_dict(ck["scaler"])
        step, val, scale = int(ck["step"]), ck.get("val_metrics"), float(ck["scale_factor"])
        log.info("diffusion: resuming at step %d of %d", step, t.steps)
    scale_source = (ck or {}).get("scale_factor_source", "data")
    if scale is None:
        scale, scale_source = initial_scale(unet_init, ae_ck, mu, sigma, seed)
    log.info("diffusion: latent %s, scale factor %.4f (%s), objective %s", list(latent_shape(cfg)), scale,
             scale_source, kind)

    def save() -> None:
        save_checkpoint(ck_path, {
            **_base_payload(cfg, stage, step, t.steps),
            "model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict(), "scaler": scaler.state_dict(), "scale_factor": scale,
            "autoencoder_sha256": ae_sha, "intensity_norm": norm, "val_metrics": book.val,
            "data_info": data.info, "null_class": null_class, "scale_factor_source": scale_source,
            "init": unet_init.provenance() if unet_init is not None else (ck or {}).get("init"),
        })

    @torch.no_grad()
    def validate() -> dict[str, float]:
        """Loss of the EMA model on fixed validation noise and timesteps (comparable across steps)."""
        g = generator(seed, stage, "validation")
        idx = torch.arange(min(len(vmu), 16))
        x_t, tt, target, labels = diffusion_batch(kind, noise_sched, vmu, vsig, vcls, idx, scale, g, 0.0, null_class,
                                                   t.timestep_dist)
        with autocast(device, precision):
            pred = ema.model(x_t.to(device).contiguous(memory_format=fmt), tt.to(device),
                             class_labels=None if labels is None else labels.to(device))
        return {"loss": float(loss_of(pred.float(), x_t.to(device), tt.to(device), target.to(device)))}

    n = len(mu)
    book = StepBook(stage, cfg, t, paths, step, math.ceil(n / (t.batch_size * t.grad_accum)), val, callback)
    start = step
    end = t.steps if max_steps is None else min(t.steps, start + max_steps)
    for _ in progress(range(start, end), desc=stage, total=end - start):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(t.grad_accum):
            g = generator(seed, stage, "step", step, micro)
            idx = batch_indices(seed, stage, step * t.grad_accum + micro, n, t.batch_size)
            x_t, tt, target, labels = diffusion_batch(kind, noise_sched, mu, sigma, data.classes, idx, scale, g,
                                                       t.cond_drop_prob, null_class, t.timestep_dist)
            # drawn for the global batch, then this rank's part (identical to one process)
            x_t, tt, target = rank_part(x_t), rank_part(tt), rank_part(target)
            labels = None if labels is None else rank_part(labels)
            with autocast(device, precision):
                pred = net(x_t.to(device).contiguous(memory_format=fmt), tt.to(device),
                           class_labels=None if labels is None else labels.to(device))
            loss = loss_of(pred.float(), x_t.to(device), tt.to(device), target.to(device)) / t.grad_accum
            scaler.scale(loss).backward()
            total += loss.item()
        scaler.step(opt)
        scaler.update()
        sched.step()
        ema.update(unet)
        step += 1
        book.after_step(step, end, {"loss": total}, sched.get_last_lr()[0], validate, save)
    if t.steps == 0 and ck is None and main:  # the initial UNet used as it is: validated and stored
        book.val = validate()
        save()
        log.info("diffusion: %s used as it is (%s), validation loss %.4g", unet_init.path.name, unet_init.layout,
                 book.val["loss"])
    elif start == t.steps:
        log.info("diffusion: already trained (%d steps)", step)
    barrier()
    if main and step == t.steps:
        card = build_model_card(cfg, paths, ae_ck, load_checkpoint(ck_path, stage), data.info)
        write_model_card(paths, card)
    return {"stage": stage, "steps": step, "val": book.val, "scale_factor": scale, "seconds": book.seconds}


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
