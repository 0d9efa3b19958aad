"""Read one case's image as a :class:`Volume`, and the MONAI reader that lets ``LoadImaged`` use the
same code path.

A case's image (or label map) is a NIfTI, NRRD or MetaImage file (see :mod:`medsynth.data.formats`)
or a folder holding one DICOM series (:mod:`medsynth.data.dicom`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from monai.data import ImageReader

from medsynth.data.formats import is_nifti, is_volume_file, itk_format, read_itk_volume
from medsynth.errors import ImageReadError
from medsynth.volume import Volume, sniff_nifti


def read_image(path: str | Path, modality: Optional[str] = None, **case_extra: Any) -> Volume:
    """Read a volume file (NIfTI, NRRD, MetaImage) or a DICOM series folder into a :class:`Volume`
    (RAS affine, physical units).

    ``case_extra`` carries manifest keys that select one series inside a folder (see
    ``data_manifests/README.md``).  Raises :class:`ImageReadError` naming the path on any failure.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: not found", hint="fix the path in the manifest (paths are relative to it)")
    if path.is_dir():
        from medsynth.data.dicom import read_series

        # reading stays permissive about modality: the manifest verifier reports mismatches
        return read_series(path, **case_extra)
    if is_nifti(path) or sniff_nifti(path):  # by name or by content; the loader checks the content
        return Volume.load_nifti(path, modality=modality or "CT")
    if itk_format(path) is not None:
        return read_itk_volume(path, modality=modality or "CT")
    raise ImageReadError(f"{path}: unsupported image type",
                         hint="use a NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd) file, "
                              "or a folder holding one DICOM series")


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
            from medsynth.data.dicom import read_series

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
