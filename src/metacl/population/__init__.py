"""Population runs: the jobs of a multirun that differ only in seed and float hyperparameters,
trained as one batched program (hydra/launcher=population; docs/sweeps.md)."""
