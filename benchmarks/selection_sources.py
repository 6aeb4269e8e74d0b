"""Would evaluating only the EMA weights select the same weights? (Half of each epoch's evaluation is the raw
weights'.)

Reads the finished runs of the accuracy benchmarks' store (outputs/accuracy) that kept a weight EMA and
replays their selection from the logged per-epoch validation scores: with both candidates per epoch (what runs
do: raw first, then EMA, a later one winning only when strictly better) and with the EMA alone. The table says,
per dataset, in how many runs the EMA alone picks the very weights that were picked, and how much validation
score the others lose.

    python benchmarks/selection_sources.py
"""

from __future__ import annotations

import math
from collections import defaultdict

import mlflow
from accuracy import TRACKING_URI
from common import write_section


def choice(scores: list[tuple[int, str, float]]) -> tuple[int, str, float]:
    best = (-1, "raw", -math.inf)
    for epoch, source, score in scores:
        if score > best[2]:
            best = (epoch, source, score)
    return best


def replay(run_id: str, metric: str) -> tuple[tuple, tuple] | None:
    client = mlflow.MlflowClient()
    raw = {m.step: m.value for m in client.get_metric_history(run_id, f"val_{metric}")}
    ema = {m.step: m.value for m in client.get_metric_history(run_id, f"ema_val_{metric}")}
    if not ema:
        return None
    both = [(e, s, v) for e in sorted(raw) for s, v in (("raw", raw[e]), ("ema", ema.get(e, -math.inf)))]
    return choice(both), choice([(e, "ema", ema[e]) for e in sorted(ema)])


def main() -> None:
    mlflow.set_tracking_uri(TRACKING_URI)
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string="attributes.status = 'FINISHED'", output_format="list"
    )
    by_dataset = defaultdict(list)
    for run in runs:
        metric = run.data.params.get("select_metric")
        if metric not in ("acc", "auc") or run.data.tags.get("mlflow.parentRunId"):
            continue
        replayed = replay(run.info.run_id, metric)
        if replayed is not None:
            by_dataset[run.data.tags.get("dataset", "?")].append(replayed)
    lines = [
        "| dataset | runs | EMA alone picks the same weights | EMA picked by both | validation score lost otherwise |",
        "|---|---:|---:|---:|---|",
    ]
    for dataset, pairs in sorted(by_dataset.items()):
        same = sum(b[:2] == e[:2] for b, e in pairs)
        ema_won = sum(b[1] == "ema" for b, _ in pairs)
        lost = [b[2] - e[2] for b, e in pairs if b[:2] != e[:2]]
        lost_text = ", ".join(f"{x:.4f}" for x in lost) or "-"
        lines.append(f"| {dataset} | {len(pairs)} | {same} | {ema_won} | {lost_text} |")
    table = "\n".join(lines)
    print(table)
    write_section(
        "selection_sources",
        "## Evaluating only the EMA weights (`benchmarks/selection_sources.py`)\n\n"
        "Replayed from the logged per-epoch validation scores of the accuracy benchmarks' finished runs that kept a "
        "weight EMA: the weights chosen with both candidates per epoch (as runs choose) against the EMA alone.\n\n"
        + table,
    )


if __name__ == "__main__":
    main()
