"""Checkpoints and the model card of a run directory (its layout: :class:`medsynth.jobs.RunPaths`).

``autoencoder/last.pt`` (stage 1) holds the weights, discriminator, optimizers, LR schedulers and
step; ``diffusion/last.pt`` (stage 2) the weights, EMA weights, optimizer, scale factor and the
hash of stage 1.

Every checkpoint carries the config it was trained with (as a plain dict) and is written
atomically.  :func:`load_run` checks the whole directory before any sampling compute is spent.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from medsynth.config import Config, config_from_dict, config_hash, config_to_dict
from medsynth.errors import CheckpointError, ConfigError
from medsynth.jobs import RunPaths, atomic_path, sha256_file, write_json
from medsynth.registry import SCHEDULERS

log = logging.getLogger("medsynth.model.checkpoint")

CHECKPOINT_FORMAT = "medsynth-checkpoint/1"
CARD_FORMAT = "medsynth-model-card/1"
INTENDED_USE = "research only, not for clinical use"
STAGES = ("autoencoder", "diffusion")


def versions() -> dict[str, Optional[str]]:
    """Versions of medsynth and the libraries that shape a model, plus the git commit if known."""
    import platform

    from medsynth.versions import package_versions

    out: dict[str, Optional[str]] = {"python": platform.python_version(),
                                     **package_versions(("torch", "monai", "numpy", "nibabel"))}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        out["git_commit"] = sha.stdout.strip() if sha.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint atomically (a killed job never leaves a truncated ``last.pt``)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: Path, stage: str) -> dict[str, Any]:
    """Load a checkpoint of ``stage`` (tensors to CPU, no pickled code); raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {stage} checkpoint not found",
                              hint=f"train it with 'medsynth train CONFIG --run {path.parent.parent} "
                                   f"--stage {stage}'")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__})",
                              hint="the file is damaged or not a medsynth checkpoint; retrain or resume") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or ck.get("stage") != stage:
        raise CheckpointError(f"{path}: not a medsynth {stage} checkpoint "
                              f"(format {CHECKPOINT_FORMAT!r}, stage {stage!r} expected)")
    return ck


def checkpoint_config(ck: dict[str, Any], path: Path) -> Config:
    """The config stored inside a checkpoint, validated again."""
    try:
        return config_from_dict(ck["config"], source=f"{path} (stored config)")
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{path}: its stored config is invalid for this medsynth version: {exc}") from None


def is_complete(ck: dict[str, Any]) -> bool:
    return int(ck.get("step", 0)) >= int(ck.get("steps", 1))


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def build_model_card(cfg: Config, paths: RunPaths, ae_ck: dict[str, Any], diff_ck: dict[str, Any],
                     data_info: dict[str, Any]) -> dict[str, Any]:
    """The model card: what the model takes and gives, what it is for, and which weights it is."""
    from medsynth.data.transforms import target_affine
    from medsynth.model.labels import label_names
    from medsynth.model.networks import latent_shape

    norm = diff_ck["intensity_norm"]
    k = cfg.model.unet.num_class_embeds
    return {
        "format": CARD_FORMAT,
        "name": cfg.name,
        "intended_use": INTENDED_USE,
        "description": "3D latent diffusion model (MONAI AutoencoderKL + DiffusionModelUNet) that samples "
                       "synthetic volumes in physical units. Research only: not a medical device, not for "
                       "diagnosis or treatment decisions; samples may reproduce biases of the training data.",
        "input_contract": {
            "modality": cfg.data.modality,
            "units": "HU" if cfg.data.modality == "CT" else "a.u.",
            "shape": list(cfg.data.shape),
            "spacing": list(cfg.data.spacing),
            "orientation": cfg.data.orientation.upper(),
            "affine": target_affine(cfg.data).tolist(),
            "intensity_norm": norm,
            "value_range": [norm["lo"], norm["hi"]],
            "model_space_range": [-1.0, 1.0],
        },
        "classes": {
            "num_classes": k,
            "null_class": k,
            "names": data_info.get("class_names"),
            "train_counts": data_info.get("class_counts"),
        },
        "labels": ({"values": label_names(cfg), "channels": "image, then one-hot per label value (ascending)"}
                   if cfg.data.use_labels else None),
        "latent": {"shape": list(latent_shape(cfg)), "scale_factor": diff_ck["scale_factor"]},
        "diffusion": {"objective": cfg.training.scheduler,
                      "prediction": "velocity" if SCHEDULERS[cfg.training.scheduler].flow
                      else cfg.training.diffusion.prediction_type,
                      "num_train_timesteps": cfg.training.diffusion.num_train_timesteps,
                      "schedule": cfg.training.diffusion.schedule},
        "sampling_defaults": config_to_dict(cfg.sampling),
        "training_data": {k2: data_info.get(k2) for k2 in ("manifest_name", "n_train", "n_val")},
        "metrics": {"autoencoder_val": ae_ck.get("val_metrics"), "diffusion_val": diff_ck.get("val_metrics"),
                    "autoencoder_reconstruction_qc": _recon_summary(ae_ck.get("reconstruction_qc"))},
        "checkpoints": {
            "autoencoder": {"path": paths.checkpoint_name("autoencoder"), "sha256": sha256_file(paths.checkpoint("autoencoder")),
                            "step": ae_ck["step"]},
            "diffusion": {"path": paths.checkpoint_name("diffusion"), "sha256": sha256_file(paths.checkpoint("diffusion")),
                          "step": diff_ck["step"]},
        },
        "config_hash": config_hash(cfg),
        "versions": diff_ck.get("versions"),
        "initial_weights": initial_weights(ae_ck, diff_ck),
    }


def _recon_summary(rq: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The model card's share of stage 1's reconstruction check (medsynth.model.recon_check): counts
    and failure codes, without the per-case list."""
    return None if not rq else {k: rq[k] for k in ("n_cases", "n_passed", "reasons") if k in rq}


def initial_weights(ae_ck: dict[str, Any], diff_ck: dict[str, Any]) -> dict[str, Any]:
    """Per network started from local weights: the file (name, sha256, layout), its licence, and
    whether it was used as is (frozen) or fine-tuned for how many steps.  Empty when none was."""
    out: dict[str, Any] = {}
    for name, ck in (("autoencoder", ae_ck), ("unet", diff_ck)):
        init = ck.get("init")
        if init:
            steps = int(ck.get("steps", 0))
            out[name] = {**init, "frozen": steps == 0, "fine_tuned_steps": steps}
    return out


def weights_licenses(card: dict[str, Any]) -> list[dict[str, Any]]:
    """The licences a run's weights carry from their initial weights (model card ``initial_weights``,
    ControlNet included), one entry per network: component, licence, file and sha256."""
    out = []
    for name, init in (card.get("initial_weights") or {}).items():
        if isinstance(init, dict) and init.get("license"):
            out.append({"component": name, "license": init["license"], "file": init.get("file"),
                        "sha256": init.get("sha256")})
    return out


def license_text(licenses: list[dict[str, Any]]) -> str:
    """One line for a dataset's ``licence`` field: what the synthetic data inherits from the weights."""
    if not licenses:
        return "see the licence of the medsynth model that generated these samples"
    parts = "; ".join(f"{x['component']}: {x['license']}" for x in licenses)
    return (f"synthetic data from a model started from third-party weights, whose licences apply "
            f"({parts}); see the model card")


def write_model_card(paths: RunPaths, card: dict[str, Any]) -> Path:
    return write_json(paths.card, card)


# --------------------------------------------------------------------------------------------
# Loading a run for sampling
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedRun:
    """Everything sampling needs from a checked run directory."""

    root: Path
    cfg: Config
    card: dict[str, Any]
    autoencoder_state: dict[str, Any]
    unet_state: dict[str, Any]
    ema_state: Optional[dict[str, Any]]
    scale_factor: float
    intensity_norm: dict[str, Any]
    diffusion_sha256: str
    autoencoder_sha256: str

    @property
    def name(self) -> str:
        return run_name(self.cfg)


def read_model_card(run_dir: str | Path) -> dict[str, Any]:
    """A run's model card as written (:func:`load_run` is what checks it against the checkpoints)."""
    return json.loads(RunPaths(Path(run_dir)).card.read_text())


def run_name(cfg: Config) -> str:
    """The run name used in sample ids: the config's ``name``, reduced to [A-Za-z0-9._-]."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.name).strip("-") or "run"


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load and check a run directory before sampling.

    Refused with :class:`CheckpointError` (naming the file and the fix): a missing directory,
    card or checkpoint; an unfinished stage; a diffusion model trained on another autoencoder;
    a model card that does not match the checkpoints (hash, grid, intensity map or classes).
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: run directory not found",
                              hint="pass the folder written by 'medsynth train CONFIG --run RUN'")
    paths = RunPaths(root)
    if not paths.card.is_file():
        raise CheckpointError(f"{paths.card}: model card missing, the run is unfinished or not a medsynth run",
                              hint=f"finish training with 'medsynth train CONFIG --run {root} --resume'")
    try:
        card = json.loads(paths.card.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{paths.card}: unreadable model card ({type(exc).__name__})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise CheckpointError(f"{paths.card}: not a medsynth model card (format {CARD_FORMAT!r} expected)")

    ae_path, diff_path = paths.checkpoint("autoencoder"), paths.checkpoint("diffusion")
    ae_ck = load_checkpoint(ae_path, "autoencoder")
    diff_ck = load_checkpoint(diff_path, "diffusion")
    for stage, ck, p in (("autoencoder", ae_ck, ae_path), ("diffusion", diff_ck, diff_path)):
        if not is_complete(ck):
            raise CheckpointError(f"{p}: {stage} training is incomplete (step {ck.get('step')} of {ck.get('steps')})",
                                  hint=f"resume it with 'medsynth train CONFIG --run {root} --resume'")
    ae_sha, diff_sha = sha256_file(ae_path), sha256_file(diff_path)
    if diff_ck.get("autoencoder_sha256") != ae_sha:
        raise CheckpointError(f"{diff_path}: the diffusion model was trained on a different autoencoder than "
                              f"{ae_path}", hint="retrain stage 2: 'medsynth train CONFIG --run RUN --stage diffusion'")
    cfg = checkpoint_config(diff_ck, diff_path)
    _check_card(card, cfg, diff_ck, ae_sha, diff_sha, paths.card)
    return LoadedRun(root=root, cfg=cfg, card=card, autoencoder_state=ae_ck["model"], unet_state=diff_ck["model"],
                     ema_state=(diff_ck.get("ema") or {}).get("model"), scale_factor=float(diff_ck["scale_factor"]),
                     intensity_norm=dict(diff_ck["intensity_norm"]), diffusion_sha256=diff_sha,
                     autoencoder_sha256=ae_sha)


def _check_card(card: dict[str, Any], cfg: Config, diff_ck: dict[str, Any], ae_sha: str, diff_sha: str,
                where: Path) -> None:
    problems = []
    ck = card.get("checkpoints") or {}
    if (ck.get("autoencoder") or {}).get("sha256") != ae_sha:
        problems.append("checkpoints.autoencoder.sha256 does not match autoencoder/last.pt")
    if (ck.get("diffusion") or {}).get("sha256") != diff_sha:
        problems.append("checkpoints.diffusion.sha256 does not match diffusion/last.pt")
    ic = card.get("input_contract") or {}
    expect = {"modality": cfg.data.modality, "shape": list(cfg.data.shape), "spacing": list(cfg.data.spacing),
              "orientation": cfg.data.orientation.upper(), "intensity_norm": diff_ck["intensity_norm"]}
    for key, val in expect.items():
        if ic.get(key) != val:
            problems.append(f"input_contract.{key} is {ic.get(key)!r}, the checkpoint says {val!r}")
    if (card.get("classes") or {}).get("num_classes") != cfg.model.unet.num_class_embeds:
        problems.append("classes.num_classes does not match the checkpoint's model.unet.num_class_embeds")
    if (card.get("latent") or {}).get("scale_factor") != diff_ck["scale_factor"]:
        problems.append("latent.scale_factor does not match the diffusion checkpoint")
    if card.get("intended_use") != INTENDED_USE:
        problems.append(f"intended_use must be {INTENDED_USE!r}")
    if problems:
        raise CheckpointError(f"{where}: model card inconsistent with the checkpoints: " + "; ".join(problems),
                              hint="the card or a checkpoint was edited or replaced; rerun the last training "
                                   "stage ('medsynth train CONFIG --run RUN --resume') to rewrite the card, "
                                   "or restore the original files")
