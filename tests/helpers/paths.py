"""Where the checkout, the official MedMNIST files and the shipped weights are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REAL_DATA_DIR = Path(os.environ.get("MEDZOO_REAL_DATA_DIR", ROOT.parent / "shared" / "data" / "medmnist"))
WEIGHTS_DIR = Path(os.environ.get("MEDZOO_WEIGHTS_DIR", ROOT.parent / "shared" / "data" / "weights"))

requires_real_data = pytest.mark.skipif(
    not (REAL_DATA_DIR / "breastmnist.npz").exists(), reason=f"no official MedMNIST files in {REAL_DATA_DIR}"
)
