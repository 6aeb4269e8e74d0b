"""ResNet-9 for small images: David Page's DAWNBench CIFAR-10 net ("How to train your ResNet"), width-scaled.

prep conv -> [conv, pool, residual] -> [conv, pool] -> [conv, pool, residual] -> global max pool -> linear.
At 28 px the three pools leave 3x3 maps; ``width`` (the first stage's channels, doubled per stage) trades
accuracy for CPU time: width 16 is ~6x cheaper than Page's 64.
"""

from __future__ import annotations

from torch import nn

from zoo.errors import ZooError
from zoo.layers import check_dropout
from zoo.registry import register_model


def conv_bn(in_chans: int, out_chans: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False), nn.BatchNorm2d(out_chans), nn.ReLU(inplace=True)
    )


class Residual(nn.Module):
    def __init__(self, chans: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(chans, chans), conv_bn(chans, chans))

    def forward(self, x):
        return x + self.body(x)


class GlobalMaxPool(nn.Module):
    """[N, C, H, W] -> [N, C]. ``amax`` exports as ONNX ReduceMax with every torch exporter; AdaptiveMaxPool2d
    has no ONNX translation in torch 2.11's exporter."""

    def forward(self, x):
        return x.amax(dim=(-2, -1))


class ResNet9(nn.Module):
    def __init__(self, in_chans: int, num_classes: int, width: int, dropout: float):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(in_chans, w),
            conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            Residual(2 * w),
            conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            conv_bn(4 * w, 8 * w),
            nn.MaxPool2d(2),
            Residual(8 * w),
            GlobalMaxPool(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(8 * w, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


@register_model("own", "ResNet-9 (Page's fast CIFAR net), width-scaled for 28 px on CPUs", min_input_size=8)
def resnet9(in_chans, num_classes, input_size, width=16, dropout=0.0):
    if int(width) < 1:
        raise ZooError(f"width={width!r} must be a positive integer.")
    return ResNet9(in_chans, num_classes, int(width), check_dropout(dropout))
