"""Conformance with curvlinops-for-pytorch 3.x: for models with 2-D outputs the
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
from torch import nn

curvlinops = pytest.importorskip("curvlinops")
from curvlinops import EKFACLinearOperator, KFACLinearOperator  # noqa: E402

from ekfac_triton import EKFAC  # noqa: E402
from tests.helpers import (assert_rel_close, curvlinops_dense, layer_indices, library_fhat, make_mlp,  # noqa: E402
                           pooled_sequence_net, preconditioned, strided_cnn)

DTYPE = torch.float64
TOL = 1e-8


# (model, X, C): the models use the global RNG as problem() seeds it; X is drawn from g after them
def mlp_net(g: torch.Generator):
    model = make_mlp([5, 7, 6, 4], bias=[True, False, True], seed=None, dtype=None)
    return model, torch.randn(24, 5, generator=g, dtype=DTYPE), 4


def sequence(g: torch.Generator):
    """Linear layers on (B, T, d) (R = T positions each), mean over tokens, a final Linear."""
    return pooled_sequence_net(), torch.randn(10, 6, 4, generator=g, dtype=DTYPE), 3


def cnn(g: torch.Generator):
    return strided_cnn(5), torch.randn(32, 2, 6, 7, generator=g, dtype=DTYPE), 5


MODELS = {"mlp": mlp_net, "sequence": sequence, "cnn": cnn}


def problem(kind: str, loss: str, seed: int = 0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, X, c = MODELS[kind](g)
    model = model.to(DTYPE)
    if loss == "ce":
        return model, X, torch.randint(0, c, (X.shape[0],), generator=g), nn.CrossEntropyLoss()
    return model, X, torch.randn(X.shape[0], c, generator=g, dtype=DTYPE), nn.MSELoss()


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("kind,loss", [("mlp", "ce"), ("mlp", "mse"), ("sequence", "ce"), ("sequence", "mse"),
                                       ("cnn", "ce")])
def test_fhat_matches_curvlinops(kind: str, loss: str, curvature: str) -> None:
    model, X, Y, loss_fn = problem(kind, loss, seed=3)
    cls = KFACLinearOperator if curvature == "kfac" else EKFACLinearOperator
    reference = curvlinops_dense(cls, model, loss_fn, X, Y, fisher_type="empirical")
    if isinstance(loss_fn, nn.MSELoss):
        # curvlinops' convention (KFACLinearOperator._maybe_adjust_loss_scale): MSELoss(mean) also
        # averages over the C outputs, and curvlinops multiplies that loss by sqrt(C) before
        # backpropagating, so its empirical Fisher is C times E_n[∇ℓ_n ∇ℓ_nᵀ] for ℓ_n = ‖f_n-y_n‖²/C,
        # the Fisher of L = mean_n ℓ_n that the library and tests/curvature/oracle.py use. A scalar
        # leaves the K-FAC/EKFAC eigenbasis unchanged, so dividing by C compares the same object.
        reference = reference / Y.shape[-1]

    opt = EKFAC(model, lr=0.1, damping=1e-3, curvature=curvature, momentum=0.0, weight_decay=0.0,
                factor_decay=0.0, eigen_every=1)
    loss_fn(model(X), Y).backward()
    opt.step()

    # the whole block-diagonal, assembled in curvlinops' order
    full = torch.zeros_like(reference)
    modules = preconditioned(model)
    assert len(modules) == len(opt.preconditioner.layers)
    for module, layer in zip(modules, opt.preconditioner.layers):
        assert layer.adapter.module is module
        idx = layer_indices(model, module)
        block = library_fhat(layer.curvature, curvature)
        assert_rel_close(block, reference[idx][:, idx], TOL, f"{kind}/{loss}/{curvature} layer {layer.name!r} block")
        full[idx[:, None], idx[None, :]] = block
    assert_rel_close(full, reference, TOL, f"{kind}/{loss}/{curvature} block-diagonal F̂")
