"""MAC's fused update kernel (kernels/mac_update.py) against its torch reference.

As in test_triton.py: the ``interpret`` tests run in a subprocess with
``TRITON_INTERPRET=1`` (started by :func:`test_mac_interpreter_suite`) at small odd shapes, and
the ``cuda`` tests at real sizes on a GPU: ``pytest -q tests/kernels/test_mac_update.py -m cuda``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ekfac_triton.kernels import mac_update, mac_update_reference
from tests.helpers import INTERPRET, assert_close_to_scale, needs_cuda, needs_interpreter
from tests.helpers import KERNEL_DEVICE as DEVICE

FP32 = (torch.float32, 2e-6, 2e-6)
BF16 = (torch.bfloat16, 2e-2, 2e-2)


@pytest.mark.skipif(INTERPRET, reason="already interpreting")
def test_mac_interpreter_suite(interpreter_suite):  # not slow: the fast subset's run of a kernel interpreted
    """Run this file's ``interpret`` tests in a subprocess with ``TRITON_INTERPRET=1``."""
    interpreter_suite(__file__)


def _check(shape, bias, momentum, weight_decay, decoupled, dtype, atol, rtol, device=DEVICE):
    torch.manual_seed(0)
    d_out, d_in = shape[0], int(torch.tensor(shape[1:]).prod())
    w = torch.randn(shape, device=device).to(dtype)
    gw = torch.randn(shape, device=device).to(dtype)
    mw = torch.randn(shape, device=device).to(dtype)
    b = torch.randn(d_out, device=device).to(dtype) if bias else None
    gb = torch.randn(d_out, device=device).to(dtype) if bias else None
    mb = torch.randn(d_out, device=device).to(dtype) if bias else None
    mean = torch.randn(d_in + int(bias), device=device).to(torch.float64 if dtype == torch.float64 else torch.float32)
    sq = mean.dot(mean)
    kw = dict(damping=0.7, lr=0.3, momentum=momentum, weight_decay=weight_decay, decoupled=decoupled)
    ref = [t if t is None else t.clone() for t in (w, mw, b, mb)]
    mac_update(w, gw, mw, b, gb, mb, mean, sq, **kw)
    # the oracle in float64 from the same inputs
    ref64 = [t if t is None else t.double() for t in ref]
    mac_update_reference(ref64[0], gw.double(), ref64[1], ref64[2], None if gb is None else gb.double(), ref64[3],
                         mean.double(), sq.double(), **kw)
    assert_close_to_scale(w, ref64[0], atol, rtol, f"weight {shape}")
    if momentum:
        assert_close_to_scale(mw, ref64[1], atol, rtol, f"weight buffer {shape}")
    if bias:
        assert_close_to_scale(b, ref64[2], atol, rtol, f"bias {shape}")
        if momentum:
            assert_close_to_scale(mb, ref64[3], atol, rtol, f"bias buffer {shape}")


# -- the kernel under the interpreter, odd shapes (row chunks of 16 there: one and two passes) ----------
@pytest.mark.interpret
@needs_interpreter
@pytest.mark.parametrize("dtype,atol,rtol", [FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.05, False), (0.05, True)], ids=["wd0", "l2", "decoupled"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", [(5, 3), (7, 15), (3, 16), (4, 33), (1, 1), (6, 3, 3, 3)])
def test_mac_update_interpret(shape, bias, momentum, wd, decoupled, dtype, atol, rtol):
    _check(shape, bias, momentum, wd, decoupled, dtype, atol, rtol)


@pytest.mark.interpret
@needs_interpreter
def test_optimizer_fused_path_interpret():
    """The optimizer's fused path (used when the backend resolves to "triton") tracks the torch
    backend over steps with statistics, refreshes, momentum and weight decay (fp32)."""
    from ekfac_triton import MAC

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, groups=4), nn.Tanh(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 17, bias=False), nn.Tanh(), nn.Linear(17, 3))
    twin = copy.deepcopy(model)
    runs = []
    for mdl in (model, twin):
        opt = MAC(mdl, lr=0.05, factor_every=2, eigen_every=3)
        runs.append((mdl, opt))
    fused = runs[1][1].preconditioner
    fused.backend = "triton"  # what resolve_backend gives on CUDA; the interpreter runs it on CPU
    for layer in fused.layers:
        layer.curvature.backend = "triton"
    g = torch.Generator().manual_seed(1)
    for _ in range(7):
        x, y = torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        for mdl, opt in runs:
            opt.zero_grad()
            nn.functional.cross_entropy(mdl(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close_to_scale(q, p, 1e-5, 1e-5, "fused vs torch backend")


class _AttentionNet(nn.Module):
    """An nn.MultiheadAttention (causal mask) and a fused q/k/v nn.Linear (no bias) in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 12)
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
        self.qkv = nn.Linear(12, 36, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        t = h.shape[1]
        y, _ = self.attn(h, h, h, attn_mask=torch.ones(t, t, dtype=torch.bool).triu(1), is_causal=True)
        q, k, v = (z.unflatten(-1, (3, 4)).transpose(1, 2) for z in self.qkv(h + y).split(12, dim=-1))
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        return self.head(torch.tanh(h + o))


def _attention_runs(backends, device, steps=6):
    """Train _AttentionNet with MAC per backend (fused update per row block on "triton")."""
    from ekfac_triton import MAC

    torch.manual_seed(0)
    model = _AttentionNet().to(device)
    finals = []
    for backend in backends:
        mdl = copy.deepcopy(model)
        opt = MAC(mdl, lr=0.05, factor_every=2, eigen_every=3, attention_layers={"qkv": {"num_heads": 3,
                                                                                          "causal": True}})
        opt.preconditioner.backend = backend  # "triton" is what resolve_backend gives on CUDA
        for layer in opt.preconditioner.layers:
            layer.curvature.backend = backend
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x, y = torch.randn(4, 7, 5, generator=g).to(device), torch.randint(0, 3, (4, 7), generator=g).to(device)
            opt.zero_grad()
            nn.functional.cross_entropy(mdl(x).flatten(0, 1), y.flatten()).backward()
            opt.step()
        finals.append(mdl)
    return finals


@pytest.mark.interpret
@needs_interpreter
def test_optimizer_fused_path_attention_interpret():
    """Attention layers: the value rows and the query/key rows launch with their own vectors and
    the result tracks the torch backend (fp32)."""
    torch_run, fused_run = _attention_runs(("torch", "triton"), "cpu")
    for p, q in zip(torch_run.parameters(), fused_run.parameters()):
        assert_close_to_scale(q, p, 1e-5, 1e-5, "fused vs torch backend (attention)")


# -- CPU without the interpreter: the op's schema, fake kernel and argument checks ----------------------
@pytest.mark.skipif(INTERPRET, reason="checks the reference path")
def test_mac_update_opcheck_and_validation():
    torch.manual_seed(0)
    args = (torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, 4), torch.randn(3), torch.randn(3), torch.zeros(3),
            torch.randn(5), torch.tensor(2.0), 0.5, 0.1, 0.9, 0.01, False)
    torch.library.opcheck(torch.ops.ekfac_triton.mac_update.default, args)
    with pytest.raises(ValueError, match="mean must have shape"):
        mac_update(torch.zeros(3, 4), torch.zeros(3, 4), None, None, None, None, torch.zeros(5), torch.tensor(0.0),
                   damping=1.0, lr=0.1, momentum=0.0, weight_decay=0.0)
    with pytest.raises(ValueError, match="momentum buffers"):
        mac_update(torch.zeros(3, 4), torch.zeros(3, 4), None, None, None, None, torch.zeros(4), torch.tensor(0.0),
                   damping=1.0, lr=0.1, momentum=0.9, weight_decay=0.0)
    # off CUDA without the interpreter the launcher is the reference
    _check((5, 7), True, 0.9, 0.01, False, torch.float64, 1e-12, 1e-12, device="cpu")


# -- real sizes on the GPU -------------------------------------------------------------------------------
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-5, 1e-5), BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", [(1000, 785), (4096, 4096), (30, 9001), (512, 256, 3, 3), (7, 1)])
def test_mac_update_cuda(shape, bias, decoupled, dtype, atol, rtol):
    _check(shape, bias, 0.9, 5e-4, decoupled, dtype, atol, rtol)


@pytest.mark.cuda
@needs_cuda
def test_mac_optimizer_triton_follows_torch_cuda():
    from ekfac_triton import MAC

    torch.manual_seed(0)
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    data = torch.rand(20, 512, 784, device="cuda")
    finals = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        model = nn.Sequential(*layers[:-1]).cuda()
        model = copy.deepcopy(model)
        opt = MAC(model, lr=0.05, factor_every=2, eigen_every=4, backend=backend)
        for x in data:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), x).backward()
            opt.step()
        finals[backend] = torch.cat([p.detach().flatten() for p in model.parameters()])
    diff = (finals["triton"] - finals["torch"]).norm() / finals["torch"].norm()
    assert diff < 1e-4, f"relative parameter difference after 20 steps: {diff:.3g}"


@pytest.mark.cuda
@needs_cuda
def test_mac_attention_triton_follows_torch_cuda():
    torch_run, fused_run = _attention_runs(("torch", "triton"), "cuda", steps=10)
    for p, q in zip(torch_run.parameters(), fused_run.parameters()):
        assert_close_to_scale(q, p, 1e-4, 1e-4, "fused vs torch backend (attention, CUDA)")
