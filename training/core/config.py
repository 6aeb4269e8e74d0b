"""The training configuration: one dataclass, the single declaration of every training parameter.

The CLI flags (``training.cli``), the MLproject ``train`` parameters, sweeps and the README table are all
derived from or checked against these fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import zoo
from training.core import policy
from training.core.augment import OPS, AugmentError
from training.core.calibration import CALIBRATIONS
from training.core.data import DatasetError, check_dataset_name, dataset_info
from training.core.devices import DEVICES, PRECISIONS, DeviceError, resolve_device, resolve_precision
from training.core.engine import CLASS_BALANCES
from training.core.optim import OPTIMIZERS, SCHEDULERS
from training.core.options import AUTO, NONE, OptionError, as_params, option, parse_key_values

RANKING_METRICS = ("auc", "acc")  # validation metrics runs are compared on
SELECT_METRICS = (*RANKING_METRICS, "last")


class ConfigError(OptionError):
    """A training parameter with a value that is not allowed; the message names both."""


@dataclass
class TrainConfig:
    recipe: str = option(NONE, "named recipe from configs/recipes.yaml whose values the other parameters override")
    model: str = option("cnn", f"a zoo model ({', '.join(zoo.list_models())}) or any timm architecture as timm/<name>")
    dataset: str = option("organamnist", "MedMNIST flag (organamnist, bloodmnist, ...), mnist or fashionmnist")
    size: int = option(28, "input size in px; raised to the model's minimum when smaller")
    epochs: int = option(10, "training epochs")
    batch_size: int = option(128, "training batch size")
    lr: float = option(1e-3, "learning rate")
    optimizer: str = option("adam", f"one of: {', '.join(OPTIMIZERS)} (sgd uses Nesterov momentum 0.9)")
    weight_decay: float = option(0.0, "L2 strength on weights (not biases or norm parameters)")
    l1: float = option(0.0, "L1 strength on weights (not biases or norm parameters)")
    dropout: float | None = option(None, f"dropout rate ({AUTO}: the model's own default)")
    scheduler: str = option("cosine", f"one of: {', '.join(SCHEDULERS)} (multistep: x0.1 at 50%/75%)")
    patience: int = option(0, "stop after this many epochs without validation gain (0: never)")
    select_metric: str = option(
        "auc", "validation metric that picks the best epoch: auc or acc; last keeps the final epoch's weights"
    )
    seed: int = option(0, "random seed (weights, batch order, subsampling)")
    members: int = option(
        1, "networks trained one after the other (member i with seed seed*N+i) and averaged into one ensemble model"
    )
    data_dir: str = option(AUTO, f"folder with the dataset files ({AUTO}: $MEDZOO_DATA_DIR, else ~/.medmnist)")
    max_train_samples: int = option(0, "seeded, stratified subsample of the training split (0: all)")
    pretrained: str = option("false", "false, true (timm hub, needs internet) or a path to a weights file")
    model_kwargs: dict = option({}, 'model options as key=value pairs, e.g. "filters=32,64 kernel_size=5"')
    augment: str = option(NONE, f"{NONE}, {AUTO} (what is valid for the dataset) or a comma list of: {', '.join(OPS)}")
    label_smoothing: float = option(0.0, "label smoothing of the targets")
    mixup: float = option(0.0, "MixUp alpha (0: off)")
    cutmix: float = option(0.0, "CutMix alpha (0: off)")
    corruption_augment: float = option(
        0.0,
        "share of each batch replaced by a MedMNIST-C corrupted copy of the same images (one random corruption of "
        "the dataset and severity per image, made once before training; 0: off)",
    )
    ema: float = option(
        0.0, "decay of an exponential moving average of the weights, selected on validation too (0: off)"
    )
    warmup_epochs: int = option(0, "epochs of linear learning-rate warm-up")
    clip_grad: float = option(0.0, "clip the gradient norm to this (0: off)")
    class_balance: str = option(NONE, f"one of: {', '.join(CLASS_BALANCES)}")
    tta: str = option(
        NONE, f"test-time views averaged in the final evaluation and the exported model: {NONE}, {AUTO} or a list"
    )
    calibration: str = option(
        "temperature",
        "none or temperature: a temperature fitted on half of validation, folded into the exported graph "
        "(conformal prediction sets are calibrated on the other half either way)",
    )
    freeze: str = option(NONE, f"{NONE}, backbone (all but the classifier) or N (the stem and the first N stages)")
    head_lr: float | None = option(None, f"learning rate of the classifier head ({AUTO}: lr)")
    device: str = option(AUTO, f"one of: {', '.join(DEVICES)} ({AUTO}: cuda when there is a GPU)")
    checkpoint_every: float = option(
        30.0, "seconds between training checkpoints (0: every epoch); a run that stops saves its last finished epoch"
    )
    precision: str = option(
        AUTO,
        f"of the training step: {', '.join(PRECISIONS)} ({AUTO}: bf16 on GPUs, and on CPUs with native bfloat16 for "
        "the models measured faster there)",
    )

    def __post_init__(self):
        if isinstance(self.model_kwargs, str):
            self.model_kwargs = parse_model_kwargs(self.model_kwargs)
        if self.select_metric.startswith("val_"):
            self.select_metric = self.select_metric[len("val_") :]
        self.pretrained = str(self.pretrained)
        self.data_dir = str(self.data_dir or AUTO)

    @property
    def select_key(self) -> str:
        return f"val_{self.select_metric}"

    @property
    def ranking_metric(self) -> str:
        """What runs of this set-up are compared on (registry, leaderboards): `last` picks an epoch, not a metric."""
        return "auc" if self.select_metric == "last" else self.select_metric

    @property
    def uses_pretrained(self) -> bool:
        return self.pretrained.lower() not in ("false", "0", "no", "")

    @property
    def data_path(self) -> str | None:
        """The dataset folder, or None for the data layer's default."""
        return None if self.data_dir == AUTO else self.data_dir

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
            if self.uses_pretrained and not model_config.has_pretrained:
                raise ConfigError(f"pretrained={self.pretrained!r}: model {self.model!r} has no pretrained weights.")
            zoo.check_options(self.model, self.model_options())
            check_dataset_name(self.dataset)
        except (zoo.ZooError, DatasetError) as err:
            raise ConfigError(str(err)) from None
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("scheduler", self.scheduler, SCHEDULERS)
        _one_of("select_metric", self.select_metric, SELECT_METRICS)
        _one_of("class_balance", self.class_balance, CLASS_BALANCES)
        _one_of("calibration", self.calibration, CALIBRATIONS)
        _one_of("device", self.device, DEVICES)
        _one_of("precision", self.precision, PRECISIONS)
        if self.select_metric == "last" and self.patience:
            raise ConfigError(
                f"patience={self.patience!r} needs a validation metric to wait on; select_metric=last has none "
                "(use auc or acc, or patience=0)."
            )
        if self.freeze not in (NONE, "backbone") and not (self.freeze.isdigit() and int(self.freeze) >= 1):
            raise ConfigError(f"freeze={self.freeze!r} must be {NONE}, backbone or a number of stages >= 1.")
        if self.freeze != NONE and not self.uses_pretrained:
            raise ConfigError(f"freeze={self.freeze!r} needs pretrained weights (pretrained=true or a weights file).")
        for name in ("label_smoothing", "mixup", "cutmix", "clip_grad", "warmup_epochs"):
            _at_least(name, getattr(self, name), 0)
        if not 0 <= self.corruption_augment <= 1:
            raise ConfigError(f"corruption_augment={self.corruption_augment!r} must be in [0, 1] (a share of images).")
        if self.corruption_augment > 0:
            from training.core.corruptions import CorruptionError, corruptions_of  # imports medmnistc: seconds

            try:
                corruptions_of(self.dataset)
            except CorruptionError as err:
                raise ConfigError(f"corruption_augment={self.corruption_augment}: {err}") from None
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema={self.ema!r} must be in [0, 1) (a decay such as 0.999; 0 turns it off).")
        if not self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing!r} must be < 1.")
        if self.head_lr is not None and not self.head_lr > 0:
            raise ConfigError(f"head_lr={self.head_lr!r} must be > 0.")
        try:
            policy.resolve_augment(self.augment, self.dataset, 3)
            policy.resolve_tta(self.tta, self.dataset)
        except AugmentError as err:
            raise ConfigError(str(err)) from None
        for name in ("epochs", "batch_size", "size", "members"):
            _at_least(name, getattr(self, name), 1)
        for name in ("patience", "max_train_samples", "weight_decay", "l1", "seed", "checkpoint_every"):
            _at_least(name, getattr(self, name), 0)
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr!r} must be > 0.")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout!r} must be in [0, 1).")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def to_params(self) -> dict[str, str]:
        """Every parameter as text, exactly as the command line and MLproject spell it."""
        return as_params(self)

    @classmethod
    def dataset_default(cls) -> str:
        return next(f.default for f in fields(cls) if f.name == "dataset")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def parse_model_kwargs(text: str) -> dict:
    try:
        return parse_key_values(text)
    except OptionError as err:
        raise ConfigError(f"model_kwargs: {err}") from None


def _one_of(name, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of: {', '.join(allowed)}.")


def _at_least(name, value, minimum):
    if value < minimum:
        raise ConfigError(f"{name}={value!r} must be >= {minimum}.")


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated TrainConfig with every derived choice made once, before a run starts: the device, the input
    size (raised to the model's minimum), the augmentation and test-time views (``auto`` made concrete for the
    dataset). Everything downstream reads these values; nothing resolves them again."""

    config: TrainConfig
    device: str
    input_size: int
    augment: tuple[str, ...]
    tta: tuple[str, ...]
    precision: str = "fp32"
    notes: tuple[str, ...] = ()


def resolve(config: TrainConfig) -> ResolvedConfig:
    """Validate ``config`` and make its choices; every error names the value and what is allowed."""
    config.validate()
    size, notes = config.size, ()
    minimum = zoo.get_model_config(config.model).min_input_size
    if size < minimum:
        size, notes = minimum, (f"size raised from {config.size} to {minimum} px, the minimum for {config.model}",)
    try:
        augment = policy.resolve_augment(config.augment, config.dataset, dataset_info(config.dataset)["channels"])
        tta = policy.resolve_tta(config.tta, config.dataset)
    except AugmentError as err:
        raise ConfigError(str(err)) from None
    device = resolve_device(config.device)
    try:
        precision = resolve_precision(config.precision, device, config.model)
    except DeviceError as err:
        raise ConfigError(str(err)) from None
    return ResolvedConfig(replace(config), device, size, augment, tta, precision, notes)
