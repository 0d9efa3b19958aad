"""Refuse a NIfTI file whose header claims more voxel data than the file can hold, before reading it.

Found by fuzzing: a 250-byte ``.nii.gz`` whose damaged header says 2060 x 516 x 16385 voxels made
nibabel allocate the whole 17 GB array and inflate into it (71 s, 17 GB resident) before the gzip
check failed; on a smaller machine the process is killed, so one bad case sinks the batch.

The bound is exact for uncompressed files (the data must fit after ``vox_offset``) and safe for
gzip: deflate never expands more than 1032:1, so a ``.nii.gz`` of ``n`` bytes holds at most about
``1032 n`` bytes.  A real file is never refused; a damaged header is, in microseconds.

:meth:`medsynth.volume.Volume.load_nifti`, through which every NIfTI read of medsynth goes (samples,
``manifest build``/``verify``, the MONAI loaders and the QC reference chain), calls it first.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from medsynth.errors import ImageReadError

#: Deflate's maximum expansion (258-byte matches at about 2 bits each), with a margin.
MAX_GZIP_RATIO = 1100


def check_voxel_bytes(path: str | os.PathLike) -> None:
    """Raise :class:`ImageReadError` if ``path``'s header claims more voxel bytes than the file holds.

    Reads the header only.  A header nibabel cannot parse is left to the reader to report.
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
