"""MedZoo's model zoo: ``create_model(name, in_chans=, num_classes=, **options)`` in the style of timm.

Knows nothing of MLflow, data files or serving. Layout: ``errors`` (leaf), ``registry`` (decorator and
configs), one module per model family registering into it, and ``factory`` (name parsing, option checks).
"""

from zoo import alexnet as _alexnet  # noqa: F401  (registers models)
from zoo import cnn as _cnn  # noqa: F401
from zoo import mlp as _mlp  # noqa: F401
from zoo import resnet9 as _resnet9  # noqa: F401
from zoo import timm_models as _timm_models  # noqa: F401
from zoo.calibration import TemperatureScaled
from zoo.errors import TIMM_PREFIX, ZooError
from zoo.factory import check_options, create_model, get_model_config
from zoo.preprocessing import DATA_INIT_IMAGES, NormalizedClassifier
from zoo.registry import ModelConfig, list_models, register_model
from zoo.transfer import freeze, head_parameter_names
from zoo.tta import VIEWS as TTA_VIEWS
from zoo.tta import TTAClassifier

__all__ = [
    "DATA_INIT_IMAGES",
    "TIMM_PREFIX",
    "TTA_VIEWS",
    "TTAClassifier",
    "TemperatureScaled",
    "ModelConfig",
    "NormalizedClassifier",
    "ZooError",
    "check_options",
    "create_model",
    "freeze",
    "head_parameter_names",
    "get_model_config",
    "list_models",
    "register_model",
]
