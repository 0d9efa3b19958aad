"""The one currency between stages: a 3D array that never travels without its affine.

``Volume.affine`` maps voxel indices (i, j, k) to world coordinates in millimetres in the
**RAS+** convention (nibabel / NIfTI / MONAI).  DICOM and ITK use **LPS+**; the conversion
lives here (:meth:`Volume.to_sitk`, :meth:`Volume.from_sitk`) and nowhere else.

Spacing is the norm of each affine column and orientation comes from the direction cosines,
so oblique affines are handled correctly (the diagonal of an oblique affine is not the spacing).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.errors import ImageReadError, VolumeError

MODALITIES = ("CT", "MR", "SEG")
_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(eq=False)
class Volume:
    """A 3D image in physical units with its voxel-to-world (RAS, mm) affine.

    Args:
        array: 3D array indexed (i, j, k) — the NIfTI/nibabel axis order.
        affine: 4x4 voxel-to-RAS-world matrix; must be finite, invertible, last row (0, 0, 0, 1).
        modality: "CT", "MR" or "SEG" (a label map).
        units: physical units of the values, e.g. "HU" for CT, "a.u." for MR, "label".
        meta: free-form, non-identifying facts (case id, seed, ...).  Never put PHI here.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str = "CT"
    units: str = "HU"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        arr = np.asarray(self.array)
        if arr.ndim != 3:
            raise VolumeError(
                f"a Volume must be 3D, got an array of shape {tuple(arr.shape)}",
                hint="squeeze channel/time axes or pass a single 3D image",
            )
        if min(arr.shape) < 1:
            raise VolumeError(f"a Volume must not be empty, got shape {tuple(arr.shape)}")
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4):
            raise VolumeError(f"affine must be 4x4, got shape {aff.shape}")
        if not np.all(np.isfinite(aff)):
            raise VolumeError("affine contains NaN or infinite values")
        if not np.allclose(aff[3], [0, 0, 0, 1]):
            raise VolumeError(f"affine last row must be (0, 0, 0, 1), got {aff[3].tolist()}")
        if abs(np.linalg.det(aff[:3, :3])) < 1e-9:
            raise VolumeError("affine is singular (zero spacing or collinear axes)")
        if self.modality not in MODALITIES:
            raise VolumeError(
                f"modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}"
            )
        self.array = arr
        self.affine = aff

    # -- geometry -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k: the norms of the affine's columns."""
        return tuple(float(x) for x in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS direction of the i, j, k axes."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def origin(self) -> tuple[float, float, float]:
        """RAS world position (mm) of the centre of voxel (0, 0, 0)."""
        return tuple(float(x) for x in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes such as "RAS" or "LPS": the closest anatomical direction each axis points to."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def is_oblique(self, tol: float = 1e-4) -> bool:
        d = np.abs(self.direction)
        return bool(np.any((d > tol) & (d < 1 - tol)))

    def same_geometry(self, other: "Volume", atol: float = 1e-4) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)

    def with_array(self, array: np.ndarray, **changes: Any) -> "Volume":
        """A new Volume with the same geometry and a different array (same shape required)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise VolumeError(f"new array shape {array.shape} differs from {self.array.shape}")
        kw = dict(modality=self.modality, units=self.units, meta=dict(self.meta))
        kw.update(changes)
        return Volume(array, self.affine.copy(), **kw)

    # -- ITK / DICOM (LPS) ------------------------------------------------------------------
    def to_sitk(self):
        """A SimpleITK image with the same voxels and LPS geometry."""
        import SimpleITK as sitk

        lps = _LPS_FLIP @ self.affine
        sp = np.asarray(self.spacing)
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array.transpose(2, 1, 0)))
        img.SetSpacing([float(s) for s in sp])
        img.SetOrigin([float(x) for x in lps[:3, 3]])
        img.SetDirection([float(x) for x in (lps[:3, :3] / sp[None, :]).ravel()])
        return img

    @classmethod
    def from_sitk(cls, img, modality: str = "CT", units: str = "HU", **meta: Any) -> "Volume":
        """Build a Volume from a 3D SimpleITK image (LPS) — converted to the RAS affine."""
        import SimpleITK as sitk

        if img.GetDimension() != 3:
            raise VolumeError(f"expected a 3D image, got {img.GetDimension()}D")
        sp = np.asarray(img.GetSpacing(), dtype=np.float64)
        d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
        lps = np.eye(4)
        lps[:3, :3] = d * sp[None, :]
        lps[:3, 3] = img.GetOrigin()
        arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
        return cls(arr, _LPS_FLIP @ lps, modality=modality, units=units, meta=dict(meta))

    # -- NIfTI --------------------------------------------------------------------------------
    @classmethod
    def load_nifti(cls, path: str | os.PathLike, modality: str = "CT", units: str | None = None) -> "Volume":
        """Read a 3D NIfTI file (a trailing singleton 4th axis is dropped)."""
        import nibabel as nib

        path = Path(path)
        if path.is_file():
            if not sniff_nifti(path):
                raise ImageReadError(f"{path}: not a readable NIfTI file (no NIfTI-1/2 header)",
                                     hint="check the file is complete (not truncated) and really NIfTI")
            check_voxel_bytes(path)  # a tiny damaged header must not make nibabel allocate gigabytes
        try:
            img = nib.load(str(path))
            arr = np.asanyarray(img.dataobj)
        except FileNotFoundError:
            raise ImageReadError(f"{path}: file not found") from None
        except Exception as exc:  # nibabel raises many types for corrupt files
            raise ImageReadError(
                f"{path}: not a readable NIfTI file ({type(exc).__name__})",
                hint="check the file is complete (not truncated) and really NIfTI",
            ) from None
        while arr.ndim > 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 3:
            raise ImageReadError(f"{path}: expected a 3D image, got shape {tuple(arr.shape)}")
        affine = img.affine
        if units is None:
            units = {"CT": "HU", "MR": "a.u.", "SEG": "label"}[modality]
        return cls(arr, affine, modality=modality, units=units)

    def save_nifti(self, path: str | os.PathLike, dtype: Any = None, description: str = "") -> Path:
        """Write NIfTI atomically with sform == qform == this affine (never an identity)."""
        import nibabel as nib

        from medsynth.jobs import atomic_path

        arr = self.array if dtype is None else _cast(self.array, dtype)
        img = nib.Nifti1Image(arr, self.affine)
        img.set_sform(self.affine, code=1)
        img.set_qform(self.affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        if description:
            img.header["descrip"] = description.encode("ascii", "replace")[:79]
        path = Path(path)
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
        return path

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Volume(shape={self.shape}, spacing=({sp}) mm, orientation={self.orientation}, "
            f"modality={self.modality}, units={self.units}, dtype={self.array.dtype})"
        )


def _cast(arr: np.ndarray, dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(arr), info.min, info.max).astype(dtype)
    return arr.astype(dtype)


def affine_from_spacing(
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int],
    orientation: str = "RAS",
    center: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """The RAS affine of a grid with ``spacing`` and axis codes ``orientation``, centred on ``center``."""
    import nibabel as nib

    ornt = nib.orientations.axcodes2ornt(tuple(orientation.upper()))
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    for i, (axis, flip) in enumerate(ornt):
        aff[int(axis), i] = float(flip) * float(spacing[i])
    half = (np.asarray(shape, dtype=float) - 1) / 2.0
    aff[:3, 3] = np.asarray(center, dtype=float) - aff[:3, :3] @ half
    return aff


# --------------------------------------------------------------------------------------------
# NIfTI files: recognition by content and the header-size guard (the one owner of both)
# --------------------------------------------------------------------------------------------


def sniff_nifti(path: str | os.PathLike) -> bool:
    """True for a single-file NIfTI-1/2 (``.nii``, gzipped or not) by content, whatever its name says.

    The magic ``n+1`` at byte 344 (NIfTI-1) or ``n+2`` at byte 4 (NIfTI-2) of the (inflated)
    header; every reader that asks "is this NIfTI?" (volume loading, ``anonymise``) asks here.
    """
    import gzip
    import zlib

    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as g:
                head = g.read(548)
        else:
            with open(path, "rb") as f:
                head = f.read(548)
    except (OSError, EOFError, zlib.error):  # gzip.BadGzipFile is an OSError
        return False
    return (len(head) >= 348 and head[344:348] == b"n+1\x00") or (len(head) >= 548 and head[4:8] == b"n+2\x00")


#: Deflate's maximum expansion (258-byte matches at about 2 bits each), with a margin.
MAX_GZIP_RATIO = 1100


def check_voxel_bytes(path: str | os.PathLike) -> None:
    """Raise :class:`ImageReadError` if ``path``'s header claims more voxel bytes than the file holds.

    Found by fuzzing: a 250-byte ``.nii.gz`` whose damaged header says 2060 x 516 x 16385 voxels
    made nibabel allocate the whole 17 GB array before the gzip check failed.  The bound is exact
    for uncompressed files (the data must fit after ``vox_offset``) and safe for gzip (deflate
    never expands more than 1032:1).  A real file is never refused; a damaged header is, in
    microseconds.  Reads the header only; a header nibabel cannot parse is left to the reader.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        hdr = img.header
        shape, dtype = hdr.get_data_shape(), hdr.get_data_dtype()
        # the proxy knows where the voxels start (a single file's vox_offset may read 0)
        offset = int(getattr(img.dataobj, "offset", hdr.get_data_offset()))
        data_file = Path(img.file_map["image"].filename or path)
    except Exception:  # noqa: BLE001 - unreadable header: the reader names the file and the error
        return
    claimed = offset + math.prod(int(s) for s in shape) * dtype.itemsize
    size = data_file.stat().st_size
    gz = data_file.name.lower().endswith(".gz")
    room = size * MAX_GZIP_RATIO if gz else size
    if claimed > room:
        raise ImageReadError(
            f"{path}: the header claims {' x '.join(str(s) for s in shape)} voxels of {dtype} "
            f"({claimed:,} bytes), more than this {size:,}-byte file can hold",
            hint="the header is damaged or the file is truncated; replace the file with a good copy")
