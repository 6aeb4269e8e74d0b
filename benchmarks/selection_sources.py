"""Would evaluating less select the same weights? Two ways to evaluate less, replayed from logged scores:
- only the EMA weights (half of each epoch's evaluation is the raw weights');
- only from a fraction of the epochs on (`quick`'s and `best`'s runs: one-cycle schedules rarely peak early).

Reads the finished runs of the accuracy benchmarks' store (outputs/accuracy) that kept a weight EMA and
replays their selection from the logged per-epoch validation scores: with both candidates per epoch (what runs
do: raw first, then EMA, a later one winning only when strictly better), with the EMA alone, and with both from
epoch ceil(f x epochs) on. The tables say, per dataset, in how many runs the cheaper evaluation picks the very
weights that were picked, and how much validation score the others lose.

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


FRACTIONS = (0.25, 0.5, 0.75)  # evaluate from epoch ceil(f x epochs) on


def replay(run_id: str, metric: str) -> tuple[tuple, tuple, dict[float, tuple]] | None:
    """(what the run chose, what the EMA alone chooses, what evaluating from each fraction of the epochs chooses)"""
    client = mlflow.MlflowClient()
    raw = {m.step: m.value for m in client.get_metric_history(run_id, f"val_{metric}")}
    ema = {m.step: m.value for m in client.get_metric_history(run_id, f"ema_val_{metric}")}
    if not ema:
        return None

    def both(first: int) -> tuple:
        return choice(
            [(e, s, v) for e in sorted(raw) if e >= first for s, v in (("raw", raw[e]), ("ema", ema.get(e, -math.inf)))]
        )

    later = {f: both(max(1, math.ceil(f * max(raw)))) for f in FRACTIONS}
    return both(1), choice([(e, "ema", ema[e]) for e in sorted(ema)]), later


def _lost(pairs: list[tuple]) -> str:
    return ", ".join(f"{b[2] - e[2]:.4f}" for b, e in pairs if b[:2] != e[:2]) or "-"


def main() -> None:
    mlflow.set_tracking_uri(TRACKING_URI)
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string="attributes.status = 'FINISHED'", output_format="list"
    )
    by_dataset, by_recipe = defaultdict(list), defaultdict(list)
    for run in runs:
        metric = run.data.params.get("select_metric")
        if metric not in ("acc", "auc") or run.data.tags.get("mlflow.parentRunId"):
            continue
        replayed = replay(run.info.run_id, metric)
        if replayed is None:
            continue
        dataset = run.data.tags.get("dataset", "?")
        by_dataset[dataset].append(replayed[:2])
        if run.data.tags.get("recipe") in ("quick", "best"):
            by_recipe[(run.data.tags["recipe"], dataset)].append(replayed)
    lines = [
        "| dataset | runs | EMA alone picks the same weights | EMA picked by both | validation score lost otherwise |",
        "|---|---:|---:|---:|---|",
    ]
    for dataset, pairs in sorted(by_dataset.items()):
        same = sum(b[:2] == e[:2] for b, e in pairs)
        ema_won = sum(b[1] == "ema" for b, _ in pairs)
        lines.append(f"| {dataset} | {len(pairs)} | {same} | {ema_won} | {_lost(pairs)} |")
    later = [
        "| recipe | dataset | runs | " + " | ".join(f"from {f:.0%} of the epochs" for f in FRACTIONS) + " |",
        "|---|---|---:|" + "---|" * len(FRACTIONS),
    ]
    for (recipe, dataset), replays in sorted(by_recipe.items()):
        cells = []
        for f in FRACTIONS:
            pairs = [(chosen, cheaper[f]) for chosen, _, cheaper in replays]
            lost = [b[2] - e[2] for b, e in pairs if b[2] > e[2]]
            worse = f"{len(lost)} lose score, at most {max(lost):.4f}" if lost else "none loses score"
            cells.append(f"{sum(b[:2] == e[:2] for b, e in pairs)} same; {worse}")
        later.append(f"| {recipe} | {dataset} | {len(replays)} | " + " | ".join(cells) + " |")
    table, later_table = "\n".join(lines), "\n".join(later)
    print(table, later_table, sep="\n\n")
    write_section(
        "selection_sources",
        "## Evaluating less: only the EMA weights, or only later epochs (`benchmarks/selection_sources.py`)\n\n"
        "Replayed from the logged per-epoch validation scores of the accuracy benchmarks' finished runs that kept a "
        "weight EMA: the weights chosen with both candidates per epoch (as runs choose) against the EMA alone.\n\n"
        + table
        + "\n\nThe same runs of `quick` and `best` (every candidate of their rule choices included), both candidates "
        "evaluated only from epoch ceil(f x epochs) on, against every epoch: how many runs pick the same weights, "
        "and how many pick weights with a lower validation score (the rest tie):\n\n" + later_table,
    )


if __name__ == "__main__":
    main()
