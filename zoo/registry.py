"""A timm-style model registry: ``@register_model`` factories, each with a small config.

Every consumer (data layer, training, export, serving) reads input size and normalisation from the
:class:`ModelConfig`, so those facts live in exactly one place.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ZooError(ValueError):
    """A model name or option that the zoo cannot build; the message says what is allowed."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str
    description: str
    default_input_size: int = 28
    min_input_size: int = 8
    # Only models with pretrained weights prescribe a normalisation; the others are z-scored with
    # the training split's statistics.
    pretrained_mean: tuple[float, ...] | None = None
    pretrained_std: tuple[float, ...] | None = None
    options: tuple[str, ...] = field(default=())

    @property
    def has_pretrained(self) -> bool:
        return self.pretrained_mean is not None


_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_CONFIGS: dict[str, ModelConfig] = {}
TIMM_PREFIX = "timm/"


def register_model(family: str, description: str, **config) -> Callable:
    """Register ``fn(in_chans, num_classes, input_size, **options)`` under its function name."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _FACTORIES:
            raise RuntimeError(f"model {name!r} registered twice")
        options = tuple(
            p for p in inspect.signature(fn).parameters if p not in ("in_chans", "num_classes", "input_size")
        )
        _FACTORIES[name] = fn
        _CONFIGS[name] = ModelConfig(name=name, family=family, description=description, options=options, **config)
        return fn

    return decorator


def list_models() -> list[str]:
    return sorted(_FACTORIES)


def _unknown_model(name: str) -> ZooError:
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ZooError(
        f"Unknown model {name!r}.{hint} Available: {', '.join(list_models())}, "
        f"or any timm architecture as '{TIMM_PREFIX}<name>'."
    )


def get_model_config(name: str) -> ModelConfig:
    if name.startswith(TIMM_PREFIX):
        from zoo.timm_models import timm_passthrough_config

        return timm_passthrough_config(name[len(TIMM_PREFIX) :])
    if name not in _CONFIGS:
        raise _unknown_model(name)
    return _CONFIGS[name]


def create_model(
    name: str, in_chans: int = 3, num_classes: int = 1000, input_size: int | None = None, **options
) -> nn.Module:
    """Build model ``name``; unknown names and options fail with what is allowed."""
    config = get_model_config(name)
    input_size = input_size or config.default_input_size
    if input_size < config.min_input_size:
        raise ZooError(f"Model {name!r} needs inputs of at least {config.min_input_size} px, got {input_size}.")
    if name.startswith(TIMM_PREFIX):
        from zoo.timm_models import create_timm_passthrough

        return create_timm_passthrough(name[len(TIMM_PREFIX) :], in_chans, num_classes, **options)
    unknown = sorted(set(options) - set(config.options))
    if unknown:
        raise ZooError(
            f"Model {name!r} has no option(s) {', '.join(unknown)}. Its options: {', '.join(config.options) or 'none'}."
        )
    return _FACTORIES[name](in_chans=in_chans, num_classes=num_classes, input_size=input_size, **options)
