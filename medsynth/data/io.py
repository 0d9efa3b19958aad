"""The MONAI reader that lets ``LoadImaged`` read a case's image the way the rest of medsynth does:
through :func:`medsynth.formats.read_image` (a NIfTI, NRRD or MetaImage file, or a folder holding one
DICOM series, :mod:`medsynth.dicom_series`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from monai.data import ImageReader

from medsynth.formats import is_volume_file, read_image
from medsynth.volume import Volume


class MedsynthReader(ImageReader):
    """A MONAI ``ImageReader`` for volume files (NIfTI, NRRD, MetaImage) and DICOM series folders via
    :func:`read_image`.

    It returns RAS affines (``space: RAS``) so ``LoadImage`` needs no LPS conversion, and it reads
    DICOM with medsynth's own series checks (slice order by position, regular grid).
    """

    def __init__(self, **case_extra: Any):
        super().__init__()
        self.case_extra = case_extra

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        if not isinstance(filename, (str, Path)):
            return True  # a list of DICOM files of one series
        return Path(filename).is_dir() or is_volume_file(Path(filename))

    def read(self, data: Sequence[str] | str, **kwargs: Any) -> Volume:
        if not isinstance(data, (str, Path)):
            files = [Path(f) for f in data]
            if len(files) == 1:
                return read_image(files[0], **{**self.case_extra, **kwargs})
            # a list of files = one DICOM series picked out of a shared folder (manifest series_files)
            from medsynth.dicom_series import read_series

            return read_series(files)
        return read_image(Path(data), **{**self.case_extra, **kwargs})

    def get_data(self, img: Volume) -> tuple[np.ndarray, dict]:
        from monai.utils import MetaKeys, SpaceKeys

        meta = {
            MetaKeys.AFFINE: img.affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: img.affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(img.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "modality": img.modality,
            "units": img.units,
        }
        return np.asarray(img.array, dtype=np.float32), meta
