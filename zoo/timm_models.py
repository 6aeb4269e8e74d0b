"""timm-backed architectures under short zoo names, plus any timm model as ``timm/<name>``.

Pretrained weights come from the timm hub (needs internet) or from a local file:
``pretrained=/path/to/weights.safetensors``. Grayscale inputs reuse RGB weights (timm sums the stem).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
from torch import nn

from zoo.layers import check_dropout
from zoo.registry import IMAGENET_MEAN, IMAGENET_STD, ModelConfig, ZooError, register_model


def _load_timm(timm_name: str, in_chans: int, num_classes: int, pretrained, **kwargs) -> nn.Module:
    if isinstance(pretrained, str) and pretrained.lower() in ("", "false", "0", "no"):
        pretrained = False
    if isinstance(pretrained, str) and pretrained.lower() in ("true", "1", "yes"):
        pretrained = True
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ZooError(f"pretrained={pretrained!r}: no weights file there (expected a .safetensors or .pth file).")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
        pretrained = True
    try:
        return timm.create_model(timm_name, pretrained=pretrained, in_chans=in_chans, num_classes=num_classes, **kwargs)
    except (OSError, ConnectionError, RuntimeError) as err:
        if not pretrained:
            raise
        raise ZooError(
            f"Could not load pretrained weights for timm model {timm_name!r} ({type(err).__name__}: {err}). "
            "Without internet, download the weights elsewhere and pass pretrained=/path/to/weights.safetensors."
        ) from err


def _cifar_stem(model: nn.Module, in_chans: int) -> nn.Module:
    """MedMNIST v2's ResNet for 28 px: a 3x3 stride-1 stem and no max-pool, so 28 px is not crushed to 7."""
    model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


_PRETRAINED = dict(pretrained_mean=IMAGENET_MEAN, pretrained_std=IMAGENET_STD)


@register_model(
    "timm", "ResNet-18 (timm); cifar_stem=True is the MedMNIST v2 28 px variant", min_input_size=16, **_PRETRAINED
)
def resnet18(in_chans, num_classes, input_size, dropout=0.0, pretrained=False, cifar_stem=False):
    model = _load_timm("resnet18", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))
    return _cifar_stem(model, in_chans) if cifar_stem else model


@register_model(
    "timm", "ResNet-50 (timm); cifar_stem=True is the MedMNIST v2 28 px variant", min_input_size=16, **_PRETRAINED
)
def resnet50(in_chans, num_classes, input_size, dropout=0.0, pretrained=False, cifar_stem=False):
    model = _load_timm("resnet50", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))
    return _cifar_stem(model, in_chans) if cifar_stem else model


@register_model("timm", "MobileNetV2 1.0 (timm mobilenetv2_100)", min_input_size=16, **_PRETRAINED)
def mobilenetv2(in_chans, num_classes, input_size, dropout=0.0, pretrained=False):
    return _load_timm("mobilenetv2_100", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))


@register_model("timm", "MobileNetV3-Small 1.0 (timm mobilenetv3_small_100)", min_input_size=16, **_PRETRAINED)
def mobilenetv3_small(in_chans, num_classes, input_size, dropout=0.0, pretrained=False):
    return _load_timm("mobilenetv3_small_100", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))


@register_model("timm", "EfficientNet-B0 (timm)", min_input_size=16, **_PRETRAINED)
def efficientnet_b0(in_chans, num_classes, input_size, dropout=0.0, pretrained=False):
    return _load_timm("efficientnet_b0", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))


@register_model(
    "timm", "EfficientNet-Lite0 (timm); ImageNet weights ship in shared/data/weights", min_input_size=16, **_PRETRAINED
)
def efficientnet_lite0(in_chans, num_classes, input_size, dropout=0.0, pretrained=False):
    return _load_timm("efficientnet_lite0", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))


# ConvNeXt's stem and stage downsampling are unpadded stride-4/2 convs: below 32 px a stage sees 0x0.
@register_model(
    "timm",
    "ConvNeXt-Atto, the smallest ConvNeXt (timm convnext_atto)",
    default_input_size=32,
    min_input_size=32,
    **_PRETRAINED,
)
def convnext(in_chans, num_classes, input_size, dropout=0.0, pretrained=False):
    return _load_timm("convnext_atto", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))


def _check_timm_name(timm_name: str) -> None:
    available = timm.list_models()
    if timm_name not in available:
        close = difflib.get_close_matches(timm_name, available, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
        raise ZooError(f"timm has no architecture {timm_name!r}.{hint} See timm.list_models().")


def timm_passthrough_config(timm_name: str) -> ModelConfig:
    _check_timm_name(timm_name)
    return ModelConfig(
        name=f"timm/{timm_name}",
        family="timm",
        description=f"timm architecture {timm_name}",
        default_input_size=32,
        min_input_size=32,
        options=("any timm.create_model keyword",),
        **_PRETRAINED,
    )


def create_timm_passthrough(timm_name: str, in_chans: int, num_classes: int, dropout=0.0, pretrained=False, **kwargs):
    try:
        return _load_timm(timm_name, in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout), **kwargs)
    except TypeError as err:
        raise ZooError(f"timm/{timm_name} rejected its options {sorted(kwargs)}: {err}") from err
