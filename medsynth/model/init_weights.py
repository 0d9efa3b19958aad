"""Initial weights from local files: MAISI / NV-Generate-CTMR checkpoints, MONAI bundles, plain
state dicts and medsynth runs (``model.autoencoder.init``, ``model.unet.init``,
``training.controlnet.init``).  Nothing is ever downloaded: users bring the files.

What a weights path may be (each read with ``torch.load(weights_only=True)``: tensors and plain
containers only, never pickled code):

* a plain ``state_dict`` ``{"encoder.blocks.0.conv.conv.weight": tensor, ...}`` -- how
  NV-Generate-CTMR ships its autoencoder (``models/autoencoder_v1.pt``, loaded there with
  ``autoencoder.load_state_dict(torch.load(path))``) and how a MONAI bundle stores
  ``models/model.pt``;
* a dict holding one under a known key (:data:`STATE_KEYS`): NV-Generate's diffusion UNet
  ``{"unet_state_dict": ..., "scale_factor": tensor, "epoch", "loss", "num_train_timesteps"}``,
  its ControlNet ``{"controlnet_state_dict": ...}``, some of its autoencoder files
  ``{"unet_state_dict": ...}``, and the usual ``state_dict`` / ``model`` / ``model_state_dict``;
  a ``scale_factor`` beside it is kept (the latent scale the UNet was trained with);
* a medsynth checkpoint (``RUN/<stage>/last.pt``; the UNet's EMA weights when present) or run folder;
* a MONAI bundle folder: the one file of ``models/`` that fits the role (:data:`BUNDLE_FILES`).

Keys (a ``module.`` prefix from DistributedDataParallel dropped) and shapes must match the network
built from the config exactly: :func:`load_into` raises one :class:`CheckpointError` naming the
config key, the file, the first missing / unexpected / wrong-shape keys and what the file holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from medsynth.errors import CheckpointError, ConfigError
from medsynth.jobs import RunPaths, sha256_file

log = logging.getLogger("medsynth.model.init_weights")

ROLES = ("autoencoder", "unet", "controlnet")
CONFIG_KEYS = {"autoencoder": "model.autoencoder", "unet": "model.unet", "controlnet": "training.controlnet"}
# where a state dict sits inside a checkpoint dict, per role, in the order they are tried
STATE_KEYS = {
    "autoencoder": ("autoencoder_state_dict", "state_dict", "model_state_dict", "model", "network",
                    "unet_state_dict"),  # NV-Generate saves some autoencoders under "unet_state_dict"
    "unet": ("unet_state_dict", "state_dict", "model_state_dict", "model", "network"),
    "controlnet": ("controlnet_state_dict", "state_dict", "model_state_dict", "model", "network"),
}
# medsynth run folders: which stage holds a role's weights
RUN_STAGES = {"autoencoder": "autoencoder", "unet": "diffusion", "controlnet": "controlnet"}
# MONAI bundle folders (MAISI's, NV-Generate's, medsynth's own export): file name patterns in models/
BUNDLE_FILES = {
    "autoencoder": ("autoencoder*.pt",),
    "unet": ("diffusion_unet*.pt", "diff_unet*.pt", "model.pt"),
    "controlnet": ("controlnet*.pt",),
}
SHOW = 5  # keys listed per kind of mismatch


@dataclass(frozen=True)
class InitWeights:
    """Weights read from a local file for one role, with where they came from."""

    role: str
    key: str  # config key of the path, e.g. "model.unet.init"
    path: Path  # the file actually read
    sha256: str
    layout: str  # e.g. "plain state_dict", "'unet_state_dict' of a checkpoint dict"
    state: dict[str, torch.Tensor]
    top_keys: tuple[str, ...]
    scale_factor: Optional[float]
    license: Optional[str]

    def provenance(self) -> dict[str, Any]:
        """What the run records about the file (its name, not its local path, which may say too much)."""
        return {"file": self.path.name, "sha256": self.sha256, "layout": self.layout, "license": self.license,
                "n_tensors": len(self.state), "scale_factor": self.scale_factor, "config_key": self.key}


def read_init(path: str | Path, role: str, license: Optional[str] = None) -> InitWeights:
    """Read the initial weights of ``role`` ("autoencoder", "unet", "controlnet") from ``path``.

    Raises :class:`ConfigError` (exit 2) when the path does not exist and :class:`CheckpointError`
    (exit 4) when it holds no state dict of a known layout.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    key = f"{CONFIG_KEYS[role]}.init"
    src = Path(path)
    if not src.exists():
        raise ConfigError(f"{key}: {src} not found",
                          hint="give the local weights file (or MONAI bundle / medsynth run folder); "
                               "medsynth never downloads weights")
    file, prefer_ema = _resolve_file(src, role, key)
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{key}: {file} cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: {why})",
            hint="give a file saved with torch.save of a state dict (tensors only); re-save one holding "
                 "pickled objects with torch.save(torch.load(path)['unet_state_dict'], 'weights.pt')") from None
    layout, state = _find_state(obj, role, prefer_ema)
    if layout is None:
        raise CheckpointError(f"{key}: {file} holds no state dict medsynth knows: {describe(obj)}",
                              hint=f"save the network's state_dict, or a dict holding it under one of "
                                   f"{', '.join(STATE_KEYS[role])}")
    state = _strip_prefix(state)
    top = tuple(str(k) for k in obj) if isinstance(obj, dict) else ()
    return InitWeights(role=role, key=key, path=file, sha256=sha256_file(file), layout=layout, state=state,
                       top_keys=top, scale_factor=_scale_factor(obj), license=license)


def load_into(net: nn.Module, init: InitWeights) -> None:
    """Copy ``init``'s tensors into ``net`` after checking keys and shapes match exactly."""
    problem = mismatch(net, init.state)
    if problem:
        raise CheckpointError(
            f"{init.key}: {init.path} does not fit the configured {type(net).__name__} ({problem}); "
            f"the file holds {_holds(init)}",
            hint=f"set {CONFIG_KEYS[init.role]} to the architecture the weights were trained with "
                 "(channels, num_res_blocks, attention_levels, latent/class channels, resblock_updown, "
                 "spacing_input ...), or point init at the weights of this architecture")
    ref = net.state_dict()
    net.load_state_dict({k: v.to(ref[k].dtype) for k, v in init.state.items()}, strict=True)
    log.info("%s: loaded %d tensors from %s (%s, sha256 %s)", init.key, len(init.state), init.path.name,
             init.layout, init.sha256[:12])


def mismatch(net: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """'' when ``state`` fits ``net`` exactly, else the first missing, unexpected and wrong-shape keys."""
    ref = net.state_dict()
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    shapes = [f"{k} (file {list(state[k].shape)}, network {list(ref[k].shape)})"
              for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    parts = []
    for what, items in (("missing from the file", missing), ("unexpected in the file", unexpected),
                        ("of the wrong shape", shapes)):
        if items:
            more = f" and {len(items) - SHOW} more" if len(items) > SHOW else ""
            parts.append(f"{len(items)} key(s) {what}: {', '.join(items[:SHOW])}{more}")
    return "; ".join(parts)


def describe(obj: Any) -> str:
    """What a loaded file looks like, in one line: its type, top-level keys and tensor count."""
    if isinstance(obj, dict):
        keys = [str(k) for k in obj]
        n = sum(1 for v in obj.values() if torch.is_tensor(v))
        shown = ", ".join(keys[:8]) + (f" ... ({len(keys)} keys)" if len(keys) > 8 else "")
        return f"a dict with top-level keys [{shown}] and {n} tensor(s) at the top level"
    if torch.is_tensor(obj):
        return f"a single tensor of shape {list(obj.shape)}"
    return f"a {type(obj).__name__}"


def _holds(init: InitWeights) -> str:
    top = (f"; top-level keys [{', '.join(init.top_keys[:8])}{' ...' if len(init.top_keys) > 8 else ''}]"
           if init.layout != "plain state_dict" else "")
    first = next(iter(init.state.items()))
    return f"{len(init.state)} tensors ({init.layout}{top}; first {first[0]} {list(first[1].shape)})"


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0 and all(isinstance(k, str) for k in obj)
            and all(torch.is_tensor(v) for v in obj.values()))


def _find_state(obj: Any, role: str, prefer_ema: bool) -> tuple[Optional[str], dict[str, torch.Tensor]]:
    if _is_state_dict(obj):
        return "plain state_dict", obj
    if not isinstance(obj, dict):
        return None, {}
    from medsynth.model.checkpoint import CHECKPOINT_FORMAT

    if obj.get("format") == CHECKPOINT_FORMAT:  # a medsynth checkpoint
        ema = (obj.get("ema") or {}).get("model") if isinstance(obj.get("ema"), dict) else None
        if prefer_ema and _is_state_dict(ema):
            return f"EMA weights of a medsynth {obj.get('stage')} checkpoint", ema
        if _is_state_dict(obj.get("model")):
            return f"weights of a medsynth {obj.get('stage')} checkpoint", obj["model"]
    for k in STATE_KEYS[role]:
        if _is_state_dict(obj.get(k)):
            return f"'{k}' of a checkpoint dict", obj[k]
    return None, {}


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix DistributedDataParallel puts on every key."""
    if all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _scale_factor(obj: Any) -> Optional[float]:
    if not isinstance(obj, dict) or "scale_factor" not in obj:
        return None
    v = obj["scale_factor"]
    try:
        f = float(v.reshape(-1)[0]) if torch.is_tensor(v) else float(v)
    except (TypeError, ValueError, IndexError):
        return None
    return f if f > 0 else None


def _resolve_file(src: Path, role: str, key: str) -> tuple[Path, bool]:
    """The file a path names (a medsynth run or MONAI bundle folder narrows to one file) and whether
    EMA weights are preferred (a medsynth UNet)."""
    if src.is_file():
        return src, role == "unet"
    run = RunPaths(src)
    stage_ck = run.checkpoint(RUN_STAGES[role])
    if stage_ck.is_file():  # a medsynth run folder
        return stage_ck, role == "unet"
    if run.card.is_file() or run.checkpoint("autoencoder").is_file():
        raise ConfigError(f"{key}: {src} is a medsynth run without {run.checkpoint_name(RUN_STAGES[role])}",
                          hint=f"train that stage first, or point {key} at a weights file")
    models = src / "models"
    if models.is_dir():  # a MONAI bundle folder
        pts = sorted(p.name for p in models.glob("*.pt"))
        found: list[str] = []
        for pattern in BUNDLE_FILES[role]:
            found = sorted(p.name for p in models.glob(pattern) if not p.name.startswith("mask_generation"))
            if found:
                break
        if len(found) == 1:
            return models / found[0], role == "unet"
        what = f"several files fit: {', '.join(found)}" if found else \
            f"no file fits (models/ holds: {', '.join(pts) or 'no .pt file'})"
        raise ConfigError(f"{key}: {src} is a MONAI bundle folder and {what}",
                          hint=f"point {key} at the file itself, e.g. {models / (found or pts or ['model.pt'])[0]}")
    raise ConfigError(f"{key}: {src} is a folder but neither a medsynth run nor a MONAI bundle (no models/)",
                      hint="point init at the weights file itself")


def config_init(cfg: Any, role: str) -> Optional[InitWeights]:
    """The initial weights the config asks for in ``role`` (None when it gives no ``init``)."""
    sec = {"autoencoder": lambda c: c.model.autoencoder, "unet": lambda c: c.model.unet,
           "controlnet": lambda c: c.training.controlnet}[role](cfg)
    if not sec.init:
        return None
    return read_init(sec.init, role, sec.init_license)
