"""Memorisation screen: is a synthetic sample a copy of a training patient?

3D latent diffusion models are known to reproduce training scans.  For every sample this module
finds its nearest training case in two spaces and compares the distance with what real,
*different* patients achieve:

* **image space**: d = 1 - NCC of the band-passed, downsampled volumes, maximised over integer
  shifts of up to ``privacy.max_shift`` voxels and then refined by half-voxel shifts around the best
  one, so a copy that was shifted, resampled, rescaled in intensity (NCC ignores gain and offset)
  or noised is still close.  Band-passing (Gaussian blur minus a wider blur) removes the body
  outline every patient shares, which would otherwise make all patients look alike, and damps
  voxel noise.
* **feature space**: the Euclidean distance of standardised radiomics-style features
  (:mod:`medsynth.qc.features`).

Calibration: the nearest-neighbour distances from held-out real cases to the training cases form
the distribution of "distinct patient" distances.  The threshold is ``privacy.threshold_scale``
times its ``privacy.memorisation_quantile`` quantile.  A sample closer than the image threshold fails
with ``possible_copy`` naming the training case; the feature distance is calibrated the same way and
reported as evidence, and fails a sample too with ``privacy.rule: image_or_feature`` (off by
default: on CT phantoms the feature space separates copies from distinct patients poorly —
noise, blur or rescaling move radiomics features more than they move anatomy).  The held-out cases come from a
hold-out manifest (real cases the model never saw) or, without one, a deterministic fraction of the
reference cases (the model trained on those too; calibration then measures real-to-real distances
only, which is what the threshold needs, but it is reported as such).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from medsynth.config import PrivacyConfig
from medsynth.errors import PrivacyError

log = logging.getLogger("medsynth.privacy.memorisation")


# ---------------------------------------------------------------------------------------------
# image-space distance
# ---------------------------------------------------------------------------------------------


def prepare_volume(array: np.ndarray, cfg: PrivacyConfig,
                   clip: Optional[tuple[float, float]] = None) -> np.ndarray:
    """Clip, downsample to at most ``cfg.downsample`` and band-pass one volume for the image distance.

    ``clip`` is the intensity window (CT: the model's HU window); without it the volume's own
    0.5..99.5 percentiles are used (MR).  Downsampling pre-blurs to avoid aliasing.  The result is
    float32 with zero mean.
    """
    import torch
    from scipy import ndimage

    x = np.nan_to_num(np.asarray(array, dtype=np.float32))
    lo, hi = clip if clip is not None else tuple(np.percentile(x, [0.5, 99.5]))
    x = np.clip(x, lo, hi)
    # never upsample: a grid smaller than cfg.downsample is used as it is
    target = tuple(min(int(s), int(t)) for s, t in zip(x.shape, cfg.downsample))
    if x.shape != target:
        factors = [s / t for s, t in zip(x.shape, target)]
        sig = [0.5 * (f - 1.0) if f > 1.0 else 0.0 for f in factors]
        if any(sig):
            x = ndimage.gaussian_filter(x, sig)
        t = torch.from_numpy(np.ascontiguousarray(x))[None, None]
        x = torch.nn.functional.interpolate(t, size=target, mode="trilinear", align_corners=False)[0, 0].numpy()
    y = ndimage.gaussian_filter(x, cfg.blur_sigma) if cfg.blur_sigma > 0 else x.copy()
    if cfg.highpass_sigma > 0:
        y = y - ndimage.gaussian_filter(x, cfg.highpass_sigma)
    return (y - y.mean()).astype(np.float32)


def _box_sums(x: np.ndarray, max_shift: int, sign: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum and sum of squares of each volume over the overlap box of every shift d, shape (n, k, k, k).

    For the query side (sign +1) the box of shift d is [max(d, 0), n + min(d, 0)) per axis; for
    the reference side (sign -1) it is the box of -d.  Uses summed-volume tables (8 corners).
    """
    x = np.asarray(x, dtype=np.float64)
    d = sign * (np.arange(2 * max_shift + 1) - max_shift)
    out = []
    for v in (x, x * x):
        t = np.pad(v, [(0, 0), (1, 0), (1, 0), (1, 0)]).cumsum(1).cumsum(2).cumsum(3)
        lo = [np.maximum(d, 0) for _ in range(3)]
        hi = [size + np.minimum(d, 0) for size in x.shape[1:]]
        total = np.zeros((x.shape[0],) + (d.size,) * 3)
        for cx in (0, 1):
            for cy in (0, 1):
                for cz in (0, 1):
                    ix = (hi[0] if cx else lo[0])[:, None, None]
                    iy = (hi[1] if cy else lo[1])[None, :, None]
                    iz = (hi[2] if cz else lo[2])[None, None, :]
                    sgn = (-1) ** (3 - cx - cy - cz)
                    total += sgn * t[:, ix, iy, iz]
        out.append(total)
    return out[0], out[1]


def shift_ncc(queries: np.ndarray, refs: np.ndarray, max_shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Max NCC over integer shifts (|d| <= max_shift per axis) of each query against each reference.

    query[x + d] is compared with ref[x] on their overlap only (no wrapped-around voxels): the
    cross products come from one ``conv3d`` of the zero-padded queries with the references as
    kernels, and the overlap means and norms from box sums.  Returns (ncc (n_q, n_r),
    best shift d (n_q, n_r, 3)).
    """
    import torch
    import torch.nn.functional as F

    s = int(max_shift)
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))[:, None]
    r = torch.from_numpy(np.ascontiguousarray(refs, dtype=np.float32))[:, None]
    n = q.shape[-3:]
    with torch.no_grad():
        num = F.conv3d(F.pad(q, (s,) * 6), r).double()          # (n_q, n_r, k, k, k)
    qs1, qs2 = (torch.from_numpy(v) for v in _box_sums(queries, s, +1))
    rs1, rs2 = (torch.from_numpy(v) for v in _box_sums(refs, s, -1))
    k = 2 * s + 1
    d = torch.arange(k) - s
    count = torch.ones(k, k, k, dtype=torch.float64)
    for ax in range(3):
        shape = [1, 1, 1]
        shape[ax] = k
        count = count * (n[ax] - d.abs()).double().reshape(shape)
    mq, mr = qs1 / count, rs1 / count
    cov = num - count * mq[:, None] * mr[None, :]
    vq = (qs2 - count * mq ** 2).clamp_min(0)
    vr = (rs2 - count * mr ** 2).clamp_min(0)
    ncc = cov / (torch.sqrt(vq[:, None] * vr[None, :]) + 1e-12)
    flat = ncc.reshape(ncc.shape[0], ncc.shape[1], -1)
    best, idx = flat.max(dim=2)
    a, b, c = np.unravel_index(idx.numpy(), (k, k, k))
    arg = np.stack([a - s, b - s, c - s], axis=-1)
    return best.numpy(), arg


def _half_shifts(x: np.ndarray) -> np.ndarray:
    """The 27 copies of ``x`` moved by -0.5, 0 or +0.5 voxels along each axis (linear interpolation),
    stacked along a new first axis."""
    out = np.asarray(x, dtype=np.float32)[None]
    for ax in range(1, 4):
        n = out.shape[ax]
        lo = np.take(out, np.clip(np.arange(n) - 1, 0, n - 1), axis=ax)
        hi = np.take(out, np.clip(np.arange(n) + 1, 0, n - 1), axis=ax)
        # value at i - 0.5 / i + 0.5: the mean of voxel i and its neighbour (edge voxel repeated)
        out = np.concatenate([0.5 * (out + lo), out, 0.5 * (out + hi)], axis=0)
    return out


def _refine(query: np.ndarray, ref: np.ndarray, shift: np.ndarray) -> float:
    """Max NCC over half-voxel offsets around the integer ``shift`` (query[x + shift + h] vs ref[x])."""
    n = query.shape
    m = int(np.max(np.abs(shift))) + 1
    if any(size - 2 * m < 4 for size in n):
        return -1.0
    core = tuple(slice(m, size - m) for size in n)
    moved = (slice(None),) + tuple(slice(m + int(d), size - m + int(d)) for d, size in zip(shift, n))
    b = ref[core].ravel().astype(np.float64)
    b = b - b.mean()
    b /= np.linalg.norm(b) + 1e-12
    a = _half_shifts(query)[moved].reshape(27, -1).astype(np.float64)
    a -= a.mean(axis=1, keepdims=True)
    a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-12
    return float(np.max(a @ b))


def image_distances(queries: np.ndarray, refs: np.ndarray, cfg: PrivacyConfig, refine_top: int = 2) -> np.ndarray:
    """1 - NCC of prepared volumes (see :func:`prepare_volume`), shift-tolerant, shape (n_q, n_r).

    The ``refine_top`` nearest references of each query are refined with half-voxel shifts
    (a copy resampled with a sub-voxel offset is then still recognised).
    """
    ncc, arg = shift_ncc(queries, refs, cfg.max_shift)
    for i in range(ncc.shape[0]):
        for j in np.argsort(-ncc[i])[:refine_top]:
            ncc[i, j] = max(ncc[i, j], _refine(queries[i], refs[j], arg[i, j].astype(np.float64)))
    return np.clip(1.0 - ncc, 0.0, 2.0)


def feature_distances(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Euclidean distances between standardised feature vectors, shape (n_q, n_r)."""
    q = np.asarray(queries, dtype=np.float64)
    r = np.asarray(refs, dtype=np.float64)
    d2 = (q ** 2).sum(1)[:, None] + (r ** 2).sum(1)[None, :] - 2.0 * q @ r.T
    return np.sqrt(np.maximum(d2, 0.0))


# ---------------------------------------------------------------------------------------------
# calibration and the screen
# ---------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """Thresholds and the held-out nearest-neighbour distances they come from."""

    mode: str                      # "holdout_manifest" or "internal_split"
    n_train: int
    n_heldout: int
    quantile: float
    scale: float
    heldout_image: list[float]
    heldout_feature: list[float]
    image_threshold: float
    feature_threshold: Optional[float]

    def to_dict(self) -> dict[str, Any]:
        note = ("held-out cases come from the --holdout manifest (real cases the model did not train on)"
                if self.mode == "holdout_manifest" else
                "no hold-out manifest: a deterministic fraction of the reference cases was held out; "
                "the generator was trained on them too, so the calibration measures distances between "
                "distinct real patients only")
        return {"mode": self.mode, "note": note, "n_train": self.n_train, "n_heldout": self.n_heldout,
                "quantile": self.quantile, "threshold_scale": self.scale,
                "image_distance": "1 - NCC (band-passed, downsampled, shift-tolerant)",
                "feature_distance": "Euclidean, standardised radiomics features",
                "heldout_nn_image_distance": [round(x, 6) for x in self.heldout_image],
                "heldout_nn_feature_distance": [round(x, 6) for x in self.heldout_feature],
                "image_threshold": round(self.image_threshold, 6),
                "feature_threshold": None if self.feature_threshold is None else round(self.feature_threshold, 6)}


@dataclass
class ScreenResult:
    """The memorisation verdict of one sample."""

    flagged: bool
    nearest_image_case: str
    image_distance: float
    nearest_feature_case: Optional[str] = None
    feature_distance: Optional[float] = None
    reason: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"flagged": self.flagged, "nearest_training_case_image": self.nearest_image_case,
                "image_distance": round(self.image_distance, 6),
                "nearest_training_case_feature": self.nearest_feature_case,
                "feature_distance": None if self.feature_distance is None else round(self.feature_distance, 6),
                "feature_below_threshold": bool(self.extra.get("feature_below_threshold", False)),
                "reason": self.reason}


def calibrated_threshold(distances: Sequence[float] | np.ndarray, cfg: PrivacyConfig) -> float:
    """``privacy.threshold_scale`` x the ``privacy.memorisation_quantile`` quantile of the held-out
    nearest-neighbour ``distances`` (the whole-volume and the lesion screens share this rule)."""
    return float(cfg.threshold_scale * np.quantile(np.asarray(distances), cfg.memorisation_quantile))


class MemorisationScreen:
    """Calibrated nearest-training-case screen (see the module docstring).

    Args:
        train_ids: ids of the cases the model trained on (manifest ids, never patient data).
        train_images: prepared volumes (:func:`prepare_volume`) of those cases, shape (n, X, Y, Z).
        train_features: standardised feature vectors of those cases, or None to use images only.
        heldout_images / heldout_features: the held-out real cases, same preparation.
        calibration_train: indices into the training cases that the held-out cases are compared
            with (all of them with a hold-out manifest; the rest of the split otherwise).
        mode: "holdout_manifest" or "internal_split" (reported).
    """

    def __init__(self, train_ids: Sequence[str], train_images: np.ndarray, train_features: Optional[np.ndarray],
                 heldout_images: np.ndarray, heldout_features: Optional[np.ndarray], cfg: PrivacyConfig,
                 calibration_train: Optional[Sequence[int]] = None, mode: str = "holdout_manifest"):
        if len(train_ids) < 1 or len(heldout_images) < 1:
            raise PrivacyError("the memorisation screen needs at least one training and one held-out case",
                               hint="give a reference manifest with >= 3 cases, or a `holdout` manifest")
        self.cfg = cfg
        self.ids = list(train_ids)
        self.images = np.asarray(train_images, dtype=np.float32)
        self.use_features = cfg.use_features and train_features is not None and heldout_features is not None
        self.features = np.asarray(train_features) if self.use_features else None
        idx = list(range(len(self.ids))) if calibration_train is None else list(calibration_train)
        d_img = image_distances(np.asarray(heldout_images, dtype=np.float32), self.images[idx], cfg).min(1)
        if self.use_features:
            d_feat = feature_distances(np.asarray(heldout_features), self.features[idx]).min(1)
            feat_thr: Optional[float] = calibrated_threshold(d_feat, cfg)
        else:
            d_feat, feat_thr = np.array([]), None
        self.calibration = Calibration(mode, len(idx), len(heldout_images), cfg.memorisation_quantile,
                                       cfg.threshold_scale, d_img.tolist(), d_feat.tolist(),
                                       calibrated_threshold(d_img, cfg), feat_thr)
        log.info("memorisation thresholds: image %.4g, feature %s (from %d held-out cases)",
                 self.calibration.image_threshold, feat_thr, len(heldout_images))

    def screen(self, images: np.ndarray, features: Optional[np.ndarray] = None) -> list[ScreenResult]:
        """Screen prepared sample volumes (and their standardised features); one result per sample."""
        if len(images) == 0:
            return []
        d_img = image_distances(np.asarray(images, dtype=np.float32), self.images, self.cfg)
        d_feat = feature_distances(features, self.features) if (self.use_features and features is not None) else None
        cal = self.calibration
        out = []
        for i in range(len(images)):
            j = int(np.argmin(d_img[i]))
            r = ScreenResult(False, self.ids[j], float(d_img[i, j]))
            image_hit = r.image_distance < cal.image_threshold
            feature_hit = False
            if d_feat is not None:
                jf = int(np.argmin(d_feat[i]))
                r.nearest_feature_case, r.feature_distance = self.ids[jf], float(d_feat[i, jf])
                feature_hit = cal.feature_threshold is not None and r.feature_distance < cal.feature_threshold
            r.extra["feature_below_threshold"] = feature_hit
            if image_hit or (feature_hit and self.cfg.rule == "image_or_feature"):
                r.flagged = True
                why = []
                if image_hit:
                    why.append(f"image distance 1-NCC {r.image_distance:.4g} < threshold {cal.image_threshold:.4g}")
                if feature_hit:
                    why.append(f"feature distance {r.feature_distance:.4g} < threshold {cal.feature_threshold:.4g}"
                               + (f" (nearest by features: {r.nearest_feature_case})"
                                  if r.nearest_feature_case != r.nearest_image_case else ""))
                case = r.nearest_image_case if image_hit else r.nearest_feature_case
                r.reason = f"possible_copy (nearest training case {case}: {'; '.join(why)})"
            out.append(r)
        return out


def holdout_split(ids: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, held-out) index split by a hash of (seed, id): stable under reordering.

    At least one case is held out and at least one kept; needs >= 2 ids.
    """
    import hashlib

    if len(ids) < 2:
        raise PrivacyError("the memorisation screen needs at least 2 reference cases to hold one out",
                           hint="give more reference cases or a `holdout` manifest")
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode()).hexdigest())
    n_hold = min(max(1, math.floor(fraction * len(ids) + 0.5)), len(ids) - 1)
    return sorted(order[n_hold:]), sorted(order[:n_hold])
