"""The MedMNIST-C corruptions (Di Salvo et al. 2024) of a dataset, applied to images at the model's input size.

The corruptions, their five severities per dataset and the AlexNet baselines are the ``medmnistc`` package's,
imported, not copied. It pins ``medmnist==3.0.1`` and ``scikit-image==0.23.2``, older than ours; it runs on ours
(with one shim, below, for NumPy 2.3), so it is installed without its pins (``requirements-nodeps.txt``,
``pip install --no-deps``) and its real needs (OpenCV, Wand with ImageMagick's library) are pinned in
``requirements.txt``.

Its severities were set for 224 px images. Each image is therefore resized to 224 px (bilinear), corrupted, and
resized back to the model's size by area averaging (box filter): a corrupted scan seen at the resolution the model
was made for, which is how MedMNIST's small files were made from larger ones. A grey image is corrupted in grey,
so each pixel gets the noise the package gives one channel of a colour image.
"""

from __future__ import annotations

import random
import types

import numpy as np
from PIL import Image

SEVERITIES = 5
CORRUPTION_SIZE = 224  # what medmnistc's severities were set for


class CorruptionError(ValueError):
    """A dataset or corruption MedMNIST-C does not define; the message lists what it does."""


class _NumpyWithBinaryFromstring(types.ModuleType):
    """numpy, whose ``fromstring`` reads bytes as ``frombuffer`` does (a copy). medmnistc 0.1.0's motion blur
    decodes ImageMagick's output with ``np.fromstring(blob, np.uint8)``, whose binary mode NumPy 2.3 removed;
    only that module sees this numpy."""

    def __init__(self):
        super().__init__("numpy")

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def fromstring(data, dtype=float, *args, **kwargs):
        return (
            np.frombuffer(data, dtype).copy()
            if isinstance(data, bytes)
            else np.fromstring(data, dtype, *args, **kwargs)
        )


def _registry():
    # Imported here: the package pulls OpenCV, scikit-image and ImageMagick in (seconds), needed by this only.
    try:
        from medmnistc.corruptions import filter as filters
        from medmnistc.corruptions.registry import CORRUPTIONS_DS
        from medmnistc.utils.baselines import BASELINES

        filters.np = _NumpyWithBinaryFromstring()
    except ImportError as err:
        raise CorruptionError(
            f"the MedMNIST-C corruptions need the medmnistc package and ImageMagick ({err}); run `make setup` "
            "(it installs requirements-nodeps.txt) and `apt-get install libmagickwand-6.q16-6`."
        ) from None
    return CORRUPTIONS_DS, BASELINES


def corruptions_of(dataset: str, names: list[str] | None = None) -> dict:
    """Name -> medmnistc corruption object for ``dataset`` (all, or ``names`` in the package's order)."""
    registry, _ = _registry()
    if dataset not in registry:
        raise CorruptionError(
            f"MedMNIST-C defines no corruptions for {dataset!r}; it does for: {', '.join(sorted(registry))}."
        )
    defined = registry[dataset]
    unknown = [n for n in names or () if n not in defined]
    if unknown:
        raise CorruptionError(
            f"corruption {', '.join(map(repr, unknown))} is not defined for {dataset}; its corruptions: "
            f"{', '.join(defined)}."
        )
    return {n: c for n, c in defined.items() if not names or n in names}


def alexnet_baseline(dataset: str) -> dict | None:
    """The package's AlexNet errors for ``dataset``: ``clean_score`` and ``raw_scores`` per corruption."""
    return _registry()[1].get(dataset)


def corrupted_copy(images: np.ndarray, dataset: str, seed: int) -> np.ndarray:
    """``images`` each corrupted once by one of ``dataset``'s corruptions at one severity, both drawn at random
    (seeded): what ``corruption_augment`` trains on."""
    chosen = corruptions_of(dataset)
    rng = np.random.default_rng(seed)
    names = rng.integers(len(chosen), size=len(images))
    severities = rng.integers(1, SEVERITIES + 1, size=len(images))
    out = images.copy()
    for i, corruption in enumerate(chosen.values()):
        for severity in range(1, SEVERITIES + 1):
            where = np.flatnonzero((names == i) & (severities == severity))
            if len(where):
                out[where] = corrupt(images[where], corruption, severity, seed=seed * 1000 + i * 10 + severity)
    return out


def corrupt(images: np.ndarray, corruption, severity: int, seed: int) -> np.ndarray:
    """``images`` (uint8, N x C x H x W) corrupted at ``severity`` (1-5), same shape and dtype; the same seed gives
    the same images."""
    if not 1 <= severity <= SEVERITIES:
        raise CorruptionError(f"severity={severity!r} is not one of 1-{SEVERITIES}.")
    rng = np.random.default_rng(seed)
    # The package draws from numpy's global generator (noise), Python's (microscopy artefacts) or an ``rng``
    # attribute it expects to be set.
    corruption.rng = rng
    np.random.seed(seed)
    random.seed(seed)
    n, channels, height, width = images.shape
    mode = "L" if channels == 1 else "RGB"
    out = np.empty_like(images)
    for i in range(n):
        pixels = images[i, 0] if channels == 1 else images[i].transpose(1, 2, 0)
        big = Image.fromarray(pixels, mode).resize((CORRUPTION_SIZE, CORRUPTION_SIZE), Image.BILINEAR)
        damaged = np.asarray(corruption.apply(big, severity - 1))
        damaged = Image.fromarray(np.clip(damaged, 0, 255).astype(np.uint8)).convert(mode)
        small = np.asarray(damaged.resize((width, height), Image.BOX))
        out[i] = small[None] if channels == 1 else small.transpose(2, 0, 1)
    return out
