"""Offline feature spaces for QC: a body mask and radiomics-style features, or a local 3D network.

Nothing here downloads weights.  The default feature space is a fixed vector of radiomics-style
features computed from the volume itself (first-order intensity statistics inside the body, tissue
fractions, shape moments of the body mask, gradient and grey-level co-occurrence texture).  A user
may instead point ``qc.feature_checkpoint`` at a local MedicalNet-style 3D ResNet checkpoint
(:class:`NetworkFeatures`); its global-average-pooled activations are then the feature space.

Features are computed on volumes that share one grid (the samples' grid; reference cases are
resampled onto it first), so their values are comparable between real and synthetic volumes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from medsynth.errors import QCError

log = logging.getLogger("medsynth.qc.features")

# CT tissue bands in HU (lower bound inclusive, upper exclusive) used for tissue fractions.
CT_BANDS = {"air": (-np.inf, -900.0), "lung": (-900.0, -500.0), "fat": (-200.0, -30.0),
            "soft": (-30.0, 150.0), "bone": (200.0, np.inf)}
# MR has no absolute units: bands relative to the median inside the body.
MR_BANDS = {"dark": (-np.inf, 0.25), "low": (0.25, 0.75), "mid": (0.75, 1.25),
            "high": (1.25, 2.0), "bright": (2.0, np.inf)}
GLCM_LEVELS = 16

FEATURE_NAMES: tuple[str, ...] = (
    # first order, inside the body
    "int_mean", "int_std", "int_p01", "int_p05", "int_p25", "int_p50", "int_p75", "int_p95",
    "int_p99", "int_skewness", "int_kurtosis", "int_entropy",
    # tissue fractions of the body volume (CT: HU bands; MR: bands relative to the body median)
    "frac_band0", "frac_band1", "frac_band2", "frac_band3", "frac_band4",
    # shape of the body mask
    "body_fraction", "body_volume_ml", "extent_r_mm", "extent_a_mm", "extent_s_mm",
    "axis_major_mm", "axis_mid_mm", "axis_minor_mm", "surface_to_volume",
    # texture
    "grad_mean", "grad_p50", "grad_p90", "laplacian_abs_mean",
    "glcm_contrast", "glcm_homogeneity", "glcm_energy", "glcm_correlation",
)


def si_axis(affine: np.ndarray) -> int:
    """The voxel axis (0, 1 or 2) that points closest to superior-inferior."""
    d = np.abs(np.asarray(affine)[:3, :3])
    d = d / np.linalg.norm(d, axis=0, keepdims=True)
    return int(np.argmax(d[2]))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (used for MR, which has no absolute air level)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0 or v.min() == v.max():
        return float(v.min()) if v.size else 0.0
    hist, edges = np.histogram(v, bins=bins)
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def body_mask(array: np.ndarray, affine: np.ndarray, modality: str,
              threshold_hu: float = -500.0) -> np.ndarray:
    """The patient's body: threshold, largest connected component, holes filled slice by slice.

    The largest component is found after a one-voxel opening (so noise specks in the air do not
    count) and then taken whole from the unopened threshold, thin walls included.

    CT uses a fixed HU threshold (air is -1000 HU, every tissue is above -500 HU except lung,
    which lies inside the body and is recovered by filling holes in each axial slice).  MR uses
    Otsu's threshold.  Returns a boolean array; empty when nothing exceeds the threshold.
    """
    arr = np.nan_to_num(np.asarray(array, dtype=np.float32), nan=-np.inf)
    thr = threshold_hu if modality == "CT" else otsu_threshold(arr[np.isfinite(arr)])
    fg = arr > thr
    if not fg.any():
        return fg
    # the opening only finds the body (noise specks fall away); the mask is then the body's whole
    # connected region of the unopened foreground, so a body wall one voxel thick (fat beside a lung
    # on a coarse grid) is kept and the lung inside it is filled below, instead of leaking out
    opened = ndimage.binary_opening(fg, iterations=1) if fg.sum() > 64 else fg
    lab, n = ndimage.label(opened)
    if n == 0:
        return opened
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    core = lab == int(np.argmax(sizes))
    full, _ = ndimage.label(fg)
    mask = full == int(np.bincount(full[core]).argmax())
    ax = si_axis(affine)
    mask = np.moveaxis(mask, ax, 0).copy()
    for k in range(mask.shape[0]):
        if mask[k].any():
            mask[k] = ndimage.binary_fill_holes(mask[k])
    return np.moveaxis(mask, 0, ax)


def _bands(modality: str) -> list[tuple[float, float]]:
    return list((CT_BANDS if modality == "CT" else MR_BANDS).values())


def radiomics_features(array: np.ndarray, affine: np.ndarray, modality: str,
                       mask: Optional[np.ndarray] = None,
                       intensity_range: Optional[tuple[float, float]] = None,
                       threshold_hu: float = -500.0) -> dict[str, float]:
    """Radiomics-style features of one volume, in the order of :data:`FEATURE_NAMES`.

    ``intensity_range`` fixes the grey-level quantisation of the co-occurrence texture (CT: a HU
    window shared by every volume so values are comparable; default: the body's p1..p99, which is
    what MR needs).  Features that need a body are NaN when the mask is empty.
    """
    arr = np.asarray(array, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if mask is None:
        mask = body_mask(arr, affine, modality, threshold_hu)
    out = {n: float("nan") for n in FEATURE_NAMES}
    n_body = int(mask.sum())
    out["body_fraction"] = n_body / mask.size
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out["body_volume_ml"] = n_body * voxel_ml
    if n_body < 8:
        return out
    v = arr[mask]
    pct = np.percentile(v, [1, 5, 25, 50, 75, 95, 99])
    mean, std = float(v.mean()), float(v.std())
    out.update(int_mean=mean, int_std=std, int_p01=pct[0], int_p05=pct[1], int_p25=pct[2],
               int_p50=pct[3], int_p75=pct[4], int_p95=pct[5], int_p99=pct[6])
    z = (v - mean) / (std + 1e-9)
    out["int_skewness"] = float(np.mean(z ** 3))
    out["int_kurtosis"] = float(np.mean(z ** 4) - 3.0)
    lo, hi = intensity_range if intensity_range is not None else (pct[0], pct[6])
    if hi <= lo:
        hi = lo + 1.0
    hist, _ = np.histogram(np.clip(v, lo, hi), bins=64, range=(lo, hi))
    p = hist[hist > 0] / hist.sum()
    out["int_entropy"] = float(-(p * np.log2(p)).sum())

    ref = 1.0 if modality == "CT" else (abs(pct[3]) + 1e-9)
    for i, (a, b) in enumerate(_bands(modality)):
        out[f"frac_band{i}"] = float(np.mean((v / ref >= a) & (v / ref < b)))

    idx = np.argwhere(mask).astype(np.float64)
    world = idx @ affine[:3, :3].T
    ext = world.max(0) - world.min(0)
    vox_extent = np.abs(affine[:3, :3]).max(axis=1)  # add one voxel: extents are edge to edge
    out["extent_r_mm"], out["extent_a_mm"], out["extent_s_mm"] = (ext + vox_extent).tolist()
    ev = np.sort(np.linalg.eigvalsh(np.cov(world.T)))[::-1]
    out["axis_major_mm"], out["axis_mid_mm"], out["axis_minor_mm"] = (4.0 * np.sqrt(np.maximum(ev, 0))).tolist()
    area = 0.0
    for ax in range(3):
        faces = np.count_nonzero(np.diff(mask.astype(np.int8), axis=ax))
        faces += int(np.take(mask, 0, axis=ax).sum() + np.take(mask, -1, axis=ax).sum())
        area += faces * float(np.prod(np.delete(spacing, ax)))
    out["surface_to_volume"] = area / (n_body * float(np.prod(spacing)))

    grads = np.gradient(arr, *spacing)
    gmag = np.sqrt(sum(g ** 2 for g in grads))[mask]
    out["grad_mean"] = float(gmag.mean())
    out["grad_p50"], out["grad_p90"] = (float(x) for x in np.percentile(gmag, [50, 90]))
    lap = ndimage.laplace(arr)[mask]
    out["laplacian_abs_mean"] = float(np.abs(lap).mean())
    out.update(_glcm(arr, mask, lo, hi))
    return out


def _glcm(arr: np.ndarray, mask: np.ndarray, lo: float, hi: float) -> dict[str, float]:
    """Grey-level co-occurrence statistics, offsets of one voxel along each axis, symmetric, averaged."""
    L = GLCM_LEVELS
    q = np.clip(((arr - lo) / (hi - lo) * L).astype(np.int64), 0, L - 1)
    glcm = np.zeros((L, L), dtype=np.float64)
    for ax in range(3):
        n = arr.shape[ax]
        a = np.take(q, range(n - 1), axis=ax)
        b = np.take(q, range(1, n), axis=ax)
        m = np.take(mask, range(n - 1), axis=ax) & np.take(mask, range(1, n), axis=ax)
        pairs = a[m] * L + b[m]
        glcm += np.bincount(pairs, minlength=L * L).reshape(L, L)
    glcm = glcm + glcm.T
    total = glcm.sum()
    if total == 0:
        return {"glcm_contrast": float("nan"), "glcm_homogeneity": float("nan"),
                "glcm_energy": float("nan"), "glcm_correlation": float("nan")}
    P = glcm / total
    i, j = np.indices((L, L))
    mu = float((i * P).sum())
    var = float(((i - mu) ** 2 * P).sum())
    return {
        "glcm_contrast": float(((i - j) ** 2 * P).sum()),
        "glcm_homogeneity": float((P / (1.0 + np.abs(i - j))).sum()),
        "glcm_energy": float((P ** 2).sum()),
        "glcm_correlation": float(((i - mu) * (j - mu) * P).sum() / var) if var > 1e-12 else 1.0,
    }


def feature_vector(feats: dict[str, float]) -> np.ndarray:
    """The features of :func:`radiomics_features` as a vector in :data:`FEATURE_NAMES` order."""
    return np.array([feats[n] for n in FEATURE_NAMES], dtype=np.float64)


class Standardiser:
    """Z-scores features with the reference's mean and standard deviation (NaN-safe).

    Features that are constant over the reference get a unit scale so they neither explode nor
    vanish; NaN entries (no body) become 0 after standardisation, i.e. the reference mean.
    """

    def __init__(self, reference: np.ndarray):
        ref = np.asarray(reference, dtype=np.float64)
        self.mean = np.nanmean(ref, axis=0)
        std = np.nanstd(ref, axis=0)
        scale = np.nanmean(np.abs(ref), axis=0)
        # a feature constant over the reference: scale by 1% of its magnitude (or 1)
        self.std = np.where(std > 1e-9, std, np.where(scale > 1e-9, 0.01 * scale, 1.0))
        self.mean = np.nan_to_num(self.mean)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.std
        return np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)


class NetworkFeatures:
    """Features from a local MedicalNet-style 3D ResNet checkpoint (MONAI ``resnet10``...``resnet50``).

    The checkpoint is a ``torch.save`` file of a state dict, optionally wrapped as
    ``{"state_dict": ...}`` with ``module.`` prefixes (the MedicalNet release format).  The network
    is built with ``feed_forward=False``, so its output is the global-average-pooled last stage.
    Volumes are z-scored inside the body before the forward pass, as MedicalNet was trained.
    Nothing is downloaded: a missing or incompatible file raises :class:`QCError`.
    """

    def __init__(self, checkpoint: str | Path, network: str = "resnet10", device: str = "cpu"):
        import torch
        from monai.networks.nets import resnet
        from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

        path = Path(checkpoint)
        if not path.is_file():
            raise QCError(f"qc.feature_checkpoint: {path} not found",
                          hint="point it at a local MedicalNet-style .pth file, or set it to null to use "
                               "the built-in radiomics features")
        depth = int(network.replace("resnet", ""))
        bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
        net = getattr(resnet, network)(spatial_dims=3, n_input_channels=1, feed_forward=False,
                                       shortcut_type=shortcut, bias_downsample=bias_downsample)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
            sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
            sd = {k.replace("module.", "", 1) if k.startswith("module.") else k: v for k, v in sd.items()}
            net.load_state_dict(sd, strict=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a wrong or corrupt file
            raise QCError(f"qc.feature_checkpoint: {path} is not a {network} checkpoint "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                          hint="set qc.feature_network to the checkpoint's architecture "
                               "(resnet10/18/34/50)") from None
        self.net = net.eval().to(device)
        self.device = device
        self.name = f"{network}:{path.name}"

    def __call__(self, arrays: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        feats = []
        with torch.no_grad():
            for arr, m in zip(arrays, masks):
                a = np.asarray(arr, dtype=np.float32)
                sel = a[m] if m.any() else a.ravel()
                a = (a - sel.mean()) / (sel.std() + 1e-6)
                x = torch.from_numpy(a)[None, None].to(self.device)
                feats.append(self.net(x).reshape(-1).cpu().numpy().astype(np.float64))
        return np.stack(feats)
