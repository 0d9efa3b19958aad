"""A lossless latent: the orthonormal 3D Haar wavelet packet transform (``model.autoencoder.kind: wavelet``).

Each level turns every channel of a ``[B, C, X, Y, Z]`` volume into 8 sub-bands on a grid half as
large along each axis (``[B, 8C, X/2, Y/2, Z/2]``).  The transform is orthonormal, so the inverse is
its transpose and decoding is exact (to float rounding): there is no stage-1 network to train and
no reconstruction error to limit fidelity, which is what the small bright structures of CT (bone,
a 2-voxel rib, a lesion) need.  As in WDM-3D (Friedrich et al., 2024), the diffusion model then
learns the wavelet coefficients directly.

Sub-bands differ in offset and scale by orders of magnitude (the low-pass band holds the anatomy
and the air offset, the high-pass bands edges and texture).  ``band_mean`` and ``band_scale`` (one
value per latent channel, fitted on the training set by :func:`fit_band_scale` and stored with the
module) standardise every sub-band to zero mean and unit variance before diffusion, so the
denoiser's loss weighs the edges that make bone and lesions as much as the low-pass anatomy;
decoding undoes it exactly.

The module follows MONAI's autoencoder interface where sampling and training use it:
``encode(x) -> (mu, sigma)`` with ``sigma = 0`` and ``decode(z)``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medsynth.model.labels import label_shares


def haar_filters(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 8 orthonormal 3D Haar filters ``[8, 1, 2, 2, 2]``, low-pass first (band index = bits zyx)."""
    lo = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2.0)
    hi = torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2.0)
    bands = []
    for b in range(8):
        fx, fy, fz = (hi if b & 1 else lo), (hi if b & 2 else lo), (hi if b & 4 else lo)
        bands.append(torch.einsum("i,j,k->ijk", fx, fy, fz))
    return torch.stack(bands)[:, None].to(dtype)


class HaarWavelet3d(nn.Module):
    """``levels`` levels of the 3D Haar wavelet packet transform of ``in_channels`` channels.

    ``encode`` returns the (standardised) coefficients and a zero sigma, so code written for a KL
    autoencoder's posterior samples the exact coefficients; ``decode`` inverts it.  The only state
    is ``band_mean`` and ``band_scale`` (one value per latent channel; zeros and ones, the
    identity, until fitted).

    ``label_channels`` (paired models: the trailing one-hot label channels) with
    ``label_bands="low"`` keep only the low-pass band of each label channel: a label map is smooth
    inside, so its high-pass bands only say where a boundary falls within a 2-voxel block, and
    they would triple the channels the denoiser must model.  Decoding upsamples those bands
    trilinearly (the argmax of :func:`medsynth.model.labels.decode` then gives sub-block
    boundaries); the image channels stay exact.  A label smaller than a block or two (a lesion at
    the demo's 10 mm) has a block mean below its neighbour's everywhere, so a plain argmax loses it:
    ``label_weight`` (one factor per label channel, fitted on the training label maps by
    :func:`fit_label_weights`; ones until fitted, and for runs stored before it existed) scales
    each label's upsampled share of a voxel, ``(channel + 1) / 2``, before the argmax.
    """

    def __init__(self, in_channels: int, levels: int = 1, label_channels: int = 0, label_bands: str = "all"):
        super().__init__()
        if levels < 1 or in_channels < 1 or not 0 <= label_channels < in_channels:
            raise ValueError("HaarWavelet3d needs levels >= 1, in_channels >= 1 and 0 <= label_channels < in_channels")
        if label_bands not in ("all", "low"):
            raise ValueError(f"label_bands must be 'all' or 'low', got {label_bands!r}")
        self.in_channels, self.levels = int(in_channels), int(levels)
        self.low_labels = int(label_channels) if label_bands == "low" else 0
        self.register_buffer("filters", haar_filters(torch.float64), persistent=False)  # cast at use
        self.register_buffer("band_mean", torch.zeros(self.latent_channels))
        self.register_buffer("band_scale", torch.ones(self.latent_channels))
        if self.low_labels:
            self.register_buffer("label_weight", torch.ones(self.low_labels))
            self._register_load_state_dict_pre_hook(self._default_label_weight)

    def _default_label_weight(self, state: dict, prefix: str, *args: Any) -> None:
        # a wavelet latent stored before label weights existed decodes as it did: weights of one
        state.setdefault(prefix + "label_weight", torch.ones(self.low_labels))

    @staticmethod
    def channels_for(in_channels: int, levels: int, label_channels: int = 0, label_bands: str = "all") -> int:
        """Latent channels of a transform with these settings (8 sub-bands per channel and level;
        one per label channel with ``label_bands="low"``)."""
        low = label_channels if label_bands == "low" else 0
        return (in_channels - low) * 8 ** levels + low

    @property
    def latent_channels(self) -> int:
        return self.channels_for(self.in_channels, self.levels, self.low_labels, "low")

    @property
    def factor(self) -> int:
        return 2 ** self.levels

    def _weight(self, channels: int, like: torch.Tensor) -> torch.Tensor:
        return self.filters.to(dtype=like.dtype).repeat(channels, 1, 1, 1, 1)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Unscaled wavelet packet coefficients of ``x`` ``[B, C, X, Y, Z]`` (label channels: low-pass
        band only when ``label_bands="low"``)."""
        if any(s % self.factor for s in x.shape[2:]):
            raise ValueError(f"wavelet latent: every size of {list(x.shape[2:])} must be divisible by {self.factor}")
        for _ in range(self.levels):
            c = x.shape[1]
            x = F.conv3d(x, self._weight(c, x), stride=2, groups=c)
        if self.low_labels:
            n_img = (self.in_channels - self.low_labels) * 8 ** self.levels
            x = torch.cat([x[:, :n_img], x[:, n_img::8 ** self.levels]], dim=1)  # band 0 of each label channel
        return x

    def inverse(self, w: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`transform`: exact (the orthonormal filters' transpose), except for
        low-pass-only label channels, which are upsampled trilinearly from their block means."""
        lab = None
        if self.low_labels:
            n_img = w.shape[1] - self.low_labels
            w, lab = w[:, :n_img], w[:, n_img:]
        for _ in range(self.levels):
            c = w.shape[1] // 8
            w = F.conv_transpose3d(w, self._weight(c, w), stride=2, groups=c)
        if lab is not None:
            # one-hot channels are in [-1, 1]: weigh each label's share (lab + 1) / 2 of the voxel
            share = label_shares(self.upsample_labels(lab)) * self.label_weight.to(lab.dtype).view(1, -1, 1, 1, 1)
            w = torch.cat([w, 2.0 * share - 1.0], dim=1)
        return w

    def upsample_labels(self, low: torch.Tensor) -> torch.Tensor:
        """Low-pass label bands (unscaled, ``[B, K, ...]``) -> the label channels on the image grid:
        the block means (band 0 = mean x 2^(1.5 L)), upsampled trilinearly, before any weighting."""
        low = low / (2.0 ** 1.5) ** self.levels
        return F.interpolate(low, scale_factor=self.factor, mode="trilinear", align_corners=False)

    def _band(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(dtype=like.dtype).view(1, -1, 1, 1, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = (self.transform(x) - self._band(self.band_mean, x)) * self._band(self.band_scale, x)
        return z, torch.zeros_like(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.inverse(z / self._band(self.band_scale, z) + self._band(self.band_mean, z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, sigma = self.encode(x)
        return self.decode(z), z, sigma


@torch.no_grad()
def fit_band_scale(wavelet: HaarWavelet3d, images: Sequence[torch.Tensor] | Any, floor: float = 1e-3,
                   scale: bool = True, unit_channels: int = 0, detail_gain: float = 1.0,
                   unit_factor: float = 1.0) -> torch.Tensor:
    """Per-sub-band offsets and factors that give each latent channel zero mean and unit standard
    deviation over ``images`` (``scale=False``: offsets only, factors stay 1).

    ``images`` are ``[C, X, Y, Z]`` volumes in model space.  A band whose standard deviation is
    below ``floor`` (e.g. a label channel's high-pass band on a set without that label) keeps the
    factor of ``floor``, so noise in it is not blown up at decoding.  Both are set on ``wavelet``;
    the factors are returned.  The last ``unit_channels`` latent channels (a paired model's label
    bands with ``wavelet_label_scale: unit`` or ``span``) are centred and get the fixed factor
    ``unit_factor`` (1: natural scale).  ``detail_gain`` multiplies the
    factors of the image channels' high-pass bands (every band but the all-low-pass one of each
    channel): their signal-to-noise ratio at every diffusion time rises by that factor, so the
    diffusion decides them earlier and its loss weighs them gain² more.
    """
    sums = torch.zeros(wavelet.latent_channels, dtype=torch.float64)
    sq = torch.zeros_like(sums)
    n = 0
    for img in images:
        w = wavelet.transform(torch.as_tensor(img).as_subclass(torch.Tensor)[None].float()).double()
        sums += w.sum(dim=(0, 2, 3, 4))
        sq += (w * w).sum(dim=(0, 2, 3, 4))
        n += w[0, 0].numel()
    if n == 0:
        raise ValueError("fit_band_scale needs at least one image")
    mean = sums / n
    std = (sq / n - mean * mean).clamp_min(0).sqrt()
    factors = 1.0 / std.clamp_min(floor) if scale else torch.ones_like(std)
    if detail_gain != 1.0:
        per = 8 ** wavelet.levels
        n_img = (wavelet.in_channels - wavelet.low_labels) * per
        detail = torch.tensor([c < n_img and c % per != 0 for c in range(wavelet.latent_channels)])
        if unit_channels:
            detail[-int(unit_channels):] = False
        factors[detail] *= float(detail_gain)
    if unit_channels:
        factors[-int(unit_channels):] = float(unit_factor)
    wavelet.band_mean.copy_(mean.to(wavelet.band_mean.dtype))
    wavelet.band_scale.copy_(factors.to(wavelet.band_scale.dtype))
    return wavelet.band_scale.clone()


def _mean_dice(fixed: torch.Tensor, case: torch.Tensor, truth: torch.Tensor, scores: torch.Tensor,
               weight: torch.Tensor) -> float:
    """Mean over labels of the per-case Dice of the weighted argmax decoding, over the cases where
    the label is in the truth or the prediction.  ``fixed`` ``[N, K, K]`` is the confusion (truth,
    prediction) of the voxels whose decoding no positive weight changes; ``case``, ``truth`` ``[M]``
    and ``scores`` ``[K, M]`` are the other voxels."""
    n, k = fixed.shape[:2]
    top, pred = scores[0] * weight[0], torch.zeros_like(truth)
    for c in range(1, k):  # argmax over the channels, the first winning ties (as .argmax)
        s = scores[c] * weight[c]
        pred = torch.where(s > top, c, pred)
        top = torch.maximum(top, s)
    conf = fixed + torch.bincount(case * k * k + truth * k + pred, minlength=n * k * k).view(n, k, k)
    both = conf.diagonal(dim1=1, dim2=2)
    size = conf.sum(2) + conf.sum(1)  # truth + prediction voxels of each label, per case
    per = [float((2.0 * both[:, c][size[:, c] > 0] / size[:, c][size[:, c] > 0]).mean())
           for c in range(k) if (size[:, c] > 0).any()]
    return sum(per) / len(per) if per else 0.0


@torch.no_grad()
def fit_label_weights(wavelet: HaarWavelet3d, images: Sequence[torch.Tensor] | Any, max_cases: int = 64,
                      grid: Sequence[float] = tuple(0.5 + 0.25 * k for k in range(15)), rounds: int = 2) -> torch.Tensor:
    """Fit ``wavelet.label_weight`` so that the low-pass-only label channels, upsampled and weighted,
    decode (argmax) to the training label maps as well as they can: coordinate ascent of the mean
    per-label Dice over ``grid``, rarest label first (the most frequent one, usually background,
    stays at 1), on up to ``max_cases`` of ``images`` (``[C, X, Y, Z]`` model-space volumes, one-hot
    label channels last, in [-1, 1]).  Only voxels near a label boundary (more than one channel above zero) can
    change, so only those are kept.  A no-op (weights stay 1) for a transform that keeps every band
    of its labels.  Returns the weights.
    """
    k = wavelet.low_labels
    if k < 2:
        return wavelet.label_weight.clone() if k else torch.ones(0)
    fixed, cases, truths, scores = [], [], [], []
    for i, img in enumerate(images):
        if i >= max_cases:
            break
        x = torch.as_tensor(img).as_subclass(torch.Tensor)[None].float()
        t = x[0, -k:].argmax(0).reshape(-1)
        sc = label_shares(wavelet.upsample_labels(wavelet.transform(x)[:, -k:]))[0].reshape(k, -1)
        amb = (sc > 1e-6).sum(0) > 1
        fixed.append(torch.bincount(t[~amb] * k + sc[:, ~amb].argmax(0), minlength=k * k).view(k, k))
        cases.append(torch.full((int(amb.sum()),), len(fixed) - 1, dtype=torch.long))
        truths.append(t[amb])
        scores.append(sc[:, amb])
    if not fixed:
        raise ValueError("fit_label_weights needs at least one image")
    fx, case, truth, score = torch.stack(fixed), torch.cat(cases), torch.cat(truths), torch.cat(scores, 1)
    counts = fx.sum((0, 2)) + torch.bincount(truth, minlength=k)
    order = [int(c) for c in torch.argsort(counts, stable=True)][:-1]  # rarest first; the most frequent is the reference
    weight = torch.ones(k)
    best = _mean_dice(fx, case, truth, score, weight)
    for _ in range(rounds):
        for c in order:
            for g in grid:
                trial = weight.clone()
                trial[c] = float(g)
                d = _mean_dice(fx, case, truth, score, trial)
                if d > best + 1e-9:
                    best, weight = d, trial
    wavelet.label_weight.copy_(weight.to(wavelet.label_weight.dtype))
    return wavelet.label_weight.clone()
