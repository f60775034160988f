"""The Triton kernels against their torch references.

How the interpreter tests run (``TRITON_INTERPRET`` must be set before triton is imported, and
the rest of the suite imports triton normally):

* ``pytest -q`` (the whole suite): the tests marked ``interpret`` below are skipped in the main
  process, and :func:`test_interpreter_suite` runs this file again in a subprocess with
  ``TRITON_INTERPRET=1 EKFAC_TRITON_AUTOTUNE=0``, where they run on CPU tensors at small shapes
  (marked ``slow``: ``pytest -m "not slow"`` leaves it out).
* Directly: ``TRITON_INTERPRET=1 pytest -q tests/kernels/test_triton.py -m interpret``.
* On a GPU: ``pytest -q tests/kernels/test_triton.py -m cuda`` runs the same comparisons at real
  sizes and the optimizer with ``backend="triton"`` against ``backend="torch"``.

Tolerances (stated per dtype, checked as ``|x - ref| <= atol·max|ref| + rtol·|ref|``):
fp32 inputs with ``precision="ieee"`` agree to summation order (1e-5); TF32 products round the
operands to 10 mantissa bits (5e-3); bf16 inputs are exact in fp32 products, but weighted rows
are rounded back to bf16 in the factor kernel, and bf16 parameters of the moment update are
rounded differently by the reference (2e-2).
"""

from __future__ import annotations

import pytest
import torch

from ekfac_triton.kernels import (factor_update, factor_update_grouped, factor_update_reference, moment_update,
                                  moment_update_reference, per_example_scaling, per_example_scaling_reference,
                                  precondition, precondition_reference)
from tests.helpers import INTERPRET, assert_close_to_scale, make_mlp, needs_cuda, needs_interpreter
from tests.helpers import KERNEL_DEVICE as DEVICE

# (dtype, precision, atol, rtol): atol is relative to the largest magnitude of the reference.
FP32 = (torch.float32, "ieee", 1e-5, 1e-5)
TF32 = (torch.float32, "tf32", 5e-3, 5e-3)
BF16 = (torch.bfloat16, "ieee", 2e-2, 2e-2)


def _symmetric(d: int, device: str = DEVICE) -> torch.Tensor:
    c = torch.randn(d, d, device=device)
    return c + c.T


def _orthogonal(n: int, device: str = DEVICE) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, device=device, dtype=torch.float64))[0].float()


# -- the interpreter suite, from the normal test run ------------------------------------------------
@pytest.mark.skipif(INTERPRET, reason="already interpreting")
@pytest.mark.slow
def test_interpreter_suite(interpreter_suite):
    """Run this file's ``interpret`` tests in a subprocess with ``TRITON_INTERPRET=1``."""
    interpreter_suite(__file__)


# -- factor accumulation ---------------------------------------------------------------------------
def _check_factor(d, n, bias, beta, weighted, dtype, precision, atol, rtol, *, three_d=False, device=DEVICE):
    torch.manual_seed(d * 1000 + n)
    if three_d:  # a strided (B, T, d) view: every other position of a wider tensor, one column off
        base = torch.randn(n, 2 * 3 + 1, d + 3, device=device).to(dtype)
        x = base[:, ::2, 1:d + 1]
        w = torch.rand(n, 2 * 3 + 1, device=device)[:, ::2] if weighted else None
    else:
        x = torch.randn(n, d, device=device).to(dtype)
        w = torch.rand(n, device=device) if weighted else None
    c0 = _symmetric(d + bias, device)
    if beta == 0.0:
        c0.fill_(float("nan"))  # beta = 0 must ignore the old contents
    c_kernel, c_ref = c0.clone(), c0.clone()
    rows = x.shape[:-1].numel()
    out = factor_update(c_kernel, x, alpha=1.0 / rows, beta=beta, bias=bias, weights=w, precision=precision)
    assert out is c_kernel
    factor_update_reference(c_ref, x, alpha=1.0 / rows, beta=beta, bias=bias, weights=w)
    assert_close_to_scale(c_kernel, c_ref, atol, rtol,
                          f"factor d={d} n={n} bias={bias} beta={beta} w={weighted} {dtype}")
    # mirrored tiles are exact copies; diagonal tiles are symmetric up to rounding of weighted rows
    assert_close_to_scale(c_kernel, c_kernel.T, atol, rtol, "symmetry")


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("dtype,precision,atol,rtol", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weighted", [False, True], ids=["w0", "w1"])
@pytest.mark.parametrize("beta", [0.0, 0.95])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n", [1, 3, 129])
@pytest.mark.parametrize("d", [1, 7, 33, 70])
def test_factor_update_interpret(d, n, bias, beta, weighted, dtype, precision, atol, rtol):
    _check_factor(d, n, bias, beta, weighted, dtype, precision, atol, rtol)



@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("dtype,precision,atol,rtol", [FP32, BF16, TF32], ids=["fp32", "bf16", "tf32"])
@pytest.mark.parametrize("weighted", [False, True], ids=["w0", "w1"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("d", [7, 33])
def test_factor_update_strided_3d_interpret(d, bias, weighted, dtype, precision, atol, rtol):
    _check_factor(d, 3, bias, 0.95, weighted, dtype, precision, atol, rtol, three_d=True)


def _grouped_case(device):
    torch.manual_seed(0)
    specs = [  # (d, bias, X, weights, beta)
        (7, True, torch.randn(3, 7, device=device), None, 0.0),
        (33, False, torch.randn(129, 33, device=device), torch.rand(129, device=device), 0.95),
        (70, True, torch.randn(4, 5, 73, device=device)[:, ::2, 2:72], None, 0.95),
        (1, False, torch.randn(2, 1, device=device), None, 0.0),
        (9, True, torch.randn(5, 9, device=device).bfloat16(), None, 0.95),
        (16, True, torch.randn(3, 2, 16, device=device), torch.rand(3, 2, device=device), 0.0),
    ]
    cs = [_symmetric(d + b, device) for d, b, *_ in specs]
    return specs, cs


def _check_grouped(device, atol, rtol, precision):
    specs, cs = _grouped_case(device)
    refs = [c.clone() for c in cs]
    alphas = [0.5 + i for i in range(len(specs))]
    factor_update_grouped(cs, [s[2] for s in specs], alphas=alphas, betas=[s[4] for s in specs],
                          biases=[s[1] for s in specs], weights=[s[3] for s in specs], precision=precision)
    for i, ((d, b, x, w, beta), c, r) in enumerate(zip(specs, cs, refs)):
        factor_update_reference(r, x, alpha=alphas[i], beta=beta, bias=b, weights=w)
        assert_close_to_scale(c, r, atol if x.dtype == torch.float32 else BF16[2],
                              rtol if x.dtype == torch.float32 else BF16[3],
                              f"grouped pair {i} (d={d}, bias={b}, {x.dtype})")


@pytest.mark.interpret
@needs_interpreter
def test_factor_update_grouped_interpret():
    _check_grouped(DEVICE, FP32[2], FP32[3], "ieee")


@pytest.mark.interpret
@needs_interpreter
def test_factor_update_grouped_empty_and_tf32_interpret():
    factor_update_grouped([], [], alphas=[], betas=[], biases=[])
    _check_grouped(DEVICE, TF32[2], TF32[3], "tf32")



# -- eigenbasis projection -------------------------------------------------------------------------
def _check_precondition(d_out, d_in, batch, damping_tensor, beta, precision, atol, rtol, device=DEVICE):
    torch.manual_seed(d_out * 100 + d_in)
    q_out, q_in = _orthogonal(d_out, device), _orthogonal(d_in, device)
    grad = torch.randn(d_out, d_in, device=device)
    s = torch.rand(d_out, d_in, device=device)
    s_ref = s.clone()
    damping = torch.tensor(0.1, device=device) if damping_tensor else 0.1
    update = (beta, 0.05, 3) if batch else None
    out = precondition(grad, q_out, q_in, s, damping, batch_update=update, precision=precision)
    ref = precondition_reference(grad, q_out, q_in, s_ref, damping, batch_update=update)
    assert_close_to_scale(out, ref, atol, rtol, f"precondition {d_out}x{d_in} batch={batch}")
    assert_close_to_scale(s, s_ref, atol, rtol, "scaling after precondition")


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("beta", [0.0, 0.95])
@pytest.mark.parametrize("batch", [False, True], ids=["fixedS", "batchS"])
@pytest.mark.parametrize("damping_tensor", [False, True], ids=["lam_float", "lam_tensor"])
@pytest.mark.parametrize("d_out,d_in", [(1, 1), (7, 33), (33, 8), (70, 34)])
def test_precondition_interpret(d_out, d_in, batch, damping_tensor, beta):
    _check_precondition(d_out, d_in, batch, damping_tensor, beta, *FP32[1:])


def _check_scaling(d_out, d_in, n, bias, beta, dtype, precision, atol, rtol, *, r=1, strided=False, device=DEVICE):
    torch.manual_seed(d_out * 100 + d_in + n)
    q_out, q_in = _orthogonal(d_out, device), _orthogonal(d_in + bias, device)
    if strided:  # (N, 1, d) views into wider tensors
        g = torch.randn(n, r, d_out + 2, device=device).to(dtype)[:, :, 1:d_out + 1]
        a = torch.randn(n, r + 1, d_in, device=device).to(dtype)[:, 1:]
    else:
        g = torch.randn(n, r, d_out, device=device).to(dtype)
        a = torch.randn(n, r, d_in, device=device).to(dtype)
    s = torch.rand(d_out, d_in + bias, device=device)
    if beta == 0.0:
        s.fill_(float("nan"))
    s_ref = s.clone()
    out = per_example_scaling(s, g, a, q_out, q_in, alpha=1.0 / n, beta=beta, bias=bias, precision=precision)
    assert out is s
    per_example_scaling_reference(s_ref, g, a, q_out, q_in, alpha=1.0 / n, beta=beta, bias=bias)
    assert_close_to_scale(s, s_ref, atol, rtol,
                          f"per-example scaling {d_out}x{d_in} n={n} bias={bias} {dtype}")


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("dtype,precision,atol,rtol", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("beta", [0.0, 0.95])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("n", [1, 3, 129])
@pytest.mark.parametrize("d_out,d_in", [(1, 1), (7, 33), (33, 7), (70, 9)])
def test_per_example_scaling_interpret(d_out, d_in, n, bias, beta, dtype, precision, atol, rtol):
    _check_scaling(d_out, d_in, n, bias, beta, dtype, precision, atol, rtol)


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("r", [1, 3], ids=["R1", "R3_reference_path"])
def test_per_example_scaling_strided_interpret(r):
    _check_scaling(7, 33, 3, True, 0.95, *FP32, r=r, strided=True)



# -- moment update ---------------------------------------------------------------------------------
def _check_moment(momentum, weight_decay, lr_tensor, dtype, atol, rtol, shapes, device=DEVICE):
    torch.manual_seed(len(shapes))
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    directions = [torch.randn(s, device=device).to(dtype) for s in shapes]
    directions[0] = directions[0].float()  # a direction in another dtype than its parameter
    directions[1] = torch.randn(shapes[1][0] + 3, device=device).to(dtype)[2:-1]  # a strided one
    if len(shapes[2]) == 2:
        directions[2] = torch.randn(shapes[2][0], shapes[2][1] + 1, device=device).to(dtype)[:, :-1]
    buffers = [torch.randn(s, device=device).to(dtype) for s in shapes] if momentum else [None] * len(shapes)
    nu = torch.tensor(0.7, device=device)
    scales = [nu if i % 2 == 0 else None for i in range(len(shapes))]
    lr = torch.tensor(0.1, device=device) if lr_tensor else 0.1
    p_ref = [p.clone() for p in params]
    m_ref = [None if m is None else m.clone() for m in buffers]
    moment_update(params, directions, buffers, lr=lr, momentum=momentum, weight_decay=weight_decay, scales=scales)
    moment_update_reference(p_ref, directions, m_ref, lr=lr, momentum=momentum, weight_decay=weight_decay,
                            scales=scales)
    for i, (p, r) in enumerate(zip(params, p_ref)):
        assert_close_to_scale(p, r, atol, rtol, f"param {i} {tuple(p.shape)}")
    for i, (m, r) in enumerate(zip(buffers, m_ref)):
        if m is not None:
            assert_close_to_scale(m, r, atol, rtol, f"buffer {i}")


SMALL_SHAPES = [(5, 7), (130,), (4, 6), (1,), (64,), (3, 3, 3, 3)]


@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 2e-2, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lr_float", "lr_tensor"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_moment_update_interpret(momentum, weight_decay, lr_tensor, dtype, atol, rtol):
    _check_moment(momentum, weight_decay, lr_tensor, dtype, atol, rtol, SMALL_SHAPES)



# -- the optimizer on the Triton kernels, interpreted --------------------------------------------------
@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("scaling", ["per_example", "batch"])
def test_optimizer_on_kernels_interpret(scaling):
    """A small MLP for 4 steps with every kernel family interpreted follows backend="torch".
    (backend="triton" refuses CPU models, so the resolved backend is switched after construction.)

    The batch (64) exceeds the layer widths: with fewer examples than inputs the factors are
    rank-deficient and the reference itself moves by ~0.1 under 1e-7 perturbations of them
    (eigenvectors of near-degenerate eigenvalues), so no kernel could be compared there."""
    from ekfac_triton import EKFAC

    def run(backend):
        model = make_mlp([7, 9, 5], seed=0, dtype=None)
        opt = EKFAC(model, lr=0.1, damping=1e-2, momentum=0.9, weight_decay=1e-3, eigen_every=2, scaling=scaling,
                    kl_clip=1e-2, backend="torch")
        opt.preconditioner.backend = backend
        for layer in opt.preconditioner.layers:
            layer.curvature.backend = backend
        for _ in range(4):
            x = torch.randn(64, 7)
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert_close_to_scale(run("triton"), run("torch"), 1e-3, 1e-3,
                          f"parameters after 4 steps ({scaling})")


# -- the ops on CPU without the interpreter: reference path, schemas, fake kernels -----------------------
@pytest.mark.skipif(INTERPRET, reason="checks the reference path of the ops")
def test_ops_opcheck_cpu():
    """``torch.library.opcheck``: schemas, mutation annotations and fake kernels of every op."""
    torch.manual_seed(0)
    c = _symmetric(8, "cpu")
    x = torch.randn(4, 3, 7)
    torch.library.opcheck(torch.ops.ekfac_triton.factor_update.default, (c, x, None, 0.5, 0.9, True, "ieee"))
    torch.library.opcheck(torch.ops.ekfac_triton.factor_update_grouped.default,
                          ([c, _symmetric(5, "cpu")], [x, torch.randn(6, 5)], [None, torch.rand(6)], [0.5, 1.0],
                           [0.9, 0.0], [True, False], "ieee"))
    q_out, q_in = _orthogonal(5, "cpu"), _orthogonal(8, "cpu")
    s = torch.rand(5, 8)
    torch.library.opcheck(torch.ops.ekfac_triton.precondition.default,
                          (torch.randn(5, 8), q_out, q_in, s, 0.1, None, True, 0.9, 0.3, "ieee"))
    torch.library.opcheck(torch.ops.ekfac_triton.per_example_scaling.default,
                          (s, torch.randn(6, 1, 5), torch.randn(6, 1, 7), q_out, q_in, 0.5, 0.9, True, "ieee"))
    ps = [torch.randn(3, 4), torch.randn(5)]
    torch.library.opcheck(torch.ops.ekfac_triton.moment_update.default,
                          (ps, [torch.randn(3, 4), torch.randn(5)], [torch.zeros(3, 4), torch.zeros(5)],
                           [torch.tensor(0.5), None], 0.1, None, 0.9, 0.01))


@pytest.mark.skipif(INTERPRET, reason="about the backend choice")
def test_dispatch_on_cpu_uses_references():
    from ekfac_triton.backend import resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("triton", torch.device("cpu"))


@pytest.mark.skipif(INTERPRET, reason="about argument checks")
def test_launchers_validate_arguments():
    with pytest.raises(ValueError, match="precision"):
        factor_update(torch.zeros(3, 3), torch.zeros(2, 3), alpha=1.0, beta=0.0, bias=False, precision="fp8")
    with pytest.raises(ValueError, match="C must be"):
        factor_update(torch.zeros(4, 4), torch.zeros(2, 3), alpha=1.0, beta=0.0, bias=False)
    with pytest.raises(ValueError, match="equal lengths"):
        factor_update_grouped([torch.zeros(3, 3)], [], alphas=[1.0], betas=[0.0], biases=[False])
    with pytest.raises(ValueError, match="shape mismatch"):
        precondition(torch.zeros(3, 4), torch.eye(3), torch.eye(3), torch.ones(3, 4), 0.1)
    with pytest.raises(ValueError, match="momentum buffer"):
        moment_update([torch.zeros(2)], [torch.zeros(2)], [None], lr=0.1, momentum=0.9, weight_decay=0.0,
                      scales=[None])


# -- real sizes on the GPU -------------------------------------------------------------------------
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype,precision,atol,rtol", [FP32, TF32, BF16], ids=["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("weighted", [False, True], ids=["w0", "w1"])
@pytest.mark.parametrize("beta", [0.0, 0.95])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("d,n", [(785, 129), (1001, 129), (33, 1), (1001, 3), (256, 4096)])
def test_factor_update_cuda(d, n, bias, beta, weighted, dtype, precision, atol, rtol):
    _check_factor(d, n, bias, beta, weighted, dtype, precision, atol, rtol)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype,precision,atol,rtol", [FP32, BF16], ids=["fp32", "bf16"])
def test_factor_update_strided_3d_cuda(dtype, precision, atol, rtol):
    _check_factor(785, 129, True, 0.95, True, dtype, precision, atol, rtol, three_d=True)


@pytest.mark.cuda
@needs_cuda
def test_factor_update_grouped_cuda():
    _check_grouped("cuda", FP32[2], FP32[3], "ieee")
    # the autoencoder's 16 factors in one call
    torch.manual_seed(1)
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    xs_a = [torch.randn(129, d, device="cuda") for d in sizes[:-1]]
    xs_g = [torch.randn(129, d, device="cuda") for d in sizes[1:]]
    cs = [_symmetric(x.shape[1] + 1, "cuda") for x in xs_a] + [_symmetric(x.shape[1], "cuda") for x in xs_g]
    refs = [c.clone() for c in cs]
    xs = xs_a + xs_g
    biases = [True] * len(xs_a) + [False] * len(xs_g)
    factor_update_grouped(cs, xs, alphas=[1 / 129] * len(xs), betas=[0.95] * len(xs), biases=biases, precision="ieee")
    for i, (c, r, x, b) in enumerate(zip(cs, refs, xs, biases)):
        factor_update_reference(r, x, alpha=1 / 129, beta=0.95, bias=b)
        assert_close_to_scale(c, r, *FP32[2:], f"autoencoder factor {i}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision,atol,rtol", [FP32[1:], TF32[1:]], ids=["fp32", "tf32"])
@pytest.mark.parametrize("batch", [False, True], ids=["fixedS", "batchS"])
@pytest.mark.parametrize("d_out,d_in", [(785, 1001), (1001, 785), (30, 251)])
def test_precondition_cuda(d_out, d_in, batch, precision, atol, rtol):
    _check_precondition(d_out, d_in, batch, True, 0.95, precision, atol, rtol)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype,precision,atol,rtol", [FP32, TF32, BF16], ids=["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("d_out,d_in,n", [(785, 1001, 129), (1001, 785, 129), (30, 250, 3)])
def test_per_example_scaling_cuda(d_out, d_in, n, bias, dtype, precision, atol, rtol):
    _check_scaling(d_out, d_in, n, bias, 0.95, dtype, precision, atol, rtol)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 2e-2, 2e-2)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_moment_update_cuda(momentum, dtype, atol, rtol):
    _check_moment(momentum, 0.01, True, dtype, atol, rtol, [(1000, 785), (1000,), (30, 250), (1,), (4097,)])


@pytest.mark.cuda
@needs_cuda
def test_ops_compile_cuda():
    """The ops trace under torch.compile(fullgraph=True) and give the eager results."""
    torch.manual_seed(0)
    q_out, q_in = _orthogonal(65, "cuda"), _orthogonal(34, "cuda")
    grad = torch.randn(65, 34, device="cuda")
    x = torch.randn(8, 5, 33, device="cuda")

    def f(c, s, p, m):
        factor_update(c, x, alpha=0.1, beta=0.9, bias=True, precision="ieee")
        out = precondition(grad, q_out, q_in, s, 0.1, batch_update=(0.9, 0.1, 8), precision="ieee")
        moment_update([p], [out], [m], lr=0.1, momentum=0.9, weight_decay=0.0, scales=[None])
        return out

    args = [_symmetric(34, "cuda"), torch.rand(65, 34, device="cuda"), torch.randn(65, 34, device="cuda"),
            torch.zeros(65, 34, device="cuda")]
    eager = [a.clone() for a in args]
    expected = f(*eager)
    got = torch.compile(f, fullgraph=True)(*args)
    assert_close_to_scale(got, expected, 1e-5, 1e-5, "compiled output")
    for a, e in zip(args, eager):
        assert_close_to_scale(a, e, 1e-5, 1e-5, "compiled mutation")


def _autoencoder() -> torch.nn.Module:
    return make_mlp([784, 1000, 500, 250, 30, 250, 500, 1000, 784], seed=None, dtype=None)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("scaling", ["per_example", "batch"])
def test_optimizer_triton_follows_torch_cuda(scaling):
    """20 steps of the 784-1000-500-250-30 autoencoder: backend="triton" tracks backend="torch".

    Batch 1100 > 1001 (the widest factor) keeps the factors full rank: with fewer examples the
    reference itself is sensitive to rounding-level changes of the factors (see
    test_optimizer_on_kernels_interpret). Both backends run fp32 at torch's default "highest"
    matmul precision, so the kernels use "ieee" products."""
    from ekfac_triton import EKFAC

    torch.manual_seed(0)
    data = torch.rand(20, 1100, 784, device="cuda")
    losses = {}
    finals = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        model = _autoencoder().cuda()
        opt = EKFAC(model, lr=0.05, damping=1e-2, momentum=0.9, weight_decay=1e-4, eigen_every=5, scaling=scaling,
                    kl_clip=1e-2, backend=backend)
        assert opt.preconditioner.backend == backend
        trace = []
        for x in data:
            loss = torch.nn.functional.mse_loss(model(x), x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.append(loss.item())
        losses[backend] = torch.tensor(trace)
        finals[backend] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert_close_to_scale(losses["triton"], losses["torch"], 1e-3, 1e-3, "losses")
    diff = (finals["triton"] - finals["torch"]).norm() / finals["torch"].norm()
    assert diff < 1e-3, f"relative parameter difference after 20 steps: {diff:.3g}"
    assert losses["triton"][-1] < losses["triton"][0]
