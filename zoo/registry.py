"""A timm-style model registry: ``@register_model`` factories, each with a small config.

Every consumer (data layer, training, export, serving) reads input size and normalisation from the
:class:`ModelConfig`, so those facts live in exactly one place. Imports nothing else of the zoo but its
errors; name parsing (``timm/<name>``) and option checks live in :mod:`zoo.factory`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from zoo.errors import ZooError

# Parameters every factory takes; the rest of its signature are the model's options.
STANDARD_ARGS = ("in_chans", "num_classes", "input_size")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str
    description: str
    default_input_size: int = 28
    min_input_size: int = 8
    # Only models with pretrained weights prescribe a normalisation (timm's own pretrained_cfg); the
    # others are z-scored with the training split's statistics.
    pretrained_mean: tuple[float, ...] | None = None
    pretrained_std: tuple[float, ...] | None = None
    options: tuple[str, ...] = field(default=())
    # Options are free-form keywords (timm passthrough): no option check is possible before building.
    any_options: bool = False

    @property
    def has_pretrained(self) -> bool:
        return self.pretrained_mean is not None


_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_CONFIGS: dict[str, ModelConfig] = {}


def register_model(family: str, description: str, **config) -> Callable:
    """Register ``fn(in_chans, num_classes, input_size, **options)`` under its function name."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _FACTORIES:
            raise RuntimeError(f"model {name!r} registered twice")
        options = tuple(p for p in inspect.signature(fn).parameters if p not in STANDARD_ARGS)
        _FACTORIES[name] = fn
        _CONFIGS[name] = ModelConfig(name=name, family=family, description=description, options=options, **config)
        return fn

    return decorator


def list_models() -> list[str]:
    return sorted(_FACTORIES)


def registered(name: str) -> tuple[ModelConfig, Callable[..., nn.Module]] | None:
    """The config and factory of a registered name, or None."""
    if name not in _FACTORIES:
        return None
    return _CONFIGS[name], _FACTORIES[name]


__all__ = ["ModelConfig", "ZooError", "list_models", "register_model", "registered"]
