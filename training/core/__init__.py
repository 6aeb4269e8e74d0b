"""The training core: data, augmentation, the epoch loop, optimisers, metrics, configuration and recipes. No MLflow."""
