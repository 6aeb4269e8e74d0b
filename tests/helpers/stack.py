"""The real scale-out stack (``scripts/stack.sh``: PostgreSQL + `mlflow server`) in a fresh folder, on free ports."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.net import free_port
from tests.helpers.paths import ROOT
from tests.helpers.runs import project_env

STACK_SCRIPT = ROOT / "scripts" / "stack.sh"


def postgres_installed() -> bool:
    return shutil.which("pg_config") is not None or any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


@dataclass
class Stack:
    folder: Path
    settings: dict  # MEDZOO_STACK_DIR and the ports, for scripts/stack.sh
    env: dict  # MLFLOW_TRACKING_URI, MEDZOO_OPTUNA_STORAGE, PGPASSFILE, as `scripts/stack.sh env` prints them

    def run(self, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(STACK_SCRIPT), command], env=project_env(**self.settings), capture_output=True, text=True, timeout=300
        )


def start_stack(prefix: str = "medzoo-stack-", server_workers: int = 1) -> Stack:
    """``scripts/stack.sh up`` in a new temp folder; RuntimeError with its stderr if it fails."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)  # PostgreSQL runs as the postgres user, which must enter the folder
    settings = {
        "MEDZOO_STACK_DIR": str(folder),
        "MEDZOO_PG_PORT": str(free_port()),
        "MEDZOO_MLFLOW_PORT": str(free_port()),
        "MEDZOO_MLFLOW_WORKERS": str(server_workers),
    }
    stack = Stack(folder, settings, {})
    up = stack.run("up")
    if up.returncode != 0:
        raise RuntimeError(f"scripts/stack.sh up failed:\n{up.stderr[-3000:]}")
    for line in up.stdout.splitlines():  # export NAME=value
        name, _, value = line.removeprefix("export ").partition("=")
        stack.env[name] = value
    return stack
