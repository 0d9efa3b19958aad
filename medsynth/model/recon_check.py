"""Stage 1's ceiling: the QC gate's per-volume checks on the autoencoder's own reconstructions.

A latent diffusion model can only produce what its decoder can draw.  When the reconstructions of
real cases already fail the gate (bone blurred away, a lung label crossing a blurred body wall), no
amount of stage-2 training makes samples pass, so this is measured at the end of stage 1, before
stage 2 spends its compute: up to ``max_cases`` cases (validation cases first, then training
cases) are encoded to the latent mean, decoded, mapped back to physical units and judged by
:func:`medsynth.qc.checks.check_volume` against ranges learned from the training cases the same way
``medsynth qc`` learns them from its reference (same margins, window and body threshold).
Reconstructions are copies by construction, so the memorisation screen does not apply.

The result (counts, the failure codes, the body p99 of each reconstruction) goes into the stage-1
checkpoint, its metrics log and the model card; cases are named by split and position only.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Optional, Sequence

import numpy as np
import torch

from medsynth.config import Config

log = logging.getLogger("medsynth.model.train")

#: below this share of passing reconstructions, stage 1 warns that samples cannot pass either
WARN_BELOW = 0.9


def _physical(cfg: Config, norm: Any, affine: np.ndarray, x: torch.Tensor, values: Sequence[int]) -> tuple[Any, Any]:
    """One model-space output ``[1 + K, X, Y, Z]`` -> (image Volume, label Volume or None), as samples are."""
    from medsynth.model.sample import image_volume, label_volume

    return image_volume(cfg, norm, affine, x), label_volume(x, values, affine)


def _code(reason: str) -> str:
    return reason.split(" ", 1)[0]


@torch.no_grad()
def reconstruction_qc(ae: torch.nn.Module, cfg: Config, data: Any, device: torch.device, precision: str,
                      max_cases: int = 16) -> dict[str, Any]:
    """Judge the reconstructions of up to ``max_cases`` cases with the QC gate (see the module)."""
    from medsynth.data.transforms import IntensityNorm, target_affine
    from medsynth.model.labels import label_values
    from medsynth.model.networks import autocast
    from medsynth.model.training_data import batch_images
    from medsynth.qc.checks import Grid, check_volume, learn_ranges, volume_stats
    from medsynth.qc.features import body_mask
    from medsynth.qc.gate import analysis_window

    norm, values = IntensityNorm.from_dict(data.norm), label_values(cfg)
    window = analysis_window(cfg, cfg.data.modality, cfg.qc)
    grid = Grid(tuple(int(s) for s in cfg.data.shape), target_affine(cfg.data))
    ref = []
    for i in range(len(data.train)):
        x = batch_images(data.train, torch.tensor([i]), torch.device("cpu"))[0]
        img, lab = _physical(cfg, norm, grid.affine, x, values)
        arr = img.array if window is None else np.clip(img.array, *window)
        mask = body_mask(arr, img.affine, img.modality, cfg.qc.body_threshold_hu)
        ref.append(volume_stats(arr, mask, img.modality, None if lab is None else lab.array))
    def classes_of(c: torch.Tensor) -> list[Optional[int]]:
        return [int(v) if int(v) >= 0 else None for v in c]  # -1: an unlabelled case (no class)

    train_cls, val_cls = classes_of(data.classes), classes_of(data.val_classes)
    ranges = learn_ranges(ref, cfg.qc, classes=train_cls)
    picks = [("val", i) for i in range(len(data.val))] + [("train", i) for i in range(len(data.train))]
    was_training = ae.training
    ae.eval()
    cases, reasons = [], Counter()
    for split, i in picks[:max_cases]:
        items = data.val if split == "val" else data.train
        x = batch_images(items, torch.tensor([i]), device)
        with autocast(device, precision):
            recon = ae.decode(ae.encode(x)[0]).float()
        img, lab = _physical(cfg, norm, grid.affine, recon[0].cpu(), values)
        res = check_volume(img, grid, cfg.qc, ranges, label=lab, window=window,
                           class_label=(val_cls if split == "val" else train_cls)[i])
        codes = sorted({_code(r) for r in res.reasons})
        reasons.update(codes)
        cases.append({"split": split, "index": i, "passed": res.passed, "reasons": codes,
                      "body_p99": round(float(res.stats.get("body_p99", float("nan"))), 1)})
    if was_training:
        ae.train()
    n_pass = sum(c["passed"] for c in cases)
    return {"n_cases": len(cases), "n_passed": n_pass, "reasons": dict(sorted(reasons.items())),
            "reference_cases": len(ref), "cases": cases}


def failing(result: dict[str, Any]) -> str:
    """The failure codes of a result, most frequent first: ``body_p99_out_of_range 16, ...``."""
    return ", ".join(f"{c} {m}" for c, m in sorted((result.get("reasons") or {}).items(), key=lambda x: -x[1]))


def report(result: dict[str, Any]) -> None:
    """Log the result: one line, a warning when fewer than :data:`WARN_BELOW` pass."""
    n, k = result["n_cases"], result["n_passed"]
    if n == 0:
        return
    why = failing(result)
    if k < WARN_BELOW * n:
        log.warning("autoencoder: %d of %d reconstructions pass the QC gate (%s); samples decoded by this "
                    "autoencoder cannot pass more often: train stage 1 longer or with more capacity before "
                    "stage 2", k, n, why)
    else:
        log.info("autoencoder: %d of %d reconstructions pass the QC gate%s", k, n, f" ({why})" if why else "")
