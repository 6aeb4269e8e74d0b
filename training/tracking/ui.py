"""Links that open each experiment of a tracking store on its runs table in the MLflow UI.

MLflow 3.17's UI opens an experiment on the GenAI overview (traces, sessions, judges) unless the browser stored
another choice or the URL asks for the runs table with ``?workflowType=machine_learning``; a newcomer's fresh
browser has no stored choice, so ``make ui`` prints these links.
"""

from __future__ import annotations

import mlflow

RUNS_TABLE = "{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def runs_table_links(base_url: str) -> list[tuple[str, str]]:
    """(experiment name, link to its runs table) for every active experiment of the current tracking store."""
    base = base_url.rstrip("/")
    experiments = mlflow.search_experiments(order_by=["name ASC"])
    return [(e.name, RUNS_TABLE.format(base=base, experiment_id=e.experiment_id)) for e in experiments]
