"""Small building blocks shared by the zoo's own models."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from zoo.errors import ZooError

WEIGHT_INITS = ("default", "kaiming_uniform", "kaiming_normal", "xavier_uniform")
POOLINGS = ("max", "avg")


def choose(option: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ZooError(f"{option}={value!r} is not one of: {', '.join(map(str, allowed))}.")


def as_int_tuple(option: str, value) -> tuple[int, ...]:
    """Accept ``64``, ``[128, 64]`` or ``"128,64"``: sweeps and the CLI pass widths in all three forms."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, int):
        value = [value]
    try:
        widths = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ZooError(f"{option}={value!r} must be a list of positive integers.") from None
    if not widths or any(w < 1 for w in widths):
        raise ZooError(f"{option}={value!r} must be a non-empty list of positive integers.")
    return widths


def check_dropout(dropout: float) -> float:
    if not 0.0 <= float(dropout) < 1.0:
        raise ZooError(f"dropout={dropout!r} must be in [0, 1).")
    return float(dropout)


def check_flag(name: str, value) -> bool:
    """A bool, or its text as a card or a logged parameter holds it (``bool("false")`` would be True)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ZooError(f"{name}={value!r} must be true or false.")


def init_weights(model: nn.Module, scheme: str) -> None:
    """Re-initialise conv and linear weights; 'default' keeps PyTorch's own initialisation."""
    choose("init", scheme, WEIGHT_INITS)
    if scheme == "default":
        return
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if scheme == "kaiming_uniform":
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
            elif scheme == "kaiming_normal":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def flat_features(features: nn.Module, in_chans: int, input_size: int) -> int:
    """Size of ``features``' flattened output, found by a dry run so heads need no hand arithmetic."""
    with torch.no_grad():
        out = features(torch.zeros(1, in_chans, input_size, input_size))
    if out.numel() == 0:
        raise ZooError(f"input_size={input_size} is too small for this architecture (feature map is empty).")
    return out.numel()
