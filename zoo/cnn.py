"""Plain convolutional net: conv-(BN)-ReLU-pool blocks, then a small fully connected head.

Covers the studies' depth / kernel size / pooling / batch-norm comparisons through its options.
"""

from __future__ import annotations

from torch import nn

from zoo.errors import ZooError
from zoo.layers import POOLINGS, as_int_tuple, check_dropout, check_flag, choose, flat_features, init_weights
from zoo.registry import register_model


def conv_block(
    in_chans: int, out_chans: int, kernel_size: int, pool: str, batch_norm: bool, convs: int = 1
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(
            nn.Conv2d(
                in_chans if i == 0 else out_chans, out_chans, kernel_size, padding=kernel_size // 2, bias=not batch_norm
            )
        )
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_chans))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
    return nn.Sequential(*layers)


class CNN(nn.Module):
    def __init__(
        self, features: nn.Module, feature_dim: int, channels: int, hidden: int, num_classes: int, dropout: float
    ):
        super().__init__()
        self.features = features
        if hidden:
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(feature_dim, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        else:  # global average pooling straight into the classifier (VGG-style small nets)
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)
            )

    def forward(self, x):
        return self.head(self.features(x))


@register_model(
    "own", "Configurable CNN: conv blocks (filters, convs, kernel, pooling, BN) + MLP or pooled head", min_input_size=8
)
def cnn(
    in_chans,
    num_classes,
    input_size,
    filters="32,64",
    kernel_size=3,
    pool="max",
    batch_norm=True,
    hidden=128,
    dropout=0.25,
    init="default",
    convs_per_block=1,
):
    """``hidden=0``: global average pooling straight into the classifier; ``convs_per_block=2``: VGG-style blocks."""
    filters = as_int_tuple("filters", filters)
    choose("pool", pool, POOLINGS)
    if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
        raise ZooError(f"kernel_size={kernel_size!r} must be a positive odd integer (3, 5, 7, ...).")
    if input_size >> len(filters) < 1:
        raise ZooError(
            f"cnn with {len(filters)} pooling blocks needs input_size >= {2 ** len(filters)}, got {input_size}."
        )
    blocks, chans = [], in_chans
    for out in filters:
        blocks.append(
            conv_block(chans, out, int(kernel_size), pool, check_flag("batch_norm", batch_norm), int(convs_per_block))
        )
        chans = out
    features = nn.Sequential(*blocks)
    feature_dim = flat_features(features, in_chans, input_size)
    model = CNN(features, feature_dim, chans, int(hidden), num_classes, check_dropout(dropout))
    init_weights(model, init)
    return model
