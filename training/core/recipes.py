"""Named recipes (``configs/recipes.yaml``): complete training set-ups that explicit parameters override.

A recipe names no dataset. Its length, width, batch size and number of averaged networks follow the training
set by the rule in its ``scale`` block (:class:`Scale`), so a dataset nobody tuned for gets the same reasoning as
the three that were measured; what stays per dataset is the augmentation policy (``training.core.policy``),
because which flips keep a label true is anatomy, not tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from training.core.config import ConfigError, TrainConfig
from training.core.data import DatasetError, dataset_info, list_datasets
from training.core.options import NONE, mlflow_command, parser_for, to_text
from training.core.paths import CONFIGS_DIR

RECIPES_FILE = CONFIGS_DIR / "recipes.yaml"
NOT_IN_RECIPES = ("recipe", "dataset", "data_dir", "seed", "device", "precision", "checkpoint_every")
WIDTH_STEP = 8  # widened nets keep channel counts that are multiples of 8 (what vector units like)
MIN_BATCH = 16  # BatchNorm statistics get noisy below this


@dataclass(frozen=True)
class Scale:
    """The rule that sizes a recipe for a training set of ``n`` images (see configs/recipes.yaml).

    - epochs = ``images_seen`` / n, rounded, between 1 and ``max_epochs``;
    - when ``max_epochs`` leaves part of that budget unused (small datasets), the net is widened: width x sqrt(the
      unused factor), a multiple of 8, at most ``max_width`` (an image costs width^2 in a conv net);
    - what the widening leaves unused still goes to ``members`` averaged networks, at most ``max_members``;
    - the batch size is halved (not below 16) until an epoch has at least ``min_steps_per_epoch`` steps.
    """

    images_seen: int
    max_epochs: int
    min_steps_per_epoch: int = 1
    max_width: int = 0  # 0: never widen
    max_members: int = 1

    def apply(self, values: dict, n: int) -> dict:
        """``values`` (the recipe's) with epochs, width, batch size and members set for ``n`` training images."""
        n = max(1, n)
        epochs = max(1, min(self.max_epochs, round(self.images_seen / n)))
        unused = self.images_seen / (n * epochs)  # > 1 only when max_epochs capped the length
        scaled = {**values, "epochs": epochs}
        width = values.get("model_kwargs", {}).get("width")
        if self.max_width and width and unused > 1:
            wider = min(self.max_width, max(width, WIDTH_STEP * round(width * math.sqrt(unused) / WIDTH_STEP)))
            scaled["model_kwargs"] = {**values["model_kwargs"], "width": wider}
            unused /= (wider / width) ** 2
        if self.max_members > 1:
            scaled["members"] = max(1, min(self.max_members, math.floor(unused)))
        batch = values.get("batch_size", TrainConfig.batch_size)
        while batch > MIN_BATCH and n / batch < self.min_steps_per_epoch:
            batch //= 2
        scaled["batch_size"] = batch
        return scaled

    def text(self) -> str:
        return ", ".join(f"`{f.name}={getattr(self, f.name)}`" for f in fields(self))


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    values: dict
    scale: Scale | None = None

    def values_for(self, dataset: str, max_train_samples: int = 0) -> dict:
        """What the recipe sets for ``dataset``: its values, sized by its rule for the training split."""
        if self.scale is None:
            return dict(self.values)
        try:
            n = dataset_info(dataset)["train"]
        except DatasetError as err:
            raise ConfigError(str(err)) from None
        return self.scale.apply(self.values, min(n, max_train_samples) if max_train_samples else n)


def load_recipes(path: Path = RECIPES_FILE) -> dict[str, Recipe]:
    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"recipes file {path}: {err}") from None
    allowed = [f.name for f in fields(TrainConfig) if f.name not in NOT_IN_RECIPES]
    recipes = {}
    for name, spec in document.items():
        spec = dict(spec or {})
        description = str(spec.pop("description", ""))
        scale = _scale(path, name, spec.pop("scale", None))
        unknown = sorted(set(spec) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{path}: recipe {name} sets {', '.join(unknown)}; recipes may set: {', '.join(allowed)} and scale "
                "(a rule, not per-dataset values)."
            )
        recipes[name] = Recipe(name, description, _typed(spec), scale)
    return recipes


def _scale(path: Path, name: str, spec) -> Scale | None:
    if spec is None:
        return None
    names = [f.name for f in fields(Scale)]
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: recipe {name}: scale must be a mapping of {', '.join(names)}, not {spec!r}.")
    unknown = sorted(set(spec) - set(names))
    if unknown:
        raise ConfigError(f"{path}: recipe {name}: scale sets {', '.join(unknown)}; it may set: {', '.join(names)}.")
    try:
        scale = Scale(**{k: int(v) for k, v in spec.items()})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: recipe {name}: scale needs whole numbers for {', '.join(names)} ({err}).") from None
    if min(scale.images_seen, scale.max_epochs, scale.min_steps_per_epoch, scale.max_members) < 1:
        raise ConfigError(f"{path}: recipe {name}: scale values must be >= 1 (max_width >= 0): {spec}.")
    return scale


def _typed(values: dict) -> dict:
    """YAML gives ints, floats, bools and strings; parse each as its command-line text for one behaviour."""
    return {k: parser_for(TrainConfig, k)(to_text(v)) for k, v in values.items()}


def recipe_names() -> list[str]:
    return [NONE, *load_recipes()]


def config_from_recipe(recipe: str, **given) -> TrainConfig:
    """The recipe's values for the dataset, overridden by ``given``; ``none`` is TrainConfig's own defaults."""
    if recipe == NONE:
        return TrainConfig(recipe=NONE, **given)
    recipes = load_recipes()
    if recipe not in recipes:
        raise ConfigError(f"recipe={recipe!r} is not one of: {', '.join(recipe_names())} (see {RECIPES_FILE}).")
    dataset = given.get("dataset", TrainConfig.dataset_default())
    values = recipes[recipe].values_for(dataset, int(given.get("max_train_samples") or 0))
    if "model" in given and given["model"] != values.get("model"):
        values.pop("model_kwargs", None)  # they belong to the recipe's own model
    elif "model_kwargs" in given:  # options given for the recipe's model refine its options
        given = {**given, "model_kwargs": {**values.get("model_kwargs", {}), **given["model_kwargs"]}}
    return TrainConfig(**{**values, **given, "recipe": recipe})


def train_command(config: TrainConfig) -> str:
    """The ``mlflow run`` line that trains ``config`` again: its recipe, model, dataset and seed, and every value
    that differs from what that recipe gives the dataset."""
    base = config_from_recipe(config.recipe, dataset=config.dataset, max_train_samples=config.max_train_samples)
    return mlflow_command("train", config.to_params(), base.to_params(), keep=("recipe", "model", "dataset", "seed"))


def markdown_table() -> str:
    """The recipes as the docs show them (a test keeps docs/training.md equal to this)."""
    lines = ["| recipe | what it is for | values |", "|---|---|---|"]
    for recipe in load_recipes().values():
        values = ", ".join(f"`{k}={to_text(v)}`" for k, v in recipe.values.items())
        if recipe.scale is not None:
            values += f"; scale: {recipe.scale.text()}"
        lines.append(f"| `{recipe.name}` | {recipe.description} | {values} |")
    return "\n".join(lines)


def scaled_table() -> str:
    """What each scaled recipe's rule gives on every supported dataset (a test keeps docs/training.md equal)."""
    lines = [
        "| recipe | dataset | training images | epochs | width | batch size | members |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for recipe in load_recipes().values():
        if recipe.scale is None:
            continue
        for dataset in list_datasets():
            v = recipe.values_for(dataset)
            width = v.get("model_kwargs", {}).get("width", "-")
            lines.append(
                f"| `{recipe.name}` | {dataset} | {dataset_info(dataset)['train']:,} | {v['epochs']} | {width} | "
                f"{v['batch_size']} | {v.get('members', 1)} |"
            )
    return "\n".join(lines)
