"""Export stage: NIfTI (nnU-Net layout), DICOM CT/MR series, DICOM SEG, dataset.json, datalist, manifest.

``export_samples`` is the stage function ``medsynth export`` calls; the writers live in
:mod:`medsynth.export.nifti` and :mod:`medsynth.export.dicom`.
"""

from medsynth.export.dataset import DEFAULT_FORMATS, FORMATS, ExportResult, export_samples, parse_formats

__all__ = ["DEFAULT_FORMATS", "FORMATS", "ExportResult", "export_samples", "parse_formats"]
