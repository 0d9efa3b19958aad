"""Typed configuration: dataclasses loaded from YAML and validated once, at load.

* Unknown keys are rejected with a did-you-mean suggestion.
* Wrong types are reported with the full YAML key path (``training.diffusion.lr``).
* Cross-field rules live in each section's ``check()`` and report key paths too.
* All problems are collected and reported together in one :class:`ConfigError`.

No code is evaluated from a config file: values are plain YAML scalars, lists and mappings.
Later stages grow their own section dataclass here; every shipped file in ``configs/`` is loaded
by a test.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from medsynth.errors import ConfigError
from medsynth.registry import EXPORT_FORMATS, LATENT_KINDS, SCHEDULERS, flow_schedulers

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


# Allowed values derived from the extension-point tables (medsynth/registry.py)
SchedulerName = Literal[tuple(SCHEDULERS)]  # type: ignore[valid-type]
LatentKindName = Literal[tuple(LATENT_KINDS)]  # type: ignore[valid-type]

@dataclass
class IntensityConfig:
    """Intensity normalisation into model space ([-1, 1]); has an exact inverse.

    CT uses a fixed HU window ``window: [lo, hi]``; MR uses per-volume percentiles
    ``percentiles: [lo, hi]`` whose dataset-level values are stored in the checkpoint so samples
    can be mapped back to the intensity range of the training data.
    """

    window: Optional[tuple[float, float]] = (-1000.0, 1000.0)
    percentiles: Optional[tuple[float, float]] = None
    clip: bool = True

    def check(self, path: str) -> list[str]:
        errs = []
        if (self.window is None) == (self.percentiles is None):
            errs.append(f"{path}: set exactly one of 'window' (CT, HU) or 'percentiles' (MR)")
        if self.window is not None and not self.window[0] < self.window[1]:
            errs.append(f"{path}.window: lower bound must be below upper bound, got {list(self.window)}")
        if self.percentiles is not None:
            lo, hi = self.percentiles
            if not (0.0 <= lo < hi <= 100.0):
                errs.append(f"{path}.percentiles: need 0 <= lo < hi <= 100, got {[lo, hi]}")
        return errs


@dataclass
class DataConfig:
    """Where cases come from and the grid every case is resampled onto."""

    manifest: Optional[str] = None
    modality: Literal["CT", "MR"] = "CT"
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    shape: tuple[int, int, int] = (128, 128, 128)
    orientation: str = "RAS"
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    use_labels: bool = False
    # label name -> integer value of the label maps (paired generation); null: taken from the manifest's
    # "labels" (or the values seen) when training starts, then stored in the run's config
    labels: Optional[dict[str, int]] = None
    cache: Literal["none", "memory", "disk"] = "memory"
    cache_dir: Optional[str] = None
    num_workers: int = 0
    val_fraction: float = 0.1

    def check(self, path: str) -> list[str]:
        errs = []
        if any(s <= 0 for s in self.spacing):
            errs.append(f"{path}.spacing: every spacing must be > 0 mm, got {list(self.spacing)}")
        if any(s < 4 for s in self.shape):
            errs.append(f"{path}.shape: every size must be >= 4 voxels, got {list(self.shape)}")
        o = self.orientation.upper()
        axes = [{"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}.get(c) for c in o]
        if len(o) != 3 or None in axes or sorted(axes) != [0, 1, 2]:
            errs.append(
                f"{path}.orientation: need three axis codes, one each of R/L, A/P, S/I (e.g. 'RAS'), "
                f"got {self.orientation!r}"
            )
        if self.modality == "CT" and self.intensity.window is None:
            errs.append(f"{path}.intensity: modality CT needs a HU 'window', not percentiles")
        if self.modality == "MR" and self.intensity.percentiles is None:
            errs.append(f"{path}.intensity: modality MR needs 'percentiles' (MR has no absolute units)")
        if self.cache == "disk" and not self.cache_dir:
            errs.append(f"{path}.cache_dir: cache 'disk' needs a cache_dir")
        if not 0.0 <= self.val_fraction < 1.0:
            errs.append(f"{path}.val_fraction: need 0 <= value < 1, got {self.val_fraction}")
        if self.num_workers < 0:
            errs.append(f"{path}.num_workers: must be >= 0")
        if self.labels is not None:
            vals = list(self.labels.values()) if isinstance(self.labels, dict) else None
            if (not vals or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255 for v in vals)
                    or len(set(vals)) != len(vals) or 0 not in vals):
                errs.append(f"{path}.labels: need a mapping name -> distinct integer 0..255 including "
                            f"background 0, e.g. {{background: 0, lung: 1}}, got {self.labels!r}")
        return errs


@dataclass
class AutoencoderConfig:
    """Stage-1 latent: MONAI ``AutoencoderKL`` ("monai"), MAISI's ``AutoencoderKlMaisi`` ("maisi"), or
    the lossless 3D Haar wavelet packet transform ("wavelet", :mod:`medsynth.model.wavelet`).

    ``wavelet`` has no network to train: ``wavelet_levels`` levels each halve every axis and
    multiply the channels by 8 (the latent channels are derived, ``latent_channels`` is ignored);
    every sub-band is centred on its training-set mean, and ``wavelet_band_scale`` also brings it to
    unit variance; ``wavelet_label_bands: low`` keeps only the low-pass band of each label channel
    of a paired model (labels decoded by trilinear upsampling; the image stays exact), and
    ``wavelet_label_scale: unit`` leaves the label channels' bands at their natural scale (one-hot
    in [-1, 1], centred only) instead of standardising each: a label's high-pass bands are zero
    except at boundaries, and unit variance would blow those sparse bands up.  ``span`` gives every
    label band the factor that puts a label filling a block 4 latent units above its absence:
    standardising a rare label (a lesion in 0.05 % of the voxels) would put it ~70 units out, which
    no denoiser trained for minutes draws (docs/generator.md).
    ``wavelet_detail_gain`` multiplies the image's high-pass bands after standardising: their
    signal-to-noise ratio at every diffusion time rises by that factor (the diffusion settles
    them earlier and weighs them gain² more).  On the wavelet demo, 2 raised body p99 from 703-783
    to 887-986 HU (real 913), but through bright speckle noise, not bone (air std 184 -> 252 HU;
    docs/generator.md): it stays 1 in the shipped configs.  The
    network keys (``channels``, ``attention_levels``, ...) apply to "monai" and "maisi" only.

    ``with_nonlocal_attn`` adds a full self-attention block at the latent level of encoder and
    decoder (MONAI's default is on).  Its attention matrix grows with the square of the latent
    voxel count (a 64³ latent asks for ~275 GB), so large grids must keep it off, as MAISI does,
    or set ``use_flash_attention`` (memory-efficient ``scaled_dot_product_attention``).
    ``num_splits`` (MAISI only) splits each convolution's input into that many slabs to bound memory.

    ``init`` starts from local weights (never downloaded; :mod:`medsynth.model.init_weights`): a
    plain ``state_dict`` file (NV-Generate-CTMR's ``autoencoder_v1.pt``, a MONAI bundle's
    ``models/model.pt``), a dict holding one (``state_dict``, ``model``, ...), a MONAI bundle
    folder or a medsynth run folder; keys and shapes must match the configured network exactly.
    With ``training.autoencoder.steps: 0`` it is used as is (frozen), else fine-tuned.
    ``init_license`` is required with ``init`` and travels to the model card and exports (NVIDIA's
    CT weights: NVIDIA Open Model License; its MR weights: non-commercial).  ``input_range`` is the
    intensity range the weights were trained on: medsynth's model space is [-1, 1]; MAISI's
    autoencoder saw CT mapped to [0, 1] (-1000..1000 HU), so a MAISI file needs ``[0, 1]`` (an
    exact affine map around encode and decode, the weights unchanged).
    """

    kind: LatentKindName = "monai"
    channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    num_res_blocks: int = 1
    attention_levels: tuple[bool, ...] = (False, False, False)
    with_nonlocal_attn: bool = False
    norm_num_groups: int = 16
    use_flash_attention: bool = False
    num_splits: int = 1
    wavelet_levels: int = 1
    wavelet_band_scale: bool = True
    wavelet_label_bands: Literal["all", "low"] = "all"
    wavelet_label_scale: Literal["bands", "unit", "span"] = "bands"
    wavelet_detail_gain: float = 1.0
    init: Optional[str] = None
    init_license: Optional[str] = None
    input_range: tuple[float, float] = (-1.0, 1.0)

    @property
    def downsample(self) -> int:
        """How much the latent is smaller than the image along each axis."""
        if self.kind == "wavelet":
            return 2 ** self.wavelet_levels
        return 2 ** (len(self.channels) - 1)

    @property
    def levels(self) -> int:
        return self.wavelet_levels if self.kind == "wavelet" else len(self.channels) - 1

    def check(self, path: str) -> list[str]:
        errs = []
        errs.extend(_init_checks(self, path))
        if self.kind == "wavelet":
            if self.wavelet_levels < 1:
                errs.append(f"{path}.wavelet_levels: must be >= 1")
            if not self.wavelet_detail_gain > 0:
                errs.append(f"{path}.wavelet_detail_gain: must be > 0, got {self.wavelet_detail_gain}")
            if self.init is not None:
                errs.append(f"{path}.init: the wavelet latent has no weights to load; remove init or use "
                            "kind: monai / maisi")
            return errs
        if not self.input_range[0] < self.input_range[1]:
            errs.append(f"{path}.input_range: lower bound must be below upper bound, got {list(self.input_range)}")
        if len(self.attention_levels) != len(self.channels):
            errs.append(
                f"{path}.attention_levels: needs one entry per level of 'channels' "
                f"({len(self.channels)}), got {len(self.attention_levels)}"
            )
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            errs.append(f"{path}.channels: every channel count must be divisible by norm_num_groups "
                        f"({self.norm_num_groups}); {bad} are not")
        if self.latent_channels < 1:
            errs.append(f"{path}.latent_channels: must be >= 1")
        if self.num_res_blocks < 1:
            errs.append(f"{path}.num_res_blocks: must be >= 1")
        if self.num_splits < 1:
            errs.append(f"{path}.num_splits: must be >= 1")
        if self.num_splits > 1 and self.kind != "maisi":
            errs.append(f"{path}.num_splits: only the MAISI autoencoder (kind: maisi) splits its "
                        "convolutions; set num_splits: 1 or kind: maisi")
        return errs


@dataclass
class UNetConfig:
    """Stage-2 network: MONAI ``DiffusionModelUNet`` ("monai") or MAISI's ("maisi") in latent space.

    ``num_class_embeds`` makes the model class-conditional with classes 0..n-1; the embedding table
    gets one more row, index n, the "null" class used for classifier-free guidance.

    ``init`` / ``init_license`` start from local weights as for the autoencoder: a plain
    ``state_dict``, NV-Generate-CTMR's ``{"unet_state_dict": ..., "scale_factor": ...}`` (its
    scale factor is then used), a MONAI bundle, or a medsynth run (its EMA weights).  With
    ``training.diffusion.steps: 0`` the UNet is used as is; otherwise it is fine-tuned (give it a
    lower ``lr`` and ``warmup_steps``).  ``resblock_updown`` (residual blocks for down/upsampling)
    and ``spacing_input`` (kind maisi: the UNet is conditioned on ``data.spacing`` in mm x 100, as
    MAISI's) are what NV-Generate's rectified-flow CT UNet was built with.  Its 128-row modality
    embedding is not a medsynth class table (MAISI's "no modality" is row 0, medsynth's null class
    the last row): ``fixed_class_embeds: 128`` with ``fixed_class: 1`` (MAISI's code for CT) builds
    that table and feeds every call class 1, so the model is unconditional for medsynth.

    ``gated_skip`` (kind monai, trained from scratch) makes the UNet predict, besides its output
    ``a``, a gain ``g`` per latent voxel and channel, and return ``a + g * x`` for input ``x``: a
    multiplicative path from the noisy latent to the prediction.  MONAI's UNet adds its time
    embedding and so learns a time- and place-dependent gain on its input only slowly, yet that is
    what shrinking fine noise where the anatomy is flat (Wiener shrinkage) is; with it the wavelet
    demo's validation loss after 400 steps is below the plain UNet's after 1000 (docs/generator.md).
    ``gated_skip_below`` (0 < value <= 1) uses the gain only at noise times below that fraction of
    the schedule (t / num_train_timesteps); above it the UNet returns ``a`` alone, as the plain one.
    """

    kind: Literal["monai", "maisi"] = "monai"
    channels: tuple[int, ...] = (64, 128, 256)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 32
    num_class_embeds: Optional[int] = None
    use_flash_attention: bool = False
    resblock_updown: bool = False
    spacing_input: bool = False
    fixed_class_embeds: Optional[int] = None
    fixed_class: Optional[int] = None
    init: Optional[str] = None
    init_license: Optional[str] = None
    gated_skip: bool = False
    gated_skip_below: float = 1.0

    def check(self, path: str) -> list[str]:
        errs = _init_checks(self, path)
        if not 0.0 < self.gated_skip_below <= 1.0:
            errs.append(f"{path}.gated_skip_below: a fraction of the noise schedule, 0 < value <= 1; "
                        f"got {self.gated_skip_below}")
        elif self.gated_skip_below < 1.0 and not self.gated_skip:
            errs.append(f"{path}.gated_skip_below: needs gated_skip: true (it limits the gain to low noise times)")
        if self.gated_skip and self.kind != "monai":
            errs.append(f"{path}.gated_skip: only MONAI's UNet (kind: monai) has the gated skip; set kind: monai "
                        "or gated_skip: false")
        if self.gated_skip and self.init:
            errs.append(f"{path}.gated_skip: the gain outputs are new, so weights from 'init' cannot fill them; "
                        "train from scratch (init: null) or set gated_skip: false")
        if (self.fixed_class is None) != (self.fixed_class_embeds is None):
            errs.append(f"{path}.fixed_class: set fixed_class and fixed_class_embeds together (or neither)")
        elif self.fixed_class is not None:
            if self.num_class_embeds is not None:
                errs.append(f"{path}.fixed_class: a fixed class makes the model unconditional; set "
                            "num_class_embeds: null")
            if not 0 <= self.fixed_class < self.fixed_class_embeds:
                errs.append(f"{path}.fixed_class: need 0 <= fixed_class < fixed_class_embeds "
                            f"({self.fixed_class_embeds}), got {self.fixed_class}")
        if self.spacing_input and self.kind != "maisi":
            errs.append(f"{path}.spacing_input: only MAISI's UNet (kind: maisi) takes the voxel spacing; "
                        "set kind: maisi or spacing_input: false")
        if len(self.attention_levels) != len(self.channels):
            errs.append(
                f"{path}.attention_levels: needs one entry per level of 'channels' "
                f"({len(self.channels)}), got {len(self.attention_levels)}"
            )
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            errs.append(f"{path}.channels: every channel count must be divisible by norm_num_groups "
                        f"({self.norm_num_groups}); {bad} are not")
        badh = [c for c, a in zip(self.channels, self.attention_levels) if a and c % self.num_head_channels]
        if badh:
            errs.append(f"{path}.num_head_channels: channel counts of levels with attention must be "
                        f"divisible by it ({self.num_head_channels}); {badh} are not")
        if self.num_class_embeds is not None and self.num_class_embeds < 2:
            errs.append(f"{path}.num_class_embeds: need >= 2 classes, or null for unconditional")
        if self.num_res_blocks < 1:
            errs.append(f"{path}.num_res_blocks: must be >= 1")
        return errs


def _init_checks(obj: Any, path: str) -> list[str]:
    """Rules shared by every section with initial weights (``init`` + ``init_license``)."""
    errs = []
    if obj.init is not None and not str(obj.init).strip():
        errs.append(f"{path}.init: empty path; give the weights file (or folder) or remove the key")
    if obj.init is not None and not (obj.init_license or "").strip():
        errs.append(f"{path}.init_license: initial weights need their licence, which travels to the model card "
                    "and every export (e.g. 'NVIDIA Open Model License' for NVIDIA's CT weights, "
                    "'NVIDIA non-commercial' for its MR weights; 'unknown' if you do not know it)")
    if obj.init is None and obj.init_license is not None:
        errs.append(f"{path}.init_license: given without {path}.init; set init or remove init_license")
    return errs


@dataclass
class LowNoiseExpertConfig:
    """A second stage-2 UNet that denoises the times below ``handover`` (a fraction of the noise
    schedule): two experts in one run, as eDiff-I (Balaji et al., 2022).  ``medsynth train`` trains it
    after the run's own stage 2, on the same latent, into ``RUN/low_noise/`` (a run folder of its own),
    with the run's config changed by ``unet`` (keys of ``model.unet``, e.g. ``{gated_skip: true}``) and
    ``diffusion`` (keys of ``training.diffusion``); its ``time_range`` is ``[0, handover]`` unless
    ``diffusion`` sets one.  Every sampler of the run (generate, expand, evaluate, demo) then hands over
    to it.  On the 128-phantom wavelet latent a plain UNet with a gated-skip expert passed the gate in
    22 of 48 samples, each alone 0 of 16 (docs/generator.md)."""

    handover: float = 0.5
    unet: dict[str, Any] = field(default_factory=dict)
    diffusion: dict[str, Any] = field(default_factory=dict)
    #: train the expert beside the run's own stage 2 (a second process, the CPU threads split between
    #: the two) instead of after it: ``auto`` does on a CPU with >= 2 threads (two 1-thread trainings of
    #: the wavelet demo's UNet side by side ran 2 steps in 0.5 s; one 2-thread training 1 in 0.27 s)
    side_by_side: Union[bool, Literal["auto"]] = "auto"

    def check(self, path: str) -> list[str]:
        errs = []
        if isinstance(self.handover, bool) or not isinstance(self.handover, (int, float)) \
                or not 0.0 < float(self.handover) < 1.0:
            errs.append(f"{path}.handover: a fraction of the noise schedule, 0 < value < 1, got {self.handover!r}")
        for name in ("unet", "diffusion"):
            if not isinstance(getattr(self, name), dict):
                errs.append(f"{path}.{name}: a mapping of {'model.unet' if name == 'unet' else 'training.diffusion'} "
                            f"keys to change for the expert, got {_type_name(getattr(self, name))}")
        return errs


@dataclass
class LesionInpainterConfig:
    """A small diffusion model that paints a lesion, image and label together, into a ball inside a
    host label of a finished sample (a lung), as lesion-focused inpainting (LeFusion, Zhang et al.,
    2025).  ``medsynth train`` trains it after stage 2 on crops of the training cases around their
    ``label`` (the lesion), the ball erased from the crop's image and given back as the condition;
    every sampler of the run then paints one lesion into each sample of ``classes``, centred at a
    voxel of the sample's ``host`` label whose distance to the host's edge is one of the training
    lesions' own (in mm).  The demo's wavelet latent cannot carry a lesion through its low-pass label
    bands (docs/generator.md): with it 21 of 24 class-1 samples had a lesion label, without 0 of 24.

    Architecture and training keys define its weights; ``steps``, ``log_every``, ``sample_steps`` and
    ``sample_eta`` may change on resume."""

    label: str = "lesion"            # the label it paints (a name of data.labels)
    host: str = "lung"               # the label the lesion is placed in
    classes: list[int] = field(default_factory=lambda: [1])  # the classes that get a lesion
    radius_mm: float = 35.0          # the ball it repaints (covers the largest lesion with room)
    margin_mm: float = 15.0          # context around the ball: the crop is 2 (radius + margin) wide
    channels: list[int] = field(default_factory=lambda: [32, 64])
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    steps: int = 1200
    batch_size: int = 16
    lr: float = 1.0e-3
    ema_decay: float = 0.995
    jitter_mm: float = 10.0          # the training crops' centre moves this far from the lesion's
    log_every: int = 50
    sample_steps: int = 30           # rectified-flow steps when painting
    sample_eta: float = 1.0          # their stochasticity (as sampling.eta)

    def check(self, path: str) -> list[str]:
        errs = []
        for name in ("label", "host"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                errs.append(f"{path}.{name}: a label name of data.labels, got {getattr(self, name)!r}")
        if self.label == self.host:
            errs.append(f"{path}.host: must differ from {path}.label ({self.label!r})")
        if not self.classes or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.classes):
            errs.append(f"{path}.classes: a non-empty list of class values (integers >= 0), got {self.classes!r}")
        for name in ("radius_mm", "lr"):
            if not getattr(self, name) > 0:
                errs.append(f"{path}.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("margin_mm", "jitter_mm"):
            if getattr(self, name) < 0:
                errs.append(f"{path}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.jitter_mm >= self.radius_mm:
            errs.append(f"{path}.jitter_mm: must be below radius_mm ({self.radius_mm:g}) so the lesion stays in "
                        f"the ball, got {self.jitter_mm:g}")
        if not self.channels or any(c < 1 or c % self.norm_num_groups for c in self.channels):
            errs.append(f"{path}.channels: positive multiples of norm_num_groups ({self.norm_num_groups}), "
                        f"got {self.channels}")
        for name in ("num_res_blocks", "steps", "batch_size", "log_every", "sample_steps", "norm_num_groups"):
            if getattr(self, name) < 1:
                errs.append(f"{path}.{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            errs.append(f"{path}.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.sample_eta <= 1.0:
            errs.append(f"{path}.sample_eta: must be in [0, 1], got {self.sample_eta}")
        return errs


@dataclass
class ModelConfig:
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    low_noise_expert: Optional[LowNoiseExpertConfig] = None
    lesion_inpainter: Optional[LesionInpainterConfig] = None


def _steps_checks(obj: Any, path: str) -> list[str]:
    errs = []
    if obj.steps < 0:  # 0: use the initial weights as they are (Config.check asks for an init)
        errs.append(f"{path}.steps: must be >= 0, got {obj.steps}")
    for name in ("batch_size", "val_every", "log_every"):
        if getattr(obj, name) < 1:
            errs.append(f"{path}.{name}: must be >= 1, got {getattr(obj, name)}")
    if obj.lr <= 0:
        errs.append(f"{path}.lr: must be > 0, got {obj.lr}")
    if obj.warmup_steps < 0:
        errs.append(f"{path}.warmup_steps: must be >= 0")
    return errs


@dataclass
class AutoencoderTrainConfig:
    """Stage 1: L1 (+ ``l2_weight`` MSE) + ``kl_weight`` KL, PatchGAN (``adv_weight``) from step
    ``adv_start``, optional perceptual loss from a local MedicalNet-style 3D ResNet weights file
    (never downloaded).  L1 alone tends to the median, which erases small bright structures (bone,
    contrast) while the decoder is still unsure where they are; an MSE term keeps them.

    Paired models (``data.use_labels``) add ``label_dice_weight`` times a soft Dice loss over the
    decoded label channels (V-Net form, averaged over label values): in an L1 over the
    one-hot channels a lesion of 0.1 % of the volume is noise, in a Dice it weighs as much as the
    background.  ``label_balance`` (paired only) is the share of the L1/MSE terms averaged per label
    value rather than per voxel, image channel included: with the default 0.25 the demo's
    autoencoder reconstructs its 5-32-voxel lesions (Dice 0.61 over the 32 phantoms, none where
    there is none); with 0 it never did (Dice 0.0)."""

    steps: int = 2000
    batch_size: int = 1
    lr: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    kl_weight: float = 1e-6
    l2_weight: float = 0.0
    label_dice_weight: float = 1.0
    label_balance: float = 0.25
    adv_weight: float = 0.01
    adv_start: int = 500
    disc_channels: int = 32
    disc_layers: int = 3
    perceptual_weights: Optional[str] = None
    perceptual_network: Literal["resnet10", "resnet18", "resnet34", "resnet50"] = "resnet10"
    perceptual_weight: float = 0.0
    val_every: int = 200
    log_every: int = 50

    def check(self, path: str) -> list[str]:
        errs = _steps_checks(self, path)
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            errs.append(f"{path}.perceptual_weights: perceptual_weight > 0 needs a local weights file "
                        "(nothing is downloaded); set the path or set perceptual_weight: 0")
        if min(self.kl_weight, self.l2_weight, self.label_dice_weight, self.adv_weight, self.perceptual_weight) < 0:
            errs.append(f"{path}: loss weights (kl_weight, l2_weight, label_dice_weight, adv_weight, "
                        "perceptual_weight) must be >= 0")
        if not 0.0 <= self.label_balance <= 1.0:
            errs.append(f"{path}.label_balance: must be in [0, 1], got {self.label_balance}")
        if self.disc_layers < 1 or self.disc_channels < 1:
            errs.append(f"{path}.disc_layers/disc_channels: must be >= 1")
        return errs


@dataclass
class DiffusionTrainConfig:
    """Stage 2: the DDPM/DDIM objective (``prediction_type``: the noise, or the v-parameterisation,
    which stays well conditioned at high noise and suits short training and few sampling steps) or
    the rectified-flow velocity, on latents scaled to unit variance; EMA weights; gradient
    accumulation over ``grad_accum`` batches.

    ``prediction_type: sample`` makes the network predict the clean latent (x-prediction).  With
    the rectified flow (``training.scheduler: rflow``) the loss stays the velocity's, the velocity
    being derived from the predicted clean latent (``(x0 - x_t) / t``, t clipped at 0.05), as in
    "Back to Basics: Let Denoising Generative Models Denoise" (Li & He, 2025), who find clean data
    easier to predict than noise when the latent is as large as the image.  On the wavelet demo,
    500 steps with uniform times gave smooth blobs without anatomy (README); the paper pairs it
    with noise-heavy times.  Any other value keeps the plain velocity for rflow.  ``timestep_sampling`` draws rflow training times
    logit-normally (MAISI, SD3; few near t = 0) or uniformly (more weight on the last, fine steps);
    ``logit_mean`` / ``logit_std`` shape the logit-normal (t / T = sigmoid(mean + std n), t = T is
    pure noise: a positive mean trains more on noisy times, a negative one on the fine last steps).
    ``label_loss_weight`` (paired models) weighs the loss at every latent voxel by
    ``1 + sum_l (w_l - 1) * share_l``, ``share_l`` being the fraction of the voxel's block that the
    training case's label map gives label ``l`` (``{lesion: 20}``): a label in 0.05 % of the voxels
    otherwise counts for nothing in a mean-squared loss.  The loss is divided by the mean weight
    of the batch, so its scale (and the validation loss, which stays unweighted) is comparable.
    ``intensity_loss_weight: {above: 300, weight: 2.5}`` (a fixed intensity window, CT) adds
    ``(weight - 1) * share`` to that weight, ``share`` being the fraction of the voxel's block whose
    training intensity is above ``above`` (HU): on the demo grid the spine's cortex and the ribs
    are ~1 % of the voxels, and without it a short training draws them too dim (docs/generator.md).
    ``time_range: [lo, hi]`` trains an expert for one part of the noise schedule only (times
    ``lo <= t / T < hi``, the same distribution truncated there; the validation loss too): a run
    trained on part of the schedule is sampled only as one of two experts (``medsynth generate
    RUN --low-noise-run RUN2 --handover T`` with RUN covering [T, 1] and RUN2 [0, T]), so each
    expert spends all its steps on its own range (eDiff-I, Balaji et al. 2022).
    ``label_condition: true`` (a paired model on a wavelet latent, as a low-noise expert:
    ``model.low_noise_expert.diffusion: {label_condition: true}``) trains the UNet with the label
    map's latent channels clean, as a condition, and its loss on the image channels only: sampling
    lets the high-noise expert run to the end to draw the label map, then the expert draws the
    image's fine half to that map (a cascade, as MAISI draws an image to a label map).
    ``timestep_stratified: true`` draws the times of a batch low-discrepantly (Kingma et al., "Variational
    Diffusion Models", 2021): one uniform draw u0, then ``(u0 + i / B) mod 1`` for the batch's B
    samples, mapped through the same (truncated) distribution, so every batch covers the schedule's
    quantiles evenly; same distribution, less variance from step to step (a batch of 4 otherwise
    often trains on one part of the schedule only).  Off by default: it draws other times, and on
    the demo it did not win (5 of 48 samples passed against 20 of 48, docs/generator.md session 17).
    """

    steps: int = 10000
    batch_size: int = 1
    lr: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    grad_accum: int = 1
    ema_decay: float = 0.999
    cond_drop_prob: float = 0.1
    num_train_timesteps: int = 1000
    schedule: Literal["linear_beta", "scaled_linear_beta", "cosine"] = "scaled_linear_beta"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    timestep_sampling: Literal["logit-normal", "uniform"] = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    val_every: int = 500
    log_every: int = 100
    label_loss_weight: dict[str, float] = field(default_factory=dict)
    intensity_loss_weight: dict[str, float] = field(default_factory=dict)
    time_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    label_condition: bool = False
    timestep_stratified: bool = False

    @property
    def timestep_dist(self) -> tuple[str, float, float, float, float, bool]:
        """How training times are drawn: (``timestep_sampling``, logit mean, logit std, the
        ``time_range`` they are restricted to, as fractions of the schedule, and whether a batch's
        times are stratified)."""
        lo, hi = self.time_range
        return (self.timestep_sampling, float(self.logit_mean), float(self.logit_std), float(lo), float(hi),
                bool(self.timestep_stratified))

    @property
    def whole_schedule(self) -> bool:
        """True unless ``time_range`` restricts the model to a part of the noise schedule."""
        return float(self.time_range[0]) <= 0.0 and float(self.time_range[1]) >= 1.0

    def check(self, path: str) -> list[str]:
        errs = _steps_checks(self, path)
        if self.logit_std <= 0:
            errs.append(f"{path}.logit_std: must be > 0, got {self.logit_std}")
        if not 0.0 <= self.ema_decay < 1.0:
            errs.append(f"{path}.ema_decay: need 0 <= value < 1, got {self.ema_decay}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            errs.append(f"{path}.cond_drop_prob: need 0 <= value < 1, got {self.cond_drop_prob}")
        if self.grad_accum < 1:
            errs.append(f"{path}.grad_accum: must be >= 1")
        if self.num_train_timesteps < 2:
            errs.append(f"{path}.num_train_timesteps: must be >= 2")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            errs.append(f"{path}.beta_start/beta_end: need 0 < beta_start < beta_end < 1")
        for name, w in (self.label_loss_weight or {}).items():
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 < float(w) <= 1000:
                errs.append(f"{path}.label_loss_weight.{name}: a loss weight 0 < value <= 1000, got {w!r}")
        errs += _intensity_weight_checks(self.intensity_loss_weight, f"{path}.intensity_loss_weight")
        tr = self.time_range
        if (not isinstance(tr, (list, tuple)) or len(tr) != 2
                or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in tr)
                or not 0.0 <= float(tr[0]) < float(tr[1]) <= 1.0):
            errs.append(f"{path}.time_range: two fractions of the noise schedule [lo, hi] with "
                        f"0 <= lo < hi <= 1 (e.g. [0.0, 0.5] for a low-noise expert), got {tr!r}")
        return errs


def _intensity_weight_checks(w: Any, path: str) -> list[str]:
    if not w:
        return []
    if not isinstance(w, dict) or set(w) != {"above", "weight"}:
        return [f"{path}: two keys, above (an intensity, HU for CT) and weight, e.g. {{above: 300, weight: 2.5}}; "
                f"got {w!r}"]
    errs = []
    a, v = w["above"], w["weight"]
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(float(a)):
        errs.append(f"{path}.above: an intensity (HU for CT), got {a!r}")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < float(v) <= 1000:
        errs.append(f"{path}.weight: a loss weight 0 < value <= 1000, got {v!r}")
    return errs


@dataclass
class ControlNetTrainConfig:
    """Mask-conditioned generation (``medsynth train --stage controlnet``): a MONAI ``ControlNet``
    copied from the trained UNet learns to steer the frozen model towards a given label map.

    ``init`` / ``init_license`` start the ControlNet from local weights instead of the UNet's
    (``{"controlnet_state_dict": ...}`` as NV-Generate saves it, a plain ``state_dict`` or a
    medsynth run); they must match the ControlNet medsynth builds for the run exactly."""

    steps: int = 500
    batch_size: int = 4
    lr: float = 1.0e-4
    cond_drop_prob: float = 0.0  # class-label dropout (the mask is always given)
    conditioning_scale: float = 1.0
    log_every: int = 10
    init: Optional[str] = None
    init_license: Optional[str] = None

    def check(self, path: str) -> list[str]:
        errs = _init_checks(self, path)
        if self.steps < 1 or self.batch_size < 1 or self.log_every < 1:
            errs.append(f"{path}: steps, batch_size and log_every must be >= 1")
        if self.lr <= 0 or not 0.0 <= self.cond_drop_prob < 1.0 or self.conditioning_scale < 0:
            errs.append(f"{path}: need lr > 0, 0 <= cond_drop_prob < 1 and conditioning_scale >= 0")
        return errs


@dataclass
class TrainingConfig:
    """Seed, device, precision and the diffusion objective shared by both stages.

    ``scheduler`` picks the stage-2 objective: "ddpm" and "ddim" train the same noise-prediction
    model (sample it with DDPM or DDIM); "rflow" trains a rectified-flow velocity model.
    The training fast path (``medsynth/model/fastpath.py``), for stage 1, stage 2 and the ControlNet:
    ``precision: auto`` autocasts to bf16 on CUDA (fp16 on GPUs without bf16) and on CPUs with native
    bf16 (AVX512-BF16 / AMX) for grids of at least 2048 voxels (the image grid for stage 1, the latent
    grid for stage 2 and the ControlNet), and stays fp32 elsewhere (emulated
    bf16 is tens of times slower); ``precision: bf16`` autocasts where the device supports bf16
    natively and falls back to fp32 (with a warning) where it does not.  ``channels_last`` trains
    the networks channels-last (NDHWC; ``auto``: on the CPU, per stage and precision where it measured
    faster, ``fastpath.resolve_training_channels_last``: the ControlNet always, stage 1 in fp32, stage 2
    in bf16; channels-first on CUDA).  ``fused_attention`` runs MONAI's attention
    blocks with PyTorch's fused ``scaled_dot_product_attention`` (the same parameters, so checkpoints
    are interchangeable; ``auto``: on CUDA and in bf16, not in fp32 on the CPU, where it gained nothing).
    ``fused_optimizer`` steps Adam with PyTorch's fused kernel (``fused=True``; ``auto``: on the CPU
    and CUDA) instead of its per-parameter loop: the same update rule and state, so a checkpoint
    resumes under either; on a 2-core AVX512-BF16 EPYC the benchmark UNet's Adam step (29 M parameters) took
    19 ms fused vs 56 ms looped.
    """

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "bf16"
    scheduler: SchedulerName = "ddpm"
    checkpoint_every: int = 500
    channels_last: Union[bool, Literal["auto"]] = "auto"
    fused_attention: Union[bool, Literal["auto"]] = "auto"
    fused_optimizer: Union[bool, Literal["auto"]] = "auto"
    autoencoder: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    diffusion: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    controlnet: ControlNetTrainConfig = field(default_factory=ControlNetTrainConfig)

    def check(self, path: str) -> list[str]:
        if self.checkpoint_every < 1:
            return [f"{path}.checkpoint_every: must be >= 1"]
        return []


@dataclass
class TilingConfig:
    """Decode latents in overlapping tiles (MONAI sliding window, gaussian blending) to bound memory.

    Used only when the latent grid is larger than ``latent_roi`` in some axis.  ``latent_roi`` is
    the largest tile: each axis gets the fewest tiles of at most that size whose neighbours share
    at least the voxels ``overlap`` asks for, shrunk to cover the axis evenly.
    """

    enabled: bool = True
    latent_roi: tuple[int, int, int] = (32, 32, 32)
    overlap: float = 0.25

    def check(self, path: str) -> list[str]:
        errs = []
        if not 0.0 <= self.overlap < 1.0:
            errs.append(f"{path}.overlap: need 0 <= value < 1, got {self.overlap}")
        if any(r < 1 for r in self.latent_roi):
            errs.append(f"{path}.latent_roi: every size must be >= 1, got {list(self.latent_roi)}")
        return errs


@dataclass
class SamplingConfig:
    """Defaults of ``medsynth generate`` (each can be overridden on the command line).

    ``eta`` is the sampler's stochasticity (0 = deterministic): DDIM's, and for the rectified flow
    the share of fresh noise per step (0..1; 1 = ancestral: the clean estimate re-noised, which on
    the wavelet demo model brought lung HU and background fraction into the gate's ranges where
    the ODE did not, docs/generator.md); ``guidance_scale`` is classifier-free
    guidance (1 = plain conditional, 0 = unconditional).

    The inference fast path (see ``medsynth/model/fastpath.py`` and ``benchmarks/``):
    ``precision: auto`` samples in bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere;
    ``channels_last`` runs the networks channels-last (NDHWC; ``auto``: on the CPU, where oneDNN gains
    from it, not on CUDA, where cuDNN's 3D convolutions measured 17 % slower per step on an H200);
    ``onednn_conv`` sends every CPU
    convolution to oneDNN; ``fused_attention`` runs MONAI's attention blocks with PyTorch's fused
    ``scaled_dot_product_attention``.  ``precision: fp32`` with the three flags off is the exact
    path (the bytes of MONAI's ``LatentDiffusionInferer``).
    """

    scheduler: SchedulerName = "ddim"
    steps: int = 50
    guidance_scale: float = 1.0
    eta: float = 0.0
    batch_size: int = 1
    use_ema: bool = True
    tiling: TilingConfig = field(default_factory=TilingConfig)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: Union[bool, Literal["auto"]] = "auto"
    onednn_conv: bool = True
    fused_attention: bool = True

    def check(self, path: str) -> list[str]:
        errs = []
        if self.steps < 1:
            errs.append(f"{path}.steps: must be >= 1")
        if self.batch_size < 1:
            errs.append(f"{path}.batch_size: must be >= 1")
        if self.guidance_scale < 0:
            errs.append(f"{path}.guidance_scale: must be >= 0, got {self.guidance_scale}")
        if self.eta < 0:
            errs.append(f"{path}.eta: must be >= 0, got {self.eta}")
        if self.scheduler == "rflow" and self.eta > 1:
            errs.append(f"{path}.eta: the rectified flow's stochasticity is a share of the noise, 0..1; got {self.eta}")
        return errs


@dataclass
class QCConfig:
    """Per-volume checks, dataset metrics and the report of ``medsynth qc`` (thresholds per modality).

    Reference ranges (body/background fraction, intensity percentiles inside the body) are learned
    from the reference manifest and widened by ``percentile_margin`` times their span on each side,
    but never by less than ``range_floor`` (fractions) or ``range_floor`` times the reference's
    p1..p99 intensity span (intensities).  The span is the reference's min..max after setting aside
    ``range_trim`` of its cases at each end of every statistic (``floor(range_trim x n)`` cases, so a
    reference of fewer than 40 cases keeps its whole min..max): one atypical reference case must not
    open a range for every sample.
    """

    ct_range: tuple[float, float] = (-1024.0, 3071.0)
    mr_range: Optional[tuple[float, float]] = None
    percentile_margin: float = 0.5
    range_floor: float = 0.02
    range_trim: float = 0.025
    artefact_threshold: float = 0.35
    min_std: float = 1e-3
    body_threshold_hu: float = -500.0
    label_outside_body_max: float = 0.01
    geometry_atol_mm: float = 1e-3
    knn_k: int = 5
    max_pairs: int = 200
    feature_checkpoint: Optional[str] = None
    feature_network: Literal["resnet10", "resnet18", "resnet34", "resnet50"] = "resnet10"
    montage_count: int = 4
    seed: int = 0

    def check(self, path: str) -> list[str]:
        errs = []
        if not self.ct_range[0] < self.ct_range[1]:
            errs.append(f"{path}.ct_range: lower bound must be below upper bound, got {list(self.ct_range)}")
        if self.mr_range is not None and not self.mr_range[0] < self.mr_range[1]:
            errs.append(f"{path}.mr_range: lower bound must be below upper bound, got {list(self.mr_range)}")
        if self.percentile_margin < 0:
            errs.append(f"{path}.percentile_margin: must be >= 0, got {self.percentile_margin}")
        if self.range_floor < 0:
            errs.append(f"{path}.range_floor: must be >= 0, got {self.range_floor}")
        if not 0.0 <= self.range_trim < 0.5:
            errs.append(f"{path}.range_trim: the share of reference cases set aside at each end, 0 <= value < 0.5, "
                        f"got {self.range_trim}")
        if not 0.0 < self.artefact_threshold <= 1.0:
            errs.append(f"{path}.artefact_threshold: need 0 < value <= 1 (the score is in [0, 1]), "
                        f"got {self.artefact_threshold}")
        if not 0.0 <= self.label_outside_body_max <= 1.0:
            errs.append(f"{path}.label_outside_body_max: need 0 <= value <= 1")
        if self.knn_k < 1:
            errs.append(f"{path}.knn_k: must be >= 1")
        if self.max_pairs < 1:
            errs.append(f"{path}.max_pairs: must be >= 1")
        if self.montage_count < 1:
            errs.append(f"{path}.montage_count: must be >= 1")
        return errs


@dataclass
class PrivacyConfig:
    """Memorisation screen and identifier handling.

    A sample is a ``possible_copy`` when its distance to the nearest training case is below
    ``threshold_scale`` times the ``memorisation_quantile`` quantile of the nearest-neighbour
    distances from held-out real cases to the training cases (image space: 1 - NCC of band-passed,
    downsampled volumes maximised over shifts up to ``max_shift`` voxels; feature space: Euclidean
    distance of standardised radiomics features).  Without a hold-out manifest a deterministic
    ``holdout_fraction`` of the reference cases is held out.  ``rule`` says which distance fails a
    sample: ``image`` (default; the feature distance is reported as evidence) or
    ``image_or_feature`` (either below its threshold).  ``self_test`` plants copies of two
    training cases (noised, shifted, rescaled) in every run and reports whether they are flagged.
    """

    memorisation_quantile: float = 0.01
    downsample: tuple[int, int, int] = (32, 32, 32)
    threshold_scale: float = 0.75
    holdout_fraction: float = 0.25
    holdout_seed: int = 0
    max_shift: int = 2
    blur_sigma: float = 1.0
    highpass_sigma: float = 4.0
    use_features: bool = True
    rule: Literal["image", "image_or_feature"] = "image"
    self_test: bool = True
    # the lesion-level screen (medsynth.privacy.lesion_screen): every lesion of a sample against
    # every training lesion, in a ball of lesion_radius_mm around its centroid, same calibration
    lesion_screen: bool = True
    lesion_label: str = "lesion"
    lesion_radius_mm: float = 35.0
    lesion_max_shift: int = 1

    def check(self, path: str) -> list[str]:
        errs = []
        if not 0.0 <= self.memorisation_quantile <= 0.5:
            errs.append(f"{path}.memorisation_quantile: need 0 <= value <= 0.5")
        if not 0.0 < self.threshold_scale <= 1.0:
            errs.append(f"{path}.threshold_scale: need 0 < value <= 1, got {self.threshold_scale}")
        if not 0.0 < self.holdout_fraction < 1.0:
            errs.append(f"{path}.holdout_fraction: need 0 < value < 1, got {self.holdout_fraction}")
        if any(s < 8 for s in self.downsample):
            errs.append(f"{path}.downsample: every size must be >= 8 voxels, got {list(self.downsample)}")
        if not 0 <= self.max_shift <= 4:
            errs.append(f"{path}.max_shift: need 0 <= value <= 4 voxels, got {self.max_shift}")
        if not 0.0 < self.lesion_radius_mm <= 200.0:
            errs.append(f"{path}.lesion_radius_mm: need 0 < value <= 200 mm, got {self.lesion_radius_mm}")
        if not 0 <= self.lesion_max_shift <= 3:
            errs.append(f"{path}.lesion_max_shift: need 0 <= value <= 3 voxels, got {self.lesion_max_shift}")
        if not str(self.lesion_label).strip():
            errs.append(f"{path}.lesion_label: need a label name (e.g. lesion)")
        if self.blur_sigma < 0 or self.highpass_sigma < 0:
            errs.append(f"{path}: blur_sigma and highpass_sigma must be >= 0 (0 disables)")
        elif self.highpass_sigma and self.highpass_sigma <= self.blur_sigma:
            errs.append(f"{path}.highpass_sigma: must exceed blur_sigma ({self.blur_sigma}) or be 0")
        return errs


@dataclass
class ExportConfig:
    formats: tuple[str, ...] = tuple(n for n, f in EXPORT_FORMATS.items() if f.default)
    uid_root: Optional[str] = None

    def check(self, path: str) -> list[str]:
        errs = []
        bad = [f for f in self.formats if f not in EXPORT_FORMATS]
        if bad:
            errs.append(f"{path}.formats: unknown format(s) {bad}; choose from {', '.join(EXPORT_FORMATS)}")
        return errs


@dataclass
class Config:
    """The whole medsynth configuration (one YAML file)."""

    name: str = "medsynth"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    qc: QCConfig = field(default_factory=QCConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def check(self, path: str) -> list[str]:
        errs = []
        ae_down = self.model.autoencoder.downsample
        bad = [s for s in self.data.shape if s % ae_down]
        if bad:
            errs.append(
                f"data.shape: every size must be divisible by {ae_down} (the autoencoder downsamples "
                f"{self.model.autoencoder.levels} times); {bad} are not"
            )
        latent = [s // ae_down for s in self.data.shape]
        unet_down = 2 ** (len(self.model.unet.channels) - 1)
        badl = [s for s in latent if s % unet_down]
        if badl:
            errs.append(
                f"data.shape: the latent grid {latent} must be divisible by {unet_down} (the UNet "
                f"downsamples {len(self.model.unet.channels) - 1} times)"
            )
        if self.sampling.guidance_scale != 1.0 and self.model.unet.num_class_embeds is None:
            errs.append("sampling.guidance_scale: classifier-free guidance needs a class-conditional "
                        "model (set model.unet.num_class_embeds) or guidance_scale: 1.0")
        errs.extend(_scheduler_checks(self.sampling, self.training))
        errs.extend(_attention_memory_checks(self, latent))
        if self.training.autoencoder.steps == 0 and LATENT_KINDS[self.model.autoencoder.kind].trained \
                and self.model.autoencoder.init is None:
            errs.append("training.autoencoder.steps: 0 uses initial weights as they are and needs "
                        "model.autoencoder.init; set the weights file or steps >= 1")
        if self.training.diffusion.steps == 0 and self.model.unet.init is None:
            errs.append("training.diffusion.steps: 0 uses initial weights as they are and needs model.unet.init; "
                        "set the weights file or steps >= 1")
        ta = self.training.autoencoder
        if (ta.adv_weight > 0 and LATENT_KINDS[self.model.autoencoder.kind].trained  # no discriminator without training
                and min(self.data.shape) < 4 * 2 ** ta.disc_layers):
            errs.append(f"training.autoencoder.disc_layers: {ta.disc_layers} stride-2 layers need every image size "
                        f">= {4 * 2 ** ta.disc_layers}, data.shape is {list(self.data.shape)}; use fewer layers")
        if self.sampling.steps > self.training.diffusion.num_train_timesteps:
            errs.append(f"sampling.steps: at most training.diffusion.num_train_timesteps "
                        f"({self.training.diffusion.num_train_timesteps}), got {self.sampling.steps}")
        if self.training.diffusion.label_condition and (self.model.autoencoder.kind != "wavelet"
                                                        or not self.data.use_labels):
            errs.append("training.diffusion.label_condition: conditions on the label map's own latent channels, "
                        "which only a paired model (data.use_labels: true) on a wavelet latent "
                        "(model.autoencoder.kind: wavelet) has; set both or remove label_condition")
        les = self.model.lesion_inpainter
        if les is not None:
            if not self.data.use_labels:
                errs.append("model.lesion_inpainter: paints a lesion label and needs a paired model "
                            "(data.use_labels: true); set it or remove model.lesion_inpainter")
            if self.model.unet.num_class_embeds is None:
                errs.append("model.lesion_inpainter: paints the samples of its classes and needs a "
                            "class-conditional model (model.unet.num_class_embeds)")
            elif any(c >= self.model.unet.num_class_embeds for c in les.classes if isinstance(c, int)):
                errs.append(f"model.lesion_inpainter.classes: {les.classes} has classes the model does not know "
                            f"(model.unet.num_class_embeds: {self.model.unet.num_class_embeds})")
            if self.data.labels:
                missing = [n for n in (les.label, les.host) if n not in self.data.labels]
                if missing:
                    errs.append(f"model.lesion_inpainter: label(s) {missing} are not in data.labels "
                                f"{sorted(self.data.labels)}; name the lesion (label) and where it sits (host)")
        if self.model.low_noise_expert is not None and not _check_all(self.model.low_noise_expert, ""):
            errs.extend(_expert(self)[1])
        return errs


def _expert(cfg: "Config") -> tuple["Config", list[str]]:
    """``cfg``'s low-noise expert config (see :func:`expert_config`) and its problems, named by the
    expert's keys (``model.low_noise_expert.unet.<key>``)."""
    e = cfg.model.low_noise_expert
    raw = config_to_dict(cfg)
    raw["name"] = f"{cfg.name}-low-noise"
    raw["model"]["low_noise_expert"] = None
    raw["model"]["lesion_inpainter"] = None  # the run paints lesions after both experts, once
    raw["model"]["unet"] = _deep_merge(raw["model"]["unet"], dict(e.unet))
    raw["training"]["diffusion"] = _deep_merge(raw["training"]["diffusion"],
                                               {"time_range": [0.0, float(e.handover)], **dict(e.diffusion)})
    errors: list[str] = []
    ecfg = _build(Config, raw, "", errors)
    if not errors:
        errors.extend(_check_all(ecfg, ""))
    return ecfg, [x.replace("model.unet.", "model.low_noise_expert.unet.").replace(
        "training.diffusion.", "model.low_noise_expert.diffusion.") for x in errors]


def expert_config(cfg: "Config") -> "Config":
    """The config of ``cfg``'s low-noise expert (``model.low_noise_expert``): ``cfg`` with the expert's
    ``unet`` and ``diffusion`` keys changed, trained on ``[0, handover]`` unless it sets a
    ``time_range``, and no expert of its own.  Problems name the expert's keys."""
    if cfg.model.low_noise_expert is None:
        raise ConfigError("the config has no model.low_noise_expert")
    ecfg, errors = _expert(cfg)
    if errors:
        raise _problems("model.low_noise_expert", errors)
    return ecfg


# Full self-attention over more tokens than this needs a quadratic matrix that does not fit:
# 32³ tokens -> 4 GiB per head in fp32; a 64³ latent -> ~275 GB.
_MAX_ATTENTION_TOKENS = 32 ** 3


def _scheduler_checks(sampling: SamplingConfig, training: TrainingConfig) -> list[str]:
    """The sampling scheduler against the training objective, from :data:`medsynth.registry.SCHEDULERS`."""
    sa, tr = SCHEDULERS[sampling.scheduler], SCHEDULERS[training.scheduler]
    flows = flow_schedulers()
    errs = []
    if sa.flow and not tr.flow:
        errs.append(f"sampling.scheduler: '{sa.name}' sampling needs a model trained with "
                    f"training.scheduler: {' or '.join(flows)}")
    if not sa.flow and tr.flow:
        errs.append(f"sampling.scheduler: a rectified-flow model (training.scheduler: {tr.name}) "
                    f"must be sampled with scheduler {' or '.join(repr(f) for f in flows)}")
    if sa.all_steps and sampling.steps != training.diffusion.num_train_timesteps:
        fewer = next(n for n, s in SCHEDULERS.items() if s.flow == sa.flow and not s.all_steps)
        errs.append(f"sampling.steps: {sa.name.upper()} samples with all training timesteps "
                    f"({training.diffusion.num_train_timesteps}); use '{fewer}' for fewer steps")
    return errs


def _attention_memory_checks(cfg: "Config", latent: list[int]) -> list[str]:
    import math

    errs = []
    ae = cfg.model.autoencoder
    if ae.use_flash_attention or ae.kind == "wavelet":
        return errs
    n_levels = len(ae.channels)
    for lvl, on in enumerate(ae.attention_levels):
        tokens = math.prod(s // 2 ** min(lvl, n_levels - 1) for s in cfg.data.shape)
        if on and tokens > _MAX_ATTENTION_TOKENS:
            errs.append(f"model.autoencoder.attention_levels[{lvl}]: self-attention over {tokens} voxels "
                        f"needs a {tokens}² matrix ({4 * tokens ** 2 / 1e9:.0f} GB in fp32); turn it off or "
                        "set model.autoencoder.use_flash_attention: true")
    tokens = math.prod(latent)
    if ae.with_nonlocal_attn and tokens > _MAX_ATTENTION_TOKENS:
        errs.append(f"model.autoencoder.with_nonlocal_attn: attention over the whole latent grid {latent} "
                    f"({tokens} tokens) needs a {tokens}² matrix ({4 * tokens ** 2 / 1e9:.0f} GB in fp32); "
                    "set with_nonlocal_attn: false (as MAISI's autoencoder does) or use_flash_attention: true")
    return errs


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> Config:
    """Load, validate and return a :class:`Config` from a YAML file.

    Relative paths in ``data.manifest`` / ``data.cache_dir`` / perceptual weights / initial
    weights (``init``) are resolved against the YAML file's folder.  Raises :class:`ConfigError` listing every problem.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found", hint="pass the path of a YAML file, e.g. configs/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = _deep_merge(raw, overrides)
    cfg = config_from_dict(raw, source=str(path))
    _resolve_paths(cfg, path.parent)
    return cfg


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a plain mapping into a :class:`Config` (all problems reported at once)."""
    errors: list[str] = []
    cfg = _build(Config, raw, "", errors)
    if not errors:
        errors.extend(_check_all(cfg, ""))
    if errors:
        raise _problems(source, errors)
    return cfg


def _problems(source: str, errors: list[str]) -> ConfigError:
    """The one error that lists every problem of a config."""
    lines = "\n".join(f"  - {e}" for e in errors)
    return ConfigError(f"{source}: {len(errors)} problem(s) in the config:\n{lines}")


def as_config(config: Config | str | Path | dict[str, Any]) -> Config:
    """A :class:`Config` from a Config (as is), a YAML path (:func:`load_config`) or a plain mapping
    (:func:`config_from_dict`): what the Python API accepts wherever it takes a config."""
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-ready form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(x) for x in cfg]
    return cfg


def config_hash(cfg: Config) -> str:
    import hashlib
    import json

    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _resolve_paths(cfg: Config, root: Path) -> None:
    def res(p: Optional[str]) -> Optional[str]:
        if p is None:
            return None
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (root / q).resolve())

    cfg.data.manifest = res(cfg.data.manifest)
    cfg.data.cache_dir = res(cfg.data.cache_dir)
    cfg.training.autoencoder.perceptual_weights = res(cfg.training.autoencoder.perceptual_weights)
    cfg.qc.feature_checkpoint = res(cfg.qc.feature_checkpoint)
    cfg.model.autoencoder.init = res(cfg.model.autoencoder.init)
    cfg.model.unet.init = res(cfg.model.unet.init)
    cfg.training.controlnet.init = res(cfg.training.controlnet.init)


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _build(cls: type, raw: Any, path: str, errors: list[str]) -> Any:
    where = path or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping of keys, got {_type_name(raw)}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            errors.append(f"{_key(path, str(key))}: unknown key{hint}")
            continue
        kwargs[key] = _coerce(hints[key], value, _key(path, key), errors)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, path, errors)
        sub: list[str] = []
        for a in inner:
            sub = []
            out = _coerce(a, value, path, sub)
            if not sub:
                return out
        errors.extend(sub)
        return value
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            errors.append(f"{path}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected a list, got {_type_name(value)}")
            return value
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]", errors) for i, v in enumerate(value))
        if len(value) != len(args):
            errors.append(f"{path}: expected a list of {len(args)} values, got {len(value)}")
            return tuple(value)
        return tuple(_coerce(a, v, f"{path}[{i}]", errors) for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {_type_name(value)} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {_type_name(value)} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {_type_name(value)} {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string, got {_type_name(value)} {value!r}")
        return value
    return value


def _type_name(v: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _check_all(obj: Any, path: str) -> list[str]:
    errs: list[str] = []
    if not dataclasses.is_dataclass(obj):
        return errs
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            errs.extend(_check_all(v, _key(path, f.name)))
    check = getattr(obj, "check", None)
    if check is not None:
        errs.extend(check(path))
    return errs
