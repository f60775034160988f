"""Benchmarks of ekfac_triton (run as modules, e.g. ``python -m bench.step_time``; see bench/README.md)."""
