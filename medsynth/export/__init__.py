"""Export stage: NIfTI (nnU-Net layout), DICOM CT/MR series, DICOM SEG, dataset.json, datalist, manifest.

``export_samples`` is the stage function ``medsynth export`` calls; the writers live in
:mod:`medsynth.export.nifti` and :mod:`medsynth.export.dicom`.  The package is callable:
``medsynth.export(samples, out, formats="nifti,dicom")`` is :func:`export_samples`.
"""

from medsynth.callable_module import make_callable
from medsynth.export.dataset import DEFAULT_FORMATS, FORMATS, ExportResult, export_samples, parse_formats

make_callable(__name__, export_samples)

__all__ = ["DEFAULT_FORMATS", "FORMATS", "ExportResult", "export_samples", "parse_formats"]
