"""Peak GPU memory of sampling one volume, and the decode tiling that fits a card.

Used by ``medsynth generate --memory-gb G`` and to derive the presets in ``configs/presets/``
(like MAISI's ``config_infer_{16,24,32,80}g_*.json``).  The model, for one volume:

    peak = weights + max(decoder, UNet)

* ``weights``: every parameter of the autoencoder and the UNet, fp32 (counted, not guessed).
* ``decoder``: ``k x C0 x V`` bytes -- ``V`` the output voxels of the largest decode tile (the
  latent tile times the autoencoder's downsampling, cubed per axis), ``C0`` the autoencoder's
  first-level channels (the decoder's widest tensors live at full resolution), and ``k`` bytes per
  output voxel and channel measured on an NVIDIA H200 in bf16 (``benchmarks/results/gpu-h200-quick.json``):
  MONAI's ``AutoencoderKL`` 28.0 (whole 256³ decode, [32, 64, 64]) and 28.6 (27³-latent tiles);
  MAISI's ``AutoencoderKlMaisi`` with ``num_splits: 8`` 18.5-20.6 (RF-30 sampling at 256³, 384³,
  512³, [64, 128, 256], the 0.7 GiB of weights taken off).  The model takes the largest figure of
  each, rounded up (28.7, 20.7), so every estimate is at or above what was measured, by at most
  13 % (512³: 13.1 vs 11.7 GiB; the others within 3 %; checked against the JSON in tests/test_memory.py).
  A MAISI autoencoder with fewer splits is given MONAI's figure (not measured).
* ``UNet``: activations at the latent grid, ``32 B x C_unet0 x latent voxels x batch``: an
  assumption (not measured apart from the decoder), below the decoder on every shipped CT config.

A card of ``G`` GB offers ``0.9 x G x 10^9 B - 1 GiB`` (CUDA context, allocator slack).  Training
memory (gradients, optimizer state, the backward pass) is not modelled: no figure was measured at
these sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from medsynth.config import Config

GIB = 2 ** 30
# bytes per decoded output voxel and first-level channel (see the module docstring)
K_DECODER = {"monai": 28.7, "maisi_split8": 20.7}
K_UNET = 32.0  # assumed: bytes per latent voxel and first-level UNet channel, per sample
CONTEXT_GIB = 1.0
CARD_FRACTION = 0.9
CARDS_GB = (16, 24, 40, 80)

# The H200 figures the decoder constants come from (benchmarks/results/gpu-h200-quick.json; the test
# reads the file and checks these are its numbers): networks, volume size, largest latent tile, peak.
CALIBRATION = (
    {"what": "MAISI-sized networks, RF-30, 256³", "json": ("maisi", "sizes", 0, "peak_gb"), "unit": "GiB",
     "size": 256, "tile": 64, "nets": "maisi"},
    {"what": "MAISI-sized networks, RF-30, 384³", "json": ("maisi", "sizes", 1, "peak_gb"), "unit": "GiB",
     "size": 384, "tile": 56, "nets": "maisi"},
    {"what": "MAISI-sized networks, RF-30, 512³", "json": ("maisi", "sizes", 2, "peak_gb"), "unit": "GiB",
     "size": 512, "tile": 54, "nets": "maisi"},
    {"what": "decode 256³ whole, [32, 64, 64] AutoencoderKL", "json": ("decode", "full", "gpu_peak_mb"),
     "unit": "MiB", "size": 256, "tile": 64, "nets": "bench_decode"},
    {"what": "decode 256³ in 27³-latent tiles, [32, 64, 64] AutoencoderKL", "json": ("decode", "tiled", "gpu_peak_mb"),
     "unit": "MiB", "size": 256, "tile": 27, "nets": "bench_decode"},
)


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts of the model for one config and decode tile (GiB)."""

    weights: float
    decoder: float
    unet: float
    latent_tile: tuple[int, int, int]

    @property
    def peak(self) -> float:
        return self.weights + max(self.decoder, self.unet)

    def to_dict(self) -> dict[str, Any]:
        return {"peak_gib": round(self.peak, 2), "weights_gib": round(self.weights, 2),
                "decoder_gib": round(self.decoder, 2), "unet_gib": round(self.unet, 2),
                "latent_tile": list(self.latent_tile)}


def usable_gib(memory_gb: float) -> float:
    """What sampling may allocate on a card of ``memory_gb`` GB (decimal, as cards are sold)."""
    return CARD_FRACTION * memory_gb * 1e9 / GIB - CONTEXT_GIB


def decoder_k(cfg: Config) -> float:
    a = cfg.model.autoencoder
    return K_DECODER["maisi_split8"] if a.kind == "maisi" and a.num_splits >= 8 else K_DECODER["monai"]


def parameter_bytes(cfg: Config) -> int:
    """fp32 bytes of the autoencoder's and UNet's parameters (built on the meta device: no memory)."""
    import dataclasses

    import torch

    from medsynth.model.networks import build_autoencoder, build_unet

    m = cfg.model  # flash attention has no parameters, and MAISI's UNet refuses it without CUDA
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        m, unet=dataclasses.replace(m.unet, use_flash_attention=False),
        autoencoder=dataclasses.replace(m.autoencoder, use_flash_attention=False)))
    with torch.device("meta"):
        nets = [build_unet(cfg)] + ([] if cfg.model.autoencoder.kind == "wavelet" else [build_autoencoder(cfg)])
    return sum(4 * p.numel() for n in nets for p in n.parameters())


def estimate(cfg: Config, latent_roi: Optional[tuple[int, int, int]] = None, batch: int = 1,
             weights_bytes: Optional[int] = None) -> MemoryEstimate:
    """The model's peak for sampling ``cfg`` with decode tiles of at most ``latent_roi`` latent voxels
    (default: the config's tiling; whole volume when tiling is off)."""
    from medsynth.model.fastpath import plan_tiles
    from medsynth.model.networks import downsample_factor, latent_shape

    latent = tuple(latent_shape(cfg)[1:])
    t = cfg.sampling.tiling
    roi = tuple(latent_roi) if latent_roi is not None else (tuple(t.latent_roi) if t.enabled else latent)
    tile, _ = plan_tiles(latent, roi, t.overlap)
    f = downsample_factor(cfg)
    c0 = cfg.model.autoencoder.channels[0] if cfg.model.autoencoder.kind != "wavelet" else 1
    dec = decoder_k(cfg) * c0 * math.prod(s * f for s in tile) / GIB
    unet = K_UNET * cfg.model.unet.channels[0] * math.prod(latent) * batch / GIB
    w = parameter_bytes(cfg) if weights_bytes is None else weights_bytes
    return MemoryEstimate(weights=w / GIB, decoder=dec, unet=unet, latent_tile=tuple(int(x) for x in tile))


def tiling_for(cfg: Config, memory_gb: float) -> tuple[tuple[int, int, int], MemoryEstimate]:
    """The largest cubic decode-tile cap (``sampling.tiling.latent_roi``) whose estimate fits a card
    of ``memory_gb`` GB, and that estimate.  Raises :class:`ConfigError` when even 4³ tiles do not."""
    from medsynth.errors import ConfigError
    from medsynth.model.networks import latent_shape

    budget = usable_gib(memory_gb)
    w = parameter_bytes(cfg)
    top = max(latent_shape(cfg)[1:])
    best: Optional[MemoryEstimate] = None
    for r in range(top, 3, -1):
        est = estimate(cfg, (r, r, r), weights_bytes=w)
        best = est
        if est.peak <= budget:
            return (r, r, r), est
    raise ConfigError(f"`memory_gb={memory_gb}`: even 4³-voxel decode tiles need about {best.peak:.1f} GiB "
                      f"(weights {best.weights:.1f} GiB, UNet {best.unet:.1f} GiB); this card offers {budget:.1f}",
                      hint="use a card with more memory, or sample on the CPU (`device='cpu'`)")


def preset_text(base_yaml: str, cfg: Config, memory_gb: int, base_name: str) -> str:
    """A preset: ``base_yaml`` with ``sampling.tiling.latent_roi`` set for a ``memory_gb`` GB card and a
    header saying what the memory model estimates (the rest of the file, comments included, unchanged)."""
    import re

    roi, est = tiling_for(cfg, memory_gb)
    tiles = "the whole latent at once" if list(est.latent_tile) == list(_latent(cfg)) else \
        f"tiles of {' x '.join(map(str, est.latent_tile))} latent voxels"
    head = (f"# {base_name} for a {memory_gb} GB GPU (like MAISI's config_infer_{memory_gb}g_*.json): sampling decodes\n"
            f"# {tiles}; estimated peak {est.peak:.1f} GiB of the {usable_gib(memory_gb):.1f} GiB usable "
            f"(weights {est.weights:.1f},\n# decoder {est.decoder:.1f}, UNet {est.unet:.1f}; medsynth/model/memory.py). "
            f"Only sampling.tiling.latent_roi differs from\n# configs/{base_name}.yaml; training memory is not "
            f"modelled. Regenerate: python -m medsynth.model.memory\n")
    body, n = re.subn(r"(?m)^(\s+latent_roi:\s*)\[[^\]]*\]", lambda m: f"{m.group(1)}[{roi[0]}, {roi[1]}, {roi[2]}]",
                      base_yaml, count=1)
    if n != 1:
        raise ValueError(f"{base_name}: no sampling.tiling.latent_roi line to set")
    # presets live one folder below their base: relative file paths get one more '../'
    body = re.sub(r"(?m)^(\s*(?:manifest|cache_dir|init|perceptual_weights|feature_checkpoint):\s*)(?![/~\s]|null)",
                  r"\1../", body)
    return head + body


def _latent(cfg: Config) -> tuple[int, ...]:
    from medsynth.model.networks import latent_shape

    return tuple(latent_shape(cfg)[1:])


PRESET_BASES = ("ct_chest", "ct_maisi")


def main() -> None:  # pragma: no cover - regenerates configs/presets/ (run by hand after changing the model)
    from pathlib import Path

    from medsynth.config import load_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    (configs / "presets").mkdir(exist_ok=True)
    for base in PRESET_BASES:
        cfg = load_config(configs / f"{base}.yaml")
        text = (configs / f"{base}.yaml").read_text()
        for gb in CARDS_GB:
            out = configs / "presets" / f"{base}_{gb}g.yaml"
            out.write_text(preset_text(text, cfg, gb, base))
            print(out)


if __name__ == "__main__":  # pragma: no cover
    main()


def apply_memory_budget(sampler: Any, memory_gb: float) -> MemoryEstimate:
    """Set a :class:`~medsynth.model.sample.Sampler`'s decode tiles (and batch size 1) for a card of
    ``memory_gb`` GB, in place, and record them in its provenance (every sample's sidecar)."""
    import dataclasses

    roi, est = tiling_for(sampler.cfg, memory_gb)
    s = sampler.cfg.sampling
    tiling = dataclasses.replace(s.tiling, enabled=True, latent_roi=roi)
    sampler.cfg = dataclasses.replace(sampler.cfg, sampling=dataclasses.replace(s, batch_size=1, tiling=tiling))
    sampler.provenance["decode_tiling"] = {"latent_roi": list(roi), "memory_gb": memory_gb,
                                           "estimated_peak_gib": round(est.peak, 2)}
    return est
