"""Benchmarks of ekfac_triton, run as modules from the repository root (see bench/README.md):
end-to-end training (``python -m bench.train``), step time (``python -m bench.step_time``), warm
starts (``python -m bench.warm_start``) and the kernel microbenchmarks (``bench/kernels``)."""
