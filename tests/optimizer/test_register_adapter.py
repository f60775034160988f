"""Layer discovery: isinstance matching, ``register_adapter`` for a user's layer kind, and the
report of every module left to the plain update.

The example kind is a Linear whose weight is stored transposed, (d_in, d_out), as
transformers' ``Conv1D`` stores it: one adapter file's worth of code plus one registration, and
its EKFAC trajectory equals that of the ``nn.Linear`` with the transposed weight, in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ekfac_triton import EKFAC, register_adapter
from ekfac_triton.layers import ADAPTERS, LinearAdapter
from ekfac_triton.layers.base import MatrixLayout

DTYPE = torch.float64


class TransposedLinear(nn.Module):
    """``y = x W + b`` with W of shape (d_in, d_out)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out, dtype=DTYPE) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out, dtype=DTYPE) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class TransposedLinearAdapter(LinearAdapter):
    """The whole adapter of the new kind: its dimensions, its gradient matrix and its layout."""

    @property
    def d_out(self) -> int:
        return self.weight.shape[1]

    @property
    def d_in(self) -> int:
        return self.weight.shape[0]

    def grad_matrix(self) -> Tensor:
        return torch.cat([self.weight.grad.T, self.bias.grad.reshape(-1, 1)], dim=1)

    @property
    def layout(self) -> MatrixLayout:
        return MatrixLayout(self.weight.shape, self.d_in, transposed=True)


@pytest.fixture
def registered():
    register_adapter(TransposedLinear, TransposedLinearAdapter)
    yield
    ADAPTERS.pop(TransposedLinear)


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    custom = nn.Sequential(TransposedLinear(5, 7), nn.Tanh(), nn.Linear(7, 3).to(DTYPE))
    plain = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DTYPE)
    with torch.no_grad():
        plain[0].weight.copy_(custom[0].weight.T)
        plain[0].bias.copy_(custom[0].bias)
        plain[2].load_state_dict(custom[2].state_dict())
    return custom, plain


def test_unregistered_kind_is_reported_and_left_plain():
    custom, _ = _pair()
    opt = EKFAC(custom, lr=0.1)
    assert opt.preconditioned_modules() == ["2"]
    assert "no layer adapter for TransposedLinear" in opt.plain_update_report()["0"]


@pytest.mark.parametrize("compile_step", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_registered_kind_follows_the_linear_trajectory(registered, compile_step):
    custom, plain = _pair()
    settings = dict(lr=0.05, damping=1e-2, eigen_every=2, weight_decay=1e-3)
    opt_custom = EKFAC(custom, compile_step=compile_step, **settings)
    opt_plain = EKFAC(plain, **settings)
    assert opt_custom.preconditioned_modules() == ["0", "2"]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(16, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (16,), generator=g)
        for model, opt in ((custom, opt_custom), (plain, opt_plain)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    torch.testing.assert_close(custom[0].weight.T, plain[0].weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(custom[0].bias, plain[0].bias, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(custom[2].weight, plain[2].weight, rtol=1e-10, atol=1e-12)


def test_linear_subclass_is_matched_by_isinstance():
    class Scaled(nn.Linear):
        pass

    model = nn.Sequential(Scaled(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    opt = EKFAC(model)
    assert opt.preconditioned_modules() == ["0", "2"]
    assert opt.plain_update_report() == {"1": "no layer adapter for LayerNorm (see register_adapter)"}


def test_register_adapter_validates():
    with pytest.raises(ValueError, match="module_type"):
        register_adapter(int, TransposedLinearAdapter)
    with pytest.raises(ValueError, match="adapter"):
        register_adapter(TransposedLinear, object)
