"""Fully connected baseline: the '128-64 MLP with dropout' of the MNIST and Fashion-MNIST studies."""

from __future__ import annotations

from torch import nn

from zoo.layers import as_int_tuple, check_dropout, check_flag, init_weights
from zoo.registry import register_model


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...], dropout: float, batch_norm: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for out in hidden:
            layers.append(nn.Linear(width, out, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(out))
            layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


@register_model("own", "Multi-layer perceptron on flattened pixels", min_input_size=4)
def mlp(in_chans, num_classes, input_size, hidden="128,64", dropout=0.2, batch_norm=False, init="default"):
    model = MLP(
        in_chans * input_size * input_size,
        num_classes,
        as_int_tuple("hidden", hidden),
        check_dropout(dropout),
        check_flag("batch_norm", batch_norm),
    )
    init_weights(model, init)
    return model
