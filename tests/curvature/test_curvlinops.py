"""Conformance with curvlinops-for-pytorch 3.x (DESIGN §1): for models with 2-D outputs the
library's F̂ for K-FAC and EKFAC equals curvlinops' ``KFACLinearOperator`` /
``EKFACLinearOperator`` (empirical Fisher, K-FAC-expand, weight and bias together, mean loss) to
1e-8 in float64, for Linear, sequence Linear and Conv2d layers. (For ``MSELoss`` curvlinops'
empirical Fisher carries an extra factor C, the output dimension; see the test.)

The library's F̂ is read from its stored state after one step with ``factor_decay=0,
eigen_every=1`` (K-FAC: ``A ⊗ G``; EKFAC: ``(Q_A ⊗ Q_G) diag(vec S) (Q_A ⊗ Q_G)ᵀ``), both over
the column-major vec of ``[W | b]``. curvlinops orders its rows by the parameter list it is given,
each parameter flattened row-major (weight (d_out, d_in) then bias): a permutation maps one
convention onto the other.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

curvlinops = pytest.importorskip("curvlinops")
from curvlinops import EKFACLinearOperator, KFACLinearOperator  # noqa: E402

from ekfac_triton import EKFAC  # noqa: E402

DTYPE = torch.float64
TOL = 1e-8


class TokenMean(nn.Module):
    """Mean over the token dimension: (B, T, d) -> (B, d)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    """‖actual - expected‖_F ≤ tol·‖expected‖_F, reporting the relative error and the location of
    the largest entrywise mismatch on failure."""
    __tracebackhide__ = True  # report the message, not the tensors
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = actual - expected
    rel = (diff.norm() / expected.norm().clamp_min(torch.finfo(DTYPE).tiny)).item()
    if not rel <= tol:
        flat = int(diff.abs().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
        raise AssertionError(f"{what}: relative error {rel:.3e} > {tol:.1e}; largest mismatch at {idx}: "
                             f"actual {actual[idx].item():.6e}, expected {expected[idx].item():.6e}")


def mlp(g: torch.Generator):
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6, bias=False), nn.Tanh(), nn.Linear(6, 4))
    return model, torch.randn(24, 5, generator=g, dtype=DTYPE), 4


def sequence(g: torch.Generator):
    """Linear layers on (B, T, d) (R = T positions each), mean over tokens, a final Linear."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5, bias=False), nn.Tanh(), TokenMean(),
                          nn.Linear(5, 3))
    return model, torch.randn(10, 6, 4, generator=g, dtype=DTYPE), 3


def cnn(g: torch.Generator):
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
        nn.Conv2d(3, 4, (2, 3), stride=2, padding=(1, 0), dilation=(1, 2), bias=False), nn.Tanh(),
        nn.Flatten(), nn.Linear(32, 5))
    return model, torch.randn(32, 2, 6, 7, generator=g, dtype=DTYPE), 5


MODELS = {"mlp": mlp, "sequence": sequence, "cnn": cnn}


def problem(kind: str, loss: str, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, X, c = MODELS[kind](g)
    model = model.to(DTYPE)
    if loss == "ce":
        return model, X, torch.randint(0, c, (X.shape[0],), generator=g), nn.CrossEntropyLoss()
    return model, X, torch.randn(X.shape[0], c, generator=g, dtype=DTYPE), nn.MSELoss()


def curvlinops_dense(cls, model: nn.Module, loss_fn: nn.Module, X: Tensor, Y: Tensor) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    op = cls(model, loss_fn, params, [(X, Y)], fisher_type="empirical", kfac_approx="expand",
             separate_weight_and_bias=False, check_deterministic=False)
    dim = sum(p.numel() for p in params)
    return op @ torch.eye(dim, dtype=DTYPE)


def layer_indices(model: nn.Module, module: nn.Module) -> Tensor:
    """Rows of curvlinops' matrix, in the library's order: entry ``j·d_out + i`` (column-major
    vec of ``[W | b]``) maps to W[i, j]'s row-major position (j < d_in) or to b[i]."""
    offsets, start = {}, 0
    for p in model.parameters():
        offsets[p] = start
        start += p.numel()
    d_out = module.weight.shape[0]
    d_in = module.weight[0].numel()
    idx = []
    for j in range(d_in + int(module.bias is not None)):
        for i in range(d_out):
            idx.append(offsets[module.weight] + i * d_in + j if j < d_in else offsets[module.bias] + i)
    return torch.tensor(idx)


def library_fhat(curv, curvature: str) -> Tensor:
    if curvature == "kfac":
        return torch.kron(curv.in_factor, curv.out_factor)
    q = torch.kron(curv.q_in, curv.q_out)
    return (q * curv.scaling.T.reshape(-1)) @ q.T


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("kind,loss", [("mlp", "ce"), ("mlp", "mse"), ("sequence", "ce"), ("sequence", "mse"),
                                       ("cnn", "ce")])
def test_fhat_matches_curvlinops(kind: str, loss: str, curvature: str) -> None:
    model, X, Y, loss_fn = problem(kind, loss, seed=3)
    cls = KFACLinearOperator if curvature == "kfac" else EKFACLinearOperator
    reference = curvlinops_dense(cls, model, loss_fn, X, Y)
    if isinstance(loss_fn, nn.MSELoss):
        # curvlinops' convention (KFACLinearOperator._maybe_adjust_loss_scale): MSELoss(mean) also
        # averages over the C outputs, and curvlinops multiplies that loss by sqrt(C) before
        # backpropagating, so its empirical Fisher is C times E_n[∇ℓ_n ∇ℓ_nᵀ] for ℓ_n = ‖f_n-y_n‖²/C,
        # the Fisher of L = mean_n ℓ_n that DESIGN §1 (and tests/curvature/oracle.py) define. A scalar leaves
        # the K-FAC/EKFAC eigenbasis unchanged, so dividing by C compares the same object.
        reference = reference / Y.shape[-1]

    opt = EKFAC(model, lr=0.1, damping=1e-3, curvature=curvature, momentum=0.0, weight_decay=0.0,
                factor_decay=0.0, eigen_every=1)
    loss_fn(model(X), Y).backward()
    opt.step()

    # the whole block-diagonal, assembled in curvlinops' order
    full = torch.zeros_like(reference)
    modules = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(modules) == len(opt.preconditioner.layers)
    for module, layer in zip(modules, opt.preconditioner.layers):
        assert layer.adapter.module is module
        idx = layer_indices(model, module)
        block = library_fhat(layer.curvature, curvature)
        assert_rel_close(block, reference[idx][:, idx], TOL, f"{kind}/{loss}/{curvature} layer {layer.name!r} block")
        full[idx[:, None], idx[None, :]] = block
    assert_rel_close(full, reference, TOL, f"{kind}/{loss}/{curvature} block-diagonal F̂")
