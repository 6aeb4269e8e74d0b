"""timm-backed architectures under short zoo names, plus any timm model as ``timm/<name>``.

Pretrained weights come from the timm hub (needs internet) or from a local file:
``pretrained=/path/to/weights.safetensors``. Grayscale inputs reuse RGB weights (timm sums the stem).
Normalisation comes from each architecture's own timm ``pretrained_cfg`` (ViTs use 0.5, most CNNs ImageNet's).
"""

from __future__ import annotations

import contextlib
import difflib
import socket
from pathlib import Path

import timm
from torch import nn

from zoo.errors import TIMM_PREFIX, ZooError
from zoo.layers import check_dropout
from zoo.registry import ModelConfig, register_model

HUB_HOST = ("huggingface.co", 443)
HUB_PROBE_TIMEOUT_S = 3.0


def pretrained_normalisation(timm_name: str) -> dict:
    """``pretrained_mean`` / ``pretrained_std`` as the architecture's timm pretrained_cfg states them."""
    cfg = timm.models.get_pretrained_cfg(timm_name, allow_unregistered=False)
    if cfg is None:
        return dict(pretrained_mean=None, pretrained_std=None)
    return dict(pretrained_mean=tuple(float(m) for m in cfg.mean), pretrained_std=tuple(float(s) for s in cfg.std))


def parse_pretrained(pretrained) -> bool | Path:
    """``false``/``true`` (hub) or a weights file path, as given on the command line or in code."""
    if isinstance(pretrained, bool):
        return pretrained
    text = str(pretrained).strip()
    if text.lower() in ("", "false", "0", "no", "none"):
        return False
    if text.lower() in ("true", "1", "yes"):
        return True
    path = Path(text).expanduser()
    if not path.is_file():
        raise ZooError(f"pretrained={text!r}: no weights file there (expected a .safetensors or .pth file).")
    return path


def _hub_reachable() -> bool:
    try:
        socket.create_connection(HUB_HOST, timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline_unless_reachable(needed: bool):
    """Offline, the hub client retries for about a minute; in offline mode it answers from its cache at once."""
    import huggingface_hub.constants as hub

    offline = needed and not _hub_reachable()
    previous = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = previous or offline
    try:
        yield offline
    finally:
        hub.HF_HUB_OFFLINE = previous


def _load_timm(timm_name: str, in_chans: int, num_classes: int, pretrained, **kwargs) -> nn.Module:
    source = parse_pretrained(pretrained)
    if isinstance(source, Path):
        kwargs["pretrained_cfg_overlay"] = dict(file=str(source))
    with _hub_offline_unless_reachable(source is True) as offline:
        try:
            return timm.create_model(
                timm_name, pretrained=bool(source), in_chans=in_chans, num_classes=num_classes, **kwargs
            )
        except (OSError, ConnectionError, RuntimeError) as err:
            if not source:
                raise
            where = f"the weights hub ({HUB_HOST[0]}) is not reachable and they are not cached" if offline else err
            raise ZooError(
                f"Could not load pretrained weights for timm model {timm_name!r}: {where}. "
                "Without internet, download the weights elsewhere and pass pretrained=/path/to/weights.safetensors."
            ) from err


def _cifar_stem(model: nn.Module, in_chans: int) -> nn.Module:
    """MedMNIST v2's ResNet for 28 px: a 3x3 stride-1 stem and no max-pool, so 28 px is not crushed to 7.

    Initialised as the paper's code (kuangliu/pytorch-cifar's ResNet) is: PyTorch's default init of every layer,
    not timm's (kaiming-normal fan-out convs, the last BatchNorm of each block at zero).
    """
    model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
            module.reset_parameters()
    return model


@register_model(
    "timm",
    "ResNet-18 (timm); cifar_stem=True is the MedMNIST v2 28 px variant",
    min_input_size=16,
    **pretrained_normalisation("resnet18"),
)
def resnet18(in_chans, num_classes, input_size, dropout=0.0, pretrained=False, cifar_stem=False):
    model = _load_timm("resnet18", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))
    return _cifar_stem(model, in_chans) if cifar_stem else model


@register_model(
    "timm",
    "ResNet-50 (timm); cifar_stem=True is the MedMNIST v2 28 px variant",
    min_input_size=16,
    **pretrained_normalisation("resnet50"),
)
def resnet50(in_chans, num_classes, input_size, dropout=0.0, pretrained=False, cifar_stem=False):
    model = _load_timm("resnet50", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))
    return _cifar_stem(model, in_chans) if cifar_stem else model


@register_model(
    "timm", "MobileNetV2 1.0 (timm mobilenetv2_100)", min_input_size=16, **pretrained_normalisation("mobilenetv2_100")
)
def mobilenetv2(in_chans, num_classes, input_size, dropout=0.0, pretrained=False):
    return _load_timm("mobilenetv2_100", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))


@register_model(
    "timm",
    "MobileNetV3-Small 1.0 (timm mobilenetv3_small_100)",
    min_input_size=16,
    **pretrained_normalisation("mobilenetv3_small_100"),
)
def mobilenetv3_small(in_chans, num_classes, input_size, dropout=0.0, pretrained=False):
    return _load_timm("mobilenetv3_small_100", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))


@register_model("timm", "EfficientNet-B0 (timm)", min_input_size=16, **pretrained_normalisation("efficientnet_b0"))
def efficientnet_b0(in_chans, num_classes, input_size, dropout=0.0, pretrained=False):
    return _load_timm("efficientnet_b0", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))


@register_model(
    "timm",
    "EfficientNet-Lite0 (timm); ImageNet weights ship in shared/data/weights",
    min_input_size=16,
    **pretrained_normalisation("efficientnet_lite0"),
)
def efficientnet_lite0(in_chans, num_classes, input_size, dropout=0.0, pretrained=False):
    return _load_timm("efficientnet_lite0", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))


# ConvNeXt's stem and stage downsampling are unpadded stride-4/2 convs: below 32 px a stage sees 0x0.
@register_model(
    "timm",
    "ConvNeXt-Atto, the smallest ConvNeXt (timm convnext_atto)",
    default_input_size=32,
    min_input_size=32,
    **pretrained_normalisation("convnext_atto"),
)
def convnext(in_chans, num_classes, input_size, dropout=0.0, pretrained=False):
    return _load_timm("convnext_atto", in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout))


def _check_timm_name(timm_name: str) -> None:
    available = timm.list_models()
    if timm_name not in available:
        close = difflib.get_close_matches(timm_name, available, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ZooError(f"timm has no architecture {timm_name!r}.{hint} See timm.list_models().")


def passthrough_config(timm_name: str) -> ModelConfig:
    _check_timm_name(timm_name)
    return ModelConfig(
        name=f"{TIMM_PREFIX}{timm_name}",
        family="timm",
        description=f"timm architecture {timm_name}",
        default_input_size=32,
        min_input_size=32,
        options=("dropout", "pretrained"),
        any_options=True,
        **pretrained_normalisation(timm_name),
    )


def create_passthrough(timm_name: str, in_chans: int, num_classes: int, dropout=0.0, pretrained=False, **kwargs):
    try:
        return _load_timm(timm_name, in_chans, num_classes, pretrained, drop_rate=check_dropout(dropout), **kwargs)
    except TypeError as err:
        raise ZooError(f"{TIMM_PREFIX}{timm_name} rejected its options {sorted(kwargs)}: {err}") from err
