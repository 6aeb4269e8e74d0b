"""Helpers shared by the benchmarks: data location, medians, and writing a section of RESULTS.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
# The benchmarks start the stack and servers as the tests do (tests/helpers): one place for each.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def real_data_dir() -> Path:
    path = Path(os.environ.get("MEDZOO_REAL_DATA_DIR", ROOT.parent / "shared" / "data" / "medmnist"))
    if not (path / "organamnist.npz").exists():
        raise SystemExit(f"benchmarks need the official MedMNIST files; none in {path} (set MEDZOO_REAL_DATA_DIR)")
    return path


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between this benchmark's markers in RESULTS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = f"_Measured {dt.date.today().isoformat()} on {machine()}._\n\n"
    block = f"{start}\n{stamp}{body.strip()}\n{end}"
    text = (
        RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nWritten by the scripts in this folder.\n"
    )
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    RESULTS.write_text(text)
