"""The pure-torch references of the three kernel families (``ekfac_triton.kernels``) against
naive float64 formulas, over odd shapes, strided inputs, bias/weights on and off, EMA decays
and input dtypes (tolerances per dtype)."""

from __future__ import annotations

import itertools

import pytest
import torch

from ekfac_triton.kernels import (
    factor_update_reference,
    moment_update_reference,
    per_example_scaling_reference,
    precondition_reference,
)
from tests.helpers import assert_allclose, assert_bitwise_equal

DIMS = (1, 7, 33)
NS = (1, 3, 129)

# (input dtype, atol, rtol): the naive formula runs in float64 on the (already rounded) inputs,
# so the tolerance only covers the accumulation precision of the reference (float32 for
# half-precision inputs).
INPUT_DTYPES = [
    pytest.param(torch.float64, 1e-12, 1e-10, id="fp64"),
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2e-5, 2e-5, id="bf16"),
]
# Where the reference computes in the dtype of its operands (no half-precision operands).
STATE_DTYPES = [
    pytest.param(torch.float64, 1e-12, 1e-10, id="fp64"),
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=torch.float64))
    return q.to(dtype)


def _rows_x(shape: str, n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """X as (N, d) or as a strided (non-contiguous) (B, T, d) view with B*T = n rows."""
    g = _gen(seed)
    if shape == "2d":
        return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    # (T, B, d + 2) base; transpose and slice -> a (B, T, d) view with odd strides.
    b, t = n, 3
    base = torch.randn(t, b, d + 2, generator=g, dtype=torch.float64).to(dtype)
    x = base.transpose(0, 1)[..., 1:d + 1]
    assert not x.is_contiguous()
    return x


# ---------------------------------------------------------------------------------------------
# factor accumulation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "atol", "rtol"), INPUT_DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.95])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["2d", "3d_strided"])
@pytest.mark.parametrize(("n", "d"), list(itertools.product(NS, DIMS)))
def test_factor_update_matches_explicit_concatenation(n, d, layout, bias, weighted, beta, dtype, atol, rtol):
    x = _rows_x(layout, n, d, dtype, seed=10 * n + d)
    rows = x.reshape(-1, d).to(torch.float64)
    acc = _acc_dtype(dtype)
    db = d + int(bias)
    c0 = torch.randn(db, db, generator=_gen(1), dtype=torch.float64)
    c0 = (c0 @ c0.T).to(acc)
    if beta == 0.0:
        c0[0, 0] = float("nan")  # beta = 0 must ignore whatever C holds
    weights = None
    if weighted:
        weights = torch.rand(x.shape[:-1], generator=_gen(2), dtype=torch.float64).to(dtype)
    alpha = 1.0 / rows.shape[0]

    xbar = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=torch.float64)], 1) if bias else rows
    w = torch.ones(rows.shape[0], dtype=torch.float64) if weights is None else weights.reshape(-1).to(torch.float64)
    update = xbar.T @ (w[:, None] * xbar)
    expected = alpha * update if beta == 0.0 else beta * c0.to(torch.float64) + alpha * update

    c = c0.clone()
    out = factor_update_reference(c, x, alpha=alpha, beta=beta, bias=bias, weights=weights)
    assert out is c or out.data_ptr() == c.data_ptr()
    assert c.dtype == acc
    assert torch.isfinite(c).all()
    assert_allclose(c, expected, atol, rtol)
    assert_allclose(c, c.T.to(torch.float64), atol, rtol)  # symmetric (to rounding: the reference is a plain GEMM)


def test_factor_update_rejects_bad_arguments():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="C must be"):
        factor_update_reference(torch.zeros(3, 3), x, alpha=1.0, beta=0.0, bias=True)
    with pytest.raises(ValueError, match="C must be"):
        factor_update_reference(torch.zeros(4, 4), x, alpha=1.0, beta=0.0, bias=False)
    with pytest.raises(ValueError, match="X must be"):
        factor_update_reference(torch.zeros(3, 3), torch.randn(2, 2, 2, 3), alpha=1.0, beta=0.0, bias=False)
    with pytest.raises(ValueError, match="weights"):
        factor_update_reference(torch.zeros(3, 3), x, alpha=1.0, beta=0.0, bias=False, weights=torch.ones(4))
    with pytest.raises(ValueError, match="float32 or float64"):
        factor_update_reference(torch.zeros(3, 3, dtype=torch.bfloat16), x, alpha=1.0, beta=0.0, bias=False)


# ---------------------------------------------------------------------------------------------
# eigenbasis projection: preconditioning
# ---------------------------------------------------------------------------------------------
def _kron_precondition(grad, q_out, q_in, s, damping):
    """vec form: (Q_in ⊗ Q_out) diag(1/(vec S + λ)) (Q_in ⊗ Q_out)ᵀ vec(grad), column-major vec."""
    k = torch.kron(q_in, q_out)
    vec = grad.T.reshape(-1)
    out = k @ ((k.T @ vec) / (s.T.reshape(-1) + damping))
    return out.reshape(grad.shape[1], grad.shape[0]).T


@pytest.mark.parametrize(("dtype", "atol", "rtol"), STATE_DTYPES)
@pytest.mark.parametrize("tensor_damping", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("d_out", "d_in"), list(itertools.product(DIMS, DIMS)))
def test_precondition_matches_explicit_formula(d_out, d_in, bias, tensor_damping, dtype, atol, rtol):
    db = d_in + int(bias)
    grad64 = torch.randn(d_out, db, generator=_gen(3), dtype=torch.float64)
    q_out64, q_in64 = _orthogonal(d_out, 4, torch.float64), _orthogonal(db, 5, torch.float64)
    s64 = torch.rand(d_out, db, generator=_gen(6), dtype=torch.float64) + 0.1
    damping = 0.05
    grad, q_out, q_in, s = (t.to(dtype) for t in (grad64, q_out64, q_in64, s64))
    grad64, q_out64, q_in64, s64 = (t.to(torch.float64) for t in (grad, q_out, q_in, s))  # rounded inputs

    s_before = s.clone()
    lam = torch.tensor(damping, dtype=dtype) if tensor_damping else damping
    out = precondition_reference(grad, q_out, q_in, s, lam)
    assert_bitwise_equal(s, s_before, "S without batch_update")
    assert out.shape == grad.shape and out.dtype == dtype

    p = q_out64.T @ grad64 @ q_in64
    expected = q_out64 @ (p / (s64 + damping)) @ q_in64.T
    assert_allclose(out, expected, atol, rtol)
    if d_out * db <= 7 * 34:
        assert_allclose(out, _kron_precondition(grad64, q_out64, q_in64, s64, damping), atol, rtol)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), STATE_DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.95])
@pytest.mark.parametrize(("d_out", "d_in", "bias"), [(1, 1, True), (7, 33, True), (33, 7, False), (7, 7, False)])
def test_precondition_batch_update(d_out, d_in, bias, beta, dtype, atol, rtol):
    db = d_in + int(bias)
    grad = torch.randn(d_out, db, generator=_gen(7), dtype=torch.float64).to(dtype)
    q_out, q_in = _orthogonal(d_out, 8, dtype), _orthogonal(db, 9, dtype)
    s0 = (torch.rand(d_out, db, generator=_gen(10), dtype=torch.float64) + 0.1).to(dtype)
    if beta == 0.0:
        s0[0, 0] = float("nan")  # beta = 0 ignores the old S
    alpha, n, damping = 0.3, 13, 1e-2

    s = s0.clone()
    out = precondition_reference(grad, q_out, q_in, s, damping, batch_update=(beta, alpha, n))

    g64, qo, qi = (t.to(torch.float64) for t in (grad, q_out, q_in))
    p = qo.T @ g64 @ qi
    s_new = alpha * n * p.square() + (0.0 if beta == 0.0 else beta * s0.to(torch.float64))
    assert torch.isfinite(s).all()
    assert_allclose(s, s_new, atol, rtol)
    assert_allclose(out, qo @ (p / (s_new + damping)) @ qi.T, atol * 10, rtol * 10)


def test_precondition_rejects_shape_mismatch():
    q_out, q_in = torch.eye(3), torch.eye(4)
    with pytest.raises(ValueError, match="shape"):
        precondition_reference(torch.zeros(3, 5), q_out, q_in, torch.ones(3, 5), 0.1)
    with pytest.raises(ValueError, match="shape"):
        precondition_reference(torch.zeros(3, 4), q_out, q_in, torch.ones(4, 3), 0.1)
    with pytest.raises(ValueError, match="shape"):
        precondition_reference(torch.zeros(4, 4), q_out, q_in, torch.ones(4, 4), 0.1)


# ---------------------------------------------------------------------------------------------
# eigenbasis projection: per-example scalings
# ---------------------------------------------------------------------------------------------
def _naive_per_example(g, a, q_out, q_in, bias):
    """Σ_n (Σ_s (Q_outᵀ ĝ_ns)(Q_inᵀ ā_ns)ᵀ)², an explicit loop in float64."""
    total = torch.zeros(q_out.shape[0], q_in.shape[0], dtype=torch.float64)
    for n in range(g.shape[0]):
        m = torch.zeros_like(total)
        for s in range(g.shape[1]):
            abar = a[n, s].to(torch.float64)
            if bias:
                abar = torch.cat([abar, abar.new_ones(1)])
            m += torch.outer(q_out.T @ g[n, s].to(torch.float64), q_in.T @ abar)
        total += m.square()
    return total


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous (N, R, d) view."""
    view = t.transpose(0, 1).contiguous().transpose(0, 1)
    if t.shape[0] > 1 and t.shape[1] > 1:
        assert not view.is_contiguous()
    return view


@pytest.mark.parametrize(("dtype", "atol", "rtol"), INPUT_DTYPES)
@pytest.mark.parametrize("beta", [0.0, 0.95])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("n", "r", "d_out", "d_in", "chunk"), [
    (1, 1, 1, 1, None),
    (3, 1, 7, 33, None),
    (129, 1, 33, 7, None),
    (3, 5, 7, 7, None),
    (7, 3, 33, 1, "one"),       # one example per chunk
    (13, 2, 7, 33, "several"),  # a few examples per chunk, a ragged last chunk
    (1, 3, 1, 7, "one"),
])
def test_per_example_scaling_matches_loop(n, r, d_out, d_in, chunk, bias, beta, dtype, atol, rtol):
    acc = _acc_dtype(dtype)
    db = d_in + int(bias)
    g = _strided(torch.randn(n, r, d_out, generator=_gen(11), dtype=torch.float64).to(dtype))
    a = _strided(torch.randn(n, r, d_in, generator=_gen(12), dtype=torch.float64).to(dtype))
    q_out, q_in = _orthogonal(d_out, 13, acc), _orthogonal(db, 14, acc)
    s0 = (torch.rand(d_out, db, generator=_gen(15), dtype=torch.float64) + 0.1).to(acc)
    if beta == 0.0:
        s0[-1, -1] = float("nan")
    alpha = 1.0 / (n * r * r)
    kwargs = {}
    if chunk == "one":
        kwargs["max_chunk_elements"] = d_out * db  # -> chunks of one example
    elif chunk == "several":
        kwargs["max_chunk_elements"] = 3 * d_out * db + 1  # -> chunks of 3 of 13 examples

    s = s0.clone()
    out = per_example_scaling_reference(s, g, a, q_out, q_in, alpha=alpha, beta=beta, bias=bias, **kwargs)
    assert out.data_ptr() == s.data_ptr()
    expected = alpha * _naive_per_example(g, a, q_out.to(torch.float64), q_in.to(torch.float64), bias)
    if beta != 0.0:
        expected = expected + beta * s0.to(torch.float64)
    assert torch.isfinite(s).all()
    assert_allclose(s, expected, atol, rtol)


def test_per_example_scaling_chunking_does_not_change_the_result():
    g = torch.randn(11, 4, 7, generator=_gen(16), dtype=torch.float64)
    a = torch.randn(11, 4, 5, generator=_gen(17), dtype=torch.float64)
    q_out, q_in = _orthogonal(7, 18, torch.float64), _orthogonal(6, 19, torch.float64)
    results = []
    for max_chunk in (1, 7 * 6 * 2, 7 * 6 * 5, 1 << 24):
        s = torch.zeros(7, 6, dtype=torch.float64)
        per_example_scaling_reference(s, g, a, q_out, q_in, alpha=0.5, beta=0.0, bias=True,
                                      max_chunk_elements=max_chunk)
        results.append(s)
    for s in results[1:]:
        torch.testing.assert_close(s, results[0], atol=1e-12, rtol=1e-12)


def test_per_example_scaling_rejects_shape_mismatch():
    q_out, q_in = torch.eye(3), torch.eye(5)
    s = torch.zeros(3, 5)
    with pytest.raises(ValueError):
        per_example_scaling_reference(s, torch.zeros(2, 1, 3), torch.zeros(3, 1, 4), q_out, q_in,
                                      alpha=1.0, beta=0.0, bias=True)
    with pytest.raises(ValueError):
        per_example_scaling_reference(s, torch.zeros(2, 3), torch.zeros(2, 4), q_out, q_in,
                                      alpha=1.0, beta=0.0, bias=True)
    with pytest.raises(ValueError):
        per_example_scaling_reference(s, torch.zeros(2, 1, 3), torch.zeros(2, 1, 4), q_out, q_in,
                                      alpha=1.0, beta=0.0, bias=False)
    with pytest.raises(ValueError):
        per_example_scaling_reference(torch.zeros(3, 4), torch.zeros(2, 1, 3), torch.zeros(2, 1, 4), q_out, q_in,
                                      alpha=1.0, beta=0.0, bias=True)


# ---------------------------------------------------------------------------------------------
# moment update
# ---------------------------------------------------------------------------------------------
MOMENT_DTYPES = [
    pytest.param(torch.float64, 1e-14, 1e-12, id="fp64"),
    pytest.param(torch.float32, 1e-6, 1e-6, id="fp32"),
    pytest.param(torch.bfloat16, 2e-2, 2e-2, id="bf16"),
]
SHAPES = [(7,), (3, 33), (1, 1), (5, 3, 3, 1)]


def _tensors(seed: int, dtype: torch.dtype, shapes=SHAPES) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


@pytest.mark.parametrize(("dtype", "atol", "rtol"), MOMENT_DTYPES)
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_moment_update_matches_formula(momentum, weight_decay, scaled, dtype, atol, rtol):
    lr = 0.3
    params = _tensors(20, dtype)
    buffers = [torch.zeros_like(p) for p in params] if momentum else [None] * len(params)
    nu = torch.tensor(0.37)
    scales = [nu if (scaled and i % 2 == 0) else None for i in range(len(params))]
    p64 = [p.to(torch.float64, copy=True) for p in params]
    m64 = [torch.zeros_like(p) for p in p64]
    for step in range(3):
        directions = _tensors(30 + step, torch.float32)  # directions arrive in the factors' dtype
        moment_update_reference(params, directions, buffers, lr=lr, momentum=momentum,
                                weight_decay=weight_decay, scales=scales)
        for i, d in enumerate(directions):
            u = d.to(dtype).to(torch.float64)
            if scales[i] is not None:
                u = u * float(nu)
            u = u + weight_decay * p64[i]
            if momentum:
                m64[i] = momentum * m64[i] + u
                u = m64[i]
            p64[i] = p64[i] - lr * u
        for p, expected in zip(params, p64):
            # the update itself is rounded to dtype each step; compare against the running float64
            # recurrence on the rounded state
            assert_allclose(p, expected, atol * (step + 1) * 10, rtol * (step + 1) * 10)
        p64 = [p.to(torch.float64, copy=True) for p in params]
        if momentum:
            m64 = [b.to(torch.float64, copy=True) for b in buffers]


def test_moment_update_tensor_lr():
    params = _tensors(21, torch.float64)
    expected = [p.clone() for p in params]
    directions = _tensors(22, torch.float64)
    moment_update_reference(params, directions, [None] * 4, lr=torch.tensor(0.25, dtype=torch.float64),
                            momentum=0.0, weight_decay=0.0, scales=[None] * 4)
    for p, e, d in zip(params, expected, directions):
        torch.testing.assert_close(p, e - 0.25 * d, atol=1e-15, rtol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.0, 0.01), (0.9, 0.0), (0.9, 0.01)])
def test_moment_update_is_bitwise_sgd(momentum, weight_decay, dtype):
    """With unscaled directions equal to the gradients, the update is torch.optim.SGD's."""
    lr = 0.07
    ours = _tensors(23, dtype)
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    sgd = torch.optim.SGD(theirs, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=False)
    buffers = [torch.zeros_like(p) for p in ours] if momentum else [None] * len(ours)
    for step in range(4):
        grads = _tensors(40 + step, dtype)
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        sgd.step()
        moment_update_reference(ours, grads, buffers, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                scales=[None] * len(ours))
        for a, b in zip(ours, theirs):
            assert_bitwise_equal(a, b.detach(), f"parameter after step {step}")
        if momentum:
            for m, p in zip(buffers, theirs):
                assert_bitwise_equal(m, sgd.state[p]["momentum_buffer"], f"momentum buffer after step {step}")


def test_moment_update_rejects_bad_arguments():
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="shape"):
        moment_update_reference(p, [torch.zeros(4)], [None], lr=0.1, momentum=0.0, weight_decay=0.0, scales=[None])
    with pytest.raises(ValueError, match="lengths"):
        moment_update_reference(p, [torch.zeros(3)], [None, None], lr=0.1, momentum=0.0, weight_decay=0.0,
                                scales=[None])
    with pytest.raises(ValueError, match="buffer"):
        moment_update_reference(p, [torch.zeros(3)], [None], lr=0.1, momentum=0.9, weight_decay=0.0, scales=[None])
