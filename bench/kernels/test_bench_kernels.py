"""Microbenchmarks: each Triton kernel against its torch baseline at the same input precision.

Run on the GPU (skipped without CUDA)::

    pytest bench/kernels/test_bench_kernels.py -s -p no:cacheprovider --benchmark-columns=median,iqr,rounds

pytest-benchmark records host-side wall time of synchronised calls; the table printed at the end
(and written to ``$EKFAC_BENCH_CSV``, default ``bench_kernels.csv``) uses CUDA-event timings from
``triton.testing.do_bench``: median (p20, p80), the derived TFLOP/s or GB/s, and the fraction of
the H100's peak figures (copy 3 TB/s; matmul fp32 52, TF32 380, bf16 700 TFLOP/s).
Flops are counted as the useful work of the torch baseline (2·N·d² for XᵀX), so the symmetric
kernel's saving shows as a higher rate. Every kernel row is followed by its baseline, measured
in the same run; the footer names device and versions.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import pytest
import torch

from ekfac_triton.kernels import factor_update, factor_update_grouped, moment_update, per_example_scaling, precondition

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA device")

PEAK_TFLOPS = {"ieee": 52.0, "tf32": 380.0, "bf16": 700.0}
PEAK_GBS = 3000.0
AUTOENCODER = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]


@dataclass(frozen=True)
class Result:
    name: str
    impl: str
    precision: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    rate: float       # TFLOP/s or GB/s
    unit: str
    peak_fraction: float


RESULTS: list[Result] = []


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if not RESULTS:
        return
    import triton

    lines = [f"{'case':44s} {'impl':8s} {'prec':5s} {'median ms':>10s} {'(p20, p80)':>18s} {'rate':>14s} {'of peak':>8s}"]
    for r in RESULTS:
        lines.append(f"{r.name:44s} {r.impl:8s} {r.precision:5s} {r.median_ms:10.4f} "
                     f"({r.p20_ms:7.4f},{r.p80_ms:7.4f}) {r.rate:9.1f} {r.unit:4s} {r.peak_fraction:7.1%}")
    lines.append(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
                 f"EKFAC_TRITON_AUTOTUNE={os.environ.get('EKFAC_TRITON_AUTOTUNE', '1')}")
    print("\n" + "\n".join(lines))
    path = os.environ.get("EKFAC_BENCH_CSV", "bench_kernels.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(Result.__dataclass_fields__) + ["device", "torch", "triton"])
        for r in RESULTS:
            writer.writerow(list(r.__dict__.values()) + [torch.cuda.get_device_name(), torch.__version__,
                                                         triton.__version__])


def _measure(benchmark, fn, name, impl, precision, *, flops=None, bytes_=None, record=True):
    """Time ``fn`` with CUDA events (median, p20, p80) and record it in pytest-benchmark too."""
    import triton

    fn()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=200)
    if flops is not None:
        rate, unit = flops / (median * 1e-3) / 1e12, "TF/s"
        peak = rate / PEAK_TFLOPS[precision]
    else:
        rate, unit = bytes_ / (median * 1e-3) / 1e9, "GB/s"
        peak = rate / PEAK_GBS
    RESULTS.append(Result(name, impl, precision, median, p20, p80, rate, unit, peak))
    if record:
        def synced():
            fn()
            torch.cuda.synchronize()
        benchmark.extra_info.update(median_ms=median, rate=rate, unit=unit, peak_fraction=peak)
        benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=2)


@pytest.fixture
def matmul_precision():
    """Set torch's fp32 matmul precision for the baseline; restore it afterwards."""
    old = torch.get_float32_matmul_precision()
    yield lambda p: torch.set_float32_matmul_precision("highest" if p == "ieee" else "high")
    torch.set_float32_matmul_precision(old)


# -- factor accumulation ---------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("n,d", [(512, 785), (4096, 1024), (16384, 4096)])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_factor_update(benchmark, matmul_precision, impl, n, d, precision):
    matmul_precision(precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    x = torch.randn(n, d, device="cuda").to(dtype)
    c = torch.zeros(d, d, device="cuda")
    if impl == "triton":
        prec = "ieee" if precision == "bf16" else precision
        fn = lambda: factor_update(c, x, alpha=1.0 / n, beta=0.95, bias=False, precision=prec)  # noqa: E731
    elif dtype == torch.float32:
        fn = lambda: c.mul_(0.95).addmm_(x.T, x, alpha=1.0 / n)  # noqa: E731
    else:
        fn = lambda: c.mul_(0.95).add_((x.T @ x).float(), alpha=1.0 / n)  # noqa: E731
    _measure(benchmark, fn, f"factor N={n} d={d}", impl, precision, flops=2.0 * n * d * d)


@pytest.mark.parametrize("impl", ["triton-grouped", "triton-loop", "torch-loop"])
def test_factor_update_autoencoder(benchmark, matmul_precision, impl):
    """The autoencoder's 16 factors (8 input-side with bias, 8 output-side) for a batch of 512."""
    matmul_precision("ieee")
    n = 512
    xs = [torch.randn(n, d, device="cuda") for d in AUTOENCODER[:-1]] + \
         [torch.randn(n, d, device="cuda") for d in AUTOENCODER[1:]]
    biases = [True] * 8 + [False] * 8
    cs = [torch.zeros(x.shape[1] + b, x.shape[1] + b, device="cuda") for x, b in zip(xs, biases)]
    ones = torch.ones(n, 1, device="cuda")
    if impl == "triton-grouped":
        fn = lambda: factor_update_grouped(cs, xs, alphas=[1 / n] * 16, betas=[0.95] * 16,  # noqa: E731
                                           biases=biases, precision="ieee")
    elif impl == "triton-loop":
        def fn():
            for c, x, b in zip(cs, xs, biases):
                factor_update(c, x, alpha=1 / n, beta=0.95, bias=b, precision="ieee")
    else:
        def fn():
            for c, x, b in zip(cs, xs, biases):
                xb = torch.cat([x, ones], 1) if b else x
                c.mul_(0.95).addmm_(xb.T, xb, alpha=1 / n)
    flops = sum(2.0 * n * c.shape[0] ** 2 for c in cs)
    _measure(benchmark, fn, "factor autoencoder x16, N=512", impl, "ieee", flops=flops)


# -- eigenbasis projection -------------------------------------------------------------------------
def _orthogonal(n):
    return torch.linalg.qr(torch.randn(n, n, device="cuda", dtype=torch.float64))[0].float()


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("d_out,d_in", [(1000, 785), (1024, 1025), (4096, 4097)])
@pytest.mark.parametrize("batch", [False, True], ids=["fixedS", "batchS"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_precondition(benchmark, matmul_precision, impl, d_out, d_in, batch, precision):
    matmul_precision(precision)
    q_out, q_in = _orthogonal(d_out), _orthogonal(d_in)
    grad = torch.randn(d_out, d_in, device="cuda")
    s = torch.rand(d_out, d_in, device="cuda")
    update = (0.95, 0.05, 512) if batch else None
    if impl == "triton":
        fn = lambda: precondition(grad, q_out, q_in, s, 1e-3, batch_update=update, precision=precision)  # noqa: E731
    else:
        def fn():
            p = q_out.T @ grad @ q_in
            if batch:
                s.mul_(0.95).add_(p.square().mul_(0.05 * 512))
            p.div_(s + 1e-3)
            return q_out @ p @ q_in.T
    flops = 2.0 * d_out * d_in * (d_out + d_in) * 2
    _measure(benchmark, fn, f"precondition {d_out}x{d_in} {'batchS' if batch else 'fixedS'}", impl, precision,
             flops=flops)


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("n,d_out,d_in", [(512, 1000, 784), (4096, 1024, 1024)])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_per_example_scaling(benchmark, matmul_precision, impl, n, d_out, d_in, precision):
    matmul_precision(precision)
    q_out, q_in = _orthogonal(d_out), _orthogonal(d_in + 1)
    g = torch.randn(n, 1, d_out, device="cuda")
    a = torch.randn(n, 1, d_in, device="cuda")
    s = torch.rand(d_out, d_in + 1, device="cuda")
    ones = torch.ones(n, 1, device="cuda")
    if impl == "triton":
        fn = lambda: per_example_scaling(s, g, a, q_out, q_in, alpha=1 / n, beta=0.95, bias=True,  # noqa: E731
                                         precision=precision)
    else:
        def fn():
            gq = g[:, 0] @ q_out
            aq = torch.cat([a[:, 0], ones], 1) @ q_in
            s.mul_(0.95).addmm_(gq.square().T, aq.square(), alpha=1 / n)
    flops = 2.0 * n * (d_out * d_out + (d_in + 1) ** 2 + d_out * (d_in + 1))
    _measure(benchmark, fn, f"per-example S N={n} {d_out}x{d_in}", impl, precision, flops=flops)


# -- moment update ---------------------------------------------------------------------------------
def _autoencoder_params():
    shapes = []
    for a, b in zip(AUTOENCODER[:-1], AUTOENCODER[1:]):
        shapes += [(b, a), (b,)]
    return shapes


@pytest.mark.parametrize("case", ["autoencoder", "16x4096x1536"])
@pytest.mark.parametrize("impl", ["triton", "torch-foreach"])
def test_moment_update(benchmark, impl, case):
    shapes = _autoencoder_params() if case == "autoencoder" else [(4096, 1536)] * 16
    params = [torch.randn(s, device="cuda") for s in shapes]
    directions = [torch.randn(s, device="cuda") for s in shapes]
    buffers = [torch.zeros(s, device="cuda") for s in shapes]
    nu = torch.tensor(0.5, device="cuda")
    scales = [nu] * len(shapes)
    if impl == "triton":
        fn = lambda: moment_update(params, directions, buffers, lr=1e-3, momentum=0.9,  # noqa: E731
                                   weight_decay=1e-4, scales=scales)
    else:
        def fn():
            u = torch._foreach_mul(directions, nu)
            torch._foreach_add_(u, params, alpha=1e-4)
            torch._foreach_mul_(buffers, 0.9)
            torch._foreach_add_(buffers, u)
            torch._foreach_add_(params, buffers, alpha=-1e-3)
    numel = sum(p.numel() for p in params)
    # the minimum traffic: read p, d, m; write m, p (fp32)
    _measure(benchmark, fn, f"moment update {case} ({numel / 1e6:.1f}M)", impl, "fp32", bytes_=5 * 4 * numel)
