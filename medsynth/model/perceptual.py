"""Optional perceptual loss for stage 1, from a LOCAL MedicalNet-style 3D ResNet weights file.

MONAI's ``PerceptualLoss`` fetches its 3D networks through ``torch.hub`` (a download).  medsynth
never downloads weights at run time, so this builds MONAI's own 3D ``resnet10``...``resnet50``,
loads the user's file, and reuses MONAI's ``MedicalNetPerceptualSimilarity`` computation
(per-volume standardisation, channel-normalised layer-4 features, squared difference, mean).
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.losses.perceptual import MedicalNetPerceptualSimilarity
from torch import nn

from medsynth.errors import ConfigError


class _Features(nn.Module):
    """The convolutional trunk of a MONAI ResNet up to layer 4 (feature maps, no pooling)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        if not n.no_max_pool:
            x = n.maxpool(x)
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


class LocalMedicalNetPerceptualLoss(MedicalNetPerceptualSimilarity):
    """MONAI's MedicalNet perceptual similarity with the network loaded from ``weights``.

    ``weights`` is a ``torch.save`` file of a state dict (optionally under ``state_dict`` and with
    a ``module.`` prefix, as MedicalNet releases are).  Raises :class:`ConfigError` naming the file.
    """

    def __init__(self, weights: str | Path, network: str = "resnet10"):
        nn.Module.__init__(self)  # deliberately skip the parent's torch.hub download
        from monai.networks.nets import resnet
        from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

        path = Path(weights)
        key = "training.autoencoder.perceptual_weights"
        if not path.is_file():
            raise ConfigError(f"{key}: {path} not found", hint="point it at a local MedicalNet-style "
                                                                "weights file (nothing is downloaded)")
        depth = int(network.removeprefix("resnet"))
        bias_downsample, shortcut = get_medicalnet_pretrained_resnet_args(depth)
        net = getattr(resnet, network)(spatial_dims=3, n_input_channels=1, feed_forward=False,
                                       shortcut_type=shortcut, bias_downsample=bias_downsample)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(f"{key}: {path} is not a readable torch weights file ({type(exc).__name__})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{key}: {path} does not fit a MONAI {network} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected keys)",
                              hint="set training.autoencoder.perceptual_network to the file's ResNet depth")
        self.model = _Features(net)
        self.channel_wise = False
        self.eval()
        for p in self.parameters():
            p.requires_grad = False

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 - MONAI API
        return super().forward(input, target).mean()
