"""``create_model(name, ...)``: the one place that parses model names and checks model options.

A name is a registered zoo model (``cnn``, ``resnet18``, ...) or any timm architecture as ``timm/<name>``.
"""

from __future__ import annotations

import difflib

from torch import nn

from zoo import timm_models
from zoo.errors import TIMM_PREFIX, ZooError
from zoo.registry import ModelConfig, list_models, registered


def _unknown_model(name: str) -> ZooError:
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ZooError(
        f"Unknown model {name!r}.{hint} Available: {', '.join(list_models())}, "
        f"or any timm architecture as '{TIMM_PREFIX}<name>'."
    )


def get_model_config(name: str) -> ModelConfig:
    if name.startswith(TIMM_PREFIX):
        return timm_models.passthrough_config(name[len(TIMM_PREFIX) :])
    found = registered(name)
    if found is None:
        raise _unknown_model(name)
    return found[0]


def check_options(name: str, options) -> ModelConfig:
    """Unknown option names fail here, before anything is built (timm passthrough takes any keyword)."""
    config = get_model_config(name)
    unknown = sorted(set(options) - set(config.options))
    if unknown and not config.any_options:
        raise ZooError(
            f"Model {name!r} has no option(s) {', '.join(unknown)}. Its options: {', '.join(config.options) or 'none'}."
        )
    return config


def create_model(
    name: str, in_chans: int = 3, num_classes: int = 1000, input_size: int | None = None, **options
) -> nn.Module:
    """Build model ``name``; unknown names and options fail with what is allowed."""
    config = check_options(name, options)
    input_size = input_size or config.default_input_size
    if input_size < config.min_input_size:
        raise ZooError(f"Model {name!r} needs inputs of at least {config.min_input_size} px, got {input_size}.")
    if name.startswith(TIMM_PREFIX):
        return timm_models.create_passthrough(name[len(TIMM_PREFIX) :], in_chans, num_classes, **options)
    factory = registered(name)[1]
    return factory(in_chans=in_chans, num_classes=num_classes, input_size=input_size, **options)
