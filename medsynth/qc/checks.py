"""Per-volume quality checks: every check gives a verdict, a value, its limit, and a reason when it fails.

Checks, in order (a volume that fails an early check skips the checks that would be meaningless):

1. ``geometry_mismatch``   shape and affine equal to the configured sample grid;
2. ``non_finite_values``   no NaN or infinite voxel;
3. ``constant_volume``     standard deviation above ``qc.min_std``;
4. ``out_of_physical_range`` CT within ``qc.ct_range`` (-1024..3071 HU), MR within ``qc.mr_range`` if set;
5. ``no_body_found`` and ``<stat>_out_of_range``: body fraction, background fraction and the
   p1/p50/p99 intensities inside the body inside the ranges learned from the reference cases;
6. ``label_outside_body``  labelled voxels lie inside the body (when the sample has a label), and
   ``label_<v>_p50_out_of_range``: the median intensity inside each label value (e.g. lesion HU)
   lies in the range learned from the reference cases' label maps; ``class_label_missing`` and
   ``class_label_unexpected``: a sample of class c holds every label value that (nearly) every
   reference case of class c holds, and none that (nearly) none of them holds (a "lesion" sample
   without a lesion is a wrong label for the model trained on it);
7. ``artefact_suspected``  the artefact score (tiling seams, checkerboard) below ``qc.artefact_threshold``.

Reasons are strings ``code (details)``, e.g. ``body_fraction_out_of_range (0.05 not in [0.31, 0.52])``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from medsynth.config import QCConfig
from medsynth.qc.features import body_mask
from medsynth.volume import Volume

log = logging.getLogger("medsynth.qc.checks")

STATS = ("body_fraction", "background_fraction", "body_p01", "body_p50", "body_p99")
_FRACTION_STATS = ("body_fraction", "background_fraction")
# planes with less tissue than this fraction are not judged for seams (too few voxels)
_SEAM_MIN_PLANE_FRACTION = 0.05
_SEAM_FLOOR = 0.01
_SEAM_ERODE = 2
# ... in millimetres: the skin, fat and muscle layers under a flat body surface are about as thick
# whatever the grid (2 voxels at the demo's 10 mm); on a finer grid the interior is eroded by
# _SEAM_ERODE_MM / the smallest voxel size (4 voxels at 5 mm), never by fewer than _SEAM_ERODE voxels
_SEAM_ERODE_MM = 20.0
# the checkerboard detector demodulates over boxes of this (even) size
_CHECKER_BOX = 6
# a class's label rule is learned only from at least this many reference cases of the class
CLASS_LABEL_MIN_CASES = 8


@dataclass(frozen=True)
class Grid:
    """The sample grid every volume is judged on: shape and voxel-to-RAS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore

    @property
    def orientation(self) -> str:
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "spacing": [round(s, 6) for s in self.spacing],
                "orientation": self.orientation, "affine": np.round(self.affine, 6).tolist()}


@dataclass
class CheckResult:
    """The verdict of one volume: ``passed``, the failure ``reasons``, and the evidence."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    artefact: dict[str, Any] = field(default_factory=dict)

    def fail(self, code: str, detail: str, **evidence: Any) -> None:
        self.passed = False
        self.reasons.append(f"{code} ({detail})")
        self.checks[code] = {"passed": False, **evidence}

    def ok(self, name: str, **evidence: Any) -> None:
        self.checks.setdefault(name, {"passed": True, **evidence})


# ---------------------------------------------------------------------------------------------
# statistics and the ranges learned from the reference
# ---------------------------------------------------------------------------------------------


def background_level(modality: str, body_values: np.ndarray) -> float:
    """Intensity below which a voxel counts as background: air (-900 HU) for CT; for MR 10 % of
    the body median, since MR has no absolute units."""
    if modality == "CT":
        return -900.0
    return 0.1 * float(np.median(body_values)) if body_values.size else 0.0


def volume_stats(array: np.ndarray, mask: np.ndarray, modality: str,
                 label: Optional[np.ndarray] = None) -> dict[str, float]:
    """Body fraction, background fraction and p1/p50/p99 inside the body of one volume.

    The background fraction is the fraction of all voxels darker than :func:`background_level`
    (air outside the body and inside lungs for CT).  Percentiles are NaN when the body is empty.
    With a ``label`` map of the same shape, ``label_<v>_p50`` is the median intensity inside each
    label value v > 0 present (e.g. lesion HU).
    """
    arr = np.asarray(array, dtype=np.float64)
    body = arr[mask]
    out = {"body_fraction": float(mask.mean()),
           "background_fraction": float(np.mean(arr < background_level(modality, body)))}
    if body.size:
        p = np.percentile(body, [1, 50, 99])
        out.update(body_p01=float(p[0]), body_p50=float(p[1]), body_p99=float(p[2]))
    else:
        out.update(body_p01=float("nan"), body_p50=float("nan"), body_p99=float("nan"))
    if label is not None and np.shape(label) == arr.shape:
        out.update(label_stats(arr, label))
    return out


def label_stats(array: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """``label_<v>_p50``: the median intensity inside each label value v > 0 present in ``label``."""
    lab = np.rint(np.asarray(label)).astype(np.int64)
    return {f"label_{int(v)}_p50": float(np.median(array[lab == v])) for v in np.unique(lab) if v > 0}


@dataclass
class ReferenceRanges:
    """Allowed [lo, hi] per statistic: the reference min..max (after trimming, ``trimmed`` cases set
    aside at each end per statistic) widened by a margin on each side."""

    ranges: dict[str, tuple[float, float]]
    reference_min_max: dict[str, tuple[float, float]]
    n_cases: int
    trimmed: dict[str, int] = field(default_factory=dict)
    # per class: the label values its samples must hold ("required") and must not ("forbidden"),
    # with the number of reference cases of the class each value is in (learn_class_labels)
    class_labels: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"n_cases": self.n_cases,
                "allowed": {k: [float(a), float(b)] for k, (a, b) in self.ranges.items()},
                "reference_min_max": {k: [float(a), float(b)] for k, (a, b) in self.reference_min_max.items()},
                "trimmed_per_end": dict(self.trimmed),
                "class_labels": {str(c): dict(r) for c, r in sorted(self.class_labels.items())}}


def _label_values_of(stats: dict[str, float]) -> set[int]:
    """The label values > 0 a case holds: those with a ``label_<v>_p50`` statistic."""
    return {int(k.split("_")[1]) for k in stats if k.startswith("label_") and k.endswith("_p50")}


def learn_class_labels(stats: Sequence[dict[str, float]], classes: Sequence[Optional[int]], qc: QCConfig
                       ) -> dict[int, dict[str, Any]]:
    """Which label values the samples of each class must hold and must not, from the reference.

    For every class with at least :data:`CLASS_LABEL_MIN_CASES` reference cases that have a label
    map (a case without any ``label_<v>_p50`` statistic has none, and is not counted), a value held
    by all but ``floor(range_trim x n)`` of them is required, one held by at most that many is
    forbidden; a value in between (present in some cases of the class only) is neither.  On the
    demo's phantoms: class 1 requires the lung and the lesion, class 0 requires the lung and forbids
    the lesion.  Values are those of any reference case.
    """
    by_class: dict[int, list[set[int]]] = {}
    for s, c in zip(stats, classes):
        present = _label_values_of(s)
        if c is None or not present:
            continue
        by_class.setdefault(int(c), []).append(present)
    values = sorted(set().union(*[p for ps in by_class.values() for p in ps])) if by_class else []
    out: dict[int, dict[str, Any]] = {}
    for c, cases in sorted(by_class.items()):
        n = len(cases)
        if n < CLASS_LABEL_MIN_CASES:
            log.info("qc: class %d has %d labelled reference case(s), fewer than %d: its labels are not judged",
                     c, n, CLASS_LABEL_MIN_CASES)
            continue
        cut = int(np.floor(qc.range_trim * n + 1e-9))
        count = {v: sum(v in p for p in cases) for v in values}
        out[c] = {"cases": n, "required": [v for v in values if count[v] >= n - cut],
                  "forbidden": [v for v in values if count[v] <= cut], "cases_holding": count}
    return out


def learn_ranges(stats: Sequence[dict[str, float]], qc: QCConfig,
                 classes: Optional[Sequence[Optional[int]]] = None) -> ReferenceRanges:
    """Learn the allowed range of each statistic from reference cases (see :class:`QCConfig`).

    margin = max(``percentile_margin`` x span, floor); the floor is ``range_floor`` for fractions
    and ``range_floor`` x the median p1..p99 intensity span for intensities, so a reference whose
    cases happen to agree exactly does not reject every sample.  The span is min..max of the values
    left after setting aside ``floor(range_trim x n)`` at each end (none below 40 cases at the default
    0.025): in 128 phantoms of the demo grid two have body p99 ~350 HU (too few cortex voxels for the
    99th percentile to reach bone), and their min..max would allow samples without any bone.
    With ``classes`` (each case's class label, or None) the per-class label rules of
    :func:`learn_class_labels` are learned too.
    """
    label_keys = sorted({k for s in stats for k in s if k.startswith("label_")})
    table = {k: np.array([s[k] for s in stats if np.isfinite(s.get(k, np.nan))]) for k in (*STATS, *label_keys)}
    p01, p99 = table["body_p01"], table["body_p99"]
    int_span = float(np.median(p99) - np.median(p01)) if p01.size and p99.size else 1.0
    ranges, mm, trimmed = {}, {}, {}
    for k, v in table.items():
        if v.size == 0:
            continue
        cut = int(np.floor(qc.range_trim * v.size + 1e-9))
        v = np.sort(v)[cut: v.size - cut]
        lo, hi = float(v[0]), float(v[-1])
        floor = qc.range_floor * (1.0 if k in _FRACTION_STATS else max(int_span, 1e-6))
        m = max(qc.percentile_margin * (hi - lo), floor)
        a, b = lo - m, hi + m
        if k in _FRACTION_STATS:
            a, b = max(a, 0.0), min(b, 1.0)
        ranges[k], mm[k], trimmed[k] = (a, b), (lo, hi), cut
    rules = learn_class_labels(stats, classes, qc) if classes is not None else {}
    return ReferenceRanges(ranges, mm, len(stats), trimmed, rules)


# ---------------------------------------------------------------------------------------------
# artefact score
# ---------------------------------------------------------------------------------------------


def _ratio_score(r: float) -> float:
    """Map a ratio r >= 0 (1 = nothing special) to a score in [0, 1): (r - 1) / (r + 1), floored at 0."""
    return float(max(0.0, (r - 1.0) / (r + 1.0)))


def _seam_erosion(spacing: Optional[Sequence[float]]) -> int:
    """Voxels the body is eroded by before seams are judged (:data:`_SEAM_ERODE_MM` in the
    smallest voxel size of ``spacing``; :data:`_SEAM_ERODE` without one)."""
    if spacing is None or not len(spacing) or min(spacing) <= 0:
        return _SEAM_ERODE
    return max(_SEAM_ERODE, int(round(_SEAM_ERODE_MM / float(min(spacing)))))


def _interior(mask: np.ndarray, n: int) -> np.ndarray:
    """``mask`` eroded ``n`` times by the 6-connected cross (scipy's ``binary_erosion`` with
    ``iterations=n``, outside the array counting as background), in one pass at any ``n``: the
    voxels whose city-block distance to the background (or the array's edge) exceeds ``n``."""
    from scipy import ndimage

    padded = np.pad(mask.astype(bool), 1, constant_values=False)
    dist = ndimage.distance_transform_cdt(padded, metric="taxicab")[1:-1, 1:-1, 1:-1]
    return dist > n


def seam_score(array: np.ndarray, mask: np.ndarray, spacing: Optional[Sequence[float]] = None
               ) -> tuple[float, int, int]:
    """Tiling-seam score: the plane whose voxel-to-voxel jump stands out from the planes around it.

    For adjacent planes i, i+1 along each axis, take the voxels of the body interior (the body
    eroded by 20 mm of the voxel size ``spacing``, at least two voxels, so skin and fat layers
    under a flat body surface are not judged) on both sides, and split them into intensity terciles.  In each tercile,
    r = median |x[i+1] - x[i]| / (median over the jumps of planes i-2, i-1, i+1, i+2 of their
    medians + a floor of 1 % of the intensity span).  A seam of tiled decoding offsets a whole
    tile face, so every tissue of the plane jumps and the smallest r over the terciles is large;
    an anatomical wall parallel to the plane (lung wall) raises one tercile only, and noise or
    smooth anatomy raise none.  The score is (r - 1) / (r + 1) in [0, 1) for the largest such r.
    Returns (score, axis, plane index).
    """
    arr = np.asarray(array, dtype=np.float32)
    body = arr[mask]
    if body.size < 64:
        return 0.0, -1, -1
    p1, p99 = np.percentile(body, [1, 99])
    # a jump smaller than 1 % of the intensity span is invisible in any display window
    floor = max(_SEAM_FLOOR * float(p99 - p1), 1e-6)
    # skin, fat and muscle layers run parallel to a flat body surface: judge the interior only
    interior = _interior(mask, _seam_erosion(spacing))
    best = (0.0, -1, -1)
    for ax in range(3):
        n = arr.shape[ax]
        if n < 6:
            continue
        a = np.moveaxis(arr, ax, 0)
        m = np.moveaxis(interior, ax, 0)
        d = np.abs(np.diff(a, axis=0))                       # d[i] = |x[i+1] - x[i]|, i = 0..n-2
        inside = m[1:] & m[:-1]
        need = max(24, _SEAM_MIN_PLANE_FRACTION * inside[0].size)
        for i in range(2, n - 3):
            sel = inside[i]
            if sel.sum() < need:
                continue
            level = 0.5 * (a[i][sel] + a[i + 1][sel])
            tercile = np.searchsorted(np.percentile(level, [100 / 3, 200 / 3]), level, side="right")
            di = d[i][sel]
            around = [d[j][sel] for j in (i - 2, i - 1, i + 1, i + 2)]
            ratios = []
            for t in range(3):
                k = tercile == t
                if np.count_nonzero(k) < 0.1 * level.size:
                    continue
                base = float(np.median([np.median(x[k]) for x in around])) + floor
                ratios.append(float(np.median(di[k])) / base)
            s = _ratio_score(min(ratios)) if ratios else 0.0
            if s > best[0]:
                best = (s, ax, i)
    return best


def checkerboard_score(array: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """Checkerboard score: how much of the local variation is a voxel-to-voxel alternation.

    A period-2 pattern (the signature of strided transposed convolutions), e.g. (-1)^i or
    (-1)^(i+j+k), lives in the fine-detail residual r = x - Gaussian(x, 1 voxel) and survives
    demodulation: the local mean of r * pattern over a 6-voxel box stays at the pattern's
    amplitude, while noise and anatomy average out.  The coherence |mean(r * pattern)| / rms(r)
    over the box is in [0, 1] (about 0.1 for white noise); the score is its 75th percentile over
    the body (a decoder pattern covers the whole volume; thin periodic anatomy such as ribs covers
    a small part and does not count), maximised over the seven patterns.  Returns
    (score, pattern code: bit a set = alternates along axis a).
    """
    from scipy import ndimage

    arr = np.asarray(array, dtype=np.float64)
    if min(arr.shape) < 6 or not mask.any():
        return 0.0, -1
    body = arr[mask]
    p1, p99 = np.percentile(body, [1, 99])
    eps = max(1e-3 * float(p99 - p1), 1e-9)
    # the fine-detail residual: a Gaussian of sigma 1 voxel all but removes a period-2 pattern, so
    # the pattern stays in the residual while anatomy larger than a few voxels leaves it
    x = arr - ndimage.gaussian_filter(arr, 1.0, mode="nearest")
    box = _CHECKER_BOX
    rms = np.sqrt(np.maximum(ndimage.uniform_filter(x * x, size=box, mode="reflect"), 0.0)) + eps
    idx = np.indices(arr.shape, sparse=True)
    best = (0.0, -1)
    # every non-empty set of axes the pattern may alternate along: (-1)^i, (-1)^(i+j), ...
    for code in range(1, 8):
        parity = sum(idx[a] for a in range(3) if code >> a & 1) % 2
        demod = ndimage.uniform_filter(x * np.where(parity == 0, 1.0, -1.0), size=box, mode="reflect")
        score = float(np.percentile(np.minimum(np.abs(demod) / rms, 1.0)[mask], 75))
        if score > best[0]:
            best = (score, code)
    return best


def artefact_score(array: np.ndarray, mask: np.ndarray, spacing: Optional[Sequence[float]] = None
                   ) -> dict[str, Any]:
    """The artefact score of a volume: the larger of :func:`seam_score` (judged on the body interior
    for the voxel size ``spacing``, mm) and :func:`checkerboard_score`."""
    s, s_ax, s_at = seam_score(array, mask, spacing)
    c, c_ax = checkerboard_score(array, mask)
    kind = "tiling_seam" if s >= c else "checkerboard"
    return {"score": round(max(s, c), 4), "kind": kind, "seam": round(s, 4), "seam_axis": s_ax,
            "seam_plane": s_at, "checkerboard": round(c, 4),
            "checkerboard_axes": [a for a in range(3) if c_ax > 0 and c_ax >> a & 1]}


# ---------------------------------------------------------------------------------------------
# the checks of one volume
# ---------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


@dataclass
class _Judged:
    """One volume under judgement: the inputs of :func:`check_volume` and what the checks so far
    made of it (``arr`` becomes float64, then windowed; ``mask`` the body mask)."""

    vol: Volume
    grid: Grid
    qc: QCConfig
    ranges: Optional[ReferenceRanges]
    label: Optional[Volume]
    mask: Optional[np.ndarray]
    window: Optional[tuple[float, float]]
    arr: np.ndarray
    res: CheckResult
    class_label: Optional[int] = None


def _check_geometry(j: _Judged) -> bool:
    vol, grid, qc, res = j.vol, j.grid, j.qc, j.res
    if tuple(vol.shape) != tuple(grid.shape):
        res.fail("geometry_mismatch", f"shape {list(vol.shape)} != configured {list(grid.shape)}",
                 value=list(vol.shape), limit=list(grid.shape))
        return True
    dev = float(np.max(np.abs(vol.affine - grid.affine)))
    if dev > qc.geometry_atol_mm:
        sp = ", ".join(_fmt(s) for s in vol.spacing)
        res.fail("geometry_mismatch",
                 f"affine differs from the configured grid by up to {_fmt(dev)} mm "
                 f"(spacing [{sp}] mm, orientation {vol.orientation}; configured "
                 f"[{', '.join(_fmt(s) for s in grid.spacing)}] mm, {grid.orientation})",
                 value=dev, limit=qc.geometry_atol_mm)
    else:
        res.ok("geometry_mismatch", value=dev, limit=qc.geometry_atol_mm)
    return True


def _check_finite(j: _Judged) -> bool:
    n_bad = int(j.arr.size - np.isfinite(j.arr).sum())
    if n_bad:
        j.res.fail("non_finite_values", f"{n_bad} of {j.arr.size} voxels are NaN or infinite", value=n_bad, limit=0)
        return False
    j.res.ok("non_finite_values", value=0, limit=0)
    j.arr = j.arr.astype(np.float64, copy=False)
    return True


def _check_constant(j: _Judged) -> bool:
    std, limit = float(j.arr.std()), j.qc.min_std
    if std < limit:
        j.res.fail("constant_volume", f"standard deviation {std:.3g} < {limit:g}", value=std, limit=limit)
        return False
    j.res.ok("constant_volume", value=std, limit=limit)
    return True


def _check_physical_range(j: _Judged) -> bool:
    lim = j.qc.ct_range if j.vol.modality == "CT" else j.qc.mr_range
    if lim is None:
        return True
    vmin, vmax, units = float(j.arr.min()), float(j.arr.max()), j.vol.units
    # half a unit of slack: integer-rounded images sit exactly on the limits
    if vmin < lim[0] - 0.5 or vmax > lim[1] + 0.5:
        j.res.fail("out_of_physical_range",
                   f"values {_fmt(vmin)}..{_fmt(vmax)} {units} outside {_fmt(lim[0])}..{_fmt(lim[1])} {units}",
                   value=[vmin, vmax], limit=list(lim))
    else:
        j.res.ok("out_of_physical_range", value=[vmin, vmax], limit=list(lim))
    return True


def _in_range(res: CheckResult, code: str, v: float, lo: float, hi: float, detail: str) -> None:
    if not np.isfinite(v) or not lo <= v <= hi:
        res.fail(code, detail, value=v, limit=[lo, hi])
    else:
        res.ok(code, value=v, limit=[lo, hi])


def _check_body(j: _Judged) -> bool:
    """The body mask (on the windowed values) and its statistics against the reference ranges."""
    if j.window is not None:
        j.arr = np.clip(j.arr, j.window[0], j.window[1])
    if j.mask is None:
        j.mask = body_mask(j.arr, j.vol.affine, j.vol.modality, j.qc.body_threshold_hu)
    res = j.res
    res.stats = volume_stats(j.arr, j.mask, j.vol.modality)
    if not j.mask.any():
        res.fail("no_body_found", "no voxel above the body threshold", value=0.0, limit=">0")
    elif j.ranges is not None:
        for k, (lo, hi) in j.ranges.ranges.items():
            if not k.startswith("label_"):  # label ranges are judged with the label
                v = res.stats.get(k, float("nan"))
                _in_range(res, f"{k}_out_of_range", v, lo, hi, f"{_fmt(v)} not in [{_fmt(lo)}, {_fmt(hi)}]")
    return True


def _check_label(j: _Judged) -> bool:
    """The label map on the image grid, inside the body, with reference-like intensities per value."""
    if j.label is None:
        return True
    res, qc = j.res, j.qc
    lab = np.asarray(j.label.array)
    if lab.shape != j.arr.shape:
        res.fail("label_geometry_mismatch", f"label shape {list(lab.shape)} != image shape {list(j.arr.shape)}")
        return True
    if not np.allclose(j.label.affine, j.vol.affine, atol=qc.geometry_atol_mm):
        res.fail("label_geometry_mismatch", "label affine differs from the image affine")
    labelled = lab > 0
    n_lab = int(labelled.sum())
    frac = float((labelled & ~j.mask).sum() / n_lab) if n_lab else 0.0
    if frac > qc.label_outside_body_max:
        res.fail("label_outside_body",
                 f"{100 * frac:.1f}% of {n_lab} labelled voxels lie outside the body "
                 f"(allowed {100 * qc.label_outside_body_max:.1f}%)",
                 value=frac, limit=qc.label_outside_body_max)
    else:
        res.ok("label_outside_body", value=frac, limit=qc.label_outside_body_max)
    # intensity inside each label (e.g. lesion HU) within the reference's range for that label
    inside = label_stats(j.arr, lab)
    res.stats.update(inside)
    for k, v in inside.items():
        if j.ranges is not None and k in j.ranges.ranges:
            lo, hi = j.ranges.ranges[k]
            _in_range(res, f"{k}_out_of_range", v, lo, hi, f"median {_fmt(v)} {j.vol.units} inside label "
                      f"{k.split('_')[1]} not in [{_fmt(lo)}, {_fmt(hi)}]")
    _check_class_labels(j, _label_values_of(inside))
    return True


def _check_class_labels(j: _Judged, present: set[int]) -> None:
    """The label values of a sample of a known class against its class's rule (learn_class_labels)."""
    rule = None if j.ranges is None or j.class_label is None else j.ranges.class_labels.get(int(j.class_label))
    if rule is None:
        return
    c, n, held = int(j.class_label), rule["cases"], rule["cases_holding"]
    for code, key, wrong, where in (("class_label_missing", "required", False, "not in this sample"),
                                    ("class_label_unexpected", "forbidden", True, "but in this sample")):
        bad = [v for v in rule[key] if (v in present) == wrong]
        if bad:
            j.res.fail(code, "; ".join(f"class {c}: label {v} is in {held[v]} of {n} reference cases of this "
                                       f"class, {where}" for v in bad), value=bad, limit=rule[key])
        else:
            j.res.ok(code, value=[], limit=rule[key])


def _check_artefacts(j: _Judged) -> bool:
    res, limit = j.res, j.qc.artefact_threshold
    res.artefact = a = artefact_score(j.arr, j.mask, j.vol.spacing)
    score = a["score"]
    if score > limit:
        where = (f"tiling seam between planes {a['seam_plane']} and {a['seam_plane'] + 1} of axis {a['seam_axis']}"
                 if a["kind"] == "tiling_seam" else f"checkerboard alternating along axes {a['checkerboard_axes']}")
        res.fail("artefact_suspected", f"score {score:.2f} > {limit:g}: {where}", value=score, limit=limit)
    else:
        res.ok("artefact_suspected", value=score, limit=limit)
    return True


#: The per-volume checks in the order they run (the module docstring's list).  A check returns
#: False when the later checks would be meaningless (NaN voxels, a constant volume): they are skipped.
CHECKS: tuple[tuple[str, Callable[[_Judged], bool]], ...] = (
    ("geometry", _check_geometry),
    ("finite", _check_finite),
    ("constant", _check_constant),
    ("physical_range", _check_physical_range),
    ("body_and_reference_ranges", _check_body),
    ("label", _check_label),
    ("artefacts", _check_artefacts),
)


def check_volume(vol: Volume, grid: Grid, qc: QCConfig, ranges: Optional[ReferenceRanges] = None,
                 label: Optional[Volume] = None, mask: Optional[np.ndarray] = None,
                 window: Optional[tuple[float, float]] = None, class_label: Optional[int] = None) -> CheckResult:
    """Run every per-volume check of :data:`CHECKS` on ``vol``; never raises on bad data.

    ``ranges`` are the reference ranges (skipped when None); ``label`` the sample's label map;
    ``mask`` a precomputed body mask (computed here otherwise); ``window`` the intensity window
    the reference was clipped to (the model's HU window), applied before the statistics, body and
    artefact checks so both sides are compared alike — finiteness, constancy and the physical range
    are judged on the raw values.  ``class_label`` (the sample's class) judges its label values
    against the class's rule in ``ranges.class_labels``.  The result holds the failure reasons and,
    per check, its value and limit as evidence.
    """
    judged = _Judged(vol, grid, qc, ranges, label, mask, window, np.asarray(vol.array), CheckResult(passed=True),
                     class_label)
    for _name, check in CHECKS:
        if not check(judged):
            break
    return judged.res
