"""`make ui` (python -m training.cli ui): a link per experiment that opens its runs table, and the real MLflow UI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import mlflow
import pytest

from tests.helpers.net import free_port
from tests.helpers.runs import project_env
from training.cli import main as cli_main
from training.tracking.ui import runs_table_links

LINK = re.compile(r"^  (\S+)\s+(http://\S+/#/experiments/(\d+)/runs\?workflowType=machine_learning)$")


def test_every_experiment_gets_a_link_to_its_runs_table(mlflow_store):
    ids = {name: mlflow.create_experiment(name) for name in ("organamnist", "bloodmnist")}
    links = dict(runs_table_links("http://127.0.0.1:5000/"))
    for name, experiment_id in ids.items():
        assert links[name] == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    assert set(links) == {*ids, "Default"}


@pytest.mark.e2e
def test_the_printed_links_name_the_running_uis_experiments(mlflow_store, tmp_path, monkeypatch, capsys):
    for name in ("organamnist", "study-mnist-fashion-cnn-mlp"):
        mlflow.create_experiment(name)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "ui", "--port", str(port)],
        cwd=tmp_path,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # `ui` becomes `mlflow ui`, which starts workers: stop them all
    )
    try:
        printed = {}
        for line in process.stdout:
            if match := LINK.match(line.rstrip("\n")):
                printed[match.group(1)] = match.group(3)
                assert match.group(2).startswith(f"http://127.0.0.1:{port}/#/")
            if len(printed) == 3:
                break
        base, served = f"http://127.0.0.1:{port}", None
        deadline = time.monotonic() + 120
        while served is None and time.monotonic() < deadline:
            assert process.poll() is None, "the MLflow UI exited"
            try:
                answer = httpx.post(f"{base}/ajax-api/2.0/mlflow/experiments/search", json={"max_results": 100})
                served = {e["name"]: e["experiment_id"] for e in answer.json()["experiments"]}
            except (httpx.HTTPError, ValueError, KeyError):
                time.sleep(0.5)
        assert served == printed
        assert httpx.get(base, timeout=30).status_code == 200  # the UI's page itself
        # On a tracking server (an http URI: this UI serves the store's API too) `ui` links into it, starts nothing.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
        mlflow.set_tracking_uri(base)
        assert cli_main(["ui"]) == 0
        links = {m.group(1): m.group(3) for line in capsys.readouterr().out.splitlines() if (m := LINK.match(line))}
        assert links == printed
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
