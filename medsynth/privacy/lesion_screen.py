"""Lesion-level memorisation screen: is a sample's lesion a copy of a training patient's lesion?

The whole-volume screen (:mod:`medsynth.privacy.memorisation`) compares entire volumes, so a
training patient's lesion reproduced inside an otherwise new sample (what a lesion inpainter that
memorised its training crops would emit) hardly moves that distance.  This screen compares every
lesion of a sample with every lesion of the training cases, locally:

* each lesion is a connected component (26-connectivity) of the lesion label; its crop is the
  image inside a ball of ``privacy.lesion_radius_mm`` around the component's centroid (the lesion
  and the tissue around it, clipped to the analysis window);
* the distance is d = 1 - NCC of two crops over the ball, minimised over integer shifts of the
  training crop of up to ``privacy.lesion_max_shift`` voxels per axis and over its left-right
  mirror image (the inpainter trains on mirrored crops, so a mirrored copy is still a copy);
  NCC ignores gain and offset, so a copy at another contrast stays close;
* calibration as the whole-volume screen: the nearest-training-lesion distances of the lesions of
  held-out real cases are the "distinct patients" distribution, and a sample's lesion nearer than
  ``privacy.threshold_scale`` x its ``privacy.memorisation_quantile`` quantile fails the sample
  with ``possible_lesion_copy``, naming the training case.

A sample with a lesion that the screen cannot judge fails closed (``lesion_screen_cannot_judge``):
fewer than :data:`MIN_HELDOUT_LESIONS` held-out lesions to calibrate on.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from medsynth.privacy.memorisation import calibrated_threshold

# fewer held-out real lesions than this and the threshold would rest on one or two distances
MIN_HELDOUT_LESIONS = 3


@dataclass
class Lesion:
    """One connected component of the lesion label."""

    centre: tuple[int, int, int]   # the centroid, rounded to a voxel
    voxels: int


def find_lesions(label: np.ndarray, value: int) -> list[Lesion]:
    """The connected components (26-connectivity) of ``label == value``, largest first."""
    from scipy import ndimage

    mask = np.asarray(label) == value
    if not mask.any():
        return []
    comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    centres = ndimage.center_of_mass(mask, comp, list(range(1, n + 1)))
    out = [Lesion(tuple(int(round(c)) for c in ctr), int(sizes[k + 1])) for k, ctr in enumerate(centres)]
    return sorted(out, key=lambda les: -les.voxels)


def lr_axis(affine: np.ndarray) -> int:
    """The voxel axis that runs most nearly along the patient's left-right (world x) direction."""
    return int(np.argmax(np.abs(np.asarray(affine, dtype=np.float64)[0, :3])))


def _cube(array: np.ndarray, centre: Sequence[int], half: Sequence[int], pad: float) -> np.ndarray:
    """The (2 half + 1)-voxel cube of ``array`` around ``centre``, padded with ``pad`` outside."""
    src = [slice(max(c - h, 0), min(c + h + 1, s)) for c, h, s in zip(centre, half, array.shape)]
    dst = [slice(sl.start - (c - h), sl.stop - (c - h)) for sl, c, h in zip(src, centre, half)]
    out = np.full([2 * h + 1 for h in half], pad, dtype=np.float32)
    out[tuple(dst)] = array[tuple(src)]
    return out


def _normalise(rows: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm rows (a constant row becomes zeros: NCC 0 with anything)."""
    rows = rows - rows.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.where(norm > 1e-6, rows / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


@dataclass
class LesionCalibration:
    """The lesion screen's threshold and the held-out distances it comes from."""

    n_train_lesions: int
    n_heldout_lesions: int
    quantile: float
    scale: float
    heldout: list[float]
    threshold: Optional[float]     # None: too few held-out lesions to calibrate

    def to_dict(self) -> dict[str, Any]:
        return {"n_train_lesions": self.n_train_lesions, "n_heldout_lesions": self.n_heldout_lesions,
                "quantile": self.quantile, "threshold_scale": self.scale,
                "distance": "1 - NCC of the image in a ball around each lesion's centroid "
                            "(shift-tolerant, left-right mirror included)",
                "heldout_nn_distance": [round(x, 6) for x in self.heldout],
                "threshold": None if self.threshold is None else round(self.threshold, 6),
                "min_heldout_lesions": MIN_HELDOUT_LESIONS}


@dataclass
class LesionVerdict:
    """The lesion screen's verdict on one volume."""

    flagged: bool
    lesions: list[dict[str, Any]] = field(default_factory=list)
    reason: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return {"flagged": self.flagged, "lesions": self.lesions, "reason": self.reason}


class LesionScreen:
    """Calibrated nearest-training-lesion screen (see the module docstring).

    Args:
        value: the lesion label value.
        spacing: voxel spacing (mm) of the grid every volume is on; ``affine`` its affine (for the
            left-right axis of the mirror).
        pad: the intensity outside the volume (the analysis window's low end for CT).
        train: (case id, image, label map) of the cases the model trained on.
        heldout: (image, label map) of real cases it did not train on.
        cfg: ``privacy`` settings (``lesion_radius_mm``, ``lesion_max_shift``,
            ``memorisation_quantile``, ``threshold_scale``).
    """

    def __init__(self, value: int, spacing: Sequence[float], affine: np.ndarray, pad: float,
                 train: Sequence[tuple[str, np.ndarray, np.ndarray]],
                 heldout: Sequence[tuple[np.ndarray, np.ndarray]], cfg: Any):
        self.value, self.pad, self.cfg = int(value), float(pad), cfg
        r = float(cfg.lesion_radius_mm)
        self.half = tuple(max(1, int(math.ceil(r / float(s)))) for s in spacing)
        grid = np.stack(np.meshgrid(*[np.arange(-h, h + 1) * float(s) for h, s in zip(self.half, spacing)],
                                    indexing="ij"))
        self.ball = (grid ** 2).sum(0) <= r * r + 1e-6
        self.shift = int(cfg.lesion_max_shift)
        self.axis = lr_axis(affine)
        self.ids: list[str] = []
        self.sources: list[tuple[int, int, tuple[int, ...], bool]] = []   # (case, lesion, shift, mirrored)
        rows: list[np.ndarray] = []
        for n, (cid, img, lab) in enumerate(train):
            self.ids.append(cid)
            for k, les in enumerate(find_lesions(lab, self.value)):
                for shift, mirrored, vec in self._variants(img, les.centre):
                    self.sources.append((n, k, shift, mirrored))
                    rows.append(vec)
        self.n_train_lesions = len({(n, k) for n, k, _, _ in self.sources})
        self.refs = _normalise(np.stack(rows)) if rows else np.zeros((0, int(self.ball.sum())), np.float32)
        d_held = [self._nearest(img, les.centre)[0] for img, lab in heldout for les in find_lesions(lab, self.value)]
        d_held = [d for d in d_held if d is not None]
        thr = calibrated_threshold(d_held, cfg) if len(d_held) >= MIN_HELDOUT_LESIONS else None
        self.calibration = LesionCalibration(self.n_train_lesions, len(d_held), cfg.memorisation_quantile,
                                             cfg.threshold_scale, d_held, thr)

    def _crop(self, img: np.ndarray, centre: Sequence[int], extra: int = 0) -> np.ndarray:
        return _cube(np.asarray(img, dtype=np.float32), centre, [h + extra for h in self.half], self.pad)

    def _variants(self, img: np.ndarray, centre: Sequence[int]):
        """(shift, mirrored, ball vector) of a training lesion's crop for every shift and mirror."""
        big = self._crop(img, centre, self.shift)
        s = self.shift
        for mirrored in (False, True):
            src = np.flip(big, axis=self.axis) if mirrored else big
            for shift in itertools.product(range(-s, s + 1), repeat=3):
                sl = tuple(slice(s + d, s + d + 2 * h + 1) for d, h in zip(shift, self.half))
                yield shift, mirrored, src[sl][self.ball]

    def _nearest(self, img: np.ndarray, centre: Sequence[int]) -> tuple[Optional[float], Optional[int]]:
        """(distance, row of ``refs``) of the training lesion variant nearest this crop."""
        if not len(self.refs):
            return None, None
        q = _normalise(self._crop(img, centre)[self.ball][None])[0]
        if not q.any():   # a flat crop correlates with nothing: as far as can be
            return 1.0, None
        ncc = self.refs @ q
        j = int(np.argmax(ncc))
        return float(1.0 - ncc[j]), j

    def screen(self, img: np.ndarray, label: Optional[np.ndarray]) -> Optional[LesionVerdict]:
        """The verdict on one volume on the grid; None when it has no lesion (nothing to screen)."""
        lesions = find_lesions(label, self.value) if label is not None else []
        if not lesions:
            return None
        cal = self.calibration
        if cal.threshold is None or not len(self.refs):
            why = (f"only {cal.n_heldout_lesions} held-out real lesion(s) calibrate the lesion screen, it needs "
                   f"{MIN_HELDOUT_LESIONS}" if len(self.refs) else "the training cases hold no lesion to compare with")
            return LesionVerdict(True, [{"centre_voxel": list(les.centre), "voxels": les.voxels} for les in lesions],
                                 f"lesion_screen_cannot_judge ({why})")
        out, hits = [], []
        for les in lesions:
            d, j = self._nearest(img, les.centre)
            row: dict[str, Any] = {"centre_voxel": list(les.centre), "voxels": les.voxels, "distance": round(d, 6)}
            if j is not None:
                n, k, shift, mirrored = self.sources[j]
                row.update(nearest_training_case=self.ids[n], nearest_lesion=k, mirrored=mirrored,
                           shift_voxels=list(shift))
            row["flagged"] = d < cal.threshold
            if row["flagged"]:
                hits.append(row)
            out.append(row)
        if not hits:
            return LesionVerdict(False, out)
        h = min(hits, key=lambda r: r["distance"])
        reason = (f"possible_lesion_copy (lesion at voxel {tuple(h['centre_voxel'])}: nearest training case "
                  f"{h.get('nearest_training_case')}{' mirrored' if h.get('mirrored') else ''}, lesion distance "
                  f"1-NCC {h['distance']:.4g} < threshold {cal.threshold:.4g})")
        return LesionVerdict(True, out, reason)


def plant_lesion_copy(src_img: np.ndarray, src_label: np.ndarray, dst_img: np.ndarray, dst_label: np.ndarray,
                      centre: Sequence[int], radius_vox: Sequence[int], value: int, kind: str, axis: int,
                      rng: np.random.Generator, window: Optional[tuple[float, float]],
                      at: Optional[Sequence[int]] = None) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the source's lesion (the cube around ``centre``) pasted into another volume, as a
    memorising inpainter might emit it: ``noise`` (1 % of the intensity span), ``mirror``
    (left-right) or ``shift`` (moved one voxel along every axis); at ``at`` if given, else at the
    source's place.  Returns (image, label)."""
    img, lab = np.array(dst_img, dtype=np.float32), np.array(dst_label)
    lab[lab == value] = 0
    h = list(radius_vox)
    cube = _cube(np.asarray(src_img, dtype=np.float32), centre, h, float(np.min(src_img)))
    lcube = _cube(np.asarray(src_label, dtype=np.float32), centre, h, 0.0)
    if kind == "mirror":
        cube, lcube = np.flip(cube, axis=axis), np.flip(lcube, axis=axis)
    span = float(np.percentile(cube, 99) - np.percentile(cube, 1)) or 1.0
    if kind == "noise":
        cube = cube + rng.normal(0.0, 0.01 * span, cube.shape).astype(np.float32)
    at = [c + (1 if kind == "shift" else 0) for c in (centre if at is None else at)]
    sl_dst = [slice(max(c - r, 0), min(c + r + 1, s)) for c, r, s in zip(at, h, img.shape)]
    sl_src = tuple(slice(d.start - (c - r), d.stop - (c - r)) for d, c, r in zip(sl_dst, at, h))
    img[tuple(sl_dst)] = cube[sl_src]
    region = lab[tuple(sl_dst)]
    region[lcube[sl_src] == value] = value
    if window is not None:
        img = np.clip(img, *window)
    return img, lab
