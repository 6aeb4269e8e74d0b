"""Free ports on 127.0.0.1 and a real BentoML server on one."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.paths import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def bentoml_server(env: dict, ready_within_s: float = 120):
    """A real `bentoml serve serving.service:MedZoo` on 127.0.0.1, ready; yields (base URL, process). Its output
    goes to a file (``process.log_path``): a pipe nobody reads fills up and blocks the server."""
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", "serving.service:MedZoo", "--host", "127.0.0.1"]
    log = tempfile.NamedTemporaryFile("w+", prefix="bentoml-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [*command, "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    process.log_path = Path(log.name)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_within_s
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"bentoml serve exited early:\n{process.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"bentoml serve did not become ready within {ready_within_s:.0f} s")
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
