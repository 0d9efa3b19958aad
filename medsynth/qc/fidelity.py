"""A small fidelity figure for CT: how close synthetic volumes are to real ones, in HU.

Per volume: the body (voxels > -500 HU, holes filled slice by slice so the lungs count as body),
the lungs (-950..-700 HU inside the body), mean and std HU of body tissue and of the lungs, the
body fraction of the field of view, the lung fraction of the body, and the mean gradient magnitude
inside the body (HU/mm).  Per set: the means of those figures and a Fréchet distance between the
two sets' feature vectors (a 16-bin HU histogram inside the body, the two fractions, the gradient
statistic in 100 HU/mm) — the same construction as FID, on features that need no network.

Used by ``medsynth demo`` to compare a trained and an untrained model against the real phantoms.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import linalg, ndimage

from medsynth.volume import Volume

BODY_HU = -500.0
LUNG_HU = (-950.0, -700.0)
HIST_EDGES = np.linspace(-1000.0, 1000.0, 17)
STAT_KEYS = ("body_mean", "body_std", "lung_mean", "lung_std", "body_fraction", "lung_fraction", "gradient")


def _axial_axis(vol: Volume) -> int:
    o = vol.orientation
    return next(i for i, c in enumerate(o) if c in "SI")


def body_mask(vol: Volume) -> np.ndarray:
    """Voxels above -500 HU, largest connected component, holes filled in every axial slice."""
    m = np.asarray(vol.array, dtype=np.float32) > BODY_HU
    lab, n = ndimage.label(m)
    if n > 1:
        sizes = ndimage.sum_labels(m, lab, index=np.arange(1, n + 1))
        m = lab == (1 + int(np.argmax(sizes)))
    ax = _axial_axis(vol)
    m = np.moveaxis(m, ax, 0).copy()
    for k in range(m.shape[0]):
        m[k] = ndimage.binary_fill_holes(m[k])
    return np.moveaxis(m, 0, ax)


def volume_stats(vol: Volume) -> dict[str, float]:
    """The per-volume figures (HU statistics, fractions, gradient) of one CT volume."""
    hu = np.asarray(vol.array, dtype=np.float64)
    body = body_mask(vol)
    tissue = body & (hu > BODY_HU)
    lung = body & (hu >= LUNG_HU[0]) & (hu <= LUNG_HU[1])
    grads = np.gradient(hu, *vol.spacing)
    gmag = np.sqrt(sum(g * g for g in grads))

    def ms(mask: np.ndarray) -> tuple[float, float]:
        return (float(hu[mask].mean()), float(hu[mask].std())) if mask.any() else (float("nan"), float("nan"))

    bm, bs = ms(tissue)
    lm, ls = ms(lung)
    return {"body_mean": bm, "body_std": bs, "lung_mean": lm, "lung_std": ls,
            "body_fraction": float(body.mean()), "lung_fraction": float(lung.sum() / max(body.sum(), 1)),
            "gradient": float(gmag[body].mean()) if body.any() else 0.0}


def feature_vector(vol: Volume, stats: dict[str, float] | None = None) -> np.ndarray:
    """Histogram of HU inside the body (fractions), body and lung fractions, gradient / 100."""
    stats = stats or volume_stats(vol)
    hu = np.clip(np.asarray(vol.array, dtype=np.float64), HIST_EDGES[0], HIST_EDGES[-1])
    body = body_mask(vol)
    vals = hu[body] if body.any() else hu.ravel()
    hist = np.histogram(vals, bins=HIST_EDGES)[0] / max(vals.size, 1)
    return np.concatenate([hist, [stats["body_fraction"], stats["lung_fraction"], stats["gradient"] / 100.0]])


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to rows of ``a`` and ``b`` (as in FID)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = np.atleast_2d(np.cov(a, rowvar=False)) + eps * np.eye(a.shape[1])
    s2 = np.atleast_2d(np.cov(b, rowvar=False)) + eps * np.eye(b.shape[1])
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * covmean))


def set_figures(vols: Sequence[Volume]) -> tuple[dict[str, float], np.ndarray]:
    """Mean per-volume figures of a set (NaNs ignored) and its feature matrix."""
    stats = [volume_stats(v) for v in vols]
    feats = np.stack([feature_vector(v, s) for v, s in zip(vols, stats)])
    means = {}
    for k in STAT_KEYS:
        vals = np.array([s[k] for s in stats], dtype=float)
        means[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return means, feats


def fidelity(real: Sequence[Volume], synthetic: dict[str, Sequence[Volume]]) -> dict[str, Any]:
    """Figures of the real set and of each named synthetic set, with each set's Fréchet distance
    to the real set.  ``real`` also gets a split-half
    distance (first half vs second half of the real set): the floor a perfect model would reach."""
    if len(real) < 4:
        raise ValueError("fidelity needs at least 4 real volumes")
    rmeans, rfeats = set_figures(real)
    half = len(real) // 2
    out: dict[str, Any] = {"real": {"n": len(real), **rmeans,
                                    "frechet": frechet_distance(rfeats[:half], rfeats[half:])}}
    for name, vols in synthetic.items():
        means, feats = set_figures(vols)
        out[name] = {"n": len(vols), **means, "frechet": frechet_distance(rfeats, feats)}
    return out


def format_table(fig: dict[str, Any]) -> str:
    """A compact text table of :func:`fidelity`'s result (one row per set)."""
    head = (f"{'set':<10} {'n':>3}  {'body HU':>15}  {'lung HU':>15}  {'body%':>6} {'lung%':>6} "
            f"{'grad':>6}  {'Frechet':>9}")
    rows = [head, "-" * len(head)]

    def f(x: float, fmt: str) -> str:
        return format(x, fmt) if np.isfinite(x) else "n/a"

    for name, r in fig.items():
        body = f"{f(r['body_mean'], '.0f')} ± {f(r['body_std'], '.0f')}"
        lung = f"{f(r['lung_mean'], '.0f')} ± {f(r['lung_std'], '.0f')}"
        fd = f(r["frechet"], ".4f") + ("*" if name == "real" else "")
        rows.append(f"{name:<10} {r['n']:>3}  {body:>15}  {lung:>15}  {100 * r['body_fraction']:>6.1f} "
                    f"{100 * r['lung_fraction']:>6.1f} {f(r['gradient'], '.1f'):>6}  {fd:>9}")
    rows.append("HU: mean ± std inside the body (> -500 HU) and the lungs (-950..-700 HU); body%: of the field "
                "of view; lung%: of the body; grad: HU/mm in the body; Frechet: feature distance to the real set "
                "(* for real: first half vs second half, the floor)")
    return "\n".join(rows)
