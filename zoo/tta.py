"""Test-time augmentation inside the network: the views are averaged in the graph itself.

The wrapped model returns log(mean of the views' softmax): a softmax of it gives the averaged probabilities,
so every consumer (MLflow pyfunc, the ONNX file, the service) keeps treating the output as logits and
answers exactly what the run reported. Every view is an exportable tensor op (flip, transpose, pad + slice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import ZooError


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate by (dy, dx) px with reflected borders, the way training's translation pads."""
    pad = max(abs(dy), abs(dx))
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    h, w = x.shape[-2], x.shape[-1]
    return padded[..., pad - dy : pad - dy + h, pad - dx : pad - dx + w]


VIEWS = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "rot90": lambda x: x.transpose(-1, -2).flip(-1),
    "rot180": lambda x: x.flip(-1).flip(-2),
    "rot270": lambda x: x.transpose(-1, -2).flip(-2),
    "shift_left": lambda x: _shift(x, 0, -1),
    "shift_right": lambda x: _shift(x, 0, 1),
    "shift_up": lambda x: _shift(x, -1, 0),
    "shift_down": lambda x: _shift(x, 1, 0),
}


def check_views(views) -> tuple[str, ...]:
    views = tuple(views)
    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ZooError(f"tta views {unknown or 'none'} are not among: {', '.join(VIEWS)}.")
    return views


class TTAClassifier(nn.Module):
    """``log(mean_v softmax(model(view_v(x))))`` over the named views (identity should be one of them)."""

    def __init__(self, model: nn.Module, views):
        super().__init__()
        self.model = model
        self.views = check_views(views)

    def forward(self, x):
        batch = x.shape[0]
        stacked = torch.cat([VIEWS[v](x) for v in self.views])  # one forward pass for all views
        probs = self.model(stacked).softmax(dim=-1).reshape(len(self.views), batch, -1)
        return probs.mean(dim=0).clamp_min(1e-12).log()
