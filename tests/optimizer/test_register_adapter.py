"""Layer discovery: isinstance matching (subclasses of nn.Linear), ``register_adapter`` for a
user's layer kind, the one warning and report of every module left to the plain update, and the
coverage of the trainable elements.

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


class LoggingLinear(nn.Linear):
    """An ``nn.Linear`` subclass with its own forward (the computation of ``nn.Linear``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


def test_linear_subclass_is_preconditioned_as_linear():
    """A subclass with its own forward gets the Linear adapter and the Linear trajectory."""
    torch.manual_seed(0)
    sub = nn.Sequential(LoggingLinear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DTYPE)
    plain = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DTYPE)
    plain.load_state_dict(sub.state_dict())
    settings = dict(lr=0.05, damping=1e-2, eigen_every=2)
    opt_sub, opt_plain = EKFAC(sub, **settings), EKFAC(plain, **settings)
    assert type(opt_sub.preconditioner.layers[0].adapter) is LinearAdapter
    assert opt_sub.coverage().fraction == 1.0
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (16,), generator=g)
        for model, opt in ((sub, opt_sub), (plain, opt_plain)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(sub.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


class Scale(nn.Module):
    """A bare weight with no layer adapter."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def test_every_plain_module_is_named_in_one_warning_and_counted_in_coverage():
    """Modules with a weight on the plain update — no adapter, an unsupported configuration, a
    frozen weight — are all named with their reason in ONE warning; coverage counts the trainable
    elements, a frozen weight not among them, bare parameters on the plain update."""
    torch.manual_seed(0)
    frozen = nn.Linear(3, 3).to(DTYPE)
    frozen.weight.requires_grad_(False)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), Scale(3), frozen, nn.Conv1d(1, 1, 1), nn.Linear(3, 2))
    model = model.to(DTYPE)
    model.register_parameter("offset", nn.Parameter(torch.zeros(2, dtype=DTYPE)))
    with pytest.warns(UserWarning) as record:
        opt = EKFAC(model)
    messages = [str(w.message) for w in record if "not preconditioned" in str(w.message)]
    assert len(messages) == 1, messages
    (message,) = messages
    for name, reason in (("1", "no layer adapter for LayerNorm"), ("2", "no layer adapter for Scale"),
                         ("3", "frozen"), ("4", "no layer adapter for Conv1d")):
        assert f"'{name}'" in message and reason in message and reason in opt.plain_update_report()[name]
    assert opt.preconditioned_modules() == ["0", "5"]
    cover = opt.coverage()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert cover.trainable == trainable
    assert cover.preconditioned == 4 * 3 + 3 + 3 * 2 + 2
    assert cover.fraction == pytest.approx(cover.preconditioned / trainable)
    assert set(cover.plain) == {"offset", "1.weight", "1.bias", "2.weight", "3.bias", "4.weight", "4.bias"}


def test_no_warning_when_everything_is_preconditioned():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EKFAC(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))


def test_register_adapter_validates():
    with pytest.raises(ValueError, match="module_type"):
        register_adapter(int, TransposedLinearAdapter)
    with pytest.raises(ValueError, match="adapter"):
        register_adapter(TransposedLinear, object)
