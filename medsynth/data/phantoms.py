"""Deterministic 3D chest-CT phantoms: the built-in data the demo and the tests use.

Each phantom is drawn from one seed.  It has a body outline (soft tissue with a subcutaneous fat
layer), two lungs (air with parenchyma texture), a heart, a spine and ribs (bone), smooth tissue
texture and scanner noise, all in realistic Hounsfield units, on a physical grid with an LPS-ordered
affine (the way DICOM-converted CT usually arrives).  An optional lung lesion comes with a label
mask (0 background, 1 lung, 2 lesion) and a class label (1 lesion / 0 no lesion).

All random parameters are drawn in :func:`draw_params` from a ``numpy.random.Generator`` seeded
with the phantom seed, then applied deterministically in :func:`render` — so a phantom can be
replayed from its parameters.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from medsynth.volume import Volume, affine_from_spacing

log = logging.getLogger("medsynth.data.phantoms")

LABELS = {"background": 0, "lung": 1, "lesion": 2}
CLASSES = {0: "no_lesion", 1: "lesion"}

HU_AIR, HU_LUNG, HU_FAT, HU_SOFT, HU_BLOOD, HU_BONE, HU_CORTEX, HU_LESION = (
    -1000.0, -860.0, -100.0, 40.0, 45.0, 350.0, 900.0, 35.0)


@dataclass(frozen=True)
class PhantomParams:
    """Every random choice of one phantom, in millimetres and HU."""

    body_a: float          # body half-width (left-right)
    body_b: float          # body half-depth (anterior-posterior)
    fat_mm: float          # subcutaneous fat thickness
    lung_sep: float        # distance of each lung centre from the midline
    lung_axes: tuple[float, float, float]
    lung_y: float          # lung centre, anterior(+)/posterior(-)
    heart_axes: tuple[float, float, float]
    spine_r: float
    rib_period: float
    rib_phase: float
    texture_seed: int
    noise_sigma: float
    lesion: bool
    lesion_center: tuple[float, float, float]
    lesion_r: float
    lesion_hu: float
    shift: tuple[float, float, float]


def draw_params(seed: int, lesion: Optional[bool] = None) -> PhantomParams:
    """Draw the parameters of phantom ``seed``; ``lesion`` forces the class (default: random)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9E3779B9]))
    u = rng.uniform
    has_lesion = bool(rng.integers(0, 2)) if lesion is None else bool(lesion)
    lung_axes = (u(38, 52), u(55, 72), u(95, 125))
    lung_sep = u(62, 78)
    side = 1.0 if rng.integers(0, 2) else -1.0
    lesion_r = u(12.0, 22.0)
    # the lesion sits inside one lung, away from its wall
    ox, oy, oz = (u(-0.45, 0.45) * lung_axes[0], u(-0.45, 0.45) * lung_axes[1], u(-0.5, 0.5) * lung_axes[2])
    lung_y = u(-5, 15)
    return PhantomParams(
        body_a=u(140, 165), body_b=u(95, 115), fat_mm=u(6, 16), lung_sep=lung_sep,
        lung_axes=lung_axes, lung_y=lung_y, heart_axes=(u(40, 55), u(35, 48), u(45, 60)),
        spine_r=u(14, 18), rib_period=u(26, 34), rib_phase=u(0, 30),
        texture_seed=int(rng.integers(0, 2**31 - 1)), noise_sigma=u(12, 22), lesion=has_lesion,
        lesion_center=(side * lung_sep + ox, lung_y + oy, oz), lesion_r=lesion_r,
        lesion_hu=u(0, 60), shift=(u(-8, 8), u(-8, 8), u(-10, 10)),
    )


def render(p: PhantomParams, shape: tuple[int, int, int] = (64, 64, 48),
           spacing: tuple[float, float, float] = (5.0, 5.0, 7.0),
           orientation: str = "LPS") -> tuple[Volume, Volume]:
    """Render parameters onto a grid; returns (CT volume in HU as int16, label map as uint8)."""
    affine = affine_from_spacing(spacing, shape, orientation)
    ii, jj, kk = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    world = np.einsum("ab,bijk->aijk", affine[:3, :3].astype(np.float32), np.stack([ii, jj, kk]))
    x = world[0] + affine[0, 3] - p.shift[0]   # R+
    y = world[1] + affine[1, 3] - p.shift[1]   # A+
    z = world[2] + affine[2, 3] - p.shift[2]   # S+

    body = (x / p.body_a) ** 2 + (y / p.body_b) ** 2 <= 1.0
    inner = (x / (p.body_a - p.fat_mm)) ** 2 + (y / (p.body_b - p.fat_mm)) ** 2 <= 1.0
    hu = np.full(shape, HU_AIR, np.float32)
    hu[body] = HU_FAT
    hu[inner] = HU_SOFT

    la, lb, lc = p.lung_axes
    lungs = np.zeros(shape, bool)
    for sgn in (-1.0, 1.0):
        lungs |= ((x - sgn * p.lung_sep) / la) ** 2 + ((y - p.lung_y) / lb) ** 2 + (z / lc) ** 2 <= 1.0
    lungs &= inner
    ha, hb, hc = p.heart_axes
    heart = ((x - 0.25 * p.lung_sep) / ha) ** 2 + ((y - p.lung_y - 20) / hb) ** 2 + ((z + 0.2 * lc) / hc) ** 2 <= 1.0
    lungs &= ~heart

    # smooth tissue texture (a few HU) and lung parenchyma texture (vessels, tens of HU)
    trng = np.random.default_rng(p.texture_seed)
    vox_sigma = [max(0.6, 6.0 / s) for s in spacing]
    tex = ndimage.gaussian_filter(trng.standard_normal(shape).astype(np.float32), vox_sigma)
    tex /= tex.std() + 1e-6
    hu[inner] += 8.0 * tex[inner]
    hu[heart] = HU_BLOOD + 6.0 * tex[heart]
    hu[lungs] = HU_LUNG + 45.0 * tex[lungs]

    # spine: cortical shell around a cancellous core, posterior midline
    sy = -p.body_b + p.fat_mm + 2.2 * p.spine_r
    rr = np.sqrt(x ** 2 + (y - sy) ** 2)
    spine = rr <= p.spine_r
    hu[spine] = HU_BONE
    hu[spine & (rr >= p.spine_r - 4.0)] = HU_CORTEX
    # ribs: thin elliptic arcs in periodic axial bands, posterior two thirds of the chest
    ell = np.sqrt((x / (p.body_a - p.fat_mm - 6)) ** 2 + (y / (p.body_b - p.fat_mm - 6)) ** 2)
    band = np.mod(z - p.rib_phase, p.rib_period) < 9.0
    ribs = (np.abs(ell - 1.0) < 0.05) & band & (y < 0.6 * p.body_b) & inner
    hu[ribs] = HU_CORTEX

    label = np.zeros(shape, np.uint8)
    label[lungs] = LABELS["lung"]
    if p.lesion:
        cx, cy, cz = p.lesion_center
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
        lesion = (d <= p.lesion_r) & inner
        hu[lesion] = p.lesion_hu + 10.0 * tex[lesion]
        label[lesion] = LABELS["lesion"]

    nrng = np.random.default_rng(p.texture_seed + 1)
    hu += p.noise_sigma * nrng.standard_normal(shape).astype(np.float32)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    meta = {"phantom": asdict(p)}
    return (Volume(hu, affine, modality="CT", units="HU", meta=meta),
            Volume(label, affine, modality="SEG", units="label"))


def make_phantom(seed: int, shape: tuple[int, int, int] = (64, 64, 48),
                 spacing: tuple[float, float, float] = (5.0, 5.0, 7.0),
                 lesion: Optional[bool] = None, orientation: str = "LPS") -> tuple[Volume, Volume, int]:
    """One phantom from ``seed``: (CT in HU, label map, class 1 = lesion / 0 = none)."""
    p = draw_params(seed, lesion)
    img, lab = render(p, shape, spacing, orientation)
    return img, lab, int(p.lesion)


def write_phantoms(out_dir: str | Path, n: int, seed: int = 0,
                   shape: tuple[int, int, int] = (64, 64, 48),
                   spacing: tuple[float, float, float] = (5.0, 5.0, 7.0)) -> Path:
    """Write ``n`` phantoms (balanced classes) as NIfTI plus ``out_dir/manifest.json``; returns the manifest path.

    Case ``i`` uses seed ``seed * 100003 + i`` and class ``i % 2`` so the classes are balanced and
    the set is reproducible.  Files: ``images/<id>.nii.gz``, ``labels/<id>.nii.gz`` with case ids
    ``phantom-XXX`` for seed 0 and ``phantom-s<seed>-XXX`` otherwise, so sets written with
    different seeds (e.g. a training set and a held-out test set) never share a case id.
    """
    from medsynth.jobs import sha256_file
    from medsynth.manifest import Case, Manifest, save_manifest

    from medsynth.errors import MedsynthError

    if n < 1:
        raise MedsynthError(f"`n` must be >= 1, got {n}")
    if any(int(s) < 8 for s in shape) or any(float(s) <= 0 for s in spacing):
        raise MedsynthError(f"phantom grid needs every size >= 8 voxels and spacing > 0 mm, "
                            f"got shape {list(shape)} spacing {list(spacing)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        cid = f"phantom-{i:03d}" if int(seed) == 0 else f"phantom-s{int(seed)}-{i:03d}"
        img, lab, cls = make_phantom(int(seed) * 100003 + i, shape, spacing, lesion=bool(i % 2))
        ip = img.save_nifti(out / "images" / f"{cid}.nii.gz", dtype="int16", description="medsynth phantom")
        lp = lab.save_nifti(out / "labels" / f"{cid}.nii.gz", dtype="uint8", description="medsynth phantom label")
        cases.append(Case(id=cid, image=ip, label=lp, class_label=cls, modality="CT",
                          shape=img.shape, spacing=img.spacing, sha256=sha256_file(ip)))
    man = Manifest(cases, name="medsynth-phantoms", modality="CT",
                   extra={"labels": LABELS, "classes": {str(k): v for k, v in CLASSES.items()},
                          "description": "built-in synthetic chest CT phantoms (no patient data)"})
    path = save_manifest(man, out / "manifest.json")
    log.info("wrote %d phantoms to %s", n, out)
    return path
