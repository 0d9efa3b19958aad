"""The small MONAI diagnostic models every arm of the utility evaluation trains, and their loop.

Classification: ``monai.networks.nets.ResNet`` with basic blocks, one block per stage,
(8, 16, 32, 64) channels and a stride-1 first convolution (about 0.23 M parameters: small enough
for a 2-core CPU), softmax over the classes, cross-entropy.  The stem keeps the full resolution
because the finding may be a few voxels wide: on the demo grid (10 mm) a 2.4-4.4 cm lesion is 2-4
voxels, and the stride-2 stem used before (plus the max-pool, 4x down before the first block) left
the real-only arm at AUC 0.55 with the demo's 32 phantoms (docs/evaluation.md).  Segmentation: ``monai.networks.nets.UNet`` with (8, 16, 32) channels
and one residual unit per level, Dice + cross-entropy.

Every arm gets the same budget: the same architecture, optimiser (AdamW), learning rate, batch
size and number of optimiser *steps* (not epochs, so an arm with more data does not get more
updates).  Batches are drawn with replacement; for classification the class is drawn first
(uniformly) and then a case of that class, so arms whose class ratios differ see balanced batches.
Augmentation: a random flip along each axis (presence of a finding does not depend on
orientation) and a random circular shift of up to ``shift`` voxels per axis (default: 3 for
classification, where the finding's position carries no class information; 0 for segmentation).  The
learning rate is constant (cosine decay to zero over-fitted the phantom task in trials).  No
validation split, no early stopping and no threshold is chosen: the weights after the last step are
evaluated, so the test set influences nothing.

Randomness is explicit: the weights are initialised inside ``torch.random.fork_rng`` from
``init_seed`` (the global RNG state is restored afterwards) and batches and flips come from a
``torch.Generator`` seeded with ``data_seed``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from medsynth.progress import progress

log = logging.getLogger("medsynth.evaluate.classifier")


@dataclass(frozen=True)
class Budget:
    """The training budget every arm gets (identical across arms)."""

    steps: int = 1500
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    flip: bool = True
    shift: Optional[int] = None  # None: 3 voxels for classification, 0 for segmentation

    def shift_voxels(self, task: str) -> int:
        """The circular-shift augmentation (voxels per axis) a training of ``task`` uses."""
        if self.shift is not None:
            return int(self.shift)
        return 3 if task == "classify" else 0

    def to_dict(self, task: Optional[str] = None) -> dict:
        d = asdict(self)
        if task is not None:
            d["shift"] = self.shift_voxels(task)
        return d


def build_classifier(n_classes: int) -> torch.nn.Module:
    """A small 3D ResNet (MONAI) with ``n_classes`` logits for a one-channel volume."""
    from monai.networks.nets import ResNet

    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64], spatial_dims=3,
                  n_input_channels=1, conv1_t_size=3, conv1_t_stride=1, num_classes=n_classes)


def unet_levels(shape: tuple[int, ...], max_levels: int = 3) -> int:
    """How many resolution levels a UNet can use on ``shape`` (each down-sampling halves every size)."""
    levels = 1
    while levels < max_levels and all(s % (2 ** levels) == 0 and s // (2 ** levels) >= 2 for s in shape):
        levels += 1
    return levels


def build_segmenter(n_labels: int, shape: tuple[int, ...]) -> torch.nn.Module:
    """A small 3D UNet (MONAI) with ``n_labels`` output channels (background included)."""
    from monai.networks.nets import UNet

    levels = unet_levels(shape)
    channels = [8, 16, 32][:levels]
    if levels < 2:
        channels = [8, 16]
        return UNet(spatial_dims=3, in_channels=1, out_channels=n_labels, channels=channels, strides=[1],
                    num_res_units=1)
    return UNet(spatial_dims=3, in_channels=1, out_channels=n_labels, channels=channels,
                strides=[2] * (levels - 1), num_res_units=1)


def n_parameters(net: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in net.parameters()))


def _batch_indices(gen: torch.Generator, n: int, bs: int, by_class: Optional[list[torch.Tensor]]) -> torch.Tensor:
    if by_class is None:
        return torch.randint(0, n, (bs,), generator=gen)
    cls = torch.randint(0, len(by_class), (bs,), generator=gen)
    out = torch.empty(bs, dtype=torch.long)
    for i, c in enumerate(cls.tolist()):
        members = by_class[c]
        out[i] = members[torch.randint(0, members.numel(), (1,), generator=gen)]
    return out


def train(task: str, x: torch.Tensor, y: torch.Tensor, n_out: int, budget: Budget, init_seed: int,
          data_seed: int, device: torch.device | str = "cpu", desc: str = "train") -> torch.nn.Module:
    """Train a fresh model of ``task`` ("classify" or "segment") on ``x`` (N, 1, *grid) and ``y``.

    ``y`` holds class indices (N,) for classification, integer label maps (N, 1, *grid) for
    segmentation; ``n_out`` is the number of classes / labels.  Returns the model (eval mode) after
    exactly ``budget.steps`` optimiser steps.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        net = build_classifier(n_out) if task == "classify" else build_segmenter(n_out, tuple(x.shape[2:]))
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=budget.lr, weight_decay=budget.weight_decay)
    gen = torch.Generator().manual_seed(int(data_seed))
    by_class = None
    if task == "classify":
        by_class = [torch.nonzero(y == k).flatten() for k in range(n_out)]
        by_class = [m for m in by_class if m.numel()]
    else:
        from monai.losses import DiceCELoss

        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    shift = budget.shift_voxels(task)
    for _ in progress(range(budget.steps), desc=desc, total=budget.steps):
        idx = _batch_indices(gen, x.shape[0], budget.batch_size, by_class)
        xb = x[idx].clone()
        yb = y[idx].clone()
        if shift:
            for b in range(idx.numel()):
                sh = [int(v) for v in torch.randint(-shift, shift + 1, (3,), generator=gen)]
                xb[b] = torch.roll(xb[b], shifts=sh, dims=(1, 2, 3))
                if task == "segment":
                    yb[b] = torch.roll(yb[b], shifts=sh, dims=(1, 2, 3))
        for axis in range(3 if budget.flip else 0):
            flip = torch.rand(idx.numel(), generator=gen) < 0.5
            if flip.any():
                xb[flip] = torch.flip(xb[flip], dims=[2 + axis])
                if task == "segment":
                    yb[flip] = torch.flip(yb[flip], dims=[2 + axis])
        xb, yb = xb.to(device), yb.to(device)
        out = net(xb)
        loss = F.cross_entropy(out, yb.long()) if task == "classify" else loss_fn(out, yb.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def predict(task: str, net: torch.nn.Module, x: torch.Tensor, batch_size: int = 8,
            device: torch.device | str = "cpu") -> np.ndarray:
    """Class probabilities (N, K) for classification, arg-max label maps (N, *grid) for segmentation."""
    net.eval()
    outs = []
    for i in range(0, x.shape[0], batch_size):
        o = net(x[i:i + batch_size].to(device))
        outs.append(torch.softmax(o, dim=1).cpu() if task == "classify" else torch.argmax(o, dim=1).cpu())
    return torch.cat(outs).numpy()
