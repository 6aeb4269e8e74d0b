"""ResNet-9 for small images: David Page's DAWNBench CIFAR-10 net ("How to train your ResNet"), width-scaled.

prep conv -> [conv, pool, residual] -> [conv, pool] -> [conv, pool, residual] -> global max pool -> linear.
At 28 px the three pools leave 3x3 maps; ``width`` (the first stage's channels, doubled per stage) trades
accuracy for CPU time: width 16 is ~6x cheaper than Page's 64.

Three options from Keller Jordan's airbench (CIFAR-10 speed runs), off by default; the ``quick`` recipe sets all
three (chosen on validation among other candidates, benchmarks/rule_choice.py): ``whiten`` replaces the prep conv by
a frozen 2x2 patch-whitening conv whose filters are the training patches' covariance eigenvectors (and their
negatives), set by :func:`init_from_data`; ``dirac_init`` starts each 3x3 conv as the identity on its first
input-many filters; ``bn_scales=False`` freezes the BatchNorm scales at 1 (only the shifts learn).
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.errors import ZooError
from zoo.layers import check_dropout, check_flag
from zoo.registry import register_model

WHITENING_EPS = 5e-4  # airbench's, added to the eigenvalues


def conv_bn(in_chans: int, out_chans: int, dirac: bool = False, bn_scale: bool = True) -> nn.Sequential:
    conv = nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False)
    if dirac and out_chans >= in_chans:
        with torch.no_grad():
            nn.init.dirac_(conv.weight[:in_chans])
    norm = nn.BatchNorm2d(out_chans)
    norm.weight.requires_grad_(bn_scale)
    return nn.Sequential(conv, norm, nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, chans: int, **conv_options):
        super().__init__()
        self.body = nn.Sequential(conv_bn(chans, chans, **conv_options), conv_bn(chans, chans, **conv_options))

    def forward(self, x):
        return x + self.body(x)


class GlobalMaxPool(nn.Module):
    """[N, C, H, W] -> [N, C]. ``amax`` exports as ONNX ReduceMax with every torch exporter; AdaptiveMaxPool2d
    has no ONNX translation in torch 2.11's exporter."""

    def forward(self, x):
        return x.amax(dim=(-2, -1))


class PatchWhitening(nn.Conv2d):
    """A 2x2 convolution (no padding) with 2 * 4 * in_chans frozen filters and a learnt bias; its weights come from
    the data (:meth:`init_from_data`), so a net built without data starts with random, frozen filters."""

    def __init__(self, in_chans: int):
        super().__init__(in_chans, 2 * 4 * in_chans, kernel_size=2, padding=0, bias=True)
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """``images``: normalised [N, C, H, W] as the net sees them."""
        c, (h, w) = images.shape[1], self.kernel_size
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * h * w)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + WHITENING_EPS)[:, None]).flip(0)
        filters = filters.reshape(c * h * w, c, h, w)
        self.weight.copy_(torch.cat((filters, -filters)))
        self.bias.zero_()


class ResNet9(nn.Module):
    def __init__(
        self,
        in_chans: int,
        num_classes: int,
        width: int,
        dropout: float,
        whiten: bool = False,
        dirac_init: bool = False,
        bn_scales: bool = True,
    ):
        super().__init__()
        w, options = width, {"dirac": dirac_init, "bn_scale": bn_scales}
        prep = (
            nn.Sequential(PatchWhitening(in_chans), nn.ReLU(inplace=True))
            if whiten
            else conv_bn(in_chans, w, **options)
        )
        self.features = nn.Sequential(
            prep,
            conv_bn(8 * in_chans if whiten else w, 2 * w, **options),
            nn.MaxPool2d(2),
            Residual(2 * w, **options),
            conv_bn(2 * w, 4 * w, **options),
            nn.MaxPool2d(2),
            conv_bn(4 * w, 8 * w, **options),
            nn.MaxPool2d(2),
            Residual(8 * w, **options),
            GlobalMaxPool(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(8 * w, num_classes))

    def forward(self, x):
        return self.head(self.features(x))

    def init_from_data(self, images: torch.Tensor) -> None:
        """Set what depends on the training images (the whitening filters); ``images`` normalised as seen here."""
        for module in self.modules():
            if isinstance(module, PatchWhitening):
                module.init_from_data(images)


@register_model("own", "ResNet-9 (Page's fast CIFAR net), width-scaled for 28 px on CPUs", min_input_size=8)
def resnet9(in_chans, num_classes, input_size, width=16, dropout=0.0, whiten=False, dirac_init=False, bn_scales=True):
    if int(width) < 1:
        raise ZooError(f"width={width!r} must be a positive integer.")
    if whiten and input_size < 16:  # the unpadded 2x2 whitening conv takes a pixel before three 2x2 pools
        raise ZooError(f"whiten=true needs inputs of at least 16 px, got {input_size}.")
    return ResNet9(
        in_chans,
        num_classes,
        int(width),
        check_dropout(dropout),
        whiten=check_flag("whiten", whiten),
        dirac_init=check_flag("dirac_init", dirac_init),
        bn_scales=check_flag("bn_scales", bn_scales),
    )
