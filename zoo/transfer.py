"""Partial fine-tuning of timm backbones: which parameters form the head, and freezing the first stages.

Stages come from timm's own ``group_matcher`` (the grouping timm uses for layer-wise learning rates): group 0
is the stem, then one group per stage, the last group the classifier.
"""

from __future__ import annotations

from timm.models import group_parameters
from torch import nn

from zoo.errors import ZooError


def head_parameter_names(backbone: nn.Module, prefix: str = "") -> frozenset[str]:
    """Names (as seen from the wrapping model, with ``prefix``) of the classifier's parameters."""
    if not hasattr(backbone, "get_classifier"):
        return frozenset()
    head = backbone.get_classifier()
    ids = {id(p) for p in head.parameters()}
    return frozenset(prefix + n for n, p in backbone.named_parameters() if id(p) in ids)


def stage_groups(backbone: nn.Module) -> list[list[str]]:
    if not hasattr(backbone, "group_matcher"):
        raise ZooError(f"{type(backbone).__name__} has no stage grouping; freeze needs a timm architecture.")
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def freeze(backbone: nn.Module, spec: str) -> list[str]:
    """``backbone``: every group but the classifier; ``N``: the stem and the first N stages. Returns the names."""
    groups = stage_groups(backbone)
    stages = len(groups) - 2  # neither the stem nor the classifier
    if spec == "backbone":
        count = len(groups) - 1
    else:
        n = int(spec)
        if not 1 <= n <= stages:
            raise ZooError(f"freeze={spec!r}: {type(backbone).__name__} has {stages} stages (freeze 1..{stages}).")
        count = 1 + n
    names = {name for group in groups[:count] for name in group}
    for name, parameter in backbone.named_parameters():
        if name in names:
            parameter.requires_grad_(False)
    return sorted(names)
