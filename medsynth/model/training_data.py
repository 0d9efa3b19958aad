"""The training data of both stages: the manifest's cases in model space, split, and the seeded
batch order.

:func:`prepare_data` loads the cases through the config's MONAI transform chain (one unreadable case
is reported and skipped), pairs image and label channels for paired models, checks class labels
and fixes the intensity map; :func:`batch_indices` makes the batch order a pure function of
(seed, stage, batch).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medsynth.config import Config
from medsynth.errors import ConfigError, ManifestError, MedsynthError
from medsynth.model.networks import generator

log = logging.getLogger("medsynth.model.train")


@dataclass
class TrainingData:
    """The cases of the manifest in model space, split into training and validation."""

    train: Any  # indexable: item i is a dict with "image" [C, X, Y, Z] and "class_label"
    val: Any
    classes: torch.Tensor  # class per training item; -1 = unlabelled
    val_classes: torch.Tensor
    norm: dict[str, Any]  # IntensityNorm.to_dict(): the exact map back to physical units
    info: dict[str, Any] = field(default_factory=dict)


def _split(cfg: Config) -> tuple[Any, list[Any], list[Any], list[str]]:
    """The manifest, its training and validation cases, and the ids left out (no label map when
    ``data.use_labels``)."""
    from medsynth.data.transforms import split_cases
    from medsynth.manifest import load_manifest

    if not cfg.data.manifest:
        raise ConfigError("data.manifest: not set; training needs a data manifest",
                          hint="set data.manifest in the config (or pass it to 'medsynth train ... --manifest PATH')")
    manifest = load_manifest(cfg.data.manifest)
    if not manifest.cases:
        raise ManifestError(f"{cfg.data.manifest}: the manifest has no cases")
    train_cases, val_cases = split_cases(manifest.cases, cfg.data.val_fraction, cfg.training.seed)
    skipped: list[str] = []
    if cfg.data.use_labels:
        for c in train_cases + val_cases:
            if c.label is None:
                log.warning("skipping case %s: no label map (data.use_labels is true)", c.id)
                skipped.append(c.id)
        train_cases = [c for c in train_cases if c.label is not None]
        val_cases = [c for c in val_cases if c.label is not None]
        if not train_cases:
            raise ManifestError(f"{cfg.data.manifest}: data.use_labels is true but no training case has a label",
                                hint="add 'label' to the cases or set data.use_labels: false")
    return manifest, train_cases, val_cases, skipped


def _load(cfg: Config, cases: list[Any]) -> tuple[Any, list[str]]:
    """The cases through the MONAI chain, loaded up front (``cache: memory``; an unreadable case is
    logged and left out) or as a lazy dataset; and the ids left out."""
    from medsynth.data.transforms import build_transforms, case_dict, make_dataset

    paired = cfg.data.use_labels
    if cfg.data.cache != "memory":
        return (make_dataset(cases, cfg.data, with_label=paired) if cases else []), []
    tf = build_transforms(cfg.data, with_label=paired)
    out, left_out = [], []
    for c in cases:
        try:
            out.append(tf(case_dict(c, paired)))
        except Exception as exc:  # noqa: BLE001 - one bad case never sinks the run
            log.warning("skipping case %s: %s", c.id, _reason(exc, c.image))
            left_out.append(c.id)
    return out, left_out


def _pair_labels(cfg: Config, manifest: Any, train: Any, val: Any) -> tuple[Any, Any, dict[str, int]]:
    """Image + one-hot label channels (:mod:`medsynth.model.labels`), and the label set."""
    from medsynth.model.labels import check_label_values, pair_items, resolve_label_set, unique_values

    seen = unique_values(train) + (unique_values(val) if len(val) else [])
    label_set = dict(cfg.data.labels) if cfg.data.labels else \
        resolve_label_set(manifest.extra, seen, str(cfg.data.manifest))
    check_label_values(seen, label_set.values(), str(cfg.data.manifest))
    values = sorted(label_set.values())
    return pair_items(train, values), (pair_items(val, values) if len(val) else []), label_set


def _classes(cfg: Config, train: Any, val: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The class of every training and validation item (-1: none), checked against the model's."""
    classes = torch.tensor([int(train[i]["class_label"]) for i in range(len(train))], dtype=torch.long)
    val_classes = torch.tensor([int(val[i]["class_label"]) for i in range(len(val))], dtype=torch.long)
    k = cfg.model.unet.num_class_embeds
    if k is not None:
        bad = sorted({int(c) for c in torch.cat([classes, val_classes]) if c >= k})
        if bad:
            raise ManifestError(f"{cfg.data.manifest}: class_label(s) {bad} outside the model's classes 0..{k - 1}",
                                hint="raise model.unet.num_class_embeds or fix the manifest's class_label values")
        if bool((classes < 0).all()):
            raise ManifestError(f"{cfg.data.manifest}: model.unet.num_class_embeds is {k} but no training case "
                                "has a class_label", hint="add class_label to the cases or set num_class_embeds: null")
    return classes, val_classes


def _intensity_map(cfg: Config, train: Any) -> dict[str, Any]:
    """The window (CT), else the medians of the per-case percentile values (MR)."""
    from medsynth.data.transforms import intensity_norm

    if cfg.data.intensity.window is not None:
        return intensity_norm(cfg.data).to_dict()
    los = torch.tensor([float(train[i]["intensity_lo"]) for i in range(len(train))])
    his = torch.tensor([float(train[i]["intensity_hi"]) for i in range(len(train))])
    return intensity_norm(cfg.data, (float(los.median()), float(his.median()))).to_dict()


def prepare_data(cfg: Config) -> TrainingData:
    """Load the manifest's cases through the config's MONAI transform chain.

    With ``data.cache: memory`` every case is loaded once up front; a case that cannot be read is
    reported (by manifest id) and skipped rather than ending the run.  Class labels are checked
    against ``model.unet.num_class_embeds``.  For MR the dataset reference intensities are the
    medians of the per-case percentile values, as the model card records.
    """
    manifest, train_cases, val_cases, skipped = _split(cfg)
    (train, bad_train), (val, bad_val) = _load(cfg, train_cases), _load(cfg, val_cases)
    skipped += bad_train + bad_val
    if len(train) == 0:
        raise ManifestError(f"{cfg.data.manifest}: no readable training case", hint="run 'medsynth manifest verify'")
    label_set = None
    if cfg.data.use_labels:
        train, val, label_set = _pair_labels(cfg, manifest, train, val)
    classes, val_classes = _classes(cfg, train, val)
    norm = _intensity_map(cfg, train)
    names = manifest.extra.get("classes") if isinstance(manifest.extra.get("classes"), dict) else None
    counts = {str(int(c)): int((classes == c).sum()) for c in classes.unique() if c >= 0}
    info = {"manifest_name": manifest.name, "n_train": len(train), "n_val": len(val), "skipped": skipped,
            "class_names": names, "class_counts": counts or None, "labels": label_set}
    log.info("data: %d training and %d validation cases from %s%s", len(train), len(val), manifest.name,
             f" ({len(skipped)} skipped)" if skipped else "")
    return TrainingData(train, val, classes, val_classes, norm, info)


def _reason(exc: BaseException, image: Path) -> str:
    """The most useful one-line reason of a (possibly MONAI-wrapped) loading failure.

    MONAI's ``LoadImage`` hides the reader's own error behind "cannot find a suitable reader", so
    the file is read once more with medsynth's reader, whose errors name the file and the fix.
    """
    from medsynth.formats import read_image

    try:
        read_image(image)
    except MedsynthError as own:
        return own.message
    except Exception:  # noqa: BLE001 - fall back to MONAI's innermost message
        pass
    inner = exc
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[0] if text else ''}"


def batch_indices(seed: int, stage: str, batch: int, n: int, batch_size: int) -> torch.Tensor:
    """Item indices of batch number ``batch``: epochs are seeded permutations of the ``n`` items,
    so the order is a pure function of (seed, stage, batch)."""
    per_epoch = math.ceil(n / batch_size)
    epoch, pos = divmod(batch, per_epoch)
    perm = torch.randperm(n, generator=generator(seed, stage, "epoch", epoch))
    # a short last batch is filled from the start of the same permutation
    perm = perm.repeat(math.ceil(batch_size / n) + 1)
    return perm[pos * batch_size: pos * batch_size + batch_size]


def batch_images(items: Any, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The images of items ``idx`` as one float32 batch on ``device``."""
    x = torch.stack([torch.as_tensor(items[int(i)]["image"]).as_subclass(torch.Tensor) for i in idx])
    return x.to(device=device, dtype=torch.float32)
