"""MedZoo's model zoo: ``create_model(name, in_chans=, num_classes=, **options)`` in the style of timm.

Knows nothing of MLflow, data files or serving.
"""

from zoo import alexnet as _alexnet  # noqa: F401  (registers models)
from zoo import cnn as _cnn  # noqa: F401
from zoo import mlp as _mlp  # noqa: F401
from zoo import timm_models as _timm_models  # noqa: F401
from zoo.preprocessing import NormalizedClassifier, Preprocessing
from zoo.registry import ModelConfig, ZooError, create_model, get_model_config, list_models, register_model

__all__ = [
    "ModelConfig",
    "NormalizedClassifier",
    "Preprocessing",
    "ZooError",
    "create_model",
    "get_model_config",
    "list_models",
    "register_model",
]
