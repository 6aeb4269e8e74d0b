"""Normalisation inside the network, so every consumer feeds plain [0, 1] pixels.

Training, the logged PyTorch model and the ONNX graph all share this module; the service feeds [0, 1] pixels
and never re-implements mean/std handling.
"""

from __future__ import annotations

import torch
from torch import nn

# Training images a data-dependent initialisation sees (resnet9's whitening filters): airbench's sample size.
DATA_INIT_IMAGES = 5000


class NormalizedClassifier(nn.Module):
    """``backbone((x - mean) / std)`` for ``x`` in [0, 1], shape [N, C, H, W]."""

    def __init__(self, backbone: nn.Module, mean, std):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.backbone((x - self.mean) / self.std)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> None:
        """Hand training images ([0, 1], up to ``DATA_INIT_IMAGES``), normalised, to a backbone whose initial weights
        depend on the data (it has ``init_from_data``); other backbones are left alone."""
        init = getattr(self.backbone, "init_from_data", None)
        if init is not None:
            init((x[:DATA_INIT_IMAGES] - self.mean) / self.std)
