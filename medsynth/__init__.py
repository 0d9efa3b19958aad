"""medsynth: synthetic 3D medical images from a latent diffusion model.

Stages (each a plain function the CLI calls): load -> train -> generate -> qc/privacy -> anonymise ->
export -> release.  The one currency between stages is :class:`medsynth.volume.Volume`.

The same functions are the Python API, here at the package top::

    import medsynth

    medsynth.train("configs/demo.yaml", "runs/demo")                     # -> TrainResult
    medsynth.generate("runs/demo", "samples", range(8), seed=0)          # -> GenerateResult
    medsynth.qc("samples", "data/manifest.json", "qc", run_dir="runs/demo")  # -> QCOutcome
    medsynth.export("samples", "dataset", formats="nifti,dicom", reference="data/manifest.json")
    medsynth.anonymise("hospital_dicom/", "deid/", key_file="deid.key")  # -> AnonymiseReport
    medsynth.expand("runs/demo", "data/manifest.json", "expanded", n=16) # -> ExpandResult
    medsynth.audit("runs/demo", "data/manifest.json", "holdout.json")    # -> AuditResult
    medsynth.release("dataset", "runs/demo", "data/manifest.json", "release")  # -> ReleaseResult

Each name is imported on first use (``import medsynth`` stays light, and a stage module that fails
to import does not break the others).  ``medsynth.qc``, ``medsynth.export`` and ``medsynth.expand``
are also the stages' modules (``medsynth.qc.gate``, ...): calling them runs the stage
(:mod:`medsynth.callable_module`).  Errors are :class:`MedsynthError` subclasses with a message
that names the file or parameter and a ``hint`` that says how to fix it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from medsynth.errors import MedsynthError  # noqa: E402

#: The Python API: name -> (module, attribute); attribute None: the (callable) module itself.
API: dict[str, tuple[str, str | None]] = {
    "train": ("medsynth.model.train", "train"),
    "generate": ("medsynth.model.sample", "generate"),
    "qc": ("medsynth.qc", None),
    "export": ("medsynth.export", None),
    "anonymise": ("medsynth.privacy.deid", "anonymise"),
    "expand": ("medsynth.expand", None),
    "audit": ("medsynth.privacy.audit", "run_audit"),
    "release": ("medsynth.export.release", "release_export"),
}

__all__ = ["__version__", "MedsynthError", *API]


def __getattr__(name: str) -> Any:
    """Import an API function (or callable stage module) on first use."""
    if name not in API:
        raise AttributeError(f"module 'medsynth' has no attribute {name!r}")
    module_name, attr = API[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
