"""Where and in which layout tensors live: the device choice, channels-last batches, autocast."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")  # of the training step (autocast); weights and optimiser stay float32
# Images per evaluation forward pass. On CPUs a small batch stays in cache: ResNet-9 (width 16) with 5-view TTA
# ran 0.25 ms per image-view at 160 images per pass against 0.70 at 2560 (contiguous layout). GPUs want big ones.
EVAL_IMAGES_PER_FORWARD = {"cpu": 160, "cuda": 4096}


class DeviceError(ValueError):
    """A device that this machine does not have."""


def resolve_device(name: str) -> str:
    if name not in DEVICES:
        raise DeviceError(f"device={name!r} is not one of: {', '.join(DEVICES)}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device='cuda' but this machine has no CUDA GPU (torch.cuda.is_available() is False).")
    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 in [0, 1]; normalisation happens inside the model."""
    return images.float().div_(255.0)


def to_batch(images: torch.Tensor) -> torch.Tensor:
    """``to_input`` in channels-last layout: oneDNN's CPU convolutions run 1.5-2x faster on it (same values)."""
    return to_input(images).contiguous(memory_format=torch.channels_last)


def _is_channels_last(model: nn.Module) -> bool:
    kernels = (p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1)
    kernel = next(kernels, None)
    return kernel is not None and kernel.is_contiguous(memory_format=torch.channels_last) and not kernel.is_contiguous()


@contextlib.contextmanager
def channels_last(model: nn.Module):
    """Train and evaluate in channels-last layout; hand the model back in the layout it came in."""
    was_channels_last = _is_channels_last(model)
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if not was_channels_last:
            model.to(memory_format=torch.contiguous_format)


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX): oneDNN's bf16 kernels are fast there
    and emulated, slower than float32, elsewhere."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Zoo models whose CPU training step runs faster in bfloat16 (benchmarks/train_efficiency.py, 2-core Zen 5):
# resnet9 1.73x (width 16) and 1.42x (width 24), cnn 1.30x. mobilenetv2 ran 0.44x (depthwise convolutions have
# no fast bf16 kernel there), so `auto` keeps float32 on CPUs for every model not measured faster.
BF16_FASTER_ON_CPU = ("resnet9", "cnn")


def resolve_precision(name: str, device: str, model: str = "") -> str:
    """``auto``: bf16 on GPUs, and on CPUs with native bfloat16 for the models measured faster there; else fp32."""
    if name not in PRECISIONS:
        raise DeviceError(f"precision={name!r} is not one of: {', '.join(PRECISIONS)}.")
    if name == "auto":
        if device == "cuda":
            return "bf16"
        return "bf16" if model in BF16_FASTER_ON_CPU and native_bf16() else "fp32"
    return name


def autocast(device: str, precision: str = "auto"):
    """bfloat16 autocast for ``precision`` bf16; float32 otherwise. The final evaluation passes no precision: bf16
    on GPUs, float32 on CPUs, where the exported float32 graph must give the metrics that the run logged. Selection's
    evaluation after each epoch passes the step's precision."""
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()
