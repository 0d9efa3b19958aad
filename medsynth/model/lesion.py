"""The lesion inpainter (``model.lesion_inpainter``): a small rectified-flow model that paints a
lesion, image and label together, into a ball of a finished sample, as lesion-focused inpainting
(LeFusion, Zhang et al., ICLR 2025).

Why: on the demo's wavelet latent the label map lives in low-pass bands of 2 x 2 x 2 blocks, and a
lesion of 5-30 voxels barely shows there; the whole-volume model drew a lesion label in 0 of 24
class-1 samples (docs/generator.md).  This model sees only a crop around a lesion, in model space,
at the data grid: ``[noisy image, noisy lesion map, the crop's image with the ball erased, the
ball]`` -> the rectified-flow velocity of the first two.  Trained on crops of the training cases'
lesions (centre moved up to ``jitter_mm``, mirrored left-right), it learns the lesion's size, shape
and intensity and how the host tissue around it continues.

Painting (:class:`LesionPainter`): the ball is centred at a voxel of the sample's ``host`` label
(the lung) whose distance to the host's edge (mm) is one of the training lesions' centres' own,
drawn from the sample's generator; outside the ball the crop stays the sample's (replaced by the
known crop noised to each step's time, as RePaint does), inside it the model draws image and
lesion map; voxels whose lesion map ends above 0 become the lesion label.  Everything random comes
from ``(seed, i)``, so sample i stays a function of the seed and its index only.  A sample without
host voxels gets no lesion (and then fails the gate's class-label check: fail closed).

Training is one more stage (``RUN/lesion/last.pt``), after stage 2, resumable exactly like the
others: every random draw of step ``s`` comes from ``(training.seed, "lesion", s)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from medsynth.config import Config, LesionInpainterConfig
from medsynth.errors import CheckpointError, ConfigError
from medsynth.jobs import RunPaths, derive_seed, sha256_file
from medsynth.model.bookkeeping import LESION_KEYS, Resumable, StepBook, StepCallback, base_payload, existing_checkpoint
from medsynth.model.checkpoint import is_complete, load_checkpoint, save_checkpoint
from medsynth.model.ema import EMA
from medsynth.model.fastpath import adam, resolve_training_precision
from medsynth.model.networks import autocast, generator, lr_lambda, rflow_stochastic_step, seeded_init
from medsynth.progress import progress

log = logging.getLogger("medsynth.model.lesion")

STAGE = "lesion"
T_TRAIN = 1000  # the rectified flow's timesteps (MONAI RFlowScheduler's scale)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def crop_shape(les: LesionInpainterConfig, spacing: Sequence[float]) -> tuple[int, int, int]:
    """Voxels of the crop per axis: ``2 (radius_mm + margin_mm)`` wide, rounded up to a multiple of
    the UNet's downsampling (and at least two of its coarsest cells)."""
    down = 2 ** (len(les.channels) - 1)
    return tuple(max(2 * down, int(math.ceil(2.0 * (les.radius_mm + les.margin_mm) / float(s) / down)) * down)
                 for s in spacing)


def ball(shape: Sequence[int], spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """The ball of ``radius_mm`` around the crop's centre ``(n - 1) / 2``, as a bool array."""
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * float(s) for n, s in zip(shape, spacing)], indexing="ij")
    return sum(g * g for g in grids) <= float(radius_mm) ** 2


def crop_origin(centre: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """The first voxel of the crop whose centre ``(n - 1) / 2`` falls nearest ``centre``."""
    return np.round(np.asarray(centre, float) - (np.asarray(shape) - 1) / 2.0).astype(int)


def take(x: torch.Tensor, lo: Sequence[int], shape: Sequence[int], fill: float = -1.0) -> torch.Tensor:
    """``x[..., lo:lo + shape]`` of a ``[C, X, Y, Z]`` tensor, padded with ``fill`` outside the volume."""
    out = torch.full((x.shape[0], *shape), float(fill), dtype=x.dtype)
    src, dst = _windows(x.shape[1:], lo, shape)
    if src is not None:
        out[(slice(None), *dst)] = x[(slice(None), *src)]
    return out


def _windows(vol: Sequence[int], lo: Sequence[int], shape: Sequence[int]):
    src = [slice(max(0, int(a)), min(int(v), int(a) + int(n))) for a, n, v in zip(lo, shape, vol)]
    if any(s.stop <= s.start for s in src):
        return None, None
    dst = [slice(s.start - int(a), s.stop - int(a)) for s, a in zip(src, lo)]
    return src, dst


def mirror_axis(orientation: str) -> Optional[int]:
    """The array axis that runs left-right under ``data.orientation`` (None if none does)."""
    for i, c in enumerate(orientation.upper()):
        if c in "LR":
            return i
    return None


def build_inpainter(les: LesionInpainterConfig) -> torch.nn.Module:
    """MONAI's ``DiffusionModelUNet``: 4 inputs (noisy image and lesion map, the erased crop, the ball),
    2 outputs (their velocity); no attention (a crop is small and local)."""
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(spatial_dims=3, in_channels=4, out_channels=2, channels=tuple(les.channels),
                              attention_levels=tuple(False for _ in les.channels), num_res_blocks=les.num_res_blocks,
                              norm_num_groups=les.norm_num_groups, num_head_channels=les.channels[-1])


def _model_input(x_t: torch.Tensor, image: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    return torch.cat([x_t, image * (1.0 - region), region.expand(len(x_t), -1, -1, -1, -1)], dim=1)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class LesionCases:
    """The training lesions: crops' sources in model space, their centres and wall distances."""

    images: list[torch.Tensor]     # [X, Y, Z] image channel of each case with the lesion label
    lesions: list[torch.Tensor]    # [X, Y, Z] its lesion map in [-1, 1]
    centres: list[np.ndarray]      # lesion centroid (voxels)
    wall_mm: list[float]           # distance of the centroid to the edge of host + lesion (mm)
    ids: list[int]                 # their indices among the training items


def _channels(cfg: Config) -> tuple[int, int]:
    """The model-space channels of the lesion and the host label (1 + position among the values)."""
    from medsynth.model.labels import label_names

    les, names = cfg.model.lesion_inpainter, label_names(cfg)
    missing = [n for n in (les.label, les.host) if n not in names]
    if missing:
        raise ConfigError(f"model.lesion_inpainter: label(s) {missing} are not among the run's labels "
                          f"{list(names)}", hint="name the lesion (label) and the label it sits in (host)")
    order = list(names)
    return 1 + order.index(les.label), 1 + order.index(les.host)


def lesion_cases(cfg: Config, items: Any) -> LesionCases:
    """Every training item (paired, model space) that holds the lesion label."""
    from scipy import ndimage

    li, hi = _channels(cfg)
    spacing = [float(s) for s in cfg.data.spacing]
    out = LesionCases([], [], [], [], [])
    for i in range(len(items)):
        x = torch.as_tensor(items[i]["image"]).as_subclass(torch.Tensor).float()
        les = (x[li] > 0).numpy()
        if not les.any():
            continue
        centre = np.asarray(ndimage.center_of_mass(les))
        inside = les | (x[hi] > 0).numpy()
        dist = ndimage.distance_transform_edt(inside, sampling=spacing)
        out.images.append(x[0].clone())
        out.lesions.append(x[li].clone())
        out.centres.append(centre)
        out.wall_mm.append(float(dist[tuple(np.clip(np.round(centre).astype(int), 0, np.array(les.shape) - 1))]))
        out.ids.append(i)
    return out


def training_batch(cfg: Config, cases: LesionCases, step: int, shape: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy crops, their clean image channel, timesteps, velocity target) of step ``step``, every draw
    from the generator of ``(training.seed, "lesion", step)``."""
    from monai.networks.schedulers import RFlowScheduler

    les = cfg.model.lesion_inpainter
    g = generator(cfg.training.seed, STAGE, "step", step)
    spacing = np.asarray(cfg.data.spacing, float)
    axis = mirror_axis(cfg.data.orientation)
    crops = []
    for _ in range(les.batch_size):
        k = int(torch.randint(len(cases.images), (1,), generator=g))
        while True:  # a jitter uniform in the ball of jitter_mm (rejection, from g)
            j = (torch.rand(3, generator=g, dtype=torch.float64).numpy() * 2.0 - 1.0) * les.jitter_mm
            if float(np.sqrt((j * j).sum())) <= les.jitter_mm:
                break
        lo = crop_origin(cases.centres[k] + j / spacing, shape)
        c = take(torch.stack([cases.images[k], cases.lesions[k]]), lo, shape)
        if axis is not None and bool(torch.rand(1, generator=g) < 0.5):
            c = c.flip(1 + axis)
        crops.append(c)
    x0 = torch.stack(crops)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.sigmoid(torch.randn(len(x0), generator=g)) * T_TRAIN  # logit-normal times (as stage 2)
    x_t = RFlowScheduler(num_train_timesteps=T_TRAIN, use_discrete_timesteps=False).add_noise(x0, noise, t)
    return x_t, x0[:, :1], t, x0 - noise


@dataclass
class _LesionStage(Resumable):
    net: torch.nn.Module
    ema: EMA
    opt: Any
    sched: Any

    STATE = {"model": "net", "ema": "ema", "opt": "opt", "sched": "sched"}


def lesion_precision(cfg: Config, device: torch.device) -> str:
    """The precision it trains and paints in: ``training.precision`` by the voxels of one batch of crops."""
    les = cfg.model.lesion_inpainter
    return resolve_training_precision(cfg.training.precision, device,
                                      math.prod(crop_shape(les, cfg.data.spacing)) * les.batch_size)


def train_lesion(cfg: Config, paths: RunPaths, data: Any, device: torch.device, resume: bool,
                 callback: Optional[StepCallback] = None, max_steps: Optional[int] = None) -> dict[str, Any]:
    """Train the lesion inpainter of ``cfg`` on the training items' lesions into ``RUN/lesion/last.pt``."""
    les = cfg.model.lesion_inpainter
    if les is None:
        raise ConfigError("the config has no model.lesion_inpainter")
    precision = lesion_precision(cfg, device)
    cases = lesion_cases(cfg, data.train)
    if not cases.images:
        raise ConfigError(f"model.lesion_inpainter: no training case holds the label {les.label!r}",
                          hint="train it on cases with lesions, or remove model.lesion_inpainter")
    shape = crop_shape(les, cfg.data.spacing)
    region = torch.from_numpy(ball(shape, cfg.data.spacing, les.radius_mm)).float()[None, None].to(device)
    with seeded_init(derive_seed(cfg.training.seed, "init", STAGE)):
        net = build_inpainter(les)
    net.to(device).train()
    opt = adam(net.parameters(), les.lr, cfg.training, device)
    st = _LesionStage(net, EMA(net, les.ema_decay), opt,
                      torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 20, les.steps)))
    ck_path = paths.checkpoint(STAGE)
    ck = existing_checkpoint(ck_path, STAGE, cfg, resume, LESION_KEYS, "trained its lesion inpainter")
    step = 0
    if ck is not None:
        st.load(ck)
        step = int(ck["step"])
        log.info("lesion: resuming at step %d of %d", step, les.steps)
    log.info("lesion: %d training lesions, crops %s voxels, ball %g mm, %s", len(cases.images), list(shape),
             les.radius_mm, precision)
    weight = 0.05 + region  # the ball is what is painted; the context only lightly

    def save() -> None:
        save_checkpoint(ck_path, {**base_payload(cfg, STAGE, step, les.steps), **st.state(),
                                  "crop": list(shape), "wall_mm": cases.wall_mm, "precision": precision,
                                  "data_info": getattr(data, "info", {})})

    # one summary line per 200 steps (an "epoch" of crops means little: every step draws new ones)
    book = StepBook(STAGE, cfg, _Budget(les), paths, step, 200, None, callback)
    end = les.steps if max_steps is None else min(les.steps, step + max_steps)
    for _ in progress(range(step, end), desc=STAGE, total=end - step):
        x_t, image, t, target = training_batch(cfg, cases, step, shape)
        x_t, image, t, target = x_t.to(device), image.to(device), t.to(device), target.to(device)
        st.opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            pred = st.net(_model_input(x_t, image, region), t)
        loss = (((pred.float() - target) ** 2) * weight).mean()
        loss.backward()
        st.opt.step()
        st.sched.step()
        st.ema.update(st.net)
        step += 1
        book.after_step(step, end, {"loss": loss.item()}, st.sched.get_last_lr()[0], None, save)
    if step == 0 and les.steps == 0:
        save()
    return {"stage": STAGE, "steps": step, "seconds": book.seconds, "lesions": len(cases.images)}


@dataclass(frozen=True)
class _Budget:
    """What :class:`StepBook` reads of a stage's budget."""

    les: LesionInpainterConfig

    @property
    def steps(self) -> int:
        return self.les.steps

    @property
    def log_every(self) -> int:
        return self.les.log_every

    @property
    def val_every(self) -> int:
        return self.les.steps


# --------------------------------------------------------------------------------------------
# Painting
# --------------------------------------------------------------------------------------------


class LesionPainter:
    """A trained lesion inpainter that paints one lesion into a decoded sample (model space)."""

    def __init__(self, cfg: Config, net: torch.nn.Module, wall_mm: Sequence[float], device: torch.device,
                 provenance: dict[str, Any]):
        self.cfg, self.les = cfg, cfg.model.lesion_inpainter
        self.net = net.to(device).eval().requires_grad_(False)
        self.wall_mm = np.asarray(list(wall_mm), float)
        self.device = device
        self.shape = crop_shape(self.les, cfg.data.spacing)
        self.region_np = ball(self.shape, cfg.data.spacing, self.les.radius_mm)
        self.region = torch.from_numpy(self.region_np).float()[None, None]
        self.lesion_ch, self.host_ch = _channels(cfg)
        self.precision = lesion_precision(cfg, device)
        self.classes = {int(c) for c in self.les.classes}
        self.provenance = provenance

    @classmethod
    def from_run(cls, run_dir: str | Path, cfg: Config, device: torch.device, use_ema: bool = True
                 ) -> Optional["LesionPainter"]:
        """The run's lesion inpainter: None when the run has none; refused when the config names one
        that is not (fully) trained.  Its own checkpoint's config decides how it paints, so one can be
        trained onto a run whose other stages are done."""
        paths = RunPaths(Path(run_dir))
        path = paths.checkpoint(STAGE)
        if not path.is_file():
            if cfg.model.lesion_inpainter is not None:
                raise CheckpointError(f"{run_dir}: its lesion inpainter (model.lesion_inpainter) is not trained "
                                      f"({path.relative_to(Path(run_dir))} is missing)",
                                      hint="finish training: 'medsynth train CONFIG --run RUN --resume'")
            return None
        ck = load_checkpoint(path, STAGE)
        if not is_complete(ck):
            raise CheckpointError(f"{path}: lesion inpainter training is incomplete (step {ck.get('step')} of "
                                  f"{ck.get('steps')})", hint="resume it with 'medsynth train CONFIG --run RUN --resume'")
        from medsynth.model.checkpoint import checkpoint_config

        lcfg = checkpoint_config(ck, path)
        if lcfg.model.lesion_inpainter is None:
            raise CheckpointError(f"{path}: its stored config has no model.lesion_inpainter")
        if [float(s) for s in lcfg.data.spacing] != [float(s) for s in cfg.data.spacing] or \
                list(lcfg.data.shape) != list(cfg.data.shape):
            raise CheckpointError(f"{path}: trained on another grid than the run's diffusion model",
                                  hint="retrain it: delete RUN/lesion and 'medsynth train CONFIG --run RUN --resume'")
        net = build_inpainter(lcfg.model.lesion_inpainter)
        net.load_state_dict(ck["ema"]["model"] if use_ema else ck["model"])
        prov = {"checkpoint_sha256": sha256_file(path), "steps": lcfg.model.lesion_inpainter.sample_steps,
                "eta": lcfg.model.lesion_inpainter.sample_eta, "classes": sorted(lcfg.model.lesion_inpainter.classes)}
        return cls(lcfg, net, ck["wall_mm"], device, prov)

    def centre(self, x: torch.Tensor, g: np.random.Generator) -> Optional[np.ndarray]:
        """A voxel of the host label whose distance to the host's edge is a training lesion's (or the
        deepest host voxel when the host is thinner); None without host voxels."""
        from scipy import ndimage

        from medsynth.model.labels import decode, label_values

        values = label_values(self.cfg)
        host_value = values[self.host_ch - 1]
        host = decode(x, values) == host_value
        if not host.any():
            return None
        dist = ndimage.distance_transform_edt(host, sampling=[float(s) for s in self.cfg.data.spacing])
        want = float(self.wall_mm[int(g.integers(len(self.wall_mm)))]) if len(self.wall_mm) else 0.0
        cand = np.argwhere(dist >= min(want, float(dist.max())))
        return cand[int(g.integers(len(cand)))].astype(float)

    @torch.inference_mode()
    def paint(self, x: torch.Tensor, sample_seed: int) -> tuple[torch.Tensor, bool]:
        """``x`` ([1 + K, X, Y, Z], model space) with one lesion painted in; ``(x, False)`` unchanged when
        the sample has no host voxels.  Every draw comes from ``sample_seed``."""
        g = np.random.default_rng(derive_seed(sample_seed, STAGE, "centre"))
        centre = self.centre(x, g)
        if centre is None:
            return x, False
        tg = torch.Generator().manual_seed(derive_seed(sample_seed, STAGE, "noise"))
        lo = crop_origin(centre, self.shape)
        x = x.float().cpu().clone()
        image = take(x[:1], lo, self.shape)[None]
        known = torch.cat([image, -torch.ones_like(image)], dim=1)
        region = self.region
        z = torch.randn(known.shape, generator=tg)
        n, eta = self.les.sample_steps, float(self.les.sample_eta)
        times = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
        for k in range(n):
            t, t_next = float(times[k]), float(times[k + 1])
            z = torch.where(region > 0.5, z, (1.0 - t) * known + t * torch.randn(known.shape, generator=tg))
            with autocast(self.device, self.precision):
                v = self.net(_model_input(z, image, region).to(self.device),
                             torch.tensor([t * T_TRAIN], device=self.device)).float().cpu()
            if t_next <= 0.0:
                z = z + t * v  # the clean estimate (v = clean - noise, z = (1 - t) clean + t noise)
                break
            z = rflow_stochastic_step(z, v, t, t_next, eta, torch.randn(z.shape, generator=tg))
        src, dst = _windows(x.shape[1:], lo, self.shape)
        if src is None:
            return x, False
        inside = torch.from_numpy(self.region_np)[tuple(dst)]
        out_img = z[0, 0][tuple(dst)].clamp(-1.0, 1.0)
        lesion = (z[0, 1][tuple(dst)] > 0) & inside
        view = x[(slice(None), *src)]
        view[0][inside] = out_img[inside]  # a view: x changes with it
        labs = view[1:]
        labs[:, lesion] = -1.0
        labs[self.lesion_ch - 1][lesion] = 1.0
        return x, bool(lesion.any())
