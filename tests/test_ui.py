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


def test_on_a_tracking_server_ui_prints_links_into_it_and_starts_nothing(monkeypatch, capsys):
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://tracking.example:5000")
    monkeypatch.setattr("training.cli.runs_table_links", lambda base: [("organamnist", f"{base}/#/experiments/7/runs")])
    monkeypatch.setattr("training.cli.check_tracking", lambda: None)
    assert cli_main(["ui"]) == 0
    assert "http://tracking.example:5000/#/experiments/7/runs" in capsys.readouterr().out


@pytest.mark.e2e
def test_the_printed_links_name_the_running_uis_experiments(mlflow_store, tmp_path):
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
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
