"""The inference fast path of sampling: precision, memory format and convolution routing.

Three measured facts shape it (``benchmarks/run.py`` re-measures them on the machine at hand):

* On the CPU, PyTorch sends a batch-1 3D convolution whose ``channels x depth x height`` is at most
  20480 (every latent-level convolution of a 3D latent diffusion UNet) to its im2col
  ``slow_conv3d`` kernel, not to oneDNN; oneDNN runs the same convolution 1.5-8x faster.
  :class:`OneDNNConv3d` routes inference convolutions to oneDNN whatever their size.
* oneDNN convolutions read and write channels-last (NDHWC) tensors without reordering, and
  PyTorch's CPU group norm, SiLU and nearest upsampling have channels-last kernels, so the whole
  network runs channels-last (``torch.channels_last_3d``); on CUDA cuDNN prefers it in bf16/fp16.
* MONAI's attention blocks build the full attention matrix with ``einsum`` unless built with
  ``use_flash_attention``; PyTorch's fused ``scaled_dot_product_attention`` computes the same
  softmax attention in tiles (1.8x faster for the whole UNet at a 32³ latent on a 2-core CPU).
  The flag is a forward-time switch in MONAI, so trained weights need no change.
* bf16 autocast pays only where the hardware has bf16 arithmetic: CUDA GPUs with bf16, and CPUs
  with AVX512-BF16 or AMX.  Elsewhere oneDNN emulates bf16 and a 3D UNet runs tens of times slower,
  so ``precision: auto`` keeps fp32 there.

``precision: fp32`` with ``channels_last``, ``onednn_conv`` and ``fused_attention`` off is the exact path: the same
kernels, hence the same bytes, as MONAI's ``LatentDiffusionInferer.sample``.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from medsynth.model.networks import cpu_has_native_bf16, resolve_precision

log = logging.getLogger("medsynth.model.fastpath")


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose inference forward on the CPU in fp32 always runs oneDNN.

    Training (grad enabled), autocast, other devices and dtypes and non-zero padding modes take
    the ordinary ``nn.Conv3d`` path, so swapping a module's class changes nothing but the kernel
    chosen for fp32 CPU inference.  Parameters and ``state_dict`` keys are those of ``nn.Conv3d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")):
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride,
                                            self.dilation, self.groups)
        return super().forward(x)


def use_onednn_convolutions(net: nn.Module) -> int:
    """Make every plain ``nn.Conv3d`` of ``net`` a :class:`OneDNNConv3d` (in place); returns how many.

    Only the class changes (weights, hooks and ``state_dict`` stay), and only when oneDNN is
    available in this build of torch.
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    n = 0
    for m in net.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = OneDNNConv3d
            n += 1
    return n


def use_fused_attention(net: nn.Module) -> int:
    """Switch MONAI attention blocks of ``net`` to ``scaled_dot_product_attention`` (in place);
    returns how many.  Blocks that the fused kernel would change (relative position embedding,
    saved attention maps, attention dropout, causal masks) are left as they are."""
    n = 0
    for m in net.modules():
        if (getattr(m, "use_flash_attention", None) is False and getattr(m, "rel_positional_embedding", None) is None
                and not getattr(m, "save_attn", False) and not getattr(m, "dropout_rate", 0.0)
                and not getattr(m, "causal", False)):
            m.use_flash_attention = True
            n += 1
    return n


# On a CPU with native bf16 (2-core Xeon with AMX, issue 16), bf16 sampling was slower than fp32 at
# an 8³ latent (0.62x) and 3.07x faster end to end at 64³ (16³ latent): below this many latent
# voxels ``auto`` keeps fp32 on the CPU, where oneDNN's bf16 kernels do not pay for their reorders.
# On a 2-core AMD EPYC with AVX512-BF16 (2026-12-04) one forward of the wavelet demo's UNet (batch 1,
# channels-last, 2 threads) in bf16 vs fp32: 0.64x at 8³ (512 voxels), 0.98x at 1152, 1.16x at 2048,
# 1.34x at its 16 x 16 x 12 latent (3072), 1.74x at 24576; and the two-expert demo sampled in bf16
# passed the gate and matched the Fréchet distance of fp32 within the split-half noise
# (benchmarks/results/cpu-epyc-avx512bf16-bf16-fidelity-demo.json), so the limit is 2048 (it was
# 16³, which kept the demo's latent in fp32).  On a 2-core Xeon with AMX (2026-12-06) the sampler's own
# path (Sampler.untrained, 2 samples, RF-20, 2 threads) in bf16 vs fp32: 0.86x at the KL demo's 384
# latent voxels, 0.82x at 512, 1.03x at 1152, 1.27x at 2048, 1.42x at 3072: the same crossover.
CPU_BF16_MIN_LATENT_VOXELS = 2048


def resolve_sampling_precision(precision: str, device: torch.device, latent_voxels: Optional[int] = None,
                               min_cpu_voxels: int = CPU_BF16_MIN_LATENT_VOXELS) -> str:
    """The precision sampling runs in: ``auto`` is bf16 on CUDA (fp16 on GPUs without bf16) and on
    CPUs with native bf16 when the latent has at least ``min_cpu_voxels``
    (:data:`CPU_BF16_MIN_LATENT_VOXELS`) voxels (``latent_voxels``; unknown counts as large), fp32
    elsewhere; an explicit choice goes through ``resolve_precision``."""
    if precision != "auto":
        return resolve_precision(precision, device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type != "cpu" or not cpu_has_native_bf16():
        return "fp32"
    small = latent_voxels is not None and int(latent_voxels) < min_cpu_voxels
    return "fp32" if small else "bf16"


def resolve_channels_last(channels_last: bool | str, device: torch.device) -> bool:
    """``sampling.channels_last``: ``auto`` is channels-last on the CPU only.  oneDNN's 3D convolutions
    gain from it; on CUDA, cuDNN's lost: bf16 DDIM-50 at 256³ on an H200 took 1.8 s channels-last vs
    1.5 s channels-first (benchmarks/results/gpu-*.json)."""
    if channels_last == "auto":
        return device.type == "cpu"
    return bool(channels_last)


# Training steps (forward + backward + Adam, batch 4) gain from bf16 at smaller grids than a
# sampling forward: on a 2-core AMD EPYC with AVX512-BF16 (no AMX), 1 thread, the wavelet demo's
# UNet at its 16 x 16 x 12 latent (3072 voxels) took 0.306 s a step in bf16 vs 0.478 s in fp32
# (1.56x; 2 threads 0.200 vs 0.269 s), the KL demo's stage 2 at 8 x 8 x 6 (384) 0.090 vs 0.089 s.
CPU_BF16_MIN_TRAINING_VOXELS = 2048


def resolve_training_precision(precision: str, device: torch.device, voxels: Optional[int] = None) -> str:
    """The precision a training stage autocasts to: the rule of :func:`resolve_sampling_precision`
    (``auto``: bf16 on CUDA, fp16 on GPUs without bf16, bf16 on CPUs with native bf16 when the grid
    the stage's network sees has at least :data:`CPU_BF16_MIN_TRAINING_VOXELS` voxels (``voxels``),
    fp32 elsewhere, emulated bf16 included); an explicit choice goes through ``resolve_precision``."""
    return resolve_sampling_precision(precision, device, voxels, min_cpu_voxels=CPU_BF16_MIN_TRAINING_VOXELS)


def resolve_training_channels_last(channels_last: bool | str, device: torch.device, stage: str,
                                   precision: str) -> bool:
    """``training.channels_last`` of one stage (``autoencoder``, ``diffusion``, ``controlnet``).

    ``auto``: channels-first on CUDA (cuDNN's 3D convolutions lost channels-last in sampling); on
    the CPU channels-last for stage 2 and the ControlNet under bf16, channels-first for stage 1
    under bf16, and in fp32 channels-last only for the stages where it measured faster.

    Under bf16 (``--training-layouts --layouts-precision bf16``, 2 threads, median step):
    channels-last made the KL demo's stage 1 (autoencoder + PatchGAN, batch 2) slower on both
    native-bf16 kinds: 0.058 / 0.045 s channels-first vs 0.093 / 0.073 s channels-last in two runs
    on a 2-core Xeon with AMX (2026-12-06, ``benchmarks/results/cpu-xeon-amx-training-layouts-bf16.json``),
    0.089 vs 0.102 s on a 2-core EPYC with AVX512-BF16 (2026-12-04); the ControlNet was faster
    channels-last on both (0.049 vs 0.057 s on the Xeon, 0.060 vs 0.063 s on the EPYC), stage 2 the
    same within a few per cent (demo 0.078-0.098 vs 0.080-0.101 s, 16³ latent 0.199-0.200 vs
    0.197-0.205 s on the Xeon).  On a 2-core AVX2 EPYC (fp32, 1
    thread, load average 2.0-2.9 from another job, steps interleaved;
    ``benchmarks/results/cpu-training-layouts.json``) channels-last made the demo's stage 1 1.21x
    (0.456 -> 0.376 s a step) and its ControlNet 1.23x (0.407 -> 0.331 s) faster, the demo's stage 2
    neither (0.181 vs 0.179 s), and stage 2 of the benchmark UNet at a 16³ latent 13 % slower
    (1.63 -> 1.85 s), so fp32 stage 2 stays channels-first."""
    if channels_last != "auto":
        return bool(channels_last)
    if device.type != "cpu":
        return False
    if precision == "bf16":
        return stage != "autoencoder"
    return stage != "diffusion"


def resolve_training_fused_attention(fused_attention: bool | str, device: torch.device, precision: str) -> bool:
    """``training.fused_attention``: ``auto`` runs MONAI's attention blocks with the fused kernel on
    CUDA and under bf16 autocast, and keeps MONAI's einsum attention in fp32 on the CPU, where the
    fused forward and backward measured no gain that held (same run as above: demo stage 2 0.181 vs
    0.183 s, ControlNet 0.407 vs 0.385 s, benchmark UNet at a 16³ latent 1.63 vs 1.74 s)."""
    if fused_attention != "auto":
        return bool(fused_attention)
    return device.type != "cpu" or precision == "bf16"


def resolve_training_fused_optimizer(fused_optimizer: bool | str, device: torch.device) -> bool:
    """``training.fused_optimizer``: ``auto`` uses PyTorch's fused Adam where it has one (CPU and
    CUDA); elsewhere the per-parameter loop."""
    if fused_optimizer != "auto":
        return bool(fused_optimizer)
    return device.type in ("cpu", "cuda")


def adam(params: Iterable[nn.Parameter], lr: float, training: Any, device: torch.device) -> torch.optim.Adam:
    """The Adam optimizer of a training stage: fused when ``training.fused_optimizer`` resolves so
    (one kernel over all parameters instead of PyTorch's per-parameter loop; the same update rule,
    state and checkpoint format), else PyTorch's default."""
    fused = resolve_training_fused_optimizer(training.fused_optimizer, device)
    return torch.optim.Adam(params, lr=lr, fused=True) if fused else torch.optim.Adam(params, lr=lr)


def prepare_for_training(net: nn.Module, device: torch.device, channels_last: bool,
                         fused_attention: bool) -> torch.memory_format:
    """Put a network that is about to be trained in the training fast path (in place): its MONAI
    attention blocks on PyTorch's fused ``scaled_dot_product_attention`` when ``fused_attention``
    (forward and backward; trained weights are the same parameters), its parameters channels-last
    when ``channels_last``.  Returns the memory format its 5-D inputs should have."""
    if fused_attention:
        n = use_fused_attention(net)
        log.debug("%s: %d attention blocks fused", type(net).__name__, n)
    fmt = memory_format(channels_last)
    net.to(device=device, memory_format=fmt)
    return fmt


def prepare_stage_for_training(nets: Sequence[nn.Module], device: torch.device, training: Any, stage: str,
                               precision: str) -> torch.memory_format:
    """The training fast path of one stage: ``training.channels_last`` and ``training.fused_attention``
    resolved for ``stage`` and ``precision`` and applied to each of ``nets`` (:func:`prepare_for_training`);
    returns the memory format the stage's 5-D inputs should have."""
    channels_last = resolve_training_channels_last(training.channels_last, device, stage, precision)
    fused = resolve_training_fused_attention(training.fused_attention, device, precision)
    for net in nets:
        fmt = prepare_for_training(net, device, channels_last, fused)
    return fmt


def memory_format(channels_last: bool, x: torch.Tensor | None = None) -> torch.memory_format:
    """``torch.channels_last_3d`` for 5-D tensors when asked, else ``torch.contiguous_format``."""
    if channels_last and (x is None or x.dim() == 5):
        return torch.channels_last_3d
    return torch.contiguous_format


def prepare_for_inference(net: nn.Module, device: torch.device, channels_last: bool, onednn_conv: bool,
                          fused_attention: bool = False) -> nn.Module:
    """Move ``net`` to ``device`` in eval mode without gradients, in the chosen memory format, with
    CPU convolutions routed to oneDNN when ``onednn_conv`` and MONAI attention switched to the fused
    kernel when ``fused_attention`` (in place; returns ``net``)."""
    net = net.to(device).eval().requires_grad_(False)
    if fused_attention:
        use_fused_attention(net)
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    if onednn_conv and device.type == "cpu":
        n = use_onednn_convolutions(net)
        log.debug("%s: %d convolutions routed to oneDNN", type(net).__name__, n)
    return net


def plan_tiles(grid: tuple[int, ...], max_roi: tuple[int, ...], overlap: float) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Tile size and per-axis overlap for a sliding-window decode of a latent ``grid``.

    A fixed ``max_roi`` tile rarely divides the grid: a 64-voxel axis in 32-voxel tiles with 25%
    overlap needs three tiles that together decode 96 voxels.  Here each axis keeps the fewest
    tiles that fit in ``max_roi`` while neighbours still share at least the voxels the fixed tiling
    would share, and the tiles shrink to cover the axis evenly (three 27-voxel tiles, 81 voxels):
    less decoder work and a smaller peak.  The returned overlap fractions make MONAI's
    ``SlidingWindowInferer`` place exactly these tiles.
    """
    import math

    rois, overlaps = [], []
    for size, cap in zip(grid, max_roi):
        cap = max(1, min(int(cap), int(size)))
        if size <= cap:
            rois.append(int(size))
            overlaps.append(0.0)
            continue
        shared = min(cap - 1, cap - int(cap * (1.0 - overlap)))
        n = math.ceil((size - shared) / (cap - shared))
        roi = math.ceil((size + (n - 1) * shared) / n)
        interval = math.ceil((size - roi) / (n - 1))
        rois.append(roi)
        # MONAI's interval is int(roi * (1 - overlap)); half a voxel of slack survives float rounding
        overlaps.append(1.0 - (interval + 0.5) / roi)
    return tuple(rois), tuple(overlaps)
