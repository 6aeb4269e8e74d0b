"""A study file read, checked and expanded into planned runs before anything runs.

Each study is declared in ``configs/studies/<name>.yaml``: the datasets, the networks, classical estimators and
ensembles it compared (``runs``), the figures it reported, and the plots to make. Every configuration is built
here, so a bad entry fails before the parent run exists; ``training.workflows.study.run`` runs the plan and
``training.workflows.study.report`` reports it.

``budget=quick`` caps every run (train subsample, epochs) so a study takes minutes on 2 cores; ``full`` runs
the protocol as written. Both read the same file.
"""

from __future__ import annotations

import itertools
import os
import re
import string
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

import zoo
from training.core.config import ConfigError, TrainConfig
from training.core.data import DatasetError, check_dataset_name
from training.core.features import RAW
from training.core.options import AUTO, NONE, OptionError, option, parser_for, to_text
from training.core.paths import CONFIGS_DIR, PROJECT_DIR
from training.core.recipes import config_from_recipe
from training.workflows.classical import ESTIMATORS, ClassicalConfig, ClassicalError, load_grid
from training.workflows.ensemble import EnsembleError, parse_weights

STUDIES_DIR = CONFIGS_DIR / "studies"
BUDGETS = ("quick", "full")
KINDS = ("train", "classical", "ensemble")
PLOTS = {
    "bar": "reported vs ours, per configuration",
    "learning_curves": "validation accuracy and training loss per epoch, every network overlaid",
    "confusion_matrices": "test confusion matrices of the reported configurations and ours",
    "curves": "test accuracy against each varied parameter",
    "confusions": "the most common confusions, as a table in study.md",
}
STUDY_KEYS = ("title", "source", "datasets", "defaults", "budgets", "runs", "plots", "unreported_because")
RUN_KEYS = ("name", *KINDS, "vary", "datasets", "reported", "budgets", "note")
BUDGET_KEYS = ("max_train_samples", "max_epochs", "ours")
CLASSICAL_KEYS = ("features", "model", "grid_file", "cv")
MODEL_OPTION = "model."
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
# Where `${MEDZOO_WEIGHTS_DIR}` points when unset: the weights shipped beside a checkout.
WEIGHTS_DIR_ENV = "MEDZOO_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = PROJECT_DIR.parent / "shared" / "data" / "weights"
OURS = "ours"


class StudyError(OptionError):
    """A study file that cannot run as written; the message names the file, the entry and what is allowed."""


@dataclass
class StudyOptions:
    name: str = option(help="a study in configs/studies (its file name without .yaml) or a path to a study file")
    budget: str = option("quick", "quick (subsampled data, few epochs: minutes) or full (the protocol as written)")
    seeds: list = option([0, 1, 2], "comma-separated seeds; every configuration runs once per seed")
    datasets: list = option(["all"], "comma-separated datasets of the study to run (all: every one)")
    data_dir: str = option(AUTO, "folder with the dataset files (auto: $MEDZOO_DATA_DIR, else ~/.medmnist)")
    dry_run: bool = option(False, "print the checked plan (every run, its epochs and data) and run nothing")


@dataclass
class Configuration:
    """One planned run: a study entry on one dataset with one value of its varied parameters, for one seed."""

    label: str  # the row in study.md, e.g. "cnn lr=0.01"
    entry: str  # the study entry it comes from
    dataset: str
    kind: str
    seed: int
    train: TrainConfig | None = None
    classical: ClassicalConfig | None = None
    members: tuple[str, ...] = ()  # ensemble: labels of earlier configurations
    weights: str = AUTO
    features_from: str = RAW  # classical: label of the network whose features it reads
    reported: float | None = None
    varied: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def model(self) -> str:
        if self.kind == "train":
            return self.train.model
        if self.kind == "classical":
            return f"{self.classical.model}({self.features_from})"
        return "ensemble(" + " + ".join(self.members) + ")"


@dataclass
class Study:
    name: str
    path: Path
    title: str
    source: str
    datasets: list[str]
    plots: list[str]
    unreported_because: str
    configurations: list[Configuration]
    skipped: list[str]  # entries not run at this budget
    budget: str
    ours_recipe: str

    @property
    def seeds(self) -> list[int]:
        return sorted({c.seed for c in self.configurations})


def study_names() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def study_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise StudyError(f"name={name!r}: no study file there.")
        return path
    path = STUDIES_DIR / f"{name}.yaml"
    if not path.exists():
        raise StudyError(f"name={name!r} is not a study; the studies are: {', '.join(study_names())}.")
    return path


def load_study(options: StudyOptions, probe_weights: bool = True) -> Study:
    """Read, check and expand a study file; raises StudyError before anything runs. ``probe_weights`` tries the
    pretrained weights each network names, so the plan says up front which ones train from scratch."""
    if options.budget not in BUDGETS:
        raise StudyError(f"budget={options.budget!r} is not one of: {', '.join(BUDGETS)}.")
    seeds = [_int(s, "seeds") for s in options.seeds]
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds={to_text(options.seeds)!r}: give one or more different seeds >= 0.")
    path = study_path(options.name)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise StudyError(f"study file {path}: {err}") from None
    return _Parser(path, document, options, probe_weights).parse(seeds)


def _int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StudyError(f"{what}: {value!r} is not a whole number.") from None


class _Parser:
    """Turns the YAML document into configurations, naming the file and entry in every complaint."""

    def __init__(self, path: Path, document, options: StudyOptions, probe_weights: bool):
        self.path, self.options, self.probe_weights = path, options, probe_weights
        self.document = document
        self.weights_checked: dict[tuple[str, str], str | None] = {}

    def fail(self, where: str, message: str):
        raise StudyError(f"study file {self.path}, {where}: {message}")

    def parse(self, seeds: list[int]) -> Study:
        self.first_seed = seeds[0]
        doc = self.document
        if not isinstance(doc, dict):
            self.fail("top level", "a study is a mapping with title, datasets, budgets and runs.")
        self._known_keys("top level", doc, STUDY_KEYS)
        for key in ("title", "datasets", "budgets", "runs"):
            if key not in doc:
                self.fail("top level", f"{key} is missing.")
        datasets = self._datasets("datasets", doc["datasets"])
        chosen = [str(d) for d in self.options.datasets]
        if chosen != ["all"]:
            unknown = [d for d in chosen if d not in datasets]
            if unknown:
                self.fail(
                    "datasets", f"{', '.join(unknown)} is not a dataset of this study; it has: {', '.join(datasets)}."
                )
        plots = [str(p) for p in doc.get("plots") or list(PLOTS)]
        for plot in plots:
            if plot not in PLOTS:
                self.fail("plots", f"{plot!r} is not one of: {', '.join(PLOTS)}.")
        budget = self._budget(doc["budgets"])
        defaults = self._train_values("defaults", doc.get("defaults") or {})
        entries = doc["runs"]
        if not isinstance(entries, list) or not entries:
            self.fail("runs", "give a list of runs (each with a name and one of: train, classical, ensemble).")
        self.labels: dict[tuple[str, str, int], Configuration] = {}
        self.entry_labels: dict[tuple[str, str], list[str]] = {}
        configurations, skipped, reported_any = [], [], False
        names = set()
        for index, entry in enumerate(entries):
            name = entry.get("name") if isinstance(entry, dict) else None
            where = f"runs[{index}]" + (f" ({name})" if name else "")
            if not isinstance(entry, dict) or not isinstance(name, str) or not NAME_PATTERN.match(name):
                self.fail(where, "each run is a mapping with a name of lower-case letters, digits, '-', '_', '.'.")
            if name in names or name == OURS:
                self.fail(where, f"the name {name!r} is {'reserved' if name == OURS else 'used twice'}.")
            names.add(name)
            self._known_keys(where, entry, RUN_KEYS)
            reported_any |= entry.get("reported") is not None
            budgets = [str(b) for b in entry.get("budgets", BUDGETS)]
            for b in budgets:
                if b not in BUDGETS:
                    self.fail(where, f"budgets: {b!r} is not one of: {', '.join(BUDGETS)}.")
            planned = self._entry(where, entry, datasets, defaults, budget, seeds)
            if self.options.budget in budgets:
                configurations += planned
            else:
                skipped.append(f"{name} (runs at the {' and '.join(budgets)} budget only)")
        if not reported_any and not doc.get("unreported_because"):
            self.fail(
                "runs",
                "no run gives the figure the original study reported (reported: 0.853, or per dataset); "
                "a study that reported none says why in unreported_because.",
            )
        if chosen != ["all"]:
            skipped += [f"every run on {d} (datasets={','.join(chosen)})" for d in datasets if d not in chosen]
            configurations = [c for c in configurations if c.dataset in chosen]
        used = sorted({c.dataset for c in configurations})
        for dataset in used:
            for seed in seeds:
                configurations.append(self._ours(dataset, seed, budget, several=len(used) > 1))
        return Study(
            name=self.path.stem,
            path=self.path,
            title=str(doc["title"]),
            source=str(doc.get("source", "")),
            datasets=used,
            plots=plots,
            unreported_because=str(doc.get("unreported_because") or ""),
            configurations=configurations,
            skipped=skipped,
            budget=self.options.budget,
            ours_recipe=budget["ours"],
        )

    def _known_keys(self, where: str, mapping: dict, allowed) -> None:
        unknown = sorted(set(mapping) - set(allowed))
        if unknown:
            self.fail(where, f"unknown key {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}.")

    def _datasets(self, where: str, value) -> list[str]:
        datasets = [str(d) for d in (value if isinstance(value, list) else [value])]
        if not datasets:
            self.fail(where, "name at least one dataset.")
        for dataset in datasets:
            try:
                check_dataset_name(dataset)
            except DatasetError as err:
                self.fail(where, str(err))
        return datasets

    def _budget(self, budgets) -> dict:
        if not isinstance(budgets, dict) or set(budgets) != set(BUDGETS):
            self.fail("budgets", f"give both budgets, {' and '.join(BUDGETS)} (each a mapping, may be empty).")
        chosen = dict(budgets[self.options.budget] or {})
        self._known_keys(f"budgets.{self.options.budget}", chosen, BUDGET_KEYS)
        for key in ("max_train_samples", "max_epochs"):
            if key in chosen and _int(chosen[key], f"budgets.{key}") < 1:
                self.fail(f"budgets.{self.options.budget}", f"{key}={chosen[key]!r} must be >= 1.")
        chosen.setdefault("ours", "quick" if self.options.budget == "quick" else "best")
        try:
            config_from_recipe(str(chosen["ours"]))
        except ConfigError as err:
            self.fail(f"budgets.{self.options.budget}.ours", str(err))
        return chosen

    def _train_values(self, where: str, values) -> dict:
        """Training parameters as TrainConfig takes them; ``model.<option>`` keys become model options."""
        if not isinstance(values, dict):
            self.fail(where, "give training parameters as a mapping (name: value).")
        allowed = [f.name for f in fields(TrainConfig) if f.name not in ("dataset", "seed", "data_dir")]
        typed, model_kwargs = {}, {}
        for key, value in values.items():
            key = str(key)
            if key.startswith(MODEL_OPTION) and len(key) > len(MODEL_OPTION):
                model_kwargs[key[len(MODEL_OPTION) :]] = value
                continue
            if key not in allowed:
                self.fail(where, f"{key!r} is not a training parameter; allowed: {', '.join(allowed)}, model.<option>.")
            text = _expand(to_text(value)) if key == "pretrained" else to_text(value)
            try:
                typed[key] = parser_for(TrainConfig, key)(text)
            except (OptionError, ValueError) as err:
                self.fail(where, f"{key}={value!r}: {err}")
        if model_kwargs:
            typed["model_kwargs"] = {**typed.get("model_kwargs", {}), **model_kwargs}
        return typed

    def _variants(self, where: str, vary, dataset: str) -> list[dict]:
        """The cartesian product of the varied values (per dataset where a value list is keyed by dataset)."""
        if not vary:
            return [{}]
        if not isinstance(vary, dict):
            self.fail(f"{where}.vary", "give a mapping of parameter: [values].")
        axes = []
        for key, values in vary.items():
            if isinstance(values, dict):
                values = values.get(dataset)
                if values is None:
                    self.fail(f"{where}.vary.{key}", f"no values for dataset {dataset!r}.")
            if not isinstance(values, list) or not values:
                self.fail(f"{where}.vary.{key}", "give a non-empty list of values.")
            axes.append([(str(key), v) for v in values])
        return [dict(combo) for combo in itertools.product(*axes)]

    def _entry(self, where, entry, study_datasets, defaults, budget, seeds) -> list[Configuration]:
        kinds = [k for k in KINDS if k in entry]
        if len(kinds) != 1:
            self.fail(where, f"give exactly one of: {', '.join(KINDS)}.")
        kind = kinds[0]
        spec = entry[kind] or {}
        if not isinstance(spec, dict):
            self.fail(f"{where}.{kind}", "give a mapping.")
        datasets = self._datasets(f"{where}.datasets", entry["datasets"]) if "datasets" in entry else study_datasets
        reported = entry.get("reported")
        planned = []
        for dataset in datasets:
            figure = reported.get(dataset) if isinstance(reported, dict) else reported
            if figure is not None and not (isinstance(figure, (int, float)) and 0 < figure <= 1):
                self.fail(f"{where}.reported", f"{figure!r} must be a test accuracy in (0, 1], e.g. 0.853.")
            for varied in self._variants(where, entry.get("vary"), dataset):
                label = " ".join([entry["name"], *(f"{k}={to_text(v)}" for k, v in varied.items())])
                if len(study_datasets) > 1 or "datasets" in entry:
                    label = f"{label} @{dataset}"
                for seed in seeds:
                    config = Configuration(label, entry["name"], dataset, kind, seed, reported=figure, varied=varied)
                    if entry.get("note"):
                        config.notes.append(str(entry["note"]))
                    builder = {"train": self._train, "classical": self._classical, "ensemble": self._ensemble}[kind]
                    builder(f"{where}.{kind}", config, {**spec, **varied}, defaults, budget)
                    self.labels[(entry["name"], dataset, seed)] = config
                    self.entry_labels.setdefault((entry["name"], dataset), []).append(label)
                    planned.append(config)
        return planned

    def _train(self, where, config: Configuration, spec: dict, defaults: dict, budget: dict) -> None:
        values = {**defaults, **self._train_values(where, spec)}
        if "model_kwargs" in defaults and "model_kwargs" in values:
            values["model_kwargs"] = {**defaults["model_kwargs"], **values["model_kwargs"]}
        recipe = values.pop("recipe", NONE)
        try:
            train = config_from_recipe(
                recipe, **values, dataset=config.dataset, seed=config.seed, data_dir=self.options.data_dir
            )
            train = self._with_budget(train, budget)
            train = self._weights_or_scratch(train, config.notes)
            train.validate()
            if config.seed == self.first_seed:  # the other seeds build the same network
                zoo.create_model(
                    train.model,
                    in_chans=1,
                    num_classes=2,
                    input_size=max(train.size, zoo.get_model_config(train.model).min_input_size),
                    **{k: v for k, v in train.model_options().items() if k != "pretrained"},
                )
        except (ConfigError, zoo.ZooError) as err:
            self.fail(where, str(err))
        config.train = train

    def _with_budget(self, train: TrainConfig, budget: dict) -> TrainConfig:
        cap = int(budget.get("max_train_samples", 0))
        samples = train.max_train_samples
        if cap and (samples == 0 or samples > cap):
            samples = cap
        epochs = min(train.epochs, int(budget.get("max_epochs", train.epochs)))
        return replace(train, max_train_samples=samples, epochs=epochs)

    def _weights_or_scratch(self, train: TrainConfig, notes: list[str]) -> TrainConfig:
        """Pretrained weights that cannot be had here (no internet, no file): train from scratch, and say so."""
        if not train.uses_pretrained:
            return train
        key = (train.model, train.pretrained)
        if key not in self.weights_checked:
            self.weights_checked[key] = self._weights_problem(train) if self.probe_weights else None
        problem = self.weights_checked[key]
        if problem is None:
            return train
        notes.append(f"pretrained={train.pretrained}: weights could not be had, so it trained from scratch ({problem})")
        return replace(train, pretrained="false", freeze=NONE, head_lr=None)

    @staticmethod
    def _weights_problem(train: TrainConfig) -> str | None:
        try:
            zoo.create_model(train.model, in_chans=3, num_classes=2, input_size=32, pretrained=train.pretrained)
        except zoo.ZooError as err:
            return str(err)
        return None

    def _earlier(self, where: str, name: str, dataset: str, seed: int, kind: str | None = None) -> Configuration:
        labels = self.entry_labels.get((name, dataset), [])
        if not labels:
            self.fail(where, f"{name!r} is not an earlier run of this study on {dataset}.")
        if len(set(labels)) > 1:
            self.fail(where, f"{name!r} varies a parameter ({len(set(labels))} runs); name a run that does not.")
        found = self.labels[(name, dataset, seed)]
        if kind and found.kind != kind:
            self.fail(where, f"{name!r} is a {found.kind} run; a {kind} run is needed here.")
        return found

    def _classical(self, where, config: Configuration, spec: dict, defaults: dict, budget: dict) -> None:
        self._known_keys(where, spec, CLASSICAL_KEYS)
        model = str(spec.get("model", "svm"))
        if model not in ESTIMATORS:
            self.fail(where, f"model={model!r} is not one of: {', '.join(ESTIMATORS)}.")
        features = str(spec.get("features", RAW))
        if features != RAW:
            config.features_from = self._earlier(where, features, config.dataset, config.seed, "train").label
        cap = int(budget.get("max_train_samples", 0))
        try:
            classical = ClassicalConfig(
                dataset=config.dataset,
                features=features,  # the run id replaces the entry name once that run has finished
                model=model,
                grid_file=str(spec.get("grid_file", ClassicalConfig.grid_file)),
                cv=_int(spec.get("cv", 3), f"{where}.cv"),
                seed=config.seed,
                data_dir=self.options.data_dir,
                max_train_samples=cap,
            )
            load_grid(classical.model, classical.grid_file)
        except ClassicalError as err:
            self.fail(where, str(err))
        if classical.cv < 2:
            self.fail(where, f"cv={classical.cv} must be >= 2.")
        config.classical = classical

    def _ensemble(self, where, config: Configuration, spec: dict, defaults: dict, budget: dict) -> None:
        self._known_keys(where, spec, ("members", "weights"))
        members = spec.get("members")
        if not isinstance(members, list) or len(members) < 2:
            self.fail(where, "members: name two or more earlier runs.")
        config.members = tuple(self._earlier(where, str(m), config.dataset, config.seed).label for m in members)
        config.weights = str(spec.get("weights", AUTO)).replace(" ", "")
        try:
            parse_weights(config.weights, len(members))
        except EnsembleError as err:
            self.fail(where, str(err))

    def _ours(self, dataset: str, seed: int, budget: dict, several: bool) -> Configuration:
        recipe = str(budget["ours"])
        train = config_from_recipe(recipe, dataset=dataset, seed=seed, data_dir=self.options.data_dir)
        label = f"{OURS}: recipe {recipe}" + (f" @{dataset}" if several else "")
        return Configuration(label, OURS, dataset, "train", seed, train=self._with_budget(train, budget))


def describe(options: StudyOptions) -> str:
    """The plan, without running it: what ``--dry-run`` prints."""
    study = load_study(options)
    lines = [f"study {study.name} ({study.budget} budget, seeds {to_text(study.seeds)}): {study.title}"]
    for config in study.configurations:
        if config.seed != study.seeds[0]:
            continue
        what = config.model
        if config.train is not None:
            what += f", {config.train.epochs} epochs, train samples {config.train.max_train_samples or 'all'}"
        lines.append(f"  {config.label} [{config.kind}] on {config.dataset}: {what}")
        lines += [f"    note: {note}" for note in config.notes]
    lines += [f"  skipped: {s}" for s in study.skipped]
    return "\n".join(lines)


def _expand(text: str) -> str:
    """``${VAR}`` from the environment; ``${MEDZOO_WEIGHTS_DIR}`` defaults to the weights shipped beside a checkout."""
    return string.Template(text).safe_substitute({WEIGHTS_DIR_ENV: str(DEFAULT_WEIGHTS_DIR), **os.environ})
