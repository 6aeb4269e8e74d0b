"""Learnable synthetic files in the official formats (MedMNIST npz, torchvision idx)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from medmnist import INFO

SYNTHETIC_SIZES = {"train": 96, "val": 48, "test": 48}


def synthetic_images(labels: np.ndarray, channels: int, size: int, seed: int) -> np.ndarray:
    """Each class is a fixed random blob pattern plus noise: easy to learn, impossible to guess.

    The patterns are symmetric under flips and 90-degree turns, so every augmentation and test-time view the
    datasets' policies allow keeps the class, as it does for real images.
    """
    rng = np.random.default_rng(seed)
    num_classes = int(labels.max()) + 1
    coarse = rng.uniform(0, 1, size=(num_classes, 7, 7, channels))
    coarse = sum(np.rot90(c, k, axes=(1, 2)) for k in range(4) for c in (coarse, coarse[:, :, ::-1])) / 8
    coarse = (coarse - coarse.min()) / (coarse.max() - coarse.min())
    templates = np.kron(coarse, np.ones((size // 7 + 1, size // 7 + 1, 1)))[:, :size, :size]
    noise = np.random.default_rng(seed + 1).normal(0, 0.15, size=(len(labels), size, size, channels))
    images = np.clip((templates[labels] + noise) * 255, 0, 255).astype(np.uint8)
    return images[..., 0] if channels == 1 else images


def write_synthetic_medmnist(path: Path, flag: str, size: int = 28, sizes: dict | None = None, seed: int = 0) -> Path:
    """A MedMNIST-format npz (same keys, shapes and dtypes as the official files) for ``flag``."""
    info = INFO[flag]
    num_classes, channels = len(info["label"]), info["n_channels"]
    arrays = {}
    for i, (split, n) in enumerate((sizes or SYNTHETIC_SIZES).items()):
        labels = np.arange(n) % num_classes
        np.random.default_rng(seed + i).shuffle(labels)
        arrays[f"{split}_images"] = synthetic_images(labels, channels, size, seed=seed)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def write_idx(folder: Path, stem: str, array: np.ndarray) -> None:
    """One file in the idx format torchvision reads for MNIST and Fashion-MNIST."""
    folder.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        header = struct.pack(">IIII", 0x803, *array.shape)
    else:
        header = struct.pack(">II", 0x801, len(array))
    (folder / stem).write_bytes(header + array.astype(np.uint8).tobytes())


def write_synthetic_torchvision(root: Path, folder: str, train: int = 300, test: int = 100, seed: int = 0) -> None:
    """Learnable MNIST-format files (``folder``: MNIST or FashionMNIST) under ``root/<folder>/raw``."""
    raw = root / folder / "raw"
    for i, (prefix, n) in enumerate((("train", train), ("t10k", test))):
        labels = np.arange(n) % 10
        np.random.default_rng(seed + i).shuffle(labels)
        write_idx(raw, f"{prefix}-images-idx3-ubyte", synthetic_images(labels, 1, 28, seed=seed))
        write_idx(raw, f"{prefix}-labels-idx1-ubyte", labels)
