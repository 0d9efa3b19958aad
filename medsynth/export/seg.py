"""DICOM SEG: a label map as a DICOM Segmentation (highdicom, BINARY) that references the exported
image series, segments coded in SNOMED CT from their names (:mod:`medsynth.export.seg_codes`), and
stamped synthetic and reproducible (a re-export is byte-identical)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from medsynth import __version__
from medsynth.errors import ExportError
from medsynth.export.dicom import (
    DEFAULT_UID_ROOT,
    IMPLEMENTATION_CLASS_UID,
    SYNTHETIC_DATE,
    SYNTHETIC_TIME,
    make_uid,
    slice_frames,
)
from medsynth.volume import Volume

def write_seg(
    label: Volume,
    source_datasets: list,
    path: Path,
    *,
    uid_key: str,
    uid_root: str = DEFAULT_UID_ROOT,
    label_names: Optional[dict[int, str]] = None,
    series_number: int = 2,
) -> tuple[str, int]:
    """Write ``label`` as a DICOM Segmentation (highdicom, BINARY) that references the image series.

    Each non-zero label value present becomes one segment (numbered 1..n in value order, named from
    ``label_names`` when given and coded in SNOMED CT from its name, :mod:`medsynth.export.seg_codes`).
    Frames are the label's k-slices in the same (rows=j, columns=i) layout as :func:`write_series`,
    one per source image; empty frames are omitted.

    Returns:
        (SEG SeriesInstanceUID, number of segments).  Raises ExportError when the label is empty.
    """
    import highdicom as hd

    values = [int(v) for v in np.unique(label.array) if v != 0]
    if not values:
        raise ExportError("the label map is empty (all zeros): no DICOM SEG to write",
                          hint="drop 'seg' from `formats` for unlabelled samples")
    lut = np.zeros(int(max(values)) + 1, dtype=np.uint16)
    for n, v in enumerate(values, start=1):
        lut[v] = n
    seg_frames = slice_frames(lut[np.asarray(label.array, dtype=np.int64)])
    descriptions = _segment_descriptions(values, label_names or {}, uid_key, uid_root)
    series_uid = make_uid(uid_root, f"{uid_key}|series|{series_number}")
    seg = hd.seg.Segmentation(
        source_images=source_datasets,
        pixel_array=seg_frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=make_uid(uid_root, f"{uid_key}|series|{series_number}|instance|0"),
        instance_number=1,
        manufacturer="medsynth",
        manufacturer_model_name="medsynth latent diffusion",
        software_versions=__version__,
        device_serial_number=f"medsynth-{__version__}",
        content_description="SYNTHETIC label map (medsynth)",
        content_label="SYNTHETIC",
        content_date=SYNTHETIC_DATE,
        content_time=SYNTHETIC_TIME,
        series_date=SYNTHETIC_DATE,
        series_time=SYNTHETIC_TIME,
        series_description=f"SYNTHETIC SEG medsynth {__version__}",
    )
    _make_reproducible(seg, make_uid(uid_root, f"{uid_key}|seg-dimension-organization"))
    seg.DeidentificationMethod = source_datasets[0].DeidentificationMethod
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
    return series_uid, len(values)


def _segment_descriptions(values: list[int], names: dict[int, str], uid_key: str, uid_root: str) -> list:
    """One highdicom SegmentDescription per label value (numbered 1..n in value order), coded in
    SNOMED CT from its name (the label-name table, medsynth/resources/seg_codes.csv)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medsynth.export.seg_codes import segment_code

    algo = hd.AlgorithmIdentificationSequence(
        name="medsynth", family=codes.cid7162.ArtificialIntelligence, version=__version__)
    out = []
    for n, v in enumerate(values, start=1):
        seg_label = str(names.get(v, f"label {v}"))[:64]
        category, prop_type = segment_code(seg_label).coded()
        out.append(hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=seg_label,
            segmented_property_category=category,
            segmented_property_type=prop_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=make_uid(uid_root, f"{uid_key}|segment|{v}"),
            tracking_id=f"synthetic label {v}",
        ))
    return out


def _make_reproducible(seg: Any, dim_uid: str) -> None:
    """highdicom stamps creation times and a random dimension UID: make them synthetic and derived,
    so that a re-export is byte-identical, and mark the object synthetic."""
    seg.InstanceCreationDate = SYNTHETIC_DATE
    seg.InstanceCreationTime = SYNTHETIC_TIME
    for item in getattr(seg, "ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = SYNTHETIC_DATE + SYNTHETIC_TIME
    for item in [*getattr(seg, "DimensionOrganizationSequence", []), *getattr(seg, "DimensionIndexSequence", [])]:
        item.DimensionOrganizationUID = dim_uid
    seg.SyntheticData = "YES"
    seg.PatientIdentityRemoved = "YES"
    seg.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    seg.file_meta.ImplementationVersionName = f"MEDSYNTH_{__version__}"[:16]
