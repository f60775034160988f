"""The optimizer: public API, torch.compile, compiled step, mixed precision, data parallelism,
eigendecomposition engine."""
