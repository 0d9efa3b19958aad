"""Sampling: latent noise -> denoising loop -> (tiled) decode -> physical units -> NIfTI + sidecar.

Reproducibility contract: sample ``i`` starts from noise drawn by
``torch.Generator().manual_seed(sample_seed(seed, i))``; any noise a stochastic step adds (DDPM,
DDIM with eta > 0) comes from a second generator of that sample only.  On the CPU the networks run
one sample at a time, so a sample's bytes do not depend on the batch it was computed in (batched
CPU kernels may round differently); on CUDA batches run together and agree to float tolerance.

Latents larger than ``sampling.tiling.latent_roi`` are decoded in overlapping tiles with MONAI's
``SlidingWindowInferer`` (gaussian blending, stitched on the CPU, as MAISI does), so decoder
memory stays bounded by the tile size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from medsynth.config import Config, config_hash
from medsynth.errors import CheckpointError, ConfigError, JobError
from medsynth.jobs import RunPaths, derive_seed, sample_id, sample_seed
from medsynth.model.networks import (
    autocast,
    build_autoencoder,
    build_scheduler,
    build_unet,
    latent_shape,
    resolve_device,
    rflow_stochastic_step,
    rflow_velocity,
    seeded_init,
)
from medsynth.model.fastpath import (
    memory_format,
    plan_tiles,
    prepare_for_inference,
    resolve_channels_last,
    resolve_sampling_precision,
)
from medsynth.progress import progress
from medsynth.registry import SCHEDULERS
from medsynth.volume import Volume

log = logging.getLogger("medsynth.model.sample")


@dataclass(frozen=True)
class SampleSettings:
    """How to sample: the knobs of ``medsynth generate`` after defaults are filled in."""

    seed: int
    steps: int
    guidance: float
    scheduler: str
    eta: float


@dataclass(frozen=True)
class Step:
    """What one denoising step needs besides the scheduler, the network output and the latents."""

    t: Any                          # this step's timestep
    t_next: Any                     # the next one (0 after the last; the rectified flow integrates to it)
    eta: float                      # DDIM's / the rectified flow's stochasticity
    gens: list[torch.Generator]     # one per sample: the noise a stochastic step adds
    diffusion: Any                  # training.diffusion (timesteps, prediction type)


def _rflow_step(sched: Any, out: torch.Tensor, x: torch.Tensor, s: Step) -> torch.Tensor:
    """An Euler step of the rectified flow (MONAI's, ``eta: 0``), or with ``eta > 0`` a stochastic one.

    The stochastic step estimates the clean latent x0 = x_t + t v and the noise in x_t, and goes to
    the next time as ``(1 - t') x0 + t' (sqrt(1 - eta²) noise + eta fresh)``, the fresh noise from
    the sample's own generator: eta = 1 is ancestral (x0 re-noised), 0 the ODE.  Fresh noise
    corrects the errors an imperfect model accumulates along the deterministic path (Karras et
    al. 2022, "churn"); on the wavelet demo model it brought lung HU and background fraction into
    the gate's ranges (docs/generator.md)."""
    d = s.diffusion
    v = rflow_velocity(out, x, s.t.reshape(1).to(out.device), d.num_train_timesteps, d.prediction_type)
    if s.eta <= 0:
        return sched.step(v, s.t, x, s.t_next)[0]
    t = float(s.t) / d.num_train_timesteps
    t_next = float(s.t_next) / d.num_train_timesteps
    fresh = torch.stack([torch.randn(x.shape[1:], generator=g) for g in s.gens[:len(x)]]).to(x)
    return rflow_stochastic_step(x, v, t, t_next, s.eta, fresh)


def _ddim_step(sched: Any, out: torch.Tensor, x: torch.Tensor, s: Step) -> torch.Tensor:
    return torch.cat([sched.step(out[b:b + 1], s.t, x[b:b + 1], s.eta, s.gens[b])[0] for b in range(len(x))])


def _ddpm_step(sched: Any, out: torch.Tensor, x: torch.Tensor, s: Step) -> torch.Tensor:
    # each sample's added noise from its own generator
    return torch.cat([sched.step(out[b:b + 1], s.t, x[b:b + 1], s.gens[b])[0] for b in range(len(x))])


#: One denoising step of each entry of :data:`medsynth.registry.SCHEDULERS`.
SCHEDULER_STEPS: dict[str, Callable[[Any, torch.Tensor, torch.Tensor, Step], torch.Tensor]] = {
    "ddpm": _ddpm_step, "ddim": _ddim_step, "rflow": _rflow_step}


def _or(names: Any) -> str:
    """``a, b or c``."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def image_volume(cfg: Config, norm: Any, affine: np.ndarray, x: torch.Tensor) -> Volume:
    """The image channel of one model-space output ``[C, X, Y, Z]`` as a Volume in physical units on
    ``affine``: clipped to [-1, 1], the training data's range in model space, then mapped back with
    the exact inverse of the training normalisation ``norm`` (an ``IntensityNorm``)."""
    arr = norm.inverse(x.clamp(-1.0, 1.0)[0].double()).cpu().numpy().astype(np.float32)
    units = "HU" if cfg.data.modality == "CT" else "a.u."
    return Volume(arr, affine.copy(), modality=cfg.data.modality, units=units)


def label_volume(x: torch.Tensor, values: Sequence[int], affine: np.ndarray) -> Optional[Volume]:
    """The label channels of one model-space output as a uint8 label map on ``affine`` (None when the
    model has no label channels, ``values`` empty)."""
    if not values:
        return None
    from medsynth.model.labels import decode

    return Volume(decode(x, values), affine.copy(), modality="SEG", units="label")


class Sampler:
    """A trained (or, for baselines, untrained) latent diffusion model ready to sample volumes."""

    def __init__(self, cfg: Config, autoencoder: nn.Module, unet: nn.Module, scale_factor: float,
                 intensity_norm: dict[str, Any], device: torch.device, provenance: dict[str, Any], run: str):
        from medsynth.data.transforms import IntensityNorm, target_affine

        self.cfg = cfg
        fast = cfg.sampling
        # the inference fast path (medsynth.model.fastpath): precision, memory format, oneDNN convs
        self.channels_last = resolve_channels_last(fast.channels_last, device)
        self.autoencoder = prepare_for_inference(autoencoder, device, self.channels_last, fast.onednn_conv,
                                                 fast.fused_attention)
        self.unet = prepare_for_inference(unet, device, self.channels_last, fast.onednn_conv, fast.fused_attention)
        self.scale_factor = float(scale_factor)
        self.norm = IntensityNorm.from_dict(intensity_norm)
        self.affine = target_affine(cfg.data)
        self.device = device
        self.precision = resolve_sampling_precision(fast.precision, device, math.prod(latent_shape(cfg)[1:]))
        self.provenance = {**provenance, "sampling_path": {
            "precision": self.precision, "channels_last": self.channels_last,
            "onednn_conv": bool(fast.onednn_conv and device.type == "cpu"), "fused_attention": fast.fused_attention}}
        self.run = run
        self.num_classes = cfg.model.unet.num_class_embeds
        from medsynth.model.labels import label_names, label_values

        # paired models decode label channels after the image channel (medsynth.model.labels)
        self.label_values, self.label_names = label_values(cfg), label_names(cfg)
        # CPU kernels may round a batch differently from a single sample: run one at a time there
        self.per_sample = device.type == "cpu"
        self.low_noise: Optional["Sampler"] = None  # a low-noise expert (hand_over)
        self.handover_t = 0.0
        self.lesion: Any = None  # a lesion inpainter (medsynth.model.lesion.LesionPainter), set by paint_lesions

    def hand_over(self, low: "Sampler", below: float) -> "Sampler":
        """Denoise with ``low``'s UNet at the times below ``below`` (a fraction of the noise schedule,
        0 < below < 1) and with this one's above: two experts for two noise ranges, as eDiff-I
        (Balaji et al., 2022).  On the wavelet demo latent a plain UNet for the noisy half (the
        anatomy and the bone) and a gated-skip UNet for the fine half (the lung texture) passed the
        gate in 22 of 48 samples, each of the two alone in 0 of 16 (docs/generator.md).  Both must share
        the latent: the same autoencoder weights, latent shape and scale, intensity map, classes,
        label set and objective.  Returns ``self``."""
        if not 0.0 < float(below) < 1.0:
            raise ConfigError(f"`handover` is a fraction of the noise schedule, 0 < value < 1; got {below}")
        if self.low_noise is not None and self.cfg.model.low_noise_expert is not None:
            raise ConfigError(f"{self.run}: has a low-noise expert of its own (model.low_noise_expert), "
                              f"used below {self.handover_t:g}", hint="sample it without another expert (`low_noise_run`)")
        mine, theirs = self.cfg.training, low.cfg.training
        why = None
        if latent_shape(self.cfg) != latent_shape(low.cfg):
            why = f"latent shapes {latent_shape(self.cfg)} and {latent_shape(low.cfg)}"
        elif (SCHEDULERS[mine.scheduler].flow != SCHEDULERS[theirs.scheduler].flow
              or mine.diffusion.num_train_timesteps != theirs.diffusion.num_train_timesteps):
            why = "training objectives (scheduler or num_train_timesteps)"
        elif self.num_classes != low.num_classes or self.label_values != low.label_values:
            why = "classes or label sets"
        elif abs(self.scale_factor - low.scale_factor) > 1e-6 * abs(self.scale_factor) or \
                self.norm.to_dict() != low.norm.to_dict():
            why = "latent scale factors or intensity maps"
        else:
            a, b = self.autoencoder.state_dict(), low.autoencoder.state_dict()
            if a.keys() != b.keys() or any(not torch.equal(a[k].cpu(), b[k].cpu()) for k in a):
                why = "autoencoder weights"
        if why is None and mine.diffusion.label_condition:
            raise ConfigError(f"{self.run}: trained to draw the image to a given label map "
                              f"(training.diffusion.label_condition), so it can only be the low-noise expert",
                              hint="swap the two runs")
        if why is None:
            below = float(below)
            (hlo, hhi), (llo, lhi) = mine.diffusion.time_range, theirs.diffusion.time_range
            if float(hlo) > below + 1e-9 or float(hhi) < 1.0:
                raise ConfigError(f"{self.run}: trained on the times {hlo:g}-{hhi:g} of the noise schedule "
                                  f"(training.diffusion.time_range), so it cannot denoise {below:g}-1 above the hand-over",
                                  hint=f"hand over at `handover` {float(hlo):g} or above, or use a high-noise run trained up to 1")
            if float(llo) > 0.0 or float(lhi) < below - 1e-9:
                raise ConfigError(f"{low.run}: trained on the times {llo:g}-{lhi:g} of the noise schedule "
                                  f"(training.diffusion.time_range), so it cannot denoise 0-{below:g} below the hand-over",
                                  hint=f"hand over at `handover` {float(lhi):g} or below, or use a low-noise run trained from 0")
        if why is not None:
            raise ConfigError(f"{low.run}: cannot be the low-noise expert of {self.run}: different {why}",
                              hint="train the expert's stage 2 on a copy of this run's autoencoder "
                                   "(copy RUN/autoencoder into the new run folder, then "
                                   "'medsynth train CONFIG --stage diffusion --run NEW')")
        self.low_noise, self.handover_t = low, float(below)
        self.provenance["low_noise_expert"] = {"run": low.run, "below": float(below),
                                               "checkpoint_sha256": low.provenance.get("checkpoint_sha256"),
                                               "use_ema": low.provenance.get("use_ema")}
        return self

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, device: Optional[str] = None, use_ema: Optional[bool] = None) -> "Sampler":
        """Load a run directory after :func:`medsynth.model.checkpoint.load_run` has checked it."""
        from medsynth.model.checkpoint import load_run, versions, weights_licenses

        run = load_run(run_dir)
        cfg = run.cfg
        dev = resolve_device(device or cfg.training.device)
        ema = cfg.sampling.use_ema if use_ema is None else use_ema
        ae, unet = build_autoencoder(cfg), build_unet(cfg)
        ae.load_state_dict(run.autoencoder_state)
        if ema and run.ema_state is None:
            raise CheckpointError(f"{run.root}: the diffusion checkpoint has no EMA weights",
                                  hint="pass `use_ema=False`")
        unet.load_state_dict(run.ema_state if ema else run.unet_state)
        prov = {"checkpoint_sha256": run.diffusion_sha256, "autoencoder_sha256": run.autoencoder_sha256,
                "config_hash": config_hash(cfg), "use_ema": bool(ema), "versions": versions()}
        licenses = weights_licenses(run.card)  # what the samples inherit from initial weights
        if licenses:
            prov["weights_licenses"] = licenses
        sampler = cls(cfg, ae, unet, run.scale_factor, run.intensity_norm, dev, prov, run.name)
        expert = cfg.model.low_noise_expert
        if expert is not None:  # the run's own low-noise expert (model.low_noise_expert), trained with it
            ep = RunPaths(Path(run_dir)).low_noise
            if not ep.checkpoint("diffusion").is_file():
                raise CheckpointError(f"{run_dir}: its low-noise expert (model.low_noise_expert) is not trained "
                                      f"({ep.checkpoint('diffusion').relative_to(Path(run_dir))} is missing)",
                                      hint="finish training: 'medsynth train CONFIG --run RUN --resume'")
            sampler.hand_over(cls.from_run(ep.root, device=device, use_ema=use_ema), expert.handover)
        from medsynth.model.lesion import LesionPainter

        painter = LesionPainter.from_run(run_dir, cfg, dev, use_ema=bool(ema))
        if painter is not None:
            sampler.paint_lesions(painter)
        return sampler

    def set_precision(self, precision: str) -> "Sampler":
        """Run every network of this sampler in ``precision`` (``fp32`` or ``bf16``, forced: bf16 is
        emulated where the CPU has none): its UNet, its low-noise expert's and its lesion inpainter's,
        each of which resolved a precision of its own when loaded.  Returns ``self``."""
        for part in (self, self.low_noise, self.lesion):
            if part is not None:
                part.precision = precision
        self.provenance["sampling_path"] = {**self.provenance["sampling_path"], "precision": precision}
        return self

    def paint_lesions(self, painter: Any) -> "Sampler":
        """Paint one lesion into every sample of ``painter``'s classes after decoding
        (:class:`medsynth.model.lesion.LesionPainter`); returns ``self``."""
        if self.num_classes is None or not self.label_values:
            raise ConfigError(f"{self.run}: a lesion inpainter needs a class-conditional paired model")
        self.lesion = painter
        self.provenance["lesion_inpainter"] = dict(painter.provenance)
        return self

    @classmethod
    def untrained(cls, cfg: Config, seed: int = 0, device: str = "cpu",
                  intensity_norm: Optional[dict[str, Any]] = None) -> "Sampler":
        """The same architecture with random weights (a baseline for fidelity figures)."""
        from medsynth.data.transforms import intensity_norm as make_norm

        with seeded_init(derive_seed(seed, "untrained")):
            ae, unet = build_autoencoder(cfg), build_unet(cfg)
        norm = intensity_norm or make_norm(cfg.data).to_dict()
        prov = {"checkpoint_sha256": None, "config_hash": config_hash(cfg), "use_ema": False, "untrained": True}
        return cls(cfg, ae, unet, 1.0, norm, torch.device(device), prov, f"{cfg.name}-untrained")

    # -- checks -------------------------------------------------------------------------------
    def settings(self, seed: int = 0, steps: Optional[int] = None, guidance: Optional[float] = None,
                 scheduler: Optional[str] = None, eta: Optional[float] = None) -> SampleSettings:
        """Fill in defaults from ``sampling`` and check them against this model before any compute."""
        s, t = self.cfg.sampling, self.cfg.training
        st = SampleSettings(int(seed), int(steps if steps is not None else s.steps),
                            float(guidance if guidance is not None else s.guidance_scale),
                            scheduler or s.scheduler, float(eta if eta is not None else s.eta))
        T = t.diffusion.num_train_timesteps
        if st.scheduler not in SCHEDULERS:
            raise ConfigError(f"`scheduler` must be {_or(SCHEDULERS)}, got {st.scheduler!r}")
        spec = SCHEDULERS[st.scheduler]
        if spec.flow != SCHEDULERS[t.scheduler].flow:
            flows = [n for n, x in SCHEDULERS.items() if x.flow]
            raise ConfigError(f"`scheduler={st.scheduler!r}`: this model was trained with objective '{t.scheduler}'",
                              hint=f"rectified-flow models sample with {_or(flows)}; DDPM models with "
                                   f"{_or([n for n in SCHEDULERS if n not in flows])}")
        if not 1 <= st.steps <= T:
            raise ConfigError(f"`steps` must be between 1 and {T} (the training timesteps), got {st.steps}")
        if spec.all_steps and st.steps != T:
            fewer = next(n for n, x in SCHEDULERS.items() if x.flow == spec.flow and not x.all_steps)
            raise ConfigError(f"`steps`: {st.scheduler.upper()} samples with all {T} training timesteps, "
                              f"got {st.steps}",
                              hint=f"use `scheduler={fewer!r}` for fewer steps")
        if st.guidance < 0 or st.eta < 0:
            raise ConfigError("`guidance` and `eta` must be >= 0")
        if spec.flow and st.eta > 1:
            raise ConfigError(f"`eta={st.eta}`: the rectified flow's stochasticity is a share of the noise, 0..1")
        if self.num_classes is None and st.guidance != 1.0:
            raise CheckpointError(f"`guidance={st.guidance}`: classifier-free guidance needs a class-conditional "
                                  "model; this one is unconditional", hint="drop `guidance`")
        return st

    def check_class(self, class_label: Optional[int]) -> None:
        """Refuse a class for an unconditional model, or one outside the model's classes."""
        if class_label is None:
            return
        if self.num_classes is None:
            raise CheckpointError(f"`class_label={class_label}`: this model is unconditional (no classes)",
                                  hint="drop `class_label`")
        if not 0 <= class_label < self.num_classes:
            raise CheckpointError(f"`class_label={class_label}`: this model knows classes 0..{self.num_classes - 1}",
                                  hint="see 'classes' in the run's model_card.json")

    def class_of(self, index: int, class_label: Optional[int]) -> Optional[int]:
        """The class of sample ``index``: the requested one, else classes in turn (index mod n)."""
        if self.num_classes is None:
            return None
        return int(class_label) if class_label is not None else int(index) % self.num_classes

    # -- the pipeline -------------------------------------------------------------------------
    def initial_noise(self, indices: Sequence[int], seed: int) -> torch.Tensor:
        """Latent noise of each sample from its own generator, seeded by (seed, index) only."""
        shape = latent_shape(self.cfg)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, i)))
                            for i in indices])

    def _net(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        x = x.contiguous(memory_format=memory_format(self.channels_last, x))
        with autocast(self.device, self.precision):
            if not self.per_sample:
                return self.unet(x, t, class_labels=labels).float()
            return torch.cat([self.unet(x[b:b + 1], t[b:b + 1],
                                        class_labels=None if labels is None else labels[b:b + 1]).float()
                              for b in range(len(x))])

    def predict(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor], guidance: float,
                own: bool = False) -> torch.Tensor:
        """The model output at time ``t``, with classifier-free guidance: u + g (c - u) (the
        low-noise expert's below the hand-over time, unless ``own``)."""
        if self.low_noise is not None and not own and \
                float(t) < self.handover_t * self.cfg.training.diffusion.num_train_timesteps:
            return self.low_noise.predict(x, t, labels, guidance)
        tt = t.reshape(1).repeat(len(x)).to(self.device)
        tt = tt.float() if tt.is_floating_point() else tt
        if labels is None or guidance == 1.0:
            return self._net(x, tt, labels)
        uncond = self._net(x, tt, torch.full_like(labels, self.num_classes))
        if guidance == 0.0:
            return uncond
        return uncond + guidance * (self._net(x, tt, labels) - uncond)

    @torch.inference_mode()
    def denoise(self, noise: torch.Tensor, labels: Optional[torch.Tensor], step_gens: list[torch.Generator],
                st: SampleSettings) -> torch.Tensor:
        """The denoising loop: from pure noise to a clean latent in ``st.steps`` scheduler steps."""
        d = self.cfg.training.diffusion
        if d.label_condition:
            raise ConfigError(f"{self.run}: trained to draw the image to a given label map "
                              f"(training.diffusion.label_condition), so it samples only as a low-noise expert",
                              hint="sample it with a high-noise partner: 'medsynth generate HIGH_RUN --low-noise-run "
                                   "THIS_RUN --handover T'")
        if self.low_noise is None and not d.whole_schedule and not self.provenance.get("untrained"):
            lo, hi = d.time_range
            raise ConfigError(f"{self.run}: trained on the times {lo:g}-{hi:g} of the noise schedule only "
                              f"(training.diffusion.time_range): it is one of two experts, not a sampler by itself",
                              hint="sample it with its partner: 'medsynth generate HIGH_RUN --low-noise-run LOW_RUN "
                                   "--handover T', HIGH_RUN trained on [T, 1] and LOW_RUN on [0, T]")
        sched = build_scheduler(st.scheduler, d, math.prod(noise.shape[2:]))
        sched.set_timesteps(st.steps)
        ts = list(sched.timesteps)
        x = noise.to(self.device)
        step = SCHEDULER_STEPS[st.scheduler]
        low = self.low_noise
        cascade = low is not None and low.cfg.training.diffusion.label_condition
        cond, start, at_handover = None, 0, None
        if cascade:
            # the high-noise expert alone to the end draws the label map; the low-noise expert then
            # draws the fine half of the image to it, from the high trajectory's state at the hand-over
            handover = self.handover_t * d.num_train_timesteps
            start = next((i for i, t in enumerate(ts) if float(t) < handover), len(ts))
            for i, t in enumerate(progress(ts, desc="denoising (labels)", total=len(ts))):
                if i == start:
                    at_handover = x.clone()
                out = self.predict(x, t, labels, st.guidance, own=True)
                x = step(sched, out, x, Step(t, ts[i + 1] if i + 1 < len(ts) else 0, st.eta, step_gens, d))
            if at_handover is None:
                return x
            cond = self.label_condition_bands(x, low)
            x = at_handover
            x[:, -cond.shape[1]:] = cond
        for i, t in enumerate(progress(ts[start:], desc="denoising", total=len(ts) - start), start=start):
            out = self.predict(x, t, labels, st.guidance)
            x = step(sched, out, x, Step(t, ts[i + 1] if i + 1 < len(ts) else 0, st.eta, step_gens, d))
            if cond is not None:
                x[:, -cond.shape[1]:] = cond
        return x

    def label_condition_bands(self, z: torch.Tensor, low: "Sampler") -> torch.Tensor:
        """The label map of scaled latents ``z`` (decoded, argmax), one-hot encoded again into the
        latent's clean label channels: the condition of a ``label_condition`` low-noise expert, exactly
        as it saw label maps in training."""
        from medsynth.model.diffusion_training import cond_channels

        c = cond_channels(low.cfg)
        dec = self.autoencoder.decode(z.to(self.device).float() / self.scale_factor).float()
        k = len(self.label_values)
        hot = torch.nn.functional.one_hot(dec[:, 1:1 + k].argmax(1), k).movedim(-1, 1).to(dec) * 2.0 - 1.0
        enc = self.autoencoder.encode(torch.cat([dec[:, :1], hot], dim=1))[0].float() * self.scale_factor
        return enc[:, -c:]

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in model space, one volume at a time, tiled when large."""
        from monai.inferers import SlidingWindowInferer

        z = z.to(self.device) / self.scale_factor
        tiling = self.cfg.sampling.tiling
        # tiles no larger than latent_roi, shrunk to cover the grid evenly (fastpath.plan_tiles)
        roi, overlap = plan_tiles(tuple(z.shape[2:]), tuple(tiling.latent_roi), tiling.overlap)
        tiled = tiling.enabled and any(s > r for s, r in zip(z.shape[2:], tiling.latent_roi))
        inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=1, overlap=overlap, mode="gaussian",
                                       progress=False, sw_device=self.device, device=torch.device("cpu"))
        fmt = memory_format(self.channels_last, z)

        def dec(tile: torch.Tensor) -> torch.Tensor:
            return self.autoencoder.decode(tile.contiguous(memory_format=fmt)).float()

        outs = []
        for b in range(len(z)):
            with autocast(self.device, self.precision):
                if tiled:
                    outs.append(inferer(z[b:b + 1], dec).float())
                else:
                    outs.append(dec(z[b:b + 1]).cpu().contiguous())  # callers get NCDHW
        return torch.cat(outs)

    def to_volume(self, x: torch.Tensor) -> Volume:
        """One decoded image (model space) -> a Volume in physical units on the configured grid.

        Values are clipped to [-1, 1], the range of the training data in model space, then mapped
        back with the exact inverse of the training normalisation.
        """
        return image_volume(self.cfg, self.norm, self.affine, x)

    def to_label(self, x: torch.Tensor) -> Optional[Volume]:
        """One decoded output -> its uint8 label map on the image grid (None for an image-only model)."""
        return label_volume(x, self.label_values, self.affine)

    def sample_pairs(self, indices: Sequence[int], st: SampleSettings, class_label: Optional[int] = None
                     ) -> list[tuple[Volume, Optional[Volume]]]:
        """Sample ``indices`` (one batch) as (image in physical units, label map or None) pairs."""
        images = self.sample_model_space(indices, st, class_label)
        return [(self.to_volume(images[b]), self.to_label(images[b])) for b in range(len(indices))]

    def sample(self, indices: Sequence[int], st: SampleSettings, class_label: Optional[int] = None) -> list[Volume]:
        """Sample the volumes of ``indices`` (one batch) in physical units."""
        images = self.sample_model_space(indices, st, class_label)
        return [self.to_volume(images[b]) for b in range(len(indices))]

    def sample_model_space(self, indices: Sequence[int], st: SampleSettings,
                           class_label: Optional[int] = None) -> torch.Tensor:
        """Decoded outputs ``[B, C, X, Y, Z]`` in model space (image channel first)."""
        self.check_class(class_label)
        noise = self.initial_noise(indices, st.seed)
        step_gens = [torch.Generator(device=self.device).manual_seed(derive_seed(sample_seed(st.seed, i), "steps"))
                     for i in indices]
        labels = None
        if self.num_classes is not None:
            labels = torch.tensor([self.class_of(i, class_label) for i in indices], device=self.device)
        z = self.denoise(noise, labels, step_gens, st)
        out = self.decode(z)
        if self.lesion is None or labels is None:
            return out
        with torch.inference_mode():
            parts = []
            for b, i in enumerate(indices):
                x = out[b]
                if int(labels[b]) in self.lesion.classes:
                    x, ok = self.lesion.paint(x, sample_seed(st.seed, i))
                    if not ok:
                        log.warning("sample %d: no %s voxels to paint a lesion into; it keeps none", i,
                                    self.lesion.les.host)
                parts.append(x.to(out.dtype))
            return torch.stack(parts)


# --------------------------------------------------------------------------------------------
# medsynth generate
# --------------------------------------------------------------------------------------------


@dataclass
class GenerateResult:
    """Ids written and ids skipped (their sidecar already existed) by :func:`generate`."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


_SAME = ("seed", "class", "steps", "scheduler", "guidance", "eta", "checkpoint_sha256", "use_ema", "low_noise_expert",
         "lesion_inpainter")


def generate(run_dir: Optional[str | Path], out_dir: str | Path, indices: Sequence[int], seed: int = 0,
             class_label: Optional[int] = None, steps: Optional[int] = None, guidance: Optional[float] = None,
             batch_size: Optional[int] = None, scheduler: Optional[str] = None, eta: Optional[float] = None,
             use_ema: Optional[bool] = None, device: Optional[str] = None,
             sampler: Optional[Sampler] = None, low_noise_run: Optional[str | Path] = None,
             handover: float = 0.5) -> GenerateResult:
    """Sample volumes ``indices`` of a trained run into ``out_dir`` (the medsynth samples format).

    Sample ``i`` is a function of (run, seed, i, settings) only, never of the batch size, the other
    indices or restarts.  Indices whose sidecar already exists are skipped (resume), after checking
    that they were made with the same settings (else :class:`JobError`).  Without ``class_label`` a
    class-conditional model gives sample ``i`` class ``i mod n_classes``.  The run directory and
    every argument are checked before any compute.  A ready ``sampler`` (e.g. an untrained
    baseline) may be passed instead of ``run_dir``.  ``low_noise_run`` denoises the times below
    ``handover`` (see :meth:`Sampler.hand_over`).
    """
    from medsynth.samples import read_sample, write_sample

    if sampler is None:
        if run_dir is None:
            raise ConfigError("generate needs a run directory or a sampler")
        sampler = Sampler.from_run(run_dir, device=device, use_ema=use_ema)
    if low_noise_run is not None:
        sampler.hand_over(Sampler.from_run(low_noise_run, device=device, use_ema=use_ema), handover)
    st = sampler.settings(seed, steps, guidance, scheduler, eta)
    sampler.check_class(class_label)
    bs = int(batch_size or sampler.cfg.sampling.batch_size)
    if bs < 1:
        raise ConfigError(f"`batch_size` must be >= 1, got {bs}")
    idx = [int(i) for i in indices]
    if any(i < 0 for i in idx) or len(set(idx)) != len(idx):
        raise ConfigError("sample indices must be distinct and >= 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = GenerateResult(out)
    todo = []
    for i in idx:
        sid = sample_id(sampler.run, i)
        side = out / f"{sid}.json"
        if side.is_file():
            old = read_sample(side).sidecar
            want = _sidecar(sampler, st, i, class_label)
            diff = [k for k in _SAME if old.get(k) != want.get(k)]
            if diff:
                raise JobError(f"{side}: sample {i} exists with different settings ({', '.join(diff)})",
                               hint="use a new `out_dir` folder, or repeat the original arguments")
            result.skipped.append(sid)
        else:
            todo.append(i)
    batches = [todo[k:k + bs] for k in range(0, len(todo), bs)]
    for batch in progress(batches, desc="generate", total=len(batches)):
        for i, (vol, lab) in zip(batch, sampler.sample_pairs(batch, st, class_label)):
            sid = sample_id(sampler.run, i)
            write_sample(out, sid, vol, _sidecar(sampler, st, i, class_label), label=lab)
            result.written.append(sid)
    log.info("generate: %d written, %d already there, in %s", len(result.written), len(result.skipped), out)
    return result


def _sidecar(sampler: Sampler, st: SampleSettings, index: int, class_label: Optional[int]) -> dict[str, Any]:
    return {"index": int(index), "seed": st.seed, "sample_seed": sample_seed(st.seed, index),
            "class": sampler.class_of(index, class_label), "steps": st.steps, "scheduler": st.scheduler,
            "guidance": st.guidance, "eta": st.eta, "run": sampler.run, **sampler.provenance,
            **({"label_values": dict(sampler.label_names)} if sampler.label_names else {})}
