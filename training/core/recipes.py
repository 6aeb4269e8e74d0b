"""Named recipes (``configs/recipes.yaml``): complete training set-ups that explicit parameters override."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from training.core.config import ConfigError, TrainConfig
from training.core.options import NONE, parser_for, to_text
from training.core.paths import CONFIGS_DIR

RECIPES_FILE = CONFIGS_DIR / "recipes.yaml"
NOT_IN_RECIPES = ("recipe", "dataset", "data_dir", "seed", "device")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    values: dict
    by_dataset: dict[str, dict]

    def values_for(self, dataset: str) -> dict:
        return {**self.values, **self.by_dataset.get(dataset, {})}


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
        by_dataset = spec.pop("by_dataset", {}) or {}
        for where, values in [(name, spec), *((f"{name}.by_dataset.{d}", v) for d, v in by_dataset.items())]:
            unknown = sorted(set(values) - set(allowed))
            if unknown:
                raise ConfigError(
                    f"{path}: recipe {where} sets {', '.join(unknown)}; recipes may set: {', '.join(allowed)}."
                )
        recipes[name] = Recipe(name, description, _typed(spec), {d: _typed(v) for d, v in by_dataset.items()})
    return recipes


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
    values = recipes[recipe].values_for(given.get("dataset", TrainConfig.dataset_default()))
    if "model" in given and given["model"] != values.get("model"):
        values.pop("model_kwargs", None)  # they belong to the recipe's own model
    elif "model_kwargs" in given:  # options given for the recipe's model refine its options
        given = {**given, "model_kwargs": {**values.get("model_kwargs", {}), **given["model_kwargs"]}}
    return TrainConfig(**{**values, **given, "recipe": recipe})


def markdown_table() -> str:
    """The recipes as the README shows them (a test keeps the README equal to this)."""
    lines = ["| recipe | what it is for | values |", "|---|---|---|"]
    for recipe in load_recipes().values():
        values = ", ".join(f"`{k}={to_text(v)}`" for k, v in recipe.values.items())
        for dataset, overrides in recipe.by_dataset.items():
            values += f"; {dataset}: " + ", ".join(f"`{k}={to_text(v)}`" for k, v in overrides.items())
        lines.append(f"| `{recipe.name}` | {recipe.description} | {values} |")
    return "\n".join(lines)
