"""Where the project's own files are: the checkout (or installed tree) this package was loaded from."""

from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
CONFIGS_DIR = PROJECT_DIR / "configs"
