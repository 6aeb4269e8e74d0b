"""Grad-CAM (Selvaraju et al. 2017, the ``grad-cam`` package) of a run's test images, and how it agrees with the
class activation map the served model explains with (``zoo.cam``).

At 28 px a deep net's last feature map can be 1x1 (timm's ResNet-18: 28 -> 1), where a map says nothing: the layer
is the deepest whose output is at least 2x2 (:func:`target_layer`; resnet9's last stage gives 3x3). On a net whose
head is pooling then one linear layer, Grad-CAM on that last map weights each channel by the mean of its gradients,
which is the head's weight divided by the map's area for average and maximum pooling alike, so its map is the CAM up
to scale: their correlation measures that both are computed as they should.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.core.devices import to_input
from zoo.cam import MIN_MAP_SIDE  # the same rule as the served maps: a 1x1 map shows nothing


def target_layer(network: nn.Module, in_chans: int, input_size: int) -> tuple[str, nn.Module, tuple[int, int]]:
    """The deepest module (in the order the forward pass reaches them) whose output is a map of at least
    MIN_MAP_SIDE x MIN_MAP_SIDE: its name, the module and the map's size."""
    found: list[tuple[str, nn.Module, tuple[int, int]]] = []
    hooks = []
    for name, module in network.named_modules():
        if not name or isinstance(module, (nn.Sequential, nn.ModuleList)):
            continue

        def record(module, _inputs, output, name=name):
            if isinstance(output, torch.Tensor) and output.dim() == 4 and min(output.shape[-2:]) >= MIN_MAP_SIDE:
                found.append((name, module, tuple(output.shape[-2:])))

        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            network.eval()(torch.zeros(1, in_chans, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
    if not found:
        raise ValueError(f"{type(network).__name__} has no feature map of at least {MIN_MAP_SIDE}x{MIN_MAP_SIDE}.")
    return found[-1]


def grad_cam(network: nn.Module, layer: nn.Module, images: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Grad-CAM maps [N, H, W] in [0, 1] at the input size, of uint8 ``images`` for ``classes``."""
    from pytorch_grad_cam import GradCAM  # imported here: only the runs' figure needs it
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    network.eval()
    with GradCAM(model=network, target_layers=[layer]) as cam:
        return cam(input_tensor=to_input(images), targets=[ClassifierOutputTarget(int(c)) for c in classes])


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two maps' pixels (nan when either is constant)."""
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def examples(labels: np.ndarray, probs: np.ndarray, mistakes: int = 8, per_class: int = 1) -> list[int]:
    """Indices to explain: the most confident mistakes, then the most confident correct image of each class."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(predicted != labels)
    chosen = wrong[np.argsort(-confidence[wrong])][:mistakes].tolist()
    for c in range(probs.shape[1]):
        right = np.flatnonzero((predicted == labels) & (labels == c))
        chosen += right[np.argsort(-confidence[right])][:per_class].tolist()
    return chosen
