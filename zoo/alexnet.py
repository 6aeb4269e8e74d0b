"""AlexNet-style net adapted to small inputs.

torchvision's AlexNet (11x11 stride-4 stem, three stride-2 pools) collapses below ~63 px; this keeps its
five-conv / three-FC shape with a 5x5 stride-1 stem and an adaptive pool, so it works from 16 px upwards.
"""

from __future__ import annotations

from torch import nn

from zoo.layers import check_dropout, check_flag, init_weights
from zoo.registry import register_model


def _conv(in_chans, out_chans, kernel_size, batch_norm):
    layers = [nn.Conv2d(in_chans, out_chans, kernel_size, padding=kernel_size // 2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_chans))
    return layers + [nn.ReLU(inplace=True)]


class AlexNetSmall(nn.Module):
    def __init__(self, in_chans: int, num_classes: int, dropout: float, batch_norm: bool, width: int):
        super().__init__()
        c1, c2, c3, c4 = width, 3 * width, 6 * width, 4 * width
        self.features = nn.Sequential(
            *_conv(in_chans, c1, 5, batch_norm),
            nn.MaxPool2d(3, 2),
            *_conv(c1, c2, 5, batch_norm),
            nn.MaxPool2d(3, 2),
            *_conv(c2, c3, 3, batch_norm),
            *_conv(c3, c4, 3, batch_norm),
            *_conv(c4, c4, 3, batch_norm),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c4 * 4, 1024),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(1024, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("own", "AlexNet-style CNN (5 conv + 3 FC) adapted to 16-64 px inputs", min_input_size=16)
def alexnet(in_chans, num_classes, input_size, dropout=0.5, batch_norm=True, width=64, init="kaiming_uniform"):
    model = AlexNetSmall(
        in_chans, num_classes, check_dropout(dropout), check_flag("batch_norm", batch_norm), int(width)
    )
    init_weights(model, init)
    return model
