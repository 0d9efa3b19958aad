"""NIfTI writers for export: CT as int16 HU, MR as float32, labels as uint8.

Every file carries the volume's own affine in both sform and qform (code 1, equal; see
:meth:`Volume.save_nifti`) and a header description that marks it as synthetic.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medsynth import __version__
from medsynth.errors import ExportError
from medsynth.volume import Volume

log = logging.getLogger("medsynth.export.nifti")

IMAGE_DESCRIPTION = f"SYNTHETIC medsynth {__version__} - not a real patient"
LABEL_DESCRIPTION = f"SYNTHETIC label medsynth {__version__} - not a real patient"


def write_image(vol: Volume, path: Path) -> Path:
    """Write an export image: CT must already hold int16 HU (see ``encode_ct``), MR is stored float32.

    CT is passed in already quantised so that the NIfTI and DICOM exports hold the very same
    integers; a float CT array here is a programming error, not a user error.
    """
    if vol.modality == "CT":
        if vol.array.dtype != np.int16:
            raise ExportError(f"CT export expects int16 HU, got {vol.array.dtype}")
        return vol.save_nifti(path, description=IMAGE_DESCRIPTION)
    if vol.modality == "MR":
        return vol.save_nifti(path, dtype="float32", description=IMAGE_DESCRIPTION)
    raise ExportError(f"cannot export modality {vol.modality!r} as an image (CT or MR only)")


def check_label(label: Volume, image: Volume) -> np.ndarray:
    """The label's values as uint8, after checking it fits the image grid and holds small integers."""
    if label.shape != image.shape:
        raise ExportError(f"label shape {label.shape} differs from image shape {image.shape}",
                          hint="regenerate the sample; a label must share its image's grid")
    if not np.allclose(label.affine, image.affine, atol=1e-4):
        raise ExportError("label affine differs from the image affine",
                          hint="regenerate the sample; a label must share its image's grid")
    arr = np.asarray(label.array)
    if not np.issubdtype(arr.dtype, np.integer) and (
            not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.rint(arr))):
        raise ExportError("label map holds non-integer values", hint="labels must be integers 0..255")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0 or hi > 255:
        raise ExportError(f"label values span {lo:g}..{hi:g}; uint8 export needs 0..255",
                          hint="relabel the classes to 0..255")
    return arr.astype(np.uint8)


def write_label(label: Volume, path: Path) -> Path:
    """Write a label map as uint8 on its own (image) grid."""
    return label.save_nifti(path, dtype="uint8", description=LABEL_DESCRIPTION)
