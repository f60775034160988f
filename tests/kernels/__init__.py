"""Kernel tests: the torch references against naive formulas, the Triton kernels against the
references (CPU interpreter, CUDA)."""
