"""Normalisation inside the network, so every consumer feeds plain [0, 1] pixels.

Training, the logged PyTorch model, the ONNX graph and the service all share this one module; no
consumer re-implements mean/std handling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become the network's input: decode, convert channels, resize, divide by 255."""

    input_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "bilinear"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(
            input_size=int(data["input_size"]),
            in_chans=int(data["in_chans"]),
            mean=tuple(float(m) for m in data["mean"]),
            std=tuple(float(s) for s in data["std"]),
            resize=data.get("resize", "bilinear"),
        )


class NormalizedClassifier(nn.Module):
    """``backbone((x - mean) / std)`` for ``x`` in [0, 1], shape [N, C, H, W]."""

    def __init__(self, backbone: nn.Module, mean, std):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.backbone((x - self.mean) / self.std)
