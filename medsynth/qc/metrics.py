"""Dataset-level metrics of a set of synthetic volumes against the reference (real) cases.

Each figure is named for what it is, with the feature space in its name:

* ``ms_ssim_mean_synthetic`` / ``ms_ssim_mean_real``: mean pairwise MS-SSIM (``monai.metrics``)
  among samples and among real cases.  Lower = more diverse; a generator that collapses to a few
  outputs has a synthetic mean well above the real one.
* ``mmd2_rbf_<space>``: unbiased squared maximum mean discrepancy, RBF kernel with the median
  heuristic bandwidth, between real and synthetic standardised feature vectors.
* ``frechet_distance_<space>``: Fréchet distance between Gaussians fitted to real and synthetic
  standardised features (a small ridge keeps the covariances invertible when n < dims).  It is
  *not* FID: there is no Inception network.
* ``precision_k<k>_<space>`` / ``recall_k<k>_<space>`` (Kynkäänniemi et al. 2019) and
  ``density_k<k>_<space>`` / ``coverage_k<k>_<space>`` (Naeem et al. 2020), k-NN manifolds.

``<space>`` is ``radiomics`` (the built-in features) or the network name of a local checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

log = logging.getLogger("medsynth.qc.metrics")

# Wang et al. 2003 scale weights (MONAI's default); fewer scales use the first ones, renormalised.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@dataclass(frozen=True)
class MSSSIMSettings:
    """Kernel size, sigma and scale weights of MS-SSIM that fit a volume shape."""

    kernel_size: int
    kernel_sigma: float
    weights: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size, "kernel_sigma": self.kernel_sigma,
                "scales": len(self.weights), "weights": [round(w, 4) for w in self.weights]}


def msssim_settings(shape: Sequence[int]) -> Optional[MSSSIMSettings]:
    """The most scales (<= 5) and largest kernel (11, 9, 7 or 5) that MS-SSIM can use on ``shape``.

    ``monai.metrics.compute_ms_ssim`` rejects inputs unless, for every axis,
    ``size // (n_scales - 1) ** 2 > kernel_size - 1``; separately, the Gaussian window is applied
    without padding, so the coarsest scale (``size / 2 ** (n_scales - 1)``) must still hold a
    whole kernel.  Both rules are checked.  The default 5 scales with an 11-voxel kernel need
    more than 160 voxels per axis; a 32^3 volume gets 3 scales with a 7-voxel kernel, a 64^3
    volume 4 scales with 7.  Returns None when not even 2 scales with a 5-voxel kernel fit.
    """
    smallest = min(int(s) for s in shape)
    for n in (5, 4, 3, 2):
        div = max(1, n - 1) ** 2
        for k in (11, 9, 7, 5):
            if smallest // div > k - 1 and smallest // 2 ** (n - 1) >= k:
                w = np.array(MS_SSIM_WEIGHTS[:n])
                w = w / w.sum()
                return MSSSIMSettings(k, 1.5 if k >= 7 else 1.0, tuple(float(x) for x in w))
    return None


def _pairs(n: int, max_pairs: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    allp = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if len(allp) <= max_pairs:
        return allp
    pick = rng.choice(len(allp), size=max_pairs, replace=False)
    return [allp[i] for i in sorted(pick)]


def mean_pairwise_msssim(volumes: np.ndarray, settings: MSSSIMSettings, max_pairs: int,
                         rng: np.random.Generator, batch: int = 8) -> tuple[Optional[float], int]:
    """Mean MS-SSIM over pairs of ``volumes`` (n, X, Y, Z) scaled to [0, 1]; (mean, number of pairs).

    Uses ``monai.metrics.MultiScaleSSIMMetric`` with ``data_range=1``; at most ``max_pairs``
    pairs, drawn with ``rng`` when there are more.  None when fewer than 2 volumes.
    """
    import torch
    from monai.metrics import MultiScaleSSIMMetric

    if len(volumes) < 2:
        return None, 0
    pairs = _pairs(len(volumes), max_pairs, rng)
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=settings.kernel_size,
                                  kernel_sigma=settings.kernel_sigma, weights=settings.weights,
                                  reduction="none")
    vals = []
    t = torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32))[:, None]
    with torch.no_grad():
        for s in range(0, len(pairs), batch):
            chunk = pairs[s:s + batch]
            a = t[[i for i, _ in chunk]]
            b = t[[j for _, j in chunk]]
            vals.append(metric(a, b).reshape(-1).cpu().numpy())
    v = np.concatenate(vals)
    return float(np.mean(v)), len(pairs)


def _sqdist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum((x ** 2).sum(1)[:, None] + (y ** 2).sum(1)[None, :] - 2.0 * x @ y.T, 0.0)


def mmd2_rbf(real: np.ndarray, fake: np.ndarray) -> Optional[float]:
    """Unbiased MMD^2 with an RBF kernel whose bandwidth is the median pooled pairwise distance.

    k(a, b) = exp(-|a - b|^2 / median(|.|^2)).  None when either set has fewer than 2 vectors.
    """
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(x) < 2 or len(y) < 2:
        return None
    z = np.concatenate([x, y])
    d = _sqdist(z, z)
    off = d[~np.eye(len(z), dtype=bool)]
    med = float(np.median(off[off > 0])) if np.any(off > 0) else 1.0
    k = np.exp(-d / med)
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2.0 * kxy.mean())


def frechet_distance(real: np.ndarray, fake: np.ndarray, ridge: float = 1e-3) -> Optional[float]:
    """Fréchet distance |mu_r - mu_f|^2 + tr(C_r + C_f - 2 (C_r C_f)^(1/2)) of fitted Gaussians.

    ``ridge`` x I is added to both covariances (features are standardised, so 1e-3 is small)
    because with fewer vectors than dimensions the covariances are singular.  Uses
    ``scipy.linalg.sqrtm``; None when either set has fewer than 2 vectors.
    """
    from scipy import linalg

    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(x) < 2 or len(y) < 2:
        return None
    mu1, mu2 = x.mean(0), y.mean(0)
    eye = np.eye(x.shape[1]) * ridge
    c1, c2 = np.cov(x, rowvar=False) + eye, np.cov(y, rowvar=False) + eye
    covmean = linalg.sqrtm(c1 @ c2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(max(0.0, ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(covmean)))


def prdc(real: np.ndarray, fake: np.ndarray, k: int) -> Optional[dict[str, float]]:
    """Precision, recall (k-NN manifolds) and density, coverage (Naeem et al. 2020).

    The radius of a vector is the distance to its k-th nearest neighbour in its own set.
    precision: fraction of fake vectors inside some real ball; recall: fraction of real vectors
    inside some fake ball; density: mean number of real balls holding a fake vector, over k;
    coverage: fraction of real balls holding a fake vector.  ``k`` is clipped to n - 1 of the
    smaller set; None when that leaves k < 1.
    """
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    k = min(int(k), len(x) - 1, len(y) - 1)
    if k < 1:
        return None
    dxx, dyy, dxy = np.sqrt(_sqdist(x, x)), np.sqrt(_sqdist(y, y)), np.sqrt(_sqdist(x, y))
    rx = np.sort(dxx, axis=1)[:, k]          # column 0 is the point itself
    ry = np.sort(dyy, axis=1)[:, k]
    inside_real = dxy <= rx[:, None]         # (n_real, n_fake): fake j inside real ball i
    return {"k": k,
            "precision": float(inside_real.any(axis=0).mean()),
            "recall": float((dxy <= ry[None, :]).any(axis=1).mean()),
            "density": float(inside_real.sum(axis=0).mean() / k),
            "coverage": float((dxy.min(axis=1) <= rx).mean())}


def dataset_metrics(real_feats: np.ndarray, fake_feats: np.ndarray, space: str, k: int,
                    real_volumes: Optional[np.ndarray] = None, fake_volumes: Optional[np.ndarray] = None,
                    max_pairs: int = 200, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Every dataset figure as ``{name: {"value", "description", ...}}`` (see the module docstring).

    ``real_feats``/``fake_feats`` are standardised feature vectors; ``*_volumes`` are volumes
    scaled to [0, 1] on one grid, for MS-SSIM.  Figures that cannot be computed (too few volumes)
    have value None and say why.
    """
    out: dict[str, dict[str, Any]] = {}
    n_r, n_f = len(real_feats), len(fake_feats)
    if real_volumes is not None and fake_volumes is not None:
        st = msssim_settings(real_volumes.shape[1:])
        if st is None:
            why = f"volume {list(real_volumes.shape[1:])} too small for MS-SSIM (needs >= 10 voxels per axis)"
            out["ms_ssim_mean_synthetic"] = {"value": None, "description": why}
            out["ms_ssim_mean_real"] = {"value": None, "description": why}
        else:
            for name, vols, who in (("ms_ssim_mean_synthetic", fake_volumes, "synthetic samples"),
                                    ("ms_ssim_mean_real", real_volumes, "real reference cases")):
                v, npairs = mean_pairwise_msssim(vols, st, max_pairs, np.random.default_rng(seed))
                out[name] = {"value": v, "pairs": npairs, "settings": st.to_dict(),
                             "description": f"mean pairwise MS-SSIM among {who} (monai.metrics."
                                            f"MultiScaleSSIMMetric); lower = more diverse"}
    mmd = mmd2_rbf(real_feats, fake_feats)
    out[f"mmd2_rbf_{space}"] = {"value": mmd, "n_real": n_r, "n_synthetic": n_f,
                                "description": f"unbiased squared MMD, RBF kernel (median-heuristic bandwidth), "
                                               f"standardised {space} features; 0 = same distribution"}
    fd = frechet_distance(real_feats, fake_feats)
    out[f"frechet_distance_{space}"] = {"value": fd, "n_real": n_r, "n_synthetic": n_f,
                                        "description": f"Fréchet distance of Gaussians fitted to standardised "
                                                       f"{space} features (not FID: no Inception network); "
                                                       f"ridge 1e-3"}
    pr = prdc(real_feats, fake_feats, k)
    kk = pr["k"] if pr else min(k, max(n_r, n_f))
    texts = {"precision": "fraction of samples inside the real k-NN manifold (fidelity)",
             "recall": "fraction of real cases inside the synthetic k-NN manifold (diversity)",
             "density": "Naeem et al. 2020 density (fidelity; ~1 when distributions match)",
             "coverage": "Naeem et al. 2020 coverage: fraction of real cases with a sample nearby"}
    for key, text in texts.items():
        out[f"{key}_k{kk}_{space}"] = {"value": pr[key] if pr else None, "k": kk,
                                       "description": f"{text}; standardised {space} features"}
    return out
