"""Shared test helpers (plain functions; fixtures live in conftest.py).

* :func:`tiny_config`: the tiny CPU config (8-channel networks on a 16³ grid, 4 + 4 training steps)
  every model test starts from, and :func:`merge` that overrides its sections;
* :func:`write_series` and friends: DICOM series written with pydicom from a known HU volume, with
  PHI-like header values (:data:`PHI`) so tests can check none of them leaks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------


def tiny_config(manifest: Path | None, **sections) -> dict:
    """8-channel networks on a 16³ grid, 4 + 4 training steps."""
    raw = {
        "name": "tiny",
        "data": {"manifest": str(manifest) if manifest else None, "modality": "CT", "spacing": [20.0, 20.0, 20.0],
                 "shape": [16, 16, 16], "val_fraction": 0.25},
        "model": {"autoencoder": {"channels": [8, 8], "latent_channels": 2, "norm_num_groups": 4,
                                  "attention_levels": [False, False]},
                  "unet": {"channels": [8, 8], "attention_levels": [False, True], "num_head_channels": 8,
                           "norm_num_groups": 4, "num_class_embeds": 2}},
        "training": {"device": "cpu", "precision": "fp32", "scheduler": "ddpm", "checkpoint_every": 2,
                     "autoencoder": {"steps": 4, "batch_size": 2, "lr": 1e-3, "adv_start": 2, "disc_layers": 2,
                                     "disc_channels": 8, "val_every": 2, "log_every": 1},
                     "diffusion": {"steps": 4, "batch_size": 2, "lr": 1e-3, "val_every": 2, "log_every": 1,
                                   "num_train_timesteps": 20}},
        "sampling": {"scheduler": "ddim", "steps": 2, "guidance_scale": 2.0, "batch_size": 2},
    }
    for key, val in sections.items():
        raw[key] = merge(raw.get(key, {}), val)
    return raw


def load_benchmarks():
    """``benchmarks/run.py`` as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).resolve().parents[1] / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def merge(a: dict, b: dict) -> dict:
    """``a`` with ``b`` merged in, nested dicts key by key (``b`` wins)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Interrupt(Exception):
    """Raised from a training callback to stop a run as a kill would (tests of resume)."""


def run_weights(run: Path) -> dict:
    """Every weight tensor of a finished run: autoencoder, discriminator (none for a wavelet latent),
    UNet and EMA."""
    from medsynth.jobs import RunPaths
    from medsynth.model.checkpoint import load_checkpoint

    paths = RunPaths(run)
    ae = load_checkpoint(paths.checkpoint("autoencoder"), "autoencoder")
    diff = load_checkpoint(paths.checkpoint("diffusion"), "diffusion")
    out = {f"ae.{k}": v for k, v in ae["model"].items()}
    out.update({f"disc.{k}": v for k, v in (ae.get("discriminator") or {}).items()})
    out.update({f"unet.{k}": v for k, v in diff["model"].items()})
    out.update({f"ema.{k}": v for k, v in diff["ema"]["model"].items()})
    return out


# --------------------------------------------------------------------------------------------
# DICOM series
# --------------------------------------------------------------------------------------------

PHI = {"PatientName": "Doe^Jane", "PatientID": "PID-48213", "PatientBirthDate": "19610203",
       "StudyDate": "20240102", "InstitutionName": "St Elsewhere Hospital", "AccessionNumber": "ACC99117"}


def slice_dataset(pixels_hu: np.ndarray, ipp, iop, pixel_spacing, uids: dict, modality: str = "CT",
              slope: float = 1.0, intercept: float = -1024.0, number: int = 1) -> Dataset:
    """One single-frame CT/MR image dataset; ``pixels_hu`` is (rows, cols) in physical units."""
    ds = Dataset()
    meta = FileMetaDataset()
    sop = generate_uid()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop
    for k, v in PHI.items():
        setattr(ds, k, v)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.Modality = modality
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    ds.Rows, ds.Columns = pixels_hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    ds.PixelData = np.rint((pixels_hu - intercept) / slope).astype(np.uint16).tobytes()
    return ds


def save_dicom(ds: Dataset, path: Path, preamble: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:  # old ACR-NEMA style: no preamble, no 'DICM', no file meta, implicit VR
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True)
    return path


def oblique_cosines(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q[:, 0], q[:, 1]


def write_series(folder: Path, hu: np.ndarray, *, row=(1.0, 0.0, 0.0), col=(0.0, 1.0, 0.0),
                 pixel_spacing=(0.8, 0.7), origin=(-20.0, -30.0, 40.0), dz: float = 2.5, modality: str = "CT",
                 names=None, positions=None, slope: float = 1.0, intercept: float = -1024.0,
                 preamble_less=(), seed: int = 0) -> list[Path]:
    """Write ``hu`` (i = column, j = row, k = slice) as a DICOM series; returns the paths in slice order.

    Files get the given ``names`` (default ``IMxxxx``) assigned in a shuffled order and
    InstanceNumbers counting backwards, so neither name nor number gives the slice order.
    """
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    nz = hu.shape[2]
    if positions is None:
        positions = [np.asarray(origin) + k * dz * normal for k in range(nz)]
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    names = list(names) if names is not None else [f"IM{k:04d}" for k in range(nz)]
    perm = np.random.default_rng(seed).permutation(nz)
    paths = []
    for k in range(nz):
        ds = slice_dataset(hu[:, :, k].T, positions[k], np.concatenate([row, col]), pixel_spacing, uids, modality,
                       slope, intercept, number=nz - k)
        paths.append(save_dicom(ds, folder / names[perm[k]], preamble=names[perm[k]] not in preamble_less))
    return paths


def hu_volume(shape=(16, 12, 10), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 2000, size=shape).astype(np.int16)
