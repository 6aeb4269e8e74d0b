"""Search spaces for sweeps, read from an editable YAML file and checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

import zoo
from training.core.config import ConfigError, TrainConfig
from training.core.paths import CONFIGS_DIR, PROJECT_DIR

DEFAULT_SPACE_FILE = CONFIGS_DIR / "search_spaces.yaml"
MODEL_PREFIX = "model."
TUNABLE = tuple(
    n
    for n in TrainConfig.field_names()
    if n not in ("model", "dataset", "data_dir", "model_kwargs", "epochs", "seed", "size")
)


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple | None = None

    def suggest(self, trial: optuna.Trial):
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))


def load_space(model: str, path: str | Path = DEFAULT_SPACE_FILE) -> list[Dimension]:
    """The dimensions for ``model``: common, then its family, then its own entries."""
    path = resolve_space_file(path)
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"search space file {path} does not exist.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"search space file {path} is not valid YAML: {err}") from None
    if not isinstance(document, dict) or set(document) - {"common", "families", "models"}:
        raise ConfigError(f"{path}: top-level keys must be among common, families, models.")
    config = zoo.get_model_config(model)
    merged = dict(document.get("common") or {})
    merged.update((document.get("families") or {}).get(config.family) or {})
    merged.update((document.get("models") or {}).get(model) or {})
    if not merged:
        raise ConfigError(f"{path}: no search dimensions for model {model!r}.")
    return [_dimension(path, name, spec, config) for name, spec in merged.items()]


def resolve_space_file(path: str | Path) -> Path:
    """A relative path is looked up here first, then in the project (where the shipped file lives)."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (PROJECT_DIR / path).exists():
        return path
    return PROJECT_DIR / path


def _dimension(path: Path, name: str, spec, config: zoo.ModelConfig) -> Dimension:
    where = f"{path}: {name}"
    if name.startswith(MODEL_PREFIX):
        try:
            zoo.check_options(config.name, [name[len(MODEL_PREFIX) :]])
        except zoo.ZooError as err:
            raise ConfigError(f"{where}: {err}") from None
    elif name not in TUNABLE:
        raise ConfigError(f"{where}: unknown parameter; tunable are {', '.join(TUNABLE)} and model.<option>.")
    if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
        raise ConfigError(f"{where}: needs type float, int or categorical.")
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list of choices.")
        return Dimension(name, "categorical", choices=tuple(choices))
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: {spec['type']} needs numeric low and high.") from None
    if not low < high or (spec.get("log") and low <= 0):
        raise ConfigError(f"{where}: needs low < high (and low > 0 with log: true).")
    return Dimension(name, spec["type"], low, high, bool(spec.get("log", False)))


def apply(base: TrainConfig, values: dict) -> TrainConfig:
    """A copy of ``base`` with sampled values: training parameters directly, model.<option> as model_kwargs."""
    fields = base.to_dict()
    kwargs = dict(fields.pop("model_kwargs"))
    for name, value in values.items():
        if name.startswith(MODEL_PREFIX):
            kwargs[name[len(MODEL_PREFIX) :]] = value
        else:
            fields[name] = value
    return TrainConfig(**fields, model_kwargs=kwargs)
