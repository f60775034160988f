"""Benchmarks and the demo of ekfac_triton, run as modules from the repository root (see
bench/README.md): the MNIST autoencoder demo (``python -m bench.demo``), end-to-end training
(``python -m bench.train``), step time (``python -m bench.step_time``), warm starts
(``python -m bench.warm_start``) and the kernel microbenchmarks (``bench/kernels``). Not an
installed package: ``pip install -e ".[bench]"`` installs its dependencies only."""
