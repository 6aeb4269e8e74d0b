"""Compare recipe variants on validation accuracy only: the evidence behind configs/recipes.yaml.

    python benchmarks/recipe_search.py                                  # every variant in recipe_search.yaml
    python benchmarks/recipe_search.py --datasets bloodmnist --device cuda --jobs 12   # on a GPU machine

Each (dataset, variant, seed) trains the base recipe with the variant's values through the same code as
`training.cli train` (model, normalisation, augmentation policy, engine), then scores the selected weights with
the recipe's test-time views on the validation split. The test split is never scored here, so choosing a recipe
from this table leaves the test split for the one final read per run in benchmarks/accuracy.py. Results are
appended to benchmarks/recipe_search_results.jsonl as each case ends (a rerun skips finished cases); RESULTS.md
gets the mean validation ACC per variant.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import yaml
from common import ROOT, real_data_dir, write_section

SEARCH_FILE = ROOT / "benchmarks" / "recipe_search.yaml"
RESULTS_FILE = ROOT / "benchmarks" / "recipe_search_results.jsonl"


def cases(datasets: list[str] | None) -> list[dict]:
    plan = yaml.safe_load(SEARCH_FILE.read_text())
    return [
        {"dataset": dataset, "base": spec["base"], "variant": name, "values": values or {}, "seed": seed}
        for dataset, spec in plan.items()
        if not datasets or dataset in datasets
        for name, values in spec["variants"].items()
        for seed in spec["seeds"]
    ]


def key(case: dict) -> str:
    """The fully resolved training parameters: a result stays valid while they do, whatever the recipes say."""
    from training.core.config import parse_model_kwargs
    from training.core.recipes import config_from_recipe

    values = dict(case["values"])
    if isinstance(values.get("model_kwargs"), str):
        values["model_kwargs"] = parse_model_kwargs(values["model_kwargs"])
    params = config_from_recipe(case["base"], dataset=case["dataset"], seed=case["seed"], **values).to_params()
    for machine_specific in ("data_dir", "device"):
        params.pop(machine_specific)
    return json.dumps(params, sort_keys=True)


def run_case(case: dict, data_dir: str, device: str) -> dict:
    import torch

    import zoo
    from training.core.config import resolve
    from training.core.engine import evaluate, fit
    from training.core.recipes import config_from_recipe
    from training.workflows.network import build_model, fit_options, load

    torch.set_num_threads(1 if device == "cuda" else torch.get_num_threads())
    given = {"dataset": case["dataset"], "seed": case["seed"], "data_dir": data_dir, "device": device}
    run = resolve(config_from_recipe(case["base"], **given, **case["values"]))
    started = time.perf_counter()
    torch.manual_seed(run.config.seed)
    dataset = load(run)
    model, _ = build_model(run.config, dataset)
    result = fit(
        model,
        dataset.train,
        dataset.val,
        dataset.class_names,
        fit_options(run, model),
        progress=False,
    )
    device = run.device
    final = (zoo.TTAClassifier(model, run.tta) if run.tta else model).to(device)
    metrics, _ = evaluate(final, dataset.val, dataset.class_names, "val")
    return {
        **case,
        "key": key(case),
        "val_acc": metrics["val_acc"],
        "val_auc": metrics["val_auc"],
        "best_epoch": result.best_epoch,
        "best_weights": result.best_weights,
        "device": device,
        "seconds": time.perf_counter() - started,
    }


def finished() -> list[dict]:
    """Results of the variants as recipe_search.yaml and the recipes resolve them now."""
    if not RESULTS_FILE.exists():
        return []
    rows = [json.loads(line) for line in RESULTS_FILE.read_text().splitlines() if line.strip()]
    current = {key(c): c for c in cases(None)}
    return [{**r, **current[r["key"]]} for r in rows if r.get("key") in current]


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | base | variant | values | seeds | val ACC (TTA) | val AUC (TTA) |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    order = [(c["dataset"], c["variant"]) for c in cases(None)]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["variant"]), []).append(row)
    for dataset, variant in sorted(groups, key=lambda g: order.index(g) if g in order else len(order)):
        found = groups[(dataset, variant)]
        accs, aucs = [r["val_acc"] for r in found], [r["val_auc"] for r in found]
        values = ", ".join(f"{k}={v}" for k, v in found[0]["values"].items()) or "-"
        lines.append(
            f"| {dataset} | {found[0]['base']} | {variant} | {values} | {len(found)} | {statistics.mean(accs):.4f} "
            f"(min {min(accs):.4f}) | {statistics.mean(aucs):.4f} |"
        )
    return "\n".join(lines)


def write_results() -> None:
    rows = finished()
    devices = ", ".join(sorted({r["device"] for r in rows}))
    write_section(
        "recipe_search",
        "## Choosing the recipes: validation ACC of variants (the test split is not read)\n\n"
        "Each variant is its base recipe with the values shown, trained as `training.cli train` would, scored "
        "with the recipe's test-time views on the validation split; mean over the seeds (lowest in brackets). "
        f"Run on: {devices}. The values in configs/recipes.yaml are the best rows here that fit the time budgets "
        "(measured on the 2-core CPU in the accuracy table).\n"
        "Reproduce: `python benchmarks/recipe_search.py` (variants in benchmarks/recipe_search.yaml; resumable).\n\n"
        + table(rows),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="", help="comma list (default: all in recipe_search.yaml)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--jobs", type=int, default=1, help="cases at once (a GPU machine runs 12 well)")
    args = parser.parse_args()
    data_dir = str(real_data_dir())
    done = {key(r) for r in finished()}
    todo = [c for c in cases([d for d in args.datasets.split(",") if d]) if key(c) not in done]
    print(f"{len(done)} cases finished; {len(todo)} to run", flush=True)
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=context) as pool:
        futures = {pool.submit(run_case, case, data_dir, args.device): case for case in todo}
        for future in as_completed(futures):
            row = future.result()
            with RESULTS_FILE.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{row['dataset']} {row['variant']} seed {row['seed']}: val acc {row['val_acc']:.4f}", flush=True)
            write_results()
    write_results()


if __name__ == "__main__":
    main()
