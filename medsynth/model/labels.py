"""Paired image + label generation: label maps as extra autoencoder channels, and back.

With ``data.use_labels: true`` the autoencoder sees ``1 + K`` channels: the image in model space,
then one channel per label value (background included) holding the one-hot map scaled to
[-1, 1].  The latent diffusion model therefore learns image and label together; a sample's label
map is the argmax over its decoded label channels, mapped back to the integer label values.

The label set (``{name: value}``) is taken, in order, from ``data.labels``, the manifest's
``labels`` entry (the built-in phantoms write ``{"background": 0, "lung": 1, "lesion": 2}``), or the
values seen in the training label maps; it is stored in the run's config so sampling needs no
manifest.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from medsynth.config import Config
from medsynth.errors import ConfigError, ManifestError

log = logging.getLogger("medsynth.model.labels")


def label_values(cfg: Config) -> list[int]:
    """The label values of a paired model in channel order (ascending), or [] without labels."""
    if not cfg.data.use_labels:
        return []
    if not cfg.data.labels:
        raise ConfigError("data.labels: not resolved; the label set is filled in when training starts",
                          hint="train with 'medsynth train', or set data.labels: {background: 0, ...}")
    return sorted(int(v) for v in cfg.data.labels.values())


def label_names(cfg: Config) -> dict[str, int]:
    """``{name: value}`` of a paired model (empty without labels), in value order."""
    if not cfg.data.use_labels or not cfg.data.labels:
        return {}
    return {str(k): int(v) for k, v in sorted(cfg.data.labels.items(), key=lambda kv: kv[1])}


def resolve_label_set(manifest_extra: Mapping[str, Any], seen: Optional[Sequence[int]],
                      where: str) -> dict[str, int]:
    """The label set of a manifest: its ``labels`` mapping if present, else the values ``seen``."""
    lab = manifest_extra.get("labels")
    if isinstance(lab, dict) and lab:
        try:
            out = {str(k): int(v) for k, v in lab.items()}
        except (TypeError, ValueError):
            raise ManifestError(f"{where}: 'labels' must map names to integer values, got {lab!r}") from None
        if 0 not in out.values():
            out = {"background": 0, **out}
        return out
    if not seen:
        raise ManifestError(f"{where}: no label values found in the training label maps",
                            hint="add a 'labels' mapping to the manifest or set data.labels")
    vals = sorted({0, *(int(v) for v in seen)})
    return {("background" if v == 0 else f"label_{v}"): v for v in vals}


def label_shares(channels: torch.Tensor) -> torch.Tensor:
    """One-hot label channels in model space ([-1, 1], as :func:`encode` writes them), or a blend of
    them, -> each label's share of the voxel in [0, 1]."""
    return (channels + 1.0) / 2.0


def encode(image: torch.Tensor, label: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """``[1, X, Y, Z]`` image and integer label -> ``[1 + K, X, Y, Z]`` model input (one-hot in [-1, 1])."""
    lab = torch.as_tensor(label).as_subclass(torch.Tensor).round().long()[0]
    hot = torch.stack([(lab == v) for v in values]).to(torch.float32) * 2.0 - 1.0
    img = torch.as_tensor(image).as_subclass(torch.Tensor).to(torch.float32)
    return torch.cat([img, hot])


def decode(x: torch.Tensor, values: Sequence[int]) -> np.ndarray:
    """Decoded ``[1 + K, X, Y, Z]`` -> uint8 label map (argmax over the label channels)."""
    idx = x[1:1 + len(values)].float().argmax(0).cpu().numpy()
    return np.asarray(values, dtype=np.uint8)[idx]


def check_label_values(seen: Sequence[int], values: Sequence[int], where: str) -> None:
    """Refuse label maps holding values outside the model's label set."""
    extra = sorted(set(int(v) for v in seen) - set(int(v) for v in values))
    if extra:
        raise ManifestError(f"{where}: label value(s) {extra} are not in the label set {sorted(values)}",
                            hint="add them to the manifest's 'labels' mapping (or data.labels)")


def unique_values(items: Any) -> list[int]:
    """All integer values of the ``label`` entries of a dataset's items."""
    seen: set[int] = set()
    for i in range(len(items)):
        lab = torch.as_tensor(items[i]["label"]).as_subclass(torch.Tensor)
        seen.update(int(v) for v in torch.unique(lab.round()).tolist())
    return sorted(seen)


class PairedItems:
    """A dataset view whose ``image`` is the image stacked with the one-hot label channels."""

    def __init__(self, items: Any, values: Sequence[int]):
        self.items, self.values = items, list(values)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        d = dict(self.items[i])
        d["image"] = encode(d["image"], d.pop("label"), self.values)
        return d


def pair_items(items: Any, values: Sequence[int]) -> Any:
    """Stack label channels onto every item: eagerly for an in-memory list, lazily otherwise."""
    if isinstance(items, list):
        return [PairedItems(items, values)[i] for i in range(len(items))]
    return PairedItems(items, values)
