"""Exponential moving average of a network's weights (what stage-2 sampling uses by default)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """A frozen copy of ``model`` whose weights track ``decay * ema + (1 - decay) * model``.

    The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates, so a short
    run is not dominated by the random initial weights.  Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.model.load_state_dict(state["model"])
