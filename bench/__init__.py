"""Benchmarks: kernel microbenchmarks (bench/kernels), end-to-end training (python -m bench.train)."""
