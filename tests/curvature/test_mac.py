"""MAC (Seung, Lee & Ko, ICDM 2025) against an independent dense float64 computation.

The oracle below re-implements the official algorithm from the definition, with none of the
library's code: its own input capture and im2col (explicit kernel offsets), the official
non-normalised EMA with a global bias correction ``m / (1 − β^k)``, the explicit matrix
``R = ρ (m̂ m̂ᵀ + ρ I)⁻¹`` (no Sherman–Morrison), and the official momentum SGD. Trajectories of
every parameter must agree to 1e-10 (relative, Frobenius) in float64.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ekfac_triton import EKFAC, MAC, Preconditioner

from tests.helpers import (MAC_EXACT_ONE, MAC_SEVERAL, assert_rel_close, make_mlp, mean_ce,
                           train_in_lockstep)

DTYPE = torch.float64
TOL = 1e-10


# -- models ----------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return make_mlp([5, 7, 6, 4], bias=[True, False, True], seed=0, dtype=DTYPE)


def cnn() -> nn.Module:
    """Conv (padding), depthwise conv (stride, bias), depthwise conv with channel multiplier 2 and
    dilation (no bias), conv without bias, LayerNorm-free head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),                                     # 6x7
        nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3), nn.Tanh(),                 # -> 3x4
        nn.Conv2d(3, 6, (2, 3), padding=(1, 2), dilation=(1, 2), groups=3, bias=False), nn.Tanh(),  # -> 4x4
        nn.Conv2d(6, 4, 2, bias=False), nn.Tanh(),                                    # -> 3x3
        nn.Flatten(), nn.Linear(36, 5)).to(DTYPE)


class SeqModel(nn.Module):
    """Per-token Linear layers on (B, T, d) with a LayerNorm (a plain parameter)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.mid = nn.Linear(6, 5, bias=False)
        self.out = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mid(torch.tanh(self.norm(self.inp(x))))))


def seq() -> nn.Module:
    return SeqModel().to(DTYPE)


PROBLEMS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], tuple[Tensor, Tensor]]]] = {
    "mlp": (mlp, lambda g: (torch.randn(16, 5, generator=g, dtype=DTYPE) + 0.5,
                            torch.randint(0, 4, (16,), generator=g))),
    "cnn": (cnn, lambda g: (torch.randn(12, 2, 6, 7, generator=g, dtype=DTYPE) + 0.3,
                            torch.randint(0, 5, (12,), generator=g))),
    "seq": (seq, lambda g: (torch.randn(6, 5, 4, generator=g, dtype=DTYPE) - 0.4,
                            torch.randint(0, 3, (6, 5), generator=g))),
}


# -- the independent oracle ------------------------------------------------------------------------
def patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Rows of a Conv2d input by explicit kernel offsets: (N·L, C·kh·kw) in ``W.reshape(d_out, -1)``
    column order, or for a depthwise conv (N·C·L, kh·kw)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = [xp[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
            for i in range(kh) for j in range(kw)]
    p = torch.stack(cols, dim=2)                       # (N, C, kh·kw, oh, ow)
    n, c = p.shape[:2]
    if conv.groups == conv.in_channels and conv.groups > 1:
        return p.permute(0, 1, 3, 4, 2).reshape(n * c * oh * ow, kh * kw)
    return p.permute(0, 3, 4, 1, 2).reshape(n * oh * ow, c * kh * kw)


def rows_of(module: nn.Module, x: Tensor) -> Tensor:
    a = patches(x, module) if isinstance(module, nn.Conv2d) else x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
    return a


class DenseMAC:
    """The official algorithm with explicit matrices (no Sherman–Morrison, no library code)."""

    def __init__(self, model: nn.Module, *, lr, damping, momentum, weight_decay, factor_decay, factor_every,
                 eigen_every, decoupled=False, dense_first: Tensor | None = None):
        self.model, self.lr, self.rho, self.mu, self.wd = model, lr, damping, momentum, weight_decay
        self.beta, self.t_cov, self.t_inv, self.decoupled = factor_decay, factor_every, eigen_every, decoupled
        self.layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.ema = {m: None for m in self.layers}
        self.R = {}
        self.buf = {}
        self.step_count = 0
        self.ema_steps = 0
        self.inputs = {}
        self.first = self.layers[0]
        if dense_first is not None:
            self.R[self.first] = dense_first
        self.dense_first = dense_first is not None
        for m in self.layers:
            m.register_forward_hook(lambda mod, args, out: self.inputs.__setitem__(mod, args[0].detach()))

    @torch.no_grad()
    def step(self) -> None:
        stats = self.step_count % self.t_cov == 0
        if stats:
            self.ema_steps += 1
            for m in self.layers:
                if self.dense_first and m is self.first:
                    continue
                mean = rows_of(m, self.inputs[m]).mean(0)
                prev = torch.zeros_like(mean) if self.ema[m] is None else self.ema[m]
                self.ema[m] = self.beta * prev + (1 - self.beta) * mean
        refresh = self.step_count % self.t_inv == 0
        for m in self.layers:
            if refresh and not (self.dense_first and m is self.first):
                mh = self.ema[m] / (1 - self.beta ** self.ema_steps)
                eye = torch.eye(mh.numel(), dtype=DTYPE)
                self.R[m] = self.rho * torch.linalg.inv(torch.outer(mh, mh) + self.rho * eye)
            g = m.weight.grad.reshape(m.weight.shape[0], -1)
            if m.bias is not None:
                g = torch.cat([g, m.bias.grad[:, None]], dim=1)
            d = g @ self.R[m]
            m.weight.grad.copy_(d[:, : m.weight[0].numel()].reshape(m.weight.shape))
            if m.bias is not None:
                m.bias.grad.copy_(d[:, -1])
        for p in self.model.parameters():
            u = p.grad.clone()
            if not self.decoupled:
                u += self.wd * p
            b = self.buf.get(p)
            self.buf[p] = u if b is None else self.mu * b + u
            if self.decoupled:
                p.mul_(1 - self.lr * self.wd)
            p.sub_(self.lr * self.buf[p])
        self.step_count += 1


def run_both(problem: str, steps: int, opt_kwargs: dict, decoupled: bool = False):
    make_model, make_data = PROBLEMS[problem]
    model = make_model()
    ref_model = copy.deepcopy(model)
    opt = MAC(model, decoupled_weight_decay=decoupled, **opt_kwargs)
    ref = DenseMAC(ref_model, decoupled=decoupled, **opt_kwargs)
    train_in_lockstep(model, opt, ref_model, ref, make_data, mean_ce, steps, problem, TOL)
    return model, opt




# -- exactness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_one_step_equals_dense_inverse(problem):
    """``factor_decay=0, eigen_every=1``, no momentum: ΔW̄ = −lr·∇W̄·ρ(m m ᵀ + ρI)⁻¹, m this batch's mean row."""
    run_both(problem, 1, MAC_EXACT_ONE)


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_several_steps_equal_dense_oracle(problem, decoupled):
    """Momentum, weight decay, statistics every 2 and refreshes every 4 steps, 9 steps."""
    run_both(problem, 9, MAC_SEVERAL, decoupled=decoupled)


def test_official_defaults_trajectory():
    kw = dict(lr=0.1, damping=1.0, momentum=0.9, weight_decay=5e-4, factor_decay=0.95, factor_every=5,
              eigen_every=50)
    run_both("cnn", 12, kw)


def test_defaults_are_the_official_ones():
    opt = MAC(mlp())
    group = opt.param_groups[0]
    assert (group["lr"], group["damping"], group["momentum"], group["weight_decay"]) == (0.1, 1.0, 0.9, 5e-4)
    cfg = opt.preconditioner.config
    assert (cfg.curvature, cfg.factor_decay, cfg.factor_every, cfg.eigen_every) == ("mac", 0.95, 5, 50)
    assert opt.decoupled_weight_decay is False
    assert opt.preconditioner.backend == "torch"  # "auto" stays the torch reference in this version


def test_depthwise_conv_is_preconditioned_only_by_mac():
    model = cnn()
    assert MAC(model).preconditioned_modules() == ["0", "2", "4", "6", "9"]
    with pytest.warns(UserWarning, match="depthwise"):
        opt = EKFAC(cnn(), curvature="ekfac")
    assert opt.preconditioned_modules() == ["0", "6", "9"]


def test_dense_first_layer_equals_oracle():
    """``first_layer="dense"``: R₁ = (C + ρI)⁻¹ from one pass over the data, C the mean over batches
    of x̃x̃ᵀ/rows; the other layers plain MAC."""
    make_model, make_data = PROBLEMS["cnn"]
    g = torch.Generator().manual_seed(7)
    data = [make_data(g) for _ in range(3)]
    conv = make_model()[0]
    cov = sum(rows_of(conv, x).T @ rows_of(conv, x) / rows_of(conv, x).shape[0] for x, _ in data) / len(data)
    kw = MAC_SEVERAL
    R1 = torch.linalg.inv(cov + kw["damping"] * torch.eye(cov.shape[0], dtype=DTYPE))
    model = make_model()
    ref_model = copy.deepcopy(model)
    calls = []
    model[2].register_forward_hook(lambda *a: calls.append(1))
    opt = MAC(model, first_layer="dense", first_layer_data=data, **kw)
    assert not calls, "the pass over the data must stop at the first layer"
    assert_rel_close(opt.preconditioner.layers[0].curvature.dense_inverse, R1, TOL, "R₁")
    ref = DenseMAC(ref_model, dense_first=R1, **kw)
    train_in_lockstep(model, opt, ref_model, ref, make_data, mean_ce, 6, "dense first layer", TOL)


def test_state_dict_round_trip_continues_identically():
    model, opt = run_both("seq", 5, MAC_SEVERAL)
    model2 = copy.deepcopy(model)
    opt2 = MAC(model2, **MAC_SEVERAL)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        x, y = PROBLEMS["seq"][1](g)
        for mdl, o in ((model, opt), (model2, opt2)):
            mdl.zero_grad()
            mean_ce(mdl(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_preconditioner_alone_rewrites_grads():
    model = mlp()
    pre = Preconditioner(model, curvature="mac", damping=0.5, factor_decay=0.0, eigen_every=1)
    x, y = PROBLEMS["mlp"][1](torch.Generator().manual_seed(0))
    mean_ce(model(x), y).backward()
    lin = model[0]
    a = rows_of(lin, x)
    m = a.mean(0)
    g = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
    expected = g @ (0.5 * torch.linalg.inv(torch.outer(m, m) + 0.5 * torch.eye(6, dtype=DTYPE)))
    pre.step()
    assert_rel_close(torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1), expected, TOL, "direction")


# -- memory ----------------------------------------------------------------------------------------
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.where = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, Tensor) and t.numel() > self.largest:
                self.largest, self.where = t.numel(), str(func)
        return out


def test_no_d_in_squared_tensor_for_a_wide_layer():
    """d_in = 16384: statistics, refresh and step never create a tensor of d_in² elements (the
    largest is the layer's own d_out x d_in̄ gradient-sized matrix)."""
    d_in, d_out = 16384, 3
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, 2))
    opt = MAC(model, factor_every=1, eigen_every=1)
    x = torch.randn(4, d_in)
    mode = _LargestTensor()
    with mode:
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    assert mode.largest < d_in * d_in // 1000, f"a tensor of {mode.largest} elements ({mode.where})"
    state = opt.state_dict()["preconditioner"]["layers"][0]
    assert state["mean_ema"].shape == (d_in + 1,) and state["dense_inverse"] is None


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("damping", [0.0, -1.0, math.nan])
def test_nonpositive_damping_raises(damping):
    with pytest.raises(ValueError, match="damping"):
        MAC(mlp(), damping=damping)


def test_other_grouped_conv_is_refused_clearly():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)).to(DTYPE)
    with pytest.warns(UserWarning, match=r"groups=2 with in_channels=4.*groups == in_channels"):
        opt = MAC(model)
    assert opt.preconditioned_modules() == ["2"]
    with pytest.raises(ValueError, match="no supported layer"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MAC(nn.Conv2d(4, 4, 3, groups=2))


def test_bad_mac_arguments_raise():
    with pytest.raises(ValueError, match="attention_layers.*not divisible by 3"):
        MAC(mlp(), attention_layers={"0": 2})  # more in test_mac_attention.py
    with pytest.raises(ValueError, match="first_layer="):
        MAC(mlp(), first_layer="sparse")
    with pytest.raises(ValueError, match="first_layer_data"):
        MAC(mlp(), first_layer="dense")
    with pytest.raises(ValueError, match="first_layer_data"):
        MAC(mlp(), first_layer_data=[torch.zeros(1, 5)])
    with pytest.raises(ValueError, match="first_layer_data"):
        MAC(mlp(), first_layer="dense", first_layer_data=[])
    with pytest.raises(ValueError, match="curvature"):
        MAC(mlp(), curvature="ekfac")
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        MAC(mlp(), decoupled_weight_decay=1)
    with pytest.raises(ValueError, match="eigen_every"):
        MAC(mlp(), eigen_every=0)


def test_nonfinite_step_is_skipped_and_state_unchanged():
    model = mlp()
    opt = MAC(model, factor_every=1, eigen_every=1)
    x, y = PROBLEMS["mlp"][1](torch.Generator().manual_seed(0))
    mean_ce(model(x), y).backward()
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    params = [p.clone() for p in model.parameters()]
    opt.zero_grad()
    bad = x.clone()
    bad[0, 0] = math.inf
    with pytest.warns(RuntimeWarning, match="skipped"):
        mean_ce(model(bad), y).backward()
        opt.step()
    after = opt.state_dict()
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
    for b, a in zip(before["preconditioner"]["layers"], after["preconditioner"]["layers"]):
        for k, v in b.items():
            assert (torch.equal(v, a[k]) if isinstance(v, Tensor) else v == a[k]), k
