"""MedZoo's training side, in layers (each imports only those below it; ``lint-imports`` checks it):

cli         the one command line (python -m training.cli, medzoo, MLproject's entry points)
workflows   train, members, classical, ensemble, sweep, leaderboard, pipeline, study
export      ONNX export and parity, graph composition, the model registry
tracking    MLflow: the run lifecycle, records, stores, orphaned runs, checkpoints, resuming
core        data, augmentation, the epoch loop, optimisers, metrics, config and recipes (no MLflow)
"""
