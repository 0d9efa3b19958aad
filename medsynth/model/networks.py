"""Networks, noise schedulers, devices and precision, all built from the config.

Stage 1 is MONAI's ``AutoencoderKL`` (or MAISI's ``AutoencoderKlMaisi`` for large volumes), stage 2
MONAI's ``DiffusionModelUNet`` (or ``DiffusionModelUNetMaisi``) in the autoencoder's latent space.
Shapes that other modules need (image channels, latent grid) are derived here, in one place.

Class conditioning: a model with ``num_class_embeds: n`` gets an embedding table of n + 1 rows;
row n is the "null" class, used for label dropout in training and for the unconditional branch
of classifier-free guidance at sampling.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from medsynth.config import Config, DiffusionTrainConfig
from medsynth.errors import ConfigError
from medsynth.jobs import derive_seed
from medsynth.registry import SCHEDULERS

log = logging.getLogger("medsynth.model.networks")


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def image_channels(cfg: Config) -> int:
    """Channels of the image the autoencoder sees: the image, plus one one-hot channel per label
    value when ``data.use_labels`` (paired image + label generation, :mod:`medsynth.model.labels`)."""
    from medsynth.model.labels import label_values

    return 1 + len(label_values(cfg))


def downsample_factor(cfg: Config) -> int:
    """How much the autoencoder shrinks each axis (2 per level after the first; 2 per wavelet level)."""
    return cfg.model.autoencoder.downsample


def latent_channels(cfg: Config) -> int:
    """Channels of a latent: the configured ones, or 8 sub-bands per image channel and wavelet level."""
    a = cfg.model.autoencoder
    if a.kind == "wavelet":
        from medsynth.model.labels import label_values
        from medsynth.model.wavelet import HaarWavelet3d

        return HaarWavelet3d.channels_for(image_channels(cfg), a.wavelet_levels, len(label_values(cfg)),
                                          a.wavelet_label_bands)
    return a.latent_channels


def label_latent_channels(cfg: Config) -> int:
    """How many trailing latent channels hold the label map alone (a paired model on a wavelet latent:
    its label channels' sub-bands; 0 otherwise, the KL autoencoder mixing image and label)."""
    a = cfg.model.autoencoder
    if a.kind != "wavelet" or not cfg.data.use_labels:
        return 0
    return latent_channels(cfg) - 8 ** a.wavelet_levels  # the image channel's sub-bands come first


def latent_shape(cfg: Config) -> tuple[int, int, int, int]:
    """(channels, x, y, z) of a latent for the configured image grid."""
    f = downsample_factor(cfg)
    x, y, z = (s // f for s in cfg.data.shape)
    return (latent_channels(cfg), x, y, z)


def num_classes(cfg: Config) -> Optional[int]:
    """Number of real classes of a class-conditional model (None: unconditional)."""
    return cfg.model.unet.num_class_embeds


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


def generator(*parts: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`medsynth.jobs.derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Make network construction deterministic without touching the caller's global RNG.

    ``nn.Module`` initialisers draw from torch's global generator; it is forked (saved and
    restored) around the block, so library code never changes global random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------


def _wavelet_autoencoder(cfg: Config, n: int) -> nn.Module:
    from medsynth.model.labels import label_values
    from medsynth.model.wavelet import HaarWavelet3d

    a = cfg.model.autoencoder
    return HaarWavelet3d(n, a.wavelet_levels, len(label_values(cfg)), a.wavelet_label_bands)


def _maisi_autoencoder(cfg: Config, n: int) -> nn.Module:
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    a = cfg.model.autoencoder
    levels = len(a.channels)
    return _with_input_range(AutoencoderKlMaisi(
        spatial_dims=3, in_channels=n, out_channels=n, num_res_blocks=[a.num_res_blocks] * levels,
        num_channels=list(a.channels), attention_levels=list(a.attention_levels),
        latent_channels=a.latent_channels, norm_num_groups=a.norm_num_groups,
        with_encoder_nonlocal_attn=a.with_nonlocal_attn, with_decoder_nonlocal_attn=a.with_nonlocal_attn,
        use_flash_attention=a.use_flash_attention, num_splits=a.num_splits, dim_split=1,
        norm_float16=False, print_info=False, save_mem=False,
    ), a.input_range)


def _monai_autoencoder(cfg: Config, n: int) -> nn.Module:
    from monai.networks.nets import AutoencoderKL

    a = cfg.model.autoencoder
    return _with_input_range(AutoencoderKL(
        spatial_dims=3, in_channels=n, out_channels=n, num_res_blocks=a.num_res_blocks,
        channels=tuple(a.channels), attention_levels=tuple(a.attention_levels),
        latent_channels=a.latent_channels, norm_num_groups=a.norm_num_groups,
        with_encoder_nonlocal_attn=a.with_nonlocal_attn, with_decoder_nonlocal_attn=a.with_nonlocal_attn,
        use_flash_attention=a.use_flash_attention,
    ), a.input_range)


#: The stage-1 network of each entry of :data:`medsynth.registry.LATENT_KINDS` (config, image channels).
AUTOENCODER_BUILDERS: dict[str, Callable[[Config, int], nn.Module]] = {
    "monai": _monai_autoencoder, "maisi": _maisi_autoencoder, "wavelet": _wavelet_autoencoder}


def build_autoencoder(cfg: Config) -> nn.Module:
    """Stage-1 autoencoder of ``cfg.model.autoencoder`` (random initialisation)."""
    return AUTOENCODER_BUILDERS[cfg.model.autoencoder.kind](cfg, image_channels(cfg))


class _InputRange:
    """Mixin for an autoencoder whose weights were trained on intensities in ``input_range`` rather
    than medsynth's [-1, 1] (MAISI's: [0, 1]): images are mapped into that range before encoding
    and decoded images back, so the rest of medsynth keeps its model space.  The state dict is
    the network's own."""

    input_range: tuple[float, float] = (-1.0, 1.0)

    def encode(self, x: torch.Tensor) -> Any:
        lo, hi = self.input_range
        return super().encode((x + 1.0) * (0.5 * (hi - lo)) + lo)  # type: ignore[misc]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        lo, hi = self.input_range
        return (super().decode(z) - lo) * (2.0 / (hi - lo)) - 1.0  # type: ignore[misc]


_MIXED: dict[tuple[type, type], type] = {}


def _mix_in(net: nn.Module, mixin: type, suffix: str) -> nn.Module:
    """Give ``net`` the behaviour of ``mixin`` in place (a subclass of its own class, one per pair),
    keeping its modules, parameters and state-dict keys."""
    base = type(net)
    net.__class__ = _MIXED.setdefault((mixin, base), type(f"{base.__name__}{suffix}", (mixin, base), {}))
    return net


def _with_input_range(net: nn.Module, input_range: tuple[float, float]) -> nn.Module:
    """``net`` itself for medsynth's own range [-1, 1] (bit-identical), else the same module with
    encode/decode mapping into ``input_range`` (:class:`_InputRange`)."""
    if tuple(float(v) for v in input_range) == (-1.0, 1.0):
        return net
    _mix_in(net, _InputRange, "InputRange")
    net.input_range = (float(input_range[0]), float(input_range[1]))
    return net


class _FixedClass:
    """Mixin for a denoiser (UNet or ControlNet) whose weights carry a class table medsynth does not
    use as classes (MAISI's modality codes): every call without ``class_labels`` gets ``fixed_class``."""

    fixed_class: int = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("class_labels") is None:
            x = args[0] if args else kwargs["x"]
            kwargs["class_labels"] = torch.full((x.shape[0],), self.fixed_class, dtype=torch.long, device=x.device)
        return super().forward(*args, **kwargs)  # type: ignore[misc]


def class_rows(cfg: Config) -> Optional[int]:
    """Rows of the denoiser's class table: n + 1 for n classes (the last is the null class), the
    weights' own rows for a fixed class (``model.unet.fixed_class_embeds``), None when unconditional."""
    u = cfg.model.unet
    if u.fixed_class_embeds is not None:
        return u.fixed_class_embeds
    return None if u.num_class_embeds is None else u.num_class_embeds + 1


def with_fixed_class(net: nn.Module, cfg: Config) -> nn.Module:
    """``net`` fed ``model.unet.fixed_class`` on every call (unchanged when none is configured)."""
    if cfg.model.unet.fixed_class is None:
        return net
    _mix_in(net, _FixedClass, "FixedClass")
    net.fixed_class = int(cfg.model.unet.fixed_class)
    return net


class _GatedSkip:
    """Mixin for a MONAI UNet built with twice the latent channels as outputs (``model.unet.gated_skip``):
    the first half ``a`` and the second ``g`` give ``a + g * x``, a per-voxel, per-channel gain on the
    input.  MONAI zero-initialises the output layer, so the untrained network still returns 0; the
    state dict is the UNet's own.  With ``model.unet.gated_skip_below`` < 1 the gain is used only
    at timesteps below ``gate_below`` (in the scheduler's units); above it the output is ``a``."""

    gate_below: Optional[float] = None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                class_labels: Optional[torch.Tensor] = None, down_block_additional_residuals: Any = None,
                mid_block_additional_residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = super().forward(x, timesteps, context, class_labels,  # type: ignore[misc]
                              down_block_additional_residuals, mid_block_additional_residual)
        c = x.shape[1]
        gain = out[:, c:]
        if self.gate_below is not None:
            t = torch.as_tensor(timesteps, device=out.device).reshape(-1).float()
            on = (t < self.gate_below).to(out.dtype)
            gain = gain * on.reshape(-1, *([1] * (out.ndim - 1)))
        return out[:, :c] + gain * x


class _FixedSpacing:
    """Mixin for MAISI's UNet built with ``include_spacing_input``: every call gets the run's voxel
    spacing (mm x 100, MAISI's convention) unless one is passed, so medsynth calls it like any UNet.
    The spacing is a non-persistent buffer: the state dict is MAISI's own."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                class_labels: Optional[torch.Tensor] = None, down_block_additional_residuals: Any = None,
                mid_block_additional_residual: Optional[torch.Tensor] = None,
                top_region_index_tensor: Optional[torch.Tensor] = None,
                bottom_region_index_tensor: Optional[torch.Tensor] = None,
                spacing_tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
        if spacing_tensor is None:
            spacing_tensor = self.medsynth_spacing.to(x.device).expand(x.shape[0], 3)
        return super().forward(x, timesteps, context, class_labels,  # type: ignore[misc]
                               down_block_additional_residuals, mid_block_additional_residual,
                               top_region_index_tensor, bottom_region_index_tensor, spacing_tensor)


def build_unet(cfg: Config) -> nn.Module:
    """Stage-2 denoiser of ``cfg.model.unet``; class-conditional models get a null-class row."""
    u = cfg.model.unet
    c = latent_channels(cfg)
    n_emb = class_rows(cfg)
    if u.kind == "maisi":
        from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

        net = DiffusionModelUNetMaisi(
            spatial_dims=3, in_channels=c, out_channels=c, num_res_blocks=u.num_res_blocks,
            num_channels=list(u.channels), attention_levels=list(u.attention_levels),
            norm_num_groups=u.norm_num_groups, num_head_channels=u.num_head_channels,
            num_class_embeds=n_emb, use_flash_attention=u.use_flash_attention, include_fc=True,
            resblock_updown=u.resblock_updown, include_spacing_input=u.spacing_input,
        )
        if u.spacing_input:
            net.register_buffer("medsynth_spacing", torch.tensor([list(cfg.data.spacing)], dtype=torch.float32) * 100.0,
                                persistent=False)
            _mix_in(net, _FixedSpacing, "FixedSpacing")
        return with_fixed_class(net, cfg)
    from monai.networks.nets import DiffusionModelUNet

    net = DiffusionModelUNet(
        spatial_dims=3, in_channels=c, out_channels=2 * c if u.gated_skip else c, num_res_blocks=u.num_res_blocks,
        channels=tuple(u.channels), attention_levels=tuple(u.attention_levels),
        norm_num_groups=u.norm_num_groups, num_head_channels=u.num_head_channels,
        num_class_embeds=n_emb, use_flash_attention=u.use_flash_attention, resblock_updown=u.resblock_updown,
    )
    if u.gated_skip:
        _mix_in(net, _GatedSkip, "GatedSkip")
        if u.gated_skip_below < 1.0:
            net.gate_below = float(u.gated_skip_below) * cfg.training.diffusion.num_train_timesteps
    return with_fixed_class(net, cfg)


def build_discriminator(cfg: Config) -> nn.Module:
    """MONAI ``PatchDiscriminator`` for the adversarial loss of stage 1 (instance norm, so its
    output for one volume does not depend on the rest of the batch)."""
    from monai.networks.nets import PatchDiscriminator

    t = cfg.training.autoencoder
    return PatchDiscriminator(spatial_dims=3, num_layers_d=t.disc_layers, channels=t.disc_channels,
                              in_channels=image_channels(cfg), out_channels=1, norm="INSTANCE")


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------------------------
# Noise schedulers
# --------------------------------------------------------------------------------------------


def _ddpm(t: DiffusionTrainConfig, args: dict[str, Any], latent_numel: int) -> Any:
    from monai.networks.schedulers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=t.num_train_timesteps, clip_sample=False,
                         prediction_type=t.prediction_type, **args)


def _ddim(t: DiffusionTrainConfig, args: dict[str, Any], latent_numel: int) -> Any:
    from monai.networks.schedulers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=t.num_train_timesteps, clip_sample=False,
                         prediction_type=t.prediction_type, **args)


def _rflow(t: DiffusionTrainConfig, args: dict[str, Any], latent_numel: int) -> Any:
    from monai.networks.schedulers import RFlowScheduler

    return RFlowScheduler(num_train_timesteps=t.num_train_timesteps, use_discrete_timesteps=False,
                          sample_method="logit-normal", use_timestep_transform=False,
                          base_img_size_numel=latent_numel, spatial_dim=3)


#: The MONAI scheduler of each entry of :data:`medsynth.registry.SCHEDULERS`.
SCHEDULER_BUILDERS: dict[str, Callable[[DiffusionTrainConfig, dict[str, Any], int], Any]] = {
    "ddpm": _ddpm, "ddim": _ddim, "rflow": _rflow}


def build_scheduler(kind: str, t: DiffusionTrainConfig, latent_numel: int) -> Any:
    """A MONAI noise scheduler: ``DDPMScheduler``, ``DDIMScheduler`` or ``RFlowScheduler``.

    Latents are scaled to unit variance, not to [-1, 1], so predicted samples are not clipped.
    The rectified flow follows MAISI: continuous time and logit-normal training times.  MAISI's
    resolution-dependent time shift is off: a model is trained and sampled on one latent grid.
    """
    if kind not in SCHEDULER_BUILDERS:
        raise ConfigError(f"unknown scheduler {kind!r}; choose {', '.join(SCHEDULER_BUILDERS)}")
    args: dict[str, Any] = {"schedule": t.schedule}
    if t.schedule != "cosine":
        args.update(beta_start=t.beta_start, beta_end=t.beta_end)
    return SCHEDULER_BUILDERS[kind](t, args, latent_numel)


def is_flow(kind: str) -> bool:
    """Whether scheduler ``kind`` is of the rectified-flow family (:data:`medsynth.registry.SCHEDULERS`)."""
    return SCHEDULERS[kind].flow


def sample_train_timesteps(kind: str, scheduler: Any, n: int, g: torch.Generator,
                           sampling: str = "logit-normal", mean: float = 0.0, std: float = 1.0,
                           lo: float = 0.0, hi: float = 1.0, stratified: bool = False) -> torch.Tensor:
    """Training timesteps for ``n`` samples drawn from generator ``g``.

    MONAI's ``RFlowScheduler.sample_timesteps`` draws from the global RNG; this draws the same
    distribution (uniform integers for DDPM/DDIM, logit-normal for rectified flow) from ``g`` so a
    run can be replayed.  ``sampling: uniform`` draws rectified-flow times uniformly instead;
    ``mean`` and ``std`` are the logit-normal's (t / T = sigmoid(mean + std n); mean > 0 favours
    noisy times, mean < 0 the last, fine steps).  ``lo``, ``hi`` (fractions of the schedule)
    restrict the draws to ``lo <= t / T < hi`` for an expert of one noise range (Sampler.hand_over):
    the same distribution truncated there (the logit-normal by its inverse CDF, so every draw
    costs one random number); the whole schedule [0, 1] draws exactly as before.
    ``stratified`` (``training.diffusion.timestep_stratified``) replaces the n independent uniform
    draws behind the times by one, ``u_i = (u0 + i / n) mod 1`` (a low-discrepancy batch, VDM),
    mapped through the same distribution: each draw still has that distribution, and the batch
    covers its quantiles evenly.
    """
    T = scheduler.num_train_timesteps
    whole = lo <= 0.0 and hi >= 1.0
    if stratified:
        u0 = torch.rand(1, generator=g, dtype=torch.float64)
        return _times_of_quantiles(kind, T, torch.remainder(u0 + torch.arange(n, dtype=torch.float64) / n, 1.0),
                                   sampling, mean, std, lo, hi)
    if not is_flow(kind):
        return torch.randint(*_integer_times(lo, hi, T), (n,), generator=g)
    if sampling == "uniform":
        u = torch.rand(n, generator=g)
        return (u if whole else lo + (hi - lo) * u) * T
    if whole:
        return torch.sigmoid(mean + std * torch.randn(n, generator=g)) * T
    return _times_of_quantiles(kind, T, torch.rand(n, generator=g, dtype=torch.float64), sampling, mean, std, lo, hi)


def _integer_times(lo: float, hi: float, T: int) -> tuple[int, int]:
    """DDPM/DDIM's timesteps of the fractions ``[lo, hi)`` of the schedule: ``a <= t < b`` (never empty;
    the whole schedule is ``0 <= t < T``)."""
    a = min(int(math.ceil(lo * T)), T - 1)
    return a, max(a + 1, int(math.ceil(hi * T)))


def _times_of_quantiles(kind: str, T: int, q: torch.Tensor, sampling: str, mean: float, std: float,
                        lo: float, hi: float) -> torch.Tensor:
    """Training timesteps at quantiles ``q`` (float64 in [0, 1)) of the training-time distribution of
    :func:`sample_train_timesteps`, restricted to ``[lo, hi)``: integers for DDPM/DDIM, the (truncated)
    uniform or logit-normal by its inverse CDF for the rectified flow."""
    if not is_flow(kind):
        a, b = _integer_times(lo, hi, T)
        return (a + torch.floor(q * (b - a))).clamp(a, b - 1).long()
    if sampling == "uniform":
        return ((lo + (hi - lo) * q) * T).float()
    def cdf(t: float) -> float:  # P(sigmoid(mean + std n) < t) for a standard normal n
        if t <= 0.0:
            return 0.0
        if t >= 1.0:
            return 1.0
        return 0.5 * (1.0 + math.erf((math.log(t / (1.0 - t)) - mean) / (std * math.sqrt(2.0))))
    ca, cb = cdf(lo), cdf(hi)
    u = (ca + (cb - ca) * q).clamp(1e-12, 1.0 - 1e-12)
    z = math.sqrt(2.0) * torch.special.erfinv(2.0 * u - 1.0)
    t = torch.sigmoid(mean + std * z).clamp(lo, hi * (1.0 - 1e-7) if hi < 1.0 else 1.0)
    return (t * T).float()


# the smallest rectified-flow time a clean-latent prediction is divided by (Li & He 2025 clip at 0.05)
RFLOW_T_MIN = 0.05


def rflow_velocity(out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, num_train_timesteps: int,
                   prediction_type: str) -> torch.Tensor:
    """The rectified-flow velocity (clean minus noise) from a network output ``out`` at ``x_t``.

    A velocity model's output is the velocity; a clean-latent model (``prediction_type: sample``)
    gives ``(x0 - x_t) / t``, since ``x_t = (1 - t) x0 + t noise``.  ``t`` is per sample (or a
    scalar) in training timesteps."""
    if prediction_type != "sample":
        return out
    tt = (torch.as_tensor(t, dtype=out.dtype, device=out.device) / num_train_timesteps).clamp_min(RFLOW_T_MIN)
    return (out - x_t) / tt.reshape(-1, *([1] * (out.dim() - 1)))


def rflow_stochastic_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, eta: float,
                          fresh: torch.Tensor) -> torch.Tensor:
    """One stochastic rectified-flow step from time ``t`` to ``t_next`` (fractions of the schedule):
    the clean estimate ``x0 = x + t v`` (v = clean - noise) re-noised to ``t_next`` with a share ``eta``
    of the ``fresh`` noise (eta 1: ancestral, 0: the noise already in ``x``)."""
    x0 = x + t * v
    noise = (x - (1.0 - t) * x0) / max(t, 1e-6)
    eta = min(float(eta), 1.0)
    return (1.0 - t_next) * x0 + t_next * ((1.0 - eta * eta) ** 0.5 * noise + eta * fresh)


def diffusion_loss(kind: str, prediction_type: str, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   target: torch.Tensor, num_train_timesteps: int,
                   weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE of the stage-2 objective: the rectified flow's velocity (derived from the output when the
    network predicts the clean latent), or the DDPM/DDIM target of ``prediction_type``.  ``weight``
    (``[B, 1, ...]``, broadcast over channels) weighs each voxel; the mean is divided by the mean
    weight."""
    if is_flow(kind):
        out = rflow_velocity(out, x_t, t, num_train_timesteps, prediction_type)
    if weight is None:
        return torch.nn.functional.mse_loss(out, target)
    w = weight.to(out.dtype).expand_as(out)
    return ((out - target) ** 2 * w).sum() / w.sum()


# --------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------


def resolve_device(name: str, key: str = "training.device") -> torch.device:
    """The one device choice: ``auto`` picks CUDA when available; asking for CUDA without one is a
    clear error naming ``key``, the parameter or config key the name came from."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name!r} requested but torch sees no CUDA device",
                          hint="use device: auto or cpu, or install the CUDA build of torch")
    return torch.device(name)


CPU_BF16_ENV = "MEDSYNTH_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 / AMX).  Without them,
    bf16 autocast of 3D convolutions is emulated and many times slower than fp32.

    ``MEDSYNTH_CPU_BF16=0`` makes a CPU with native bf16 behave as one without (``auto`` picks
    fp32), ``=1`` the reverse (bf16 is then emulated: slow, but the same code path and numerics
    class), so one machine can run the tests of both kinds of CPU."""
    import os

    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private API; absent means unknown -> not native
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision actually used: bf16 where supported, fp16 only on CUDA, else fp32 (warned);
    ``auto`` as :func:`medsynth.model.fastpath.resolve_sampling_precision` decides it for a large grid."""
    if precision == "auto":
        from medsynth.model.fastpath import resolve_sampling_precision

        return resolve_sampling_precision(precision, device)
    if precision == "bf16":
        ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        if not ok:
            log.warning("precision bf16: this %s has no native bf16 support; using fp32", device.type)
            return "fp32"
    if precision == "fp16" and device.type != "cuda":
        log.warning("precision fp16: autocast to fp16 needs CUDA; using fp32")
        return "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_lambda(schedule: str, warmup: int, total: int):
    """Learning-rate multiplier per optimizer step: linear warm-up, then constant or cosine to 10%."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))

    return f
