"""Privacy: DICOM/NIfTI de-identification (``deid``), PHI scanning (``phi_scan``), memorisation audit."""
