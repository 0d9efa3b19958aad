"""The extension points of medsynth, one table each: noise schedulers, latent kinds, export formats.

Each table says what the rest of the code needs to know about an entry (config validation, sample
settings, export argument rules); the code that does the work is one entry in the matching table
of the stage, keyed by the same name:

=================== ================================== ==============================================
table               here                               its code
=================== ================================== ==============================================
noise schedulers    :data:`SCHEDULERS`                 ``model.networks.SCHEDULER_BUILDERS`` (the MONAI
                                                       scheduler) and ``model.sample.SCHEDULER_STEPS``
                                                       (one denoising step)
latent kinds        :data:`LATENT_KINDS`               ``model.networks.AUTOENCODER_BUILDERS``
export formats      :data:`EXPORT_FORMATS`             ``export.dataset.FORMAT_WRITERS``
QC checks           (stage-only: ``qc.checks.CHECKS``)
=================== ================================== ==============================================

``config.py`` derives the allowed values (``training.scheduler``, ``sampling.scheduler``,
``model.autoencoder.kind``, ``export.formats``) and the cross-field rules from these tables;
``tests/test_registry.py`` checks every stage table has exactly these names.  Adding a scheduler,
latent kind or format is one row here plus its code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheduler:
    """A noise scheduler: ``flow`` (trains and samples a rectified-flow velocity; else the DDPM
    noise-prediction family, whose members sample one another's models) and ``all_steps`` (samples
    with every training timestep)."""

    name: str
    flow: bool
    all_steps: bool
    summary: str


@dataclass(frozen=True)
class LatentKind:
    """A stage-1 latent: ``trained`` when it has weights that stage 1 trains (a wavelet has none)."""

    name: str
    trained: bool
    summary: str


@dataclass(frozen=True)
class ExportFormat:
    """An export format: ``requires`` other formats (and ``why``), ``default`` when exported unasked."""

    name: str
    default: bool
    summary: str
    requires: tuple[str, ...] = ()
    why: str = ""


def _table(*rows):
    return {r.name: r for r in rows}


SCHEDULERS: dict[str, Scheduler] = _table(
    Scheduler("ddpm", flow=False, all_steps=True, summary="DDPM: ancestral sampling over every training timestep"),
    Scheduler("ddim", flow=False, all_steps=False, summary="DDIM: fewer steps on a DDPM-trained model (eta: noise)"),
    Scheduler("rflow", flow=True, all_steps=False, summary="rectified flow (MAISI): a velocity model, Euler steps"),
)

LATENT_KINDS: dict[str, LatentKind] = _table(
    LatentKind("monai", trained=True, summary="MONAI AutoencoderKL"),
    LatentKind("maisi", trained=True, summary="MAISI AutoencoderKlMaisi (large volumes, split convolutions)"),
    LatentKind("wavelet", trained=False, summary="lossless 3D Haar wavelet packet transform (nothing to train)"),
)

EXPORT_FORMATS: dict[str, ExportFormat] = _table(
    ExportFormat("nifti", default=True, summary="NIfTI in the nnU-Net layout (imagesTr/, labelsTr/)"),
    ExportFormat("dicom", default=True, summary="one DICOM CT/MR series per sample"),
    ExportFormat("seg", default=False, summary="DICOM SEG of the label map", requires=("dicom",),
                 why="a DICOM SEG references the exported image series"),
)


def flow_schedulers() -> tuple[str, ...]:
    """The schedulers of the rectified-flow family."""
    return tuple(n for n, s in SCHEDULERS.items() if s.flow)
