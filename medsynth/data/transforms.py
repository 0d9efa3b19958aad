"""MONAI transform chains built from the config, the invertible intensity normalisation, datasets.

The chain for every case: ``LoadImaged`` (NIfTI, NRRD, MetaImage or DICOM series, via
:class:`~medsynth.data.io.MedsynthReader`, which returns RAS affines) ->
``EnsureChannelFirstd`` -> ``Orientationd`` -> ``Spacingd`` (labels nearest-neighbour) ->
:class:`IntensityNormd` (physical units -> [-1, 1]) -> ``ResizeWithPadOrCropd`` (air pads to -1,
labels to 0) -> ``EnsureTyped``.

The normalisation is owned here and has an exact inverse (:meth:`IntensityNorm.inverse`), which the
sampler uses to return to HU.  For MR the per-volume percentiles are recorded, and the dataset-level
reference (their medians over the training cases) is what the inverse uses for synthetic volumes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable, Mapping, Optional, Sequence

import numpy as np
import torch

from medsynth.config import DataConfig
from medsynth.manifest import Case
from medsynth.volume import affine_from_spacing

log = logging.getLogger("medsynth.data.transforms")


@dataclass(frozen=True)
class IntensityNorm:
    """Linear map of physical intensities [lo, hi] onto model space [-1, 1] (clipped outside).

    ``inverse(forward(x)) == x`` for every x in [lo, hi] up to float rounding; values outside are
    clipped first when ``clip`` is true (CT outside the window carries no information the model
    keeps).
    """

    lo: float
    hi: float
    clip: bool = True
    mode: str = "window"  # "window" (CT, fixed HU) or "percentiles" (MR, dataset reference)

    def forward(self, x: Any) -> Any:
        y = (x - self.lo) / (self.hi - self.lo) * 2.0 - 1.0
        if self.clip:
            y = y.clamp(-1.0, 1.0) if isinstance(y, torch.Tensor) else np.clip(y, -1.0, 1.0)
        return y

    def inverse(self, y: Any) -> Any:
        return (y + 1.0) * 0.5 * (self.hi - self.lo) + self.lo

    def to_dict(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi, "clip": self.clip, "mode": self.mode}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IntensityNorm":
        return cls(float(d["lo"]), float(d["hi"]), bool(d.get("clip", True)), str(d.get("mode", "window")))


def intensity_norm(cfg: DataConfig, reference: Optional[tuple[float, float]] = None) -> IntensityNorm:
    """The normalisation of a config: the HU window for CT, the dataset reference for MR."""
    it = cfg.intensity
    if it.window is not None:
        return IntensityNorm(float(it.window[0]), float(it.window[1]), it.clip, "window")
    if reference is None:
        raise ValueError("percentile normalisation needs the dataset reference (lo, hi)")
    return IntensityNorm(float(reference[0]), float(reference[1]), it.clip, "percentiles")


class IntensityNormd:
    """Dictionary transform: normalise ``keys`` into [-1, 1] by the config's rule.

    Records the (lo, hi) used in ``data["intensity_lo"]`` / ``["intensity_hi"]`` so the dataset
    reference for MR can be computed from the training cases.
    """

    def __init__(self, keys: Sequence[str], cfg: DataConfig):
        self.keys = list(keys)
        self.cfg = cfg

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        it = self.cfg.intensity
        for k in self.keys:
            x = d[k]
            if it.window is not None:
                norm = IntensityNorm(float(it.window[0]), float(it.window[1]), it.clip)
            else:
                arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
                lo, hi = np.percentile(arr, list(it.percentiles))  # type: ignore[arg-type]
                if hi <= lo:
                    hi = lo + 1.0
                norm = IntensityNorm(float(lo), float(hi), it.clip, "percentiles")
            d[k] = norm.forward(x)
            d["intensity_lo"], d["intensity_hi"] = norm.lo, norm.hi
        return d


def build_transforms(cfg: DataConfig, with_label: bool = False) -> Any:
    """The MONAI ``Compose`` that turns a case dict (``image``[, ``label``]) into model input."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        ResizeWithPadOrCropd,
        Spacingd,
    )

    from medsynth.data.io import MedsynthReader

    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    return Compose([
        LoadImaged(keys=keys, reader=MedsynthReader(), image_only=True),
        EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
        Orientationd(keys=keys, axcodes=cfg.orientation.upper(), labels=None),
        Spacingd(keys=keys, pixdim=cfg.spacing, mode=modes, padding_mode="border"),
        IntensityNormd(keys=["image"], cfg=cfg),
        ResizeWithPadOrCropd(keys=["image"], spatial_size=cfg.shape, value=-1.0),
        *([ResizeWithPadOrCropd(keys=["label"], spatial_size=cfg.shape)] if with_label else []),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True),
    ])


def case_dict(case: Case, with_label: bool) -> dict[str, Any]:
    """The MONAI data dict of a manifest case (no PHI: id, paths and class only)."""
    image: Any = str(case.image)
    files = case.extra.get("series_files")
    if files:  # one series out of a folder holding several: LoadImaged reads the listed files
        image = [str(Path(case.image) / f) for f in files]
    d: dict[str, Any] = {"id": case.id, "image": image,
                         "class_label": -1 if case.class_label is None else int(case.class_label)}
    if with_label:
        d["label"] = str(case.label)
    return d


def split_cases(cases: Sequence[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split by a hash of (seed, case id): stable under reordering."""
    if val_fraction <= 0 or len(cases) < 2:
        return list(cases), []
    keyed = sorted(cases, key=lambda c: hashlib.sha256(f"{seed}:{c.id}".encode()).hexdigest())
    n_val = max(1, int(round(val_fraction * len(cases))))
    n_val = min(n_val, len(cases) - 1)
    return keyed[n_val:], keyed[:n_val]


def make_dataset(cases: Sequence[Case], cfg: DataConfig, with_label: bool = False) -> Any:
    """A MONAI dataset over ``cases``: in-memory ``CacheDataset``, on-disk ``PersistentDataset``, or plain."""
    from monai.data import CacheDataset, Dataset, PersistentDataset

    data = [case_dict(c, with_label) for c in cases]
    tf = build_transforms(cfg, with_label)
    if cfg.cache == "memory":
        return CacheDataset(data, tf, cache_rate=1.0, num_workers=max(cfg.num_workers, 1), progress=False)
    if cfg.cache == "disk":
        return PersistentDataset(data, tf, cache_dir=cfg.cache_dir)
    return Dataset(data, tf)


def target_affine(cfg: DataConfig) -> np.ndarray:
    """The affine every model-space volume (and every synthetic sample) lives on: the configured
    spacing and orientation, centred on the world origin."""
    return affine_from_spacing(cfg.spacing, cfg.shape, cfg.orientation.upper())
