"""MLflow bookkeeping: the run lifecycle, what a run records, stores, orphaned runs, checkpoints and resuming."""
