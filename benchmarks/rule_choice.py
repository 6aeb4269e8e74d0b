"""Choose a recipe's rule honestly: leave one dataset out.

Each candidate is the recipe with a few of its values or of its `scale` rule changed. Every candidate trains on
OrganAMNIST, BloodMNIST and BreastMNIST (seed 0) with the rule's own sizing for each. For each held-out dataset
the candidate with the best mean validation ACC on the *other two* is chosen, and only then is its test ACC on the
held-out dataset read, over 3 seeds (the missing seeds are trained for the chosen candidates only). The table
puts the three held-out results beside what per-dataset tuning reached before the rules (fp32 step, values chosen
on each dataset's own validation split) and the candidate the three validation splits choose together, which is
what configs/recipes.yaml should ship.

The rule above chose `quick`'s and `best`'s present rules. Declared on 2026-12-03 for the next choice (after seeing
that both of those choices led by less than one standard error and read lower on test): a candidate replaces what
ships (``SHIPPED``) only if its mean validation ACC leads it by more than one standard error (``ships``). The
held-out rows keep the rule they were declared with: the best candidate on the other two.

    python benchmarks/rule_choice.py                      # quick's rule; resumable: finished cases are kept
    python benchmarks/rule_choice.py --recipe best        # best's rule (about 15-25 minutes a run)
    python benchmarks/rule_choice.py --selection-only     # phase 1 only

Runs go through benchmarks/accuracy.py's `run_case` (a real `python -m training.cli train` process, its wall time
measured) into benchmarks/rule_choice_results.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import statistics

import medmnist
from accuracy import REFERENCES, create_store, device_name, fingerprint, mean_std, run_case
from accuracy import RESULTS_FILE as ACCURACY_RESULTS
from common import ROOT, real_data_dir, write_section

from training.core.config import TrainConfig
from training.core.options import to_text
from training.core.recipes import load_recipes

RESULTS_FILE = ROOT / "benchmarks" / "rule_choice_results.jsonl"
DATASETS = ("organamnist", "bloodmnist", "breastmnist")
SELECTION_SEED, SEEDS = 0, (0, 1, 2)
# What can change: recipe values (command-line names) and `scale.<field>` of the rule. Each candidate names its
# network, so that shipping one of them does not change what the others were (nor their results' fingerprints).
PLAIN = {"model_kwargs": {"width": 16}}
QUICK = {
    "210k images": {**PLAIN, "scale.images_seen": 210000, "mixup": 0.0},
    "210k images, MixUp 0.2": {**PLAIN, "scale.images_seen": 210000, "mixup": 0.2},
    "140k images": {**PLAIN, "scale.images_seen": 140000, "mixup": 0.0},
    "140k images, MixUp 0.2": {**PLAIN, "scale.images_seen": 140000, "mixup": 0.2},
    # Input upsampled from the 28 px files (bilinear, in the data and in the served graph's resize), at the training
    # compute of 140k images at 28 px: a step costs (size / 28)^2 as much (issue 23: 28 vs 42 vs 56 px).
    "42 px, 62k images, MixUp 0.2": {**PLAIN, "scale.images_seen": 62000, "mixup": 0.2, "size": 42},
    "56 px, 35k images, MixUp 0.2": {**PLAIN, "scale.images_seen": 35000, "mixup": 0.2, "size": 56},
    # Speed-run tricks (airbench, Page's ResNet-9), values set before measuring: Lookahead around AdamW (timm's,
    # k=6, alpha=0.5); Nesterov SGD with label smoothing 0.2 (lr 0.1 for the mean loss of 128 images, L2 5e-4).
    "140k images, MixUp 0.2, Lookahead AdamW": {
        **PLAIN,
        "scale.images_seen": 140000,
        "mixup": 0.2,
        "optimizer": "lookahead_adamw",
    },
    "140k images, MixUp 0.2, Nesterov SGD, label smoothing 0.2": {
        **PLAIN,
        "scale.images_seen": 140000,
        "mixup": 0.2,
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 0.0005,
        "label_smoothing": 0.2,
    },
    # airbench's three remaining tricks together, as its net uses them (zoo/resnet9.py): a frozen 2x2
    # patch-whitening first layer set from 5000 training images, identity-initialised 3x3 convolutions, BatchNorm
    # scales frozen at 1. Set before measuring; the rest as "140k images, MixUp 0.2".
    "140k images, MixUp 0.2, whitening stem, identity init, frozen BN scales": {
        "scale.images_seen": 140000,
        "mixup": 0.2,
        "model_kwargs": {"width": 16, "whiten": True, "dirac_init": True, "bn_scales": False},
    },
    # Larger batches with a scaled learning rate (issue 23): batch 256 runs the bf16 step 7% faster than 128
    # (benchmarks/step_speed.py). Declared on 2026-12-03 before its runs, under the one-SE rule: the square-root
    # scaling rule for Adam-type optimisers (Malladi et al. 2022), lr 0.004 x sqrt(2); the rest as what ships. The
    # rule still halves the batch until an epoch has 8 steps (BreastMNIST: 64, as before).
    "140k images, MixUp 0.2, whitening stem, identity init, frozen BN scales, batch 256": {
        "scale.images_seen": 140000,
        "mixup": 0.2,
        "model_kwargs": {"width": 16, "whiten": True, "dirac_init": True, "bn_scales": False},
        "batch_size": 256,
        "lr": 0.0057,
    },
}
# best's candidates, declared on 2026-12-03 before any of B's runs: A is best as it ships (its rule set by hand from
# OrganAMNIST's and BloodMNIST's validation, benchmarks/RESULTS.md); B carries what quick's rule choice added (MixUp
# 0.2 and airbench's first layer, initialisation and BatchNorm) to best's budget. The same selection rule as quick's:
# the best mean validation ACC of seed 0 on the other two datasets.
BEST = {
    "700k images, width 24": {"mixup": 0.0, "model_kwargs": {"width": 24}},
    "700k images, width 24, MixUp 0.2, whitening stem, identity init, frozen BN scales": {
        "mixup": 0.2,
        "model_kwargs": {"width": 24, "whiten": True, "dirac_init": True, "bn_scales": False},
    },
}
CANDIDATES = {"quick": QUICK, "best": BEST}
# What each recipe ships (configs/recipes.yaml), the incumbent under the one-SE rule.
SHIPPED = {
    "quick": "140k images, MixUp 0.2, whitening stem, identity init, frozen BN scales",
    "best": "700k images, width 24, MixUp 0.2, whitening stem, identity init, frozen BN scales",
}
# Each recipe before the rules: per-dataset epochs, width, batch size, MixUp and members, each chosen on that
# dataset's validation split; fp32 step; 3 seeds; process wall time (median). quick: benchmarks/RESULTS.md at
# commit 4dfac93; best: the CPU rows of 2026-12-02 (two averaged members on OrganAMNIST).
TUNED_BEFORE = {
    "quick": {
        "organamnist": "0.9290 ± 0.0070, 214 s",
        "bloodmnist": "0.9740 ± 0.0010, 237 s",
        "breastmnist": "0.8780 ± 0.0420, 182 s",
    },
    "best": {
        "organamnist": "0.9364 ± 0.0036, 1310-1474 s",
        "bloodmnist": "0.9800 ± 0.0020",
        "breastmnist": "0.8996 ± 0.0098, 1065 s",
    },
}
MEASURED = ("best_val_acc", "test_acc", "process_time")


def candidate_values(recipe_name: str, name: str, dataset: str) -> dict:
    """What the candidate trains on ``dataset``: the recipe changed as the candidate says, sized by its rule."""
    recipe = load_recipes()[recipe_name]
    changes = CANDIDATES[recipe_name][name]
    scale = dataclasses.replace(
        recipe.scale, **{k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("scale.")}
    )
    values = {**recipe.values, **{k: v for k, v in changes.items() if not k.startswith("scale.")}}
    defaults = TrainConfig()
    for key in [k for k in changes if not k.startswith("scale.")]:
        if values[key] == getattr(defaults, key):  # a default is not set: the same runs whichever way it is said
            values.pop(key)
    return dataclasses.replace(recipe, values=values, scale=scale).values_for(dataset)


def command_line(values: dict) -> tuple[str, ...]:
    """Every value as a command-line parameter: the process trains exactly the candidate."""
    args = []
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", to_text(value)]
    return tuple(args)


def mark(values: dict) -> str:
    text = json.dumps({k: to_text(v) for k, v in sorted(values.items())})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_rows() -> list[dict]:
    """This benchmark's runs, and the accuracy benchmark's runs of the recipe (a candidate that is the recipe as
    it stands has their fingerprint: its seeds count here too, the latest run of a seed winning)."""
    files = [f for f in (RESULTS_FILE, ACCURACY_RESULTS) if f.exists()]
    return [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]


def current(rows: list[dict], recipe: str, name: str, dataset: str) -> list[dict]:
    """The rows of this candidate on this dataset measured with its present values, on this device."""
    fp, device = mark(candidate_values(recipe, name, dataset)), device_name("cpu")
    found = {r["seed"]: r for r in rows if r["fingerprint"] == fp and r["dataset"] == dataset and r["device"] == device}
    return [found[s] for s in sorted(found)]


def validation(rows: list[dict], recipe: str, name: str, datasets) -> float:
    """Mean over ``datasets`` of the selection seed's validation ACC (NaN when a run is missing)."""
    scores = []
    for dataset in datasets:
        found = [r for r in current(rows, recipe, name, dataset) if r["seed"] == SELECTION_SEED]
        scores.append(found[0]["best_val_acc"] if found else float("nan"))
    return statistics.mean(scores)


def choose(rows: list[dict], recipe: str, datasets) -> str:
    """The candidate with the best mean validation ACC among those measured on every dataset of ``datasets``."""
    measured = [name for name in CANDIDATES[recipe] if not math.isnan(validation(rows, recipe, name, datasets))]
    return max(measured or CANDIDATES[recipe], key=lambda name: validation(rows, recipe, name, datasets))


def lead(rows: list[dict], recipe: str, first: str, second: str, datasets) -> tuple[float, float]:
    """``first``'s lead over ``second`` in mean validation ACC, and the standard error of that difference (two
    accuracies on each validation split, binomial, unpaired, so an upper bound; BreastMNIST's 78 images make one
    image 0.0128)."""
    variance = 0.0
    for dataset in datasets:
        n = medmnist.INFO[dataset]["n_samples"]["val"]
        variance += sum(
            a * (1 - a) / n for a in (validation(rows, recipe, name, [dataset]) for name in (first, second))
        )
    difference = validation(rows, recipe, first, datasets) - validation(rows, recipe, second, datasets)
    return difference, math.sqrt(variance) / len(datasets)


def margin(rows: list[dict], recipe: str, datasets) -> str:
    """How decisive the choice was: the winner's lead over the runner-up, in ACC and in standard errors."""
    ranked = sorted(CANDIDATES[recipe], key=lambda name: -validation(rows, recipe, name, datasets))
    if len(ranked) < 2 or math.isnan(validation(rows, recipe, ranked[1], datasets)):
        return "-"
    difference, se = lead(rows, recipe, ranked[0], ranked[1], datasets)
    return f"+{difference:.4f} ({difference / se:.1f} SE)"


def check_shipped(recipe: str) -> None:
    """``SHIPPED`` must be configs/recipes.yaml's recipe as it stands (the accuracy benchmark's fingerprint)."""
    for dataset in DATASETS:
        if mark(candidate_values(recipe, SHIPPED[recipe], dataset)) != fingerprint(recipe, dataset):
            raise SystemExit(f"SHIPPED[{recipe!r}] is not what configs/recipes.yaml ships on {dataset}: update it")


def ships(rows: list[dict], recipe: str) -> str:
    """The one-SE rule (declared 2026-12-03): the best candidate on the three validation splits replaces what
    ships only if it leads it by more than one standard error."""
    best, incumbent = choose(rows, recipe, DATASETS), SHIPPED[recipe]
    if best == incumbent:
        return incumbent
    difference, se = lead(rows, recipe, best, incumbent, DATASETS)
    return best if difference > se else incumbent


def run(recipe: str, name: str, dataset: str, seed: int, data_dir, shared_cpu: bool = False) -> None:
    values = candidate_values(recipe, name, dataset)
    print(f"{recipe}: {name} / {dataset} / seed {seed} ...", flush=True)
    row = run_case(recipe, dataset, seed, data_dir, "cpu", command_line(values), mark(values))
    row["candidate"] = name
    if shared_cpu:  # other work shared the cores: the wall time is an upper bound
        row["shared_cpu"] = True
    with RESULTS_FILE.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"    val {row['best_val_acc']:.4f}, test {row['test_acc']:.4f}, {row['process_time']:.0f} s", flush=True)


def report(rows: list[dict], recipe: str) -> str:
    lines = [
        "| held-out dataset | chosen on the other two (validation ACC) | lead over the runner-up | held-out test ACC | "
        "wall time (s) | tuned on itself before the rules (test ACC, wall) | MedMNIST v2 ResNet-18 (28) |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for held_out in DATASETS:
        others = [d for d in DATASETS if d != held_out]
        name = choose(rows, recipe, others)
        found = current(rows, recipe, name, held_out)
        seeds = f" ({len(found)} seeds, partial)" if len(found) < len(SEEDS) else ""
        walls = [r["process_time"] for r in found]
        shared = " (shared CPU)" if any(r.get("shared_cpu") for r in found) else ""
        lines.append(
            f"| {held_out} | {name} ({validation(rows, recipe, name, others):.4f}) | {margin(rows, recipe, others)} | "
            f"{mean_std([r['test_acc'] for r in found])}{seeds} | "
            f"{statistics.median(walls):.0f}{shared} | {TUNED_BEFORE[recipe][held_out]} | "
            f"{REFERENCES[held_out]['MedMNIST v2 ResNet-18 (28)']:.3f} |"
            if found
            else f"| {held_out} | {name} | {margin(rows, recipe, others)} | - | - | "
            f"{TUNED_BEFORE[recipe][held_out]} | - |"
        )
    lines += ["", "Every candidate, seed 0 (validation ACC / test ACC / wall s):", ""]
    lines += ["| candidate | " + " | ".join(DATASETS) + " | mean validation ACC |", "|---|---|---|---|---:|"]
    for name in CANDIDATES[recipe]:
        cells = []
        for dataset in DATASETS:
            found = [r for r in current(rows, recipe, name, dataset) if r["seed"] == SELECTION_SEED]
            shared = "*" if found and found[0].get("shared_cpu") else ""
            cells.append(
                f"{found[0]['best_val_acc']:.4f} / {found[0]['test_acc']:.4f} / {found[0]['process_time']:.0f}{shared}"
                if found
                else "-"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {validation(rows, recipe, name, DATASETS):.4f} |")
    lines += [
        "",
        "\\* other work shared the 2 cores during the run (`shared_cpu` in the results file): its wall time is an "
        "upper bound; accuracy does not depend on it.",
        "",
        f"Best on all three validation splits: **{choose(rows, recipe, DATASETS)}**, ahead of the runner-up by "
        f"{margin(rows, recipe, DATASETS)} (one standard error is about 0.013 of mean validation ACC, mostly "
        f"BreastMNIST's 78 images). What `{recipe}` ships by the one-SE rule (a candidate replaces what ships only "
        f"with a lead over one standard error): **{ships(rows, recipe)}**.",
    ]
    return "\n".join(lines)


def write(rows: list[dict], recipe: str) -> None:
    body = (
        f"## Choosing `{recipe}`'s rule, one dataset left out\n\n"
        "Each candidate trains on the three datasets (seed 0); for each held-out dataset the candidate with the best "
        "mean validation ACC on the other two is chosen, then its test ACC on the held-out dataset is read over 3 "
        "seeds. Process wall times on the 2-core CPU with the bfloat16 step. Reproduce: "
        f"`python benchmarks/rule_choice.py --recipe {recipe}` (resumable).\n\n" + report(rows, recipe)
    )
    write_section(f"rule-choice-{recipe}", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quick", choices=sorted(CANDIDATES))
    parser.add_argument("--selection-only", action="store_true", help="train the seed-0 runs only")
    parser.add_argument(
        "--held-out", default=",".join(DATASETS), help="the held-out datasets whose seeds to complete, in this order"
    )
    parser.add_argument("--shared-cpu", action="store_true", help="mark the wall times: other work shared the CPU")
    args = parser.parse_args()
    held_outs = [d for d in args.held_out.split(",") if d]
    for held_out in held_outs:
        if held_out not in DATASETS:
            parser.error(f"--held-out {held_out!r} is not one of: {', '.join(DATASETS)}")
    recipe, data_dir = args.recipe, real_data_dir()
    check_shipped(recipe)
    create_store()
    for name in CANDIDATES[recipe]:
        for dataset in DATASETS:
            if not any(r["seed"] == SELECTION_SEED for r in current(load_rows(), recipe, name, dataset)):
                run(recipe, name, dataset, SELECTION_SEED, data_dir, args.shared_cpu)
                write(load_rows(), recipe)
    if not args.selection_only:
        for held_out in held_outs:
            name = choose(load_rows(), recipe, [d for d in DATASETS if d != held_out])
            done = {r["seed"] for r in current(load_rows(), recipe, name, held_out)}
            for seed in (s for s in SEEDS if s not in done):
                run(recipe, name, held_out, seed, data_dir, args.shared_cpu)
                write(load_rows(), recipe)
    write(load_rows(), recipe)


if __name__ == "__main__":
    main()
