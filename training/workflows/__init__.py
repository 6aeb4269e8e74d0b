"""What users run: one network, members, classical models, ensembles, sweeps, leaderboards, the pipeline, studies."""
