"""Plain convolutional net: conv-(BN)-ReLU-pool blocks, then a small fully connected head.

Covers the studies' depth / kernel size / pooling / batch-norm comparisons through its options.
"""

from __future__ import annotations

from torch import nn

from zoo.layers import POOLINGS, as_int_tuple, check_dropout, choose, flat_features, init_weights
from zoo.registry import ZooError, register_model


def conv_block(in_chans: int, out_chans: int, kernel_size: int, pool: str, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_chans, out_chans, kernel_size, padding=kernel_size // 2, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_chans))
    layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)]
    return nn.Sequential(*layers)


class CNN(nn.Module):
    def __init__(self, features: nn.Module, feature_dim: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.features = features
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(feature_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


@register_model("own", "Configurable CNN: conv blocks (filters, kernel, pooling, BN) + MLP head", min_input_size=8)
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
):
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
        blocks.append(conv_block(chans, out, int(kernel_size), pool, bool(batch_norm)))
        chans = out
    features = nn.Sequential(*blocks)
    model = CNN(
        features, flat_features(features, in_chans, input_size), int(hidden), num_classes, check_dropout(dropout)
    )
    init_weights(model, init)
    return model
