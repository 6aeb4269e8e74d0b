"""Class activation maps (Zhou et al. 2016) without gradients, in a graph of their own beside the served one.

A net whose head is global pooling then one linear layer scores class c as w_c . pool(F) + b_c, where F is its
last feature map; the map w_c . F(x, y) shows where that evidence lies. :class:`Explained` computes it for every
class on the plain view of the input, upsampled (bilinear) to the input size and floored at 0, beside the served
graph's logits (test-time views and temperature included), so an explanation and its answer come from one call.
It is exported as a second ONNX graph (``explain.onnx``) rather than a second output of the served one: the served
graph then costs what it cost before (benchmarks/cam_cost.py measures the difference).

Which heads qualify, by :func:`cam_parts`: resnet9 (global *max* pooling: its map is the same weighted sum, of
which the logit takes each channel's peak), cnn with ``hidden=0`` (global average pooling), and timm's ResNets,
EfficientNets and MobileNetV2 (average pooling, then the classifier). Not: mlp and alexnet (no spatial map before
the head), cnn with a hidden layer, MobileNetV3 (a 1x1 conv and activation after the pooling) and ConvNeXt (a
LayerNorm after the pooling): for them the weighted map would not be what the head computes. Nor a net whose last
map is 1x1 at its input size (timm's ResNets at 28 px): upsampled, it is a constant.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from zoo.cnn import CNN
from zoo.preprocessing import NormalizedClassifier
from zoo.resnet9 import GlobalMaxPool, ResNet9

# timm classes whose head is global average pooling then the classifier (forward_features gives the last map).
TIMM_POOLED_HEADS = ("ResNet", "EfficientNet")


class CamParts(nn.Module):
    """The backbone up to its last spatial feature map, and the linear layer its pooled features go through."""

    def __init__(self, features, linear: nn.Linear, pooling: str):
        super().__init__()
        self.features, self.linear, self.pooling = features, linear, pooling

    def forward(self, x):
        return self.features(x)


class _TimmFeatures(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def cam_parts(backbone: nn.Module) -> CamParts | None:
    """The parts a CAM needs, or None when the head is not pooling then one linear layer."""
    if isinstance(backbone, ResNet9) and isinstance(backbone.features[-1], GlobalMaxPool):
        return CamParts(backbone.features[:-1], backbone.head[-1], "max")
    if isinstance(backbone, CNN) and isinstance(backbone.head[0], nn.AdaptiveAvgPool2d):
        return CamParts(backbone.features, backbone.head[-1], "avg")
    if type(backbone).__name__ in TIMM_POOLED_HEADS and hasattr(backbone, "forward_features"):
        pool = getattr(backbone, "global_pool", None)
        classifier = backbone.get_classifier()
        if isinstance(classifier, nn.Linear) and getattr(pool, "pool_type", "") == "avg":
            return CamParts(_TimmFeatures(backbone), classifier, "avg")
    return None


MIN_MAP_SIDE = 2  # a 1x1 map (timm's ResNet-18 at 28 px) upsamples to a constant: it shows nothing


def explains(backbone: nn.Module, in_chans: int, input_size: int) -> bool:
    """Whether ``backbone`` has a pooled linear head and, at this input size, a last map of at least 2x2."""
    parts = cam_parts(backbone)
    if parts is None:
        return False
    with torch.no_grad():
        side = min(parts(torch.zeros(1, in_chans, input_size, input_size)).shape[-2:])
    return side >= MIN_MAP_SIDE


class Explained(nn.Module):
    """``x`` -> (``logits`` of ``served``, ``cams`` [N, K, H, W]: each class's activation map on the plain view,
    at the input's size, floored at 0). ``normalized`` is the NormalizedClassifier inside ``served``."""

    def __init__(self, served: nn.Module, normalized: NormalizedClassifier):
        super().__init__()
        parts = cam_parts(normalized.backbone)
        if parts is None:
            raise ValueError(f"{type(normalized.backbone).__name__} has no pooled linear head: no activation map.")
        self.served, self.normalized, self.parts = served, normalized, parts

    def forward(self, x):
        logits = self.served(x)
        fmap = self.parts((x - self.normalized.mean) / self.normalized.std)  # [N, C, h, w]
        cams = torch.einsum("kc,nchw->nkhw", self.parts.linear.weight, fmap)
        cams = F.interpolate(cams, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, cams.clamp_min(0.0)
