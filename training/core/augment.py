"""Augmentation of in-memory uint8 batches: random per sample, vectorised, reproducible from a seed.

Why our own instead of torchvision.transforms.v2: v2 draws one set of random parameters per call, so a
per-sample draw means a Python loop over the batch (about 30x slower on a 128-image batch of 28 px images
here); these batched ops draw per sample in one call each and run where the data is (CPU or GPU).
MixUp and CutMix are timm's (``timm.data.Mixup``), applied after these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# name -> what it does; "auto" picks a valid subset per dataset (training.core.policy).
OPS = {
    "translate": "shift by up to 2 px (reflected border)",
    "hflip": "left-right flip, half the images",
    "vflip": "up-down flip, half the images",
    "rot90": "rotation by a random multiple of 90 degrees",
    "affine": "rotation up to 15 degrees and scaling by up to 10%",
    "color": "brightness and contrast by up to 20%",
}
TRANSLATE_PX = 2
MAX_ROTATION_DEG = 15.0
MAX_SCALE = 0.10
MAX_COLOR = 0.20


class AugmentError(ValueError):
    """An unknown augmentation name; the message lists the allowed ones."""


def check_ops(ops) -> tuple[str, ...]:
    ops = tuple(ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise AugmentError(f"augmentation(s) {', '.join(unknown)} unknown; allowed: none, auto, {', '.join(OPS)}.")
    return ops


class Augmenter:
    """uint8 [N, C, H, W] -> float32 in [0, 1], each image with its own random draw of every op."""

    def __init__(self, ops, generator: torch.Generator):
        self.ops = check_ops(ops)
        self.generator = generator

    def _rand(self, n: int, device) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, device=device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        for op in self.ops:
            x = getattr(self, op)(x)
        return x

    def translate(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        r = TRANSLATE_PX
        padded = F.pad(x, (r, r, r, r), mode="reflect")
        dy = torch.randint(0, 2 * r + 1, (n,), generator=self.generator, device=x.device)
        dx = torch.randint(0, 2 * r + 1, (n,), generator=self.generator, device=x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        return padded[batch, chans, rows, cols]

    def hflip(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where((self._rand(len(x), x.device) < 0.5)[:, None, None, None], x.flip(-1), x)

    def vflip(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where((self._rand(len(x), x.device) < 0.5)[:, None, None, None], x.flip(-2), x)

    def rot90(self, x: torch.Tensor) -> torch.Tensor:
        k = torch.randint(0, 4, (len(x),), generator=self.generator, device=x.device)[:, None, None, None]
        out = x
        for turns in (1, 2, 3):
            out = torch.where(k == turns, torch.rot90(x, turns, dims=(-2, -1)), out)
        return out

    def affine(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        angle = (self._rand(n, x.device) * 2 - 1) * math.radians(MAX_ROTATION_DEG)
        scale = 1 + (self._rand(n, x.device) * 2 - 1) * MAX_SCALE
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def color(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        brightness = 1 + (self._rand(n, x.device) * 2 - 1) * MAX_COLOR
        contrast = 1 + (self._rand(n, x.device) * 2 - 1) * MAX_COLOR
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast[:, None, None, None] + mean
        return (x * brightness[:, None, None, None]).clamp_(0.0, 1.0)
