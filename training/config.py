"""The training configuration: one dataclass shared by the CLI, the MLproject entry point and sweeps."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field, fields

import yaml

import zoo
from training.data import DatasetError, check_dataset_name
from training.engine import OPTIMIZERS, SCHEDULERS

SELECT_METRICS = ("auc", "acc")


class ConfigError(ValueError):
    """A training parameter with a value that is not allowed; the message names both."""


@dataclass
class TrainConfig:
    model: str = "cnn"
    dataset: str = "organamnist"
    size: int = 28
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    l1: float = 0.0
    dropout: float | None = None  # None: the model's own default
    scheduler: str = "cosine"
    patience: int = 0  # epochs without validation gain before stopping; 0 = never stop early
    select_metric: str = "auc"
    seed: int = 0
    data_dir: str = ""
    max_train_samples: int = 0  # 0 = the whole training split
    pretrained: str = "false"  # false, true (timm hub) or a path to a weights file
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.model_kwargs, str):
            self.model_kwargs = parse_model_kwargs(self.model_kwargs)
        if self.select_metric.startswith("val_"):
            self.select_metric = self.select_metric[len("val_") :]
        self.pretrained = str(self.pretrained)

    @property
    def select_key(self) -> str:
        return f"val_{self.select_metric}"

    @property
    def uses_pretrained(self) -> bool:
        return self.pretrained.lower() not in ("false", "0", "no", "")

    def model_options(self) -> dict:
        """Options handed to ``zoo.create_model``: ``model_kwargs`` plus the top-level dropout/pretrained."""
        options = dict(self.model_kwargs)
        if self.dropout is not None:
            options["dropout"] = self.dropout
        if self.uses_pretrained:
            options["pretrained"] = self.pretrained
        return options

    def validate(self) -> "TrainConfig":
        """Check every value before anything is created; raises ConfigError naming value and allowed range."""
        try:
            model_config = zoo.get_model_config(self.model)
            check_dataset_name(self.dataset)
        except (zoo.ZooError, DatasetError) as err:
            raise ConfigError(str(err)) from None
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("scheduler", self.scheduler, SCHEDULERS)
        _one_of("select_metric", self.select_metric, SELECT_METRICS)
        for name in ("epochs", "batch_size", "size"):
            _at_least(name, getattr(self, name), 1)
        for name in ("patience", "max_train_samples", "weight_decay", "l1", "seed"):
            _at_least(name, getattr(self, name), 0)
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r} must be > 0.")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1).")
        if self.uses_pretrained and not model_config.has_pretrained:
            raise ConfigError(f"pretrained={self.pretrained!r}: model {self.model!r} has no pretrained weights.")
        if not self.model.startswith(zoo.registry.TIMM_PREFIX):
            unknown = sorted(set(self.model_options()) - set(model_config.options))
            if unknown:
                raise ConfigError(
                    f"model_kwargs: {self.model!r} has no option(s) {', '.join(unknown)}; "
                    f"its options are: {', '.join(model_config.options)}."
                )
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def parse_model_kwargs(text: str) -> dict:
    """``"filters=32,64 kernel_size=5 pool=avg"`` -> ``{"filters": "32,64", "kernel_size": 5, "pool": "avg"}``."""
    options = {}
    for item in shlex.split(text.replace(";", " ")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f'model_kwargs: {item!r} is not key=value (example: "filters=32,64 kernel_size=5").')
        options[key.strip()] = yaml.safe_load(value) if value else ""
    return options


def _one_of(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of: {', '.join(allowed)}.")


def _at_least(name, value, minimum):
    if value < minimum:
        raise ConfigError(f"{name}={value!r} must be >= {minimum}.")
