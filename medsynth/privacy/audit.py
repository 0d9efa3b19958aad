"""Membership-inference audit: can an attacker tell the generator's training cases from unseen ones?

Two attacks published against generative models score every real case; the run's training cases
are the members, real cases it never saw (a hold-out manifest) the non-members:

* **denoising loss** (Matsumoto et al. 2023, "Membership inference attacks against diffusion
  models"; Carlini et al. 2023, "Extracting training data from diffusion models"): a model that
  memorised its training set denoises those cases better.  Each case's latent (posterior mean of
  the run's autoencoder, times the run's scale factor) is noised at fixed timesteps with fixed
  noise draws (the same draws for every case, seeded by (seed, timestep, draw)), and the loss of
  the model's own training objective is averaged over them.  Score: minus the loss.
* **nearest synthetic sample** (Chen et al. 2020, "GAN-Leaks"; Hilprecht et al. 2019): a generator
  that memorised its training set emits samples close to them.  Distance: the memorisation
  screen's image distance (1 - shift-tolerant NCC of band-passed volumes,
  :mod:`medsynth.privacy.memorisation`) to the nearest synthetic sample.  Score: minus the distance.

Each attack gives a ROC AUC (members positive; 0.5: the attacker cannot tell, 1: every training
case is recognised) with a 95% percentile-bootstrap interval that resamples members and
non-members separately.  The report holds counts and sorted per-case figures, never a case id.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from medsynth import __version__
from medsynth.errors import ConfigError, ManifestError, MedsynthError
from medsynth.progress import progress

log = logging.getLogger("medsynth.privacy.audit")

AUDIT_FORMAT = "medsynth-membership-audit/1"
# a lower CI bound above this says the attacker beats chance
CHANCE = 0.5


@dataclass(frozen=True)
class AuditSettings:
    """Knobs of the audit; the defaults are what ``medsynth audit`` and ``medsynth release`` use.

    ``timesteps`` are fractions of the model's training timesteps (low noise, where memorisation
    shows most, is sampled densely); ``draws`` noise draws per timestep; ``n_synthetic`` samples
    generated for the nearest-sample attack when no samples are given; ``bootstrap`` resamples.
    """

    timesteps: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
    draws: int = 4
    seed: int = 0
    n_synthetic: int = 16
    bootstrap: int = 2000

    def check(self) -> None:
        if not self.timesteps or any(not 0.0 < t < 1.0 for t in self.timesteps):
            raise ConfigError(f"audit timesteps must be fractions strictly between 0 and 1, got {list(self.timesteps)}")
        if self.draws < 1:
            raise ConfigError(f"`draws` must be >= 1, got {self.draws}")
        if self.n_synthetic < 1:
            raise ConfigError(f"`n_synthetic` must be >= 1, got {self.n_synthetic}")
        if self.bootstrap < 100:
            raise ConfigError(f"`bootstrap` must be >= 100, got {self.bootstrap}")


# ---------------------------------------------------------------------------------------------
# real cases
# ---------------------------------------------------------------------------------------------


@dataclass
class RealCases:
    """Real cases on the model grid: model-space inputs (image, then one-hot label channels for a
    paired model) and the image in physical units.  ``ids`` stay in memory, never in a report."""

    ids: list[str] = field(default_factory=list)
    model: list[torch.Tensor] = field(default_factory=list)
    physical: list[np.ndarray] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def _reason(exc: BaseException) -> str:
    e: Optional[BaseException] = exc
    while e is not None:
        if isinstance(e, MedsynthError):
            return e.message
        e = e.__cause__ or e.__context__
    return f"could not be read or resampled ({type(exc).__name__})"


def load_cases(cfg: Any, cases: Sequence[Any], desc: str = "cases", model_inputs: bool = True) -> RealCases:
    """Read ``cases`` through the run's own MONAI chain (as in training); unreadable ones are
    skipped with a warning naming the case id (a manifest id, never patient data).  Without
    ``model_inputs`` only the images in physical units are kept (label maps are not read)."""
    from medsynth.data.transforms import IntensityNorm, build_transforms, case_dict
    from medsynth.model.labels import encode, label_values

    values = label_values(cfg) if model_inputs else []
    paired = bool(values)
    tf = build_transforms(dataclasses.replace(cfg.data, cache="none"), with_label=paired)
    out = RealCases()
    for c in progress(cases, desc=desc, total=len(cases)):
        if paired and c.label is None:
            log.warning("%s case %s skipped: no label map (the model learns image and label together)", desc, c.id)
            out.skipped.append("no label map")
            continue
        try:
            d = tf(case_dict(c, paired))
        except Exception as exc:  # noqa: BLE001 - one bad case never sinks the audit
            log.warning("%s case %s skipped: %s", desc, c.id, _reason(exc))
            out.skipped.append(_reason(exc))
            continue
        img = torch.as_tensor(d["image"]).as_subclass(torch.Tensor).float()
        norm = IntensityNorm(float(d["intensity_lo"]), float(d["intensity_hi"]))
        out.ids.append(c.id)
        out.physical.append(np.asarray(norm.inverse(img[0].numpy().astype(np.float64)), dtype=np.float32))
        if model_inputs:
            out.model.append(encode(img, d["label"], values) if paired else img)
        out.classes.append(-1 if c.class_label is None else int(c.class_label))
    return out


def training_split(cfg: Any, manifest: Any) -> tuple[list[Any], list[Any]]:
    """(training cases, validation cases) of ``manifest`` exactly as the run split them."""
    from medsynth.data.transforms import split_cases

    return split_cases(manifest.cases, cfg.data.val_fraction, cfg.training.seed)


def unseen_cases(holdout: Any, train_manifest: Any) -> tuple[list[Any], int]:
    """The hold-out cases that are not training files (same path or same sha256); and how many were dropped."""
    paths = {Path(c.image).resolve() for c in train_manifest.cases}
    shas = {c.sha256 for c in train_manifest.cases if c.sha256}
    keep = [c for c in holdout.cases if Path(c.image).resolve() not in paths and not (c.sha256 and c.sha256 in shas)]
    return keep, len(holdout.cases) - len(keep)


# ---------------------------------------------------------------------------------------------
# attack 1: denoising loss
# ---------------------------------------------------------------------------------------------


def _timestep(kind: str, frac: float, T: int) -> torch.Tensor:
    if kind == "rflow":
        return torch.tensor(float(frac * T))
    return torch.tensor(min(T - 1, max(0, int(round(frac * T)))), dtype=torch.long)


@torch.inference_mode()
def encode_latents(sampler: Any, items: Sequence[torch.Tensor]) -> torch.Tensor:
    """Scaled posterior means ``[N, C, x, y, z]`` of model-space inputs under the sampler's autoencoder."""
    from medsynth.model.fastpath import memory_format
    from medsynth.model.networks import autocast

    out = []
    for x in items:
        x = x[None].to(sampler.device)
        with autocast(sampler.device, sampler.precision):
            mu = sampler.autoencoder.encode(x.contiguous(memory_format=memory_format(sampler.channels_last, x)))[0]
        out.append(mu.float() * sampler.scale_factor)
    return torch.cat(out)


@torch.inference_mode()
def denoising_losses(sampler: Any, items: Sequence[torch.Tensor], classes: Sequence[int],
                     settings: AuditSettings) -> np.ndarray:
    """Per-case loss of the model's training objective, shape (n_cases, n_timesteps), each entry the
    mean over ``settings.draws`` noise draws shared by every case."""
    from medsynth.model.networks import build_scheduler, generator, latent_shape, rflow_velocity
    from medsynth.model.objectives import diffusion_target

    cfg = sampler.cfg
    d, kind = cfg.training.diffusion, cfg.training.scheduler
    sched = build_scheduler(kind, d, math.prod(latent_shape(cfg)[1:]))
    z0 = encode_latents(sampler, items)
    n = len(z0)
    labels = None
    if sampler.num_classes is not None:  # the case's class; the null class when unknown
        k = sampler.num_classes
        labels = torch.tensor([c if 0 <= c < k else k for c in classes], device=sampler.device)
    out = np.zeros((n, len(settings.timesteps)))
    steps = [(i, m) for i in range(len(settings.timesteps)) for m in range(settings.draws)]
    for i, m in progress(steps, desc="denoising loss", total=len(steps)):
        t = _timestep(kind, settings.timesteps[i], d.num_train_timesteps)
        noise = torch.randn(tuple(z0.shape[1:]), generator=generator(settings.seed, "audit", "noise", i, m))
        noise = noise.to(sampler.device)[None].expand_as(z0).contiguous()
        tt = t.repeat(n).to(sampler.device)
        x_t = sched.add_noise(original_samples=z0, noise=noise, timesteps=tt)
        pred = sampler.predict(x_t, t, labels, 1.0)
        if kind == "rflow":
            pred = rflow_velocity(pred, x_t, tt, d.num_train_timesteps, d.prediction_type)
        target = diffusion_target(kind, sched, z0, noise, tt)
        out[:, i] += ((pred.float() - target) ** 2).flatten(1).mean(1).cpu().numpy() / settings.draws
    return out


# ---------------------------------------------------------------------------------------------
# attack 2: nearest synthetic sample
# ---------------------------------------------------------------------------------------------


def analysis_window(cfg: Any) -> Optional[tuple[float, float]]:
    """The HU window distances are computed in (CT), or None (MR: each volume's own percentiles)."""
    w = cfg.data.intensity.window
    return None if w is None else (float(w[0]), float(w[1]))


def prepare(arrays: Sequence[np.ndarray], cfg: Any) -> np.ndarray:
    """Volumes prepared for the memorisation screen's image distance, stacked."""
    from medsynth.privacy.memorisation import prepare_volume

    w = analysis_window(cfg)
    return np.stack([prepare_volume(np.asarray(a), cfg.privacy, w) for a in arrays])


def nearest_distances(queries: np.ndarray, synthetic: np.ndarray, cfg: Any) -> np.ndarray:
    """Image distance of each prepared query volume to its nearest prepared synthetic volume."""
    from medsynth.privacy.memorisation import image_distances

    return image_distances(queries, synthetic, cfg.privacy).min(axis=1)


def synthesise(sampler: Any, n: int, seed: int) -> list[np.ndarray]:
    """``n`` samples in physical units (indices 0..n-1, classes in turn), in memory."""
    st = sampler.settings(seed=seed)
    bs = max(1, int(sampler.cfg.sampling.batch_size))
    out: list[np.ndarray] = []
    for start in progress(range(0, n, bs), desc="synthetic", total=math.ceil(n / bs)):
        out += [np.asarray(v.array) for v in sampler.sample(list(range(start, min(n, start + bs))), st)]
    return out


# ---------------------------------------------------------------------------------------------
# AUC with a bootstrap interval
# ---------------------------------------------------------------------------------------------


def auc_with_ci(member_scores: Sequence[float], nonmember_scores: Sequence[float], n_boot: int, seed: int,
                level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """ROC AUC of scores (members positive) and its percentile-bootstrap interval, resampling
    members and non-members separately so every replicate keeps both groups.

    The AUC is the Mann-Whitney statistic (ties count one half), computed for every replicate at
    once from the member x non-member comparison matrix."""
    from medsynth.evaluate.stats import percentile_ci
    from medsynth.model.networks import derive_seed

    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if not (m.size and n.size):
        return float("nan"), (float("nan"), float("nan"))
    wins = (m[:, None] > n[None, :]) + 0.5 * (m[:, None] == n[None, :])  # (n_m, n_n)
    rng = np.random.default_rng(derive_seed(seed, "audit", "bootstrap"))
    mi = rng.integers(0, m.size, size=(n_boot, m.size))
    ni = rng.integers(0, n.size, size=(n_boot, n.size))
    dist = wins[mi[:, :, None], ni[:, None, :]].mean(axis=(1, 2))
    return float(wins.mean()), percentile_ci(dist, level)


def _attack(name: str, description: str, member: np.ndarray, nonmember: np.ndarray, settings: AuditSettings,
            figure: str, lower_is_member: bool = True) -> dict[str, Any]:
    sign = -1.0 if lower_is_member else 1.0
    auc, ci = auc_with_ci(sign * member, sign * nonmember, settings.bootstrap, settings.seed)
    return {"name": name, "description": description, "auc": round(auc, 4), "ci95": [round(ci[0], 4), round(ci[1], 4)],
            "figure": figure,
            f"member_{figure}": sorted(round(float(x), 6) for x in member),
            f"nonmember_{figure}": sorted(round(float(x), 6) for x in nonmember)}


def with_noise_weights(sampler: Any, seed: int = 0) -> Any:
    """A copy of ``sampler`` whose network weights are Gaussian noise with each tensor's own mean and
    standard deviation: the same architecture, scale and pipeline, and no information about any
    case.  The audit's control: both attacks should give about 0.5 on it.

    (A freshly initialised MONAI UNet is no such control: its output layer starts at zero, so every
    case gets the same loss.)
    """
    import copy

    from medsynth.model.networks import generator

    out = copy.copy(sampler)
    g = generator(seed, "audit", "noise-weights")
    for name in ("autoencoder", "unet"):
        net = copy.deepcopy(getattr(sampler, name))
        with torch.no_grad():
            for p in net.parameters():
                if p.numel() > 1:
                    noise = torch.randn(tuple(p.shape), generator=g).to(p.device, p.dtype)
                    p.copy_(p.mean() + p.std() * noise)
        setattr(out, name, net)
    out.provenance = {**sampler.provenance, "noise_weights": True}
    return out


def verdict(attacks: Sequence[dict[str, Any]]) -> str:
    """One sentence a privacy officer can read: is there evidence that membership leaks?"""
    worst = max(attacks, key=lambda a: a["auc"])
    lo, hi = worst["ci95"]
    if lo > CHANCE:
        return (f"membership leaks: the {worst['name']} attack tells training cases from unseen ones better "
                f"than chance (AUC {worst['auc']:.2f}, 95% CI {lo:.2f}-{hi:.2f})")
    return (f"no evidence that membership leaks at this sample size: the strongest attack ({worst['name']}) "
            f"has AUC {worst['auc']:.2f}, 95% CI {lo:.2f}-{hi:.2f}, which includes chance (0.5); a leak "
            f"up to AUC {hi:.2f} cannot be ruled out")


def audit_membership(sampler: Any, members: RealCases, nonmembers: RealCases, settings: AuditSettings = AuditSettings(),
                     synthetic: Optional[Sequence[np.ndarray]] = None, synthetic_source: str = "") -> dict[str, Any]:
    """Both attacks for loaded cases (see the module docstring); the report as a dict.

    ``synthetic`` are volumes in physical units on the model grid; without them
    ``settings.n_synthetic`` are sampled from ``sampler``.
    """
    settings.check()
    if len(members) < 2 or len(nonmembers) < 2:
        raise ManifestError(f"the membership audit needs at least 2 readable training cases and 2 hold-out cases, "
                            f"got {len(members)} and {len(nonmembers)}",
                            hint="give a larger `holdout` manifest of real cases the model did not train on")
    losses_m = denoising_losses(sampler, members.model, members.classes, settings)
    losses_n = denoising_losses(sampler, nonmembers.model, nonmembers.classes, settings)
    loss = _attack("denoising loss",
                   f"loss of the model's own objective, averaged over {len(settings.timesteps)} fixed timesteps x "
                   f"{settings.draws} fixed noise draws per case (lower loss: member)",
                   losses_m.mean(1), losses_n.mean(1), settings, "loss")
    loss["per_timestep"] = [
        {"t": t, "auc": round(auc_with_ci(-losses_m[:, i], -losses_n[:, i], 100, settings.seed)[0], 4)}
        for i, t in enumerate(settings.timesteps)]
    loss["per_timestep_note"] = "exploratory: the headline figure averages all timesteps, chosen in advance"
    if synthetic is None:
        synthetic = synthesise(sampler, settings.n_synthetic, settings.seed)
        synthetic_source = synthetic_source or (f"{settings.n_synthetic} samples generated by the run "
                                                f"(seed {settings.seed}, its sampling defaults)")
    if not len(synthetic):
        raise ManifestError("the nearest-sample attack needs at least one synthetic sample")
    syn = prepare(synthetic, sampler.cfg)
    near = _attack("nearest synthetic sample",
                   "distance (1 - shift-tolerant NCC of band-passed volumes) from each real case to its nearest "
                   "synthetic sample (closer: member)",
                   nearest_distances(prepare(members.physical, sampler.cfg), syn, sampler.cfg),
                   nearest_distances(prepare(nonmembers.physical, sampler.cfg), syn, sampler.cfg), settings, "distance")
    near["n_synthetic"] = len(synthetic)
    near["synthetic_source"] = synthetic_source
    attacks = [loss, near]
    worst = max(attacks, key=lambda a: a["auc"])
    return {
        "format": AUDIT_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "medsynth_version": __version__,
        "model": {k: sampler.provenance.get(k) for k in ("checkpoint_sha256", "config_hash", "use_ema", "untrained")
                  if k in sampler.provenance},
        "n_members": len(members), "n_nonmembers": len(nonmembers),
        "settings": {**dataclasses.asdict(settings), "timesteps_are": "fractions of the training timesteps",
                     "bootstrap_level": 0.95, "bootstrap_over": "members and non-members resampled separately"},
        "attacks": {"denoising_loss": loss, "nearest_synthetic": near},
        "worst": {"attack": worst["name"], "auc": worst["auc"], "ci95": worst["ci95"]},
        "verdict": verdict(attacks),
    }


# ---------------------------------------------------------------------------------------------
# the stage: medsynth audit
# ---------------------------------------------------------------------------------------------


@dataclass
class AuditResult:
    """The audit report and where it was written (``None`` when no ``out`` was given)."""

    report: dict[str, Any]
    path: Optional[Path] = None

    def table(self) -> str:
        r = self.report
        rows = [(a["name"], f"{a['auc']:.2f}", f"[{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}]")
                for a in r["attacks"].values()]
        w = max(len(x[0]) for x in rows + [("attack", "", "")])
        lines = [f"membership inference: {r['n_members']} training vs {r['n_nonmembers']} held-out real cases",
                 f"  {'attack'.ljust(w)}  AUC   95% CI"]
        lines += [f"  {n.ljust(w)}  {a}  {ci}" for n, a, ci in rows]
        if r.get("control"):
            ctl = r["control"]["attacks"]
            lines.append("  control, noise-only weights (mean AUC): "
                         + ", ".join(f"{r['attacks'][k]['name']} {v['mean_auc']:.2f}" for k, v in ctl.items()))
        lines.append(f"verdict: {r['verdict']}")
        return "\n".join(lines)


def load_audit_inputs(run_dir: str | Path, manifest: str | Path, holdout: str | Path, device: Optional[str] = None,
                      use_ema: Optional[bool] = None) -> tuple[Any, RealCases, RealCases, dict[str, Any]]:
    """Load the run, and its training cases and the unseen hold-out cases; check they fit together.

    Returns (sampler, members, non-members, notes on where they came from).  Raises
    ManifestError when ``manifest`` is not the one the run trained on, or too few cases remain.
    """
    from medsynth.manifest import load_manifest
    from medsynth.model.sample import Sampler

    sampler = Sampler.from_run(run_dir, device=device, use_ema=use_ema)
    train_m, hold_m = load_manifest(manifest), load_manifest(holdout)
    card = sampler_card(run_dir)
    name = (card.get("training_data") or {}).get("manifest_name")
    if name and train_m.name and name != train_m.name:
        raise ManifestError(f"{manifest}: is the manifest '{train_m.name}', but the run was trained on '{name}'",
                            hint="pass the manifest the run was trained on (its model card names it)")
    train_cases, val_cases = training_split(sampler.cfg, train_m)
    members = load_cases(sampler.cfg, train_cases, "training")
    n_train = (card.get("training_data") or {}).get("n_train")
    if isinstance(n_train, int) and n_train != len(members):
        raise ManifestError(f"{manifest}: gives {len(members)} readable training cases, the run trained on {n_train}",
                            hint="pass the manifest the run was trained on, with every case readable")
    unseen, dropped = unseen_cases(hold_m, train_m)
    nonmembers = load_cases(sampler.cfg, unseen, "hold-out")
    notes = {"members": f"the run's training split of the manifest ({len(val_cases)} validation case(s) of the "
                        "manifest are not counted: the model did not train on them)",
             "nonmembers": "hold-out manifest"
                           + (f" ({dropped} case(s) dropped: also training files)" if dropped else ""),
             "skipped": len(members.skipped) + len(nonmembers.skipped)}
    return sampler, members, nonmembers, notes


def sampler_card(run_dir: str | Path) -> dict[str, Any]:
    """The run's model card (checked by ``load_run`` before)."""
    from medsynth.model.checkpoint import read_model_card

    return read_model_card(run_dir)


def load_synthetic(samples_dir: str | Path, cfg: Any) -> list[np.ndarray]:
    """The images of a samples folder, which must be on the run's grid."""
    from medsynth.samples import list_samples

    vols = [s.load() for s in list_samples(Path(samples_dir))]
    bad = [v.shape for v in vols if tuple(v.shape) != tuple(cfg.data.shape)]
    if bad:
        raise ManifestError(f"{samples_dir}: {len(bad)} sample(s) are not on the run's grid "
                            f"{list(cfg.data.shape)} (e.g. {list(bad[0])})", hint="pass samples made by this run")
    return [np.asarray(v.array) for v in vols]


CONTROL_DRAWS = 3


def control_audit(sampler: Any, members: RealCases, nonmembers: RealCases, settings: AuditSettings,
                  draws: int = CONTROL_DRAWS) -> dict[str, Any]:
    """Both attacks on ``draws`` noise-weight copies of the model (:func:`with_noise_weights`),
    each with its own samples: what AUC the pipeline gives when the model knows nothing."""
    per: dict[str, list[float]] = {}
    for d in range(draws):
        rep = audit_membership(with_noise_weights(sampler, d), members, nonmembers, settings)
        for key, a in rep["attacks"].items():
            per.setdefault(key, []).append(a["auc"])
    return {"description": f"the same model with noise-only weights ({draws} draws: each weight tensor replaced by "
                           "Gaussian noise of its own mean and standard deviation); about 0.5 is expected",
            "attacks": {k: {"mean_auc": round(float(np.mean(v)), 4), "per_draw": v} for k, v in per.items()}}


def run_audit(run_dir: str | Path, manifest: str | Path, holdout: str | Path, *, out: Optional[str | Path] = None,
              samples: Optional[str | Path] = None, settings: AuditSettings = AuditSettings(),
              device: Optional[str] = None, use_ema: Optional[bool] = None, control: bool = False) -> AuditResult:
    """``medsynth audit``: both attacks on a trained run (and, with ``control``, on noise-weight copies
    of it); writes ``out/audit.json`` when ``out`` is given."""
    from medsynth.jobs import write_json

    settings.check()
    sampler, members, nonmembers, notes = load_audit_inputs(run_dir, manifest, holdout, device, use_ema)
    synthetic = load_synthetic(samples, sampler.cfg) if samples is not None else None
    report = audit_membership(sampler, members, nonmembers, settings, synthetic,
                              f"the samples folder {Path(samples).name}" if samples is not None else "")
    report["cases"] = notes
    if control:
        report["control"] = control_audit(sampler, members, nonmembers, settings)
    path = None
    if out is not None:
        path = write_json(Path(out) / "audit.json", report)
    return AuditResult(report, path)
