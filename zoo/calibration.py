"""Temperature scaling inside the network: ``model(x) / T``, so every consumer (MLflow pyfunc, the ONNX file,
the service) gets calibrated probabilities from a softmax, with nothing to apply on its own side."""

from __future__ import annotations

import torch
from torch import nn

from zoo.errors import ZooError


class TemperatureScaled(nn.Module):
    """``model(x) / temperature``: the same argmax, softer (T > 1) or sharper (T < 1) probabilities."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        if not temperature > 0:
            raise ZooError(f"temperature={temperature!r} must be > 0.")
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x):
        return self.model(x) / self.temperature
