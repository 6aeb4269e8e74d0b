"""What every stage agrees on about a trained model, in one torch-free package.

Training writes a :class:`ModelCard` with the logged model, export copies it into the ONNX file's
``metadata_props``, deploy adds the registry version, and the service reads it back. ``serving/`` may import
this package (it needs neither torch nor the training code).
"""

from contract.model_card import (
    CAM,
    CAMS_NAME,
    CHAMPION_ALIAS,
    EXPLAIN_FILE,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    REGISTERED_MODEL_PREFIX,
    REGISTRY_METRICS,
    ROBUSTNESS_TAG,
    ModelCard,
    Preprocessing,
    dataset_of_registered_model,
    metric_safe,
    registered_model_name,
)

__all__ = [
    "CAM",
    "CAMS_NAME",
    "CHAMPION_ALIAS",
    "EXPLAIN_FILE",
    "INPUT_NAME",
    "METADATA_KEY",
    "OUTPUT_NAME",
    "REGISTERED_MODEL_PREFIX",
    "REGISTRY_METRICS",
    "ROBUSTNESS_TAG",
    "ModelCard",
    "Preprocessing",
    "dataset_of_registered_model",
    "metric_safe",
    "registered_model_name",
]
