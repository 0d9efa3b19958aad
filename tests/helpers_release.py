"""Shared inputs of the release, audit and PACS tests, built once per test session.

A tiny wavelet-latent model (nothing to train in stage 1) over-fitted on 4 phantoms (16³ at 20 mm,
60 diffusion steps on all 4 at once), 8 held-out phantoms it never saw, 4 samples with real QC
verdicts (ranges widened, as in tests/test_expand.py, so that a tiny model's samples can pass)
and their export as NIfTI, DICOM and SEG.  Built with the real stages; about 15 s on 2 cores.
"""

from __future__ import annotations

import functools
from pathlib import Path

from tests.helpers import tiny_config


def overfit_config(manifest: Path) -> dict:
    raw = tiny_config(manifest, data={"val_fraction": 0.0, "use_labels": True},
                      training={"scheduler": "ddpm",
                                "diffusion": {"steps": 60, "batch_size": 4, "lr": 3e-3, "val_every": 1000,
                                              "log_every": 1000, "ema_decay": 0.9, "num_train_timesteps": 20}},
                      qc={"percentile_margin": 20.0, "range_floor": 1.0, "artefact_threshold": 1.0,
                          "label_outside_body_max": 1.0})
    raw["model"]["autoencoder"] = {"kind": "wavelet", "wavelet_levels": 1}
    return raw


@functools.lru_cache(maxsize=None)
def inputs(root: Path) -> dict[str, Path]:
    """Paths of: train / holdout manifests, run, samples, qc folder, export, built under ``root`` on
    first use.  Test modules pass ``tmp_path_factory.getbasetemp() / "release-inputs"``, the same
    folder in every module of a session, so the model is trained once."""
    from medsynth.config import config_from_dict
    from medsynth.data.phantoms import write_phantoms
    from medsynth.export import export_samples
    from medsynth.model.sample import generate
    from medsynth.model.train import train
    from medsynth.qc.gate import load_qc_config, run_qc

    train_m = write_phantoms(root / "train", 4, 0, (16, 16, 16), (20.0, 20.0, 20.0))
    hold_m = write_phantoms(root / "holdout", 8, 5, (16, 16, 16), (20.0, 20.0, 20.0))
    run = root / "run"
    train(config_from_dict(overfit_config(train_m)), run)
    samples = root / "samples"
    generate(run, samples, range(4), seed=0)
    cfg, source = load_qc_config(run_dir=run)
    run_qc(samples, train_m, root / "qc", cfg, holdout=hold_m, quarantine=False, grid_source=source)
    export = root / "export"
    export_samples(samples, export, formats="nifti,dicom,seg", reference=train_m)
    return {"root": root, "train": train_m, "holdout": hold_m, "run": run, "samples": samples,
            "qc": root / "qc", "export": export}
