"""The projected gradient from the captured rows, ``Q_outᵀ ∇W̄ Q_in = (ĜQ_out)ᵀ(ĀQ_in)/N``
(ARCHITECTURE.md, "The projected gradient from the rows"): the same directions as the gradient
form over several steps in float64, the choice by shape, and its guard: every case that breaks
``∇W̄ = ĜᵀĀ/N`` falls back to the gradient form and still equals it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ekfac_triton import EKFAC
from ekfac_triton.layers import LayerBatch
from ekfac_triton.step.rows import GradientWitness, rows_match
from tests.helpers import assert_rel_close, half_mse, make_mlp

# refreshes at steps 0, 4, 8 (no stagger): by step 4 each factor has seen more examples than its
# dimension, so its eigenbasis is well defined and the two paths' rounding cannot rotate it
SETTINGS = dict(lr=0.05, damping=0.3, momentum=0.9, weight_decay=1e-3, factor_decay=0.9, eigen_every=4, stagger=False)
STEPS = 9


def _forms(opt) -> list[str | None]:
    return [layer.curvature.last_projection for layer in opt.preconditioner.layers]


def _lockstep(widths, n, curvature="ekfac", mode="auto", *, expect, loss_extra=None, before_step=None,
              model_fn=None, steps=STEPS, **extra):
    """Train a ``projected_gradient=mode`` optimizer and a ``"gradient"`` one on the same float64
    batches; after every step the parameters agree to 1e-10 and the first used the form ``expect``
    in every layer."""
    model = make_mlp(widths) if model_fn is None else model_fn()
    ref_model = copy.deepcopy(model)
    kw = dict(SETTINGS, curvature=curvature, **extra)
    opt = EKFAC(model, projected_gradient=mode, **kw)
    ref = EKFAC(ref_model, projected_gradient="gradient", **kw)
    gen = torch.Generator().manual_seed(1)
    d_in, d_out = widths[0], widths[-1]
    for k in range(steps):
        x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
        y = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
        for mdl, o in ((model, opt), (ref_model, ref)):
            mdl.zero_grad()
            if o.preconditioner.fisher != "empirical":
                out = mdl(x)
                o.preconditioner.curvature_backward(out)
                loss = half_mse(out, y)
            else:
                loss = half_mse(mdl(x), y)
            if loss_extra is not None:
                loss = loss + loss_extra(mdl)
            loss.backward()
            if before_step is not None:
                before_step(mdl)
            o.step()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert_rel_close(p, q, 1e-10, f"{curvature} {mode} step {k} {name}")
        assert _forms(ref) == ["gradient"] * len(ref.preconditioner.layers)
        assert _forms(opt) == [expect] * len(opt.preconditioner.layers), f"step {k}: {_forms(opt)}"
    return opt


# -- the same directions ---------------------------------------------------------------------------
@pytest.mark.parametrize("curvature,scaling", [("ekfac", "per_example"), ("ekfac", "batch"), ("kfac", None),
                                               ("tekfac", "per_example")])
def test_rows_chosen_when_n_below_d_and_equal_to_gradient_form(curvature, scaling):
    extra = {} if scaling is None else {"scaling": scaling}
    _lockstep((20, 30, 12), 6, curvature, expect="rows", **extra)


@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
def test_gradient_form_chosen_when_n_above_d(curvature):
    # N = 64 examples of 5 -> 6 -> 3: the gradient form is cheaper, "auto" keeps it
    _lockstep((5, 6, 3), 64, curvature, expect="gradient")


def test_rows_forced_when_n_above_d_still_equal():
    _lockstep((5, 6, 3), 64, "ekfac", mode="rows", expect="rows")


def test_rows_without_bias():
    _lockstep((20, 30, 12), 6, "ekfac", expect="rows", model_fn=lambda: make_mlp((20, 30, 12), bias=False))


def test_rows_used_in_float32_without_false_fallbacks():
    """The probe's bound is the gradient's own rounding: float32 training keeps the row form."""
    model = make_mlp((40, 50, 10), dtype=torch.float32)
    opt = EKFAC(model, lr=0.05, damping=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randn(24, 40, generator=gen), torch.randn(24, 10, generator=gen)
        model.zero_grad()
        half_mse(model(x), y).backward()
        opt.step()
        assert _forms(opt) == ["rows", "rows"]


# -- the guard: each case falls back and equals the gradient form ------------------------------------------
def test_clip_grad_norm_in_place_falls_back():
    _lockstep((20, 30, 12), 6, expect="gradient",
              before_step=lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01))


def test_l2_penalty_in_the_loss_falls_back():
    _lockstep((20, 30, 12), 6, expect="gradient",
              loss_extra=lambda m: 1e-3 * sum(p.square().sum() for p in m.parameters()))


def test_change_through_data_falls_back():
    """A change through ``.grad.data`` escapes the version counter; the probe catches it."""
    def scale(m):
        for p in m.parameters():
            p.grad.data.mul_(0.999)
    _lockstep((20, 30, 12), 6, expect="gradient", before_step=scale)


class _Tied(nn.Module):
    """A head whose weight is also used outside the module (as a tied output embedding is):
    discovery cannot see that use, the head's gradient holds both terms."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.head = nn.Linear(20, 30), nn.Linear(30, 12)
        self.double()

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.head(h) + 0.5 * F.linear(h.roll(1, dims=1), self.head.weight)


def test_tied_weight_falls_back():
    # the probe refuses the head (its gradient holds the other use); the first layer keeps the rows
    model = _Tied()
    ref_model = copy.deepcopy(model)
    opt = EKFAC(model, projected_gradient="auto", **SETTINGS)
    ref = EKFAC(ref_model, projected_gradient="gradient", **SETTINGS)
    names = opt.preconditioner.preconditioned_modules()
    gen = torch.Generator().manual_seed(1)
    for k in range(STEPS):
        x = torch.randn(6, 20, generator=gen, dtype=torch.float64)
        y = torch.randn(6, 12, generator=gen, dtype=torch.float64)
        for mdl, o in ((model, opt), (ref_model, ref)):
            mdl.zero_grad()
            half_mse(mdl(x), y).backward()
            o.step()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert_rel_close(p, q, 1e-10, f"tied step {k} {name}")
        forms = dict(zip(names, _forms(opt)))
        assert forms == {"first": "rows", "head": "gradient"}, forms


def test_mc_fisher_falls_back():
    _lockstep((20, 30, 12), 6, expect="gradient", fisher="mc", loss=nn.MSELoss(), seed=3,
              steps=5)


# -- the guard's pieces ---------------------------------------------------------------------------------------
def test_witness_sees_in_place_changes_replacements_and_accumulation():
    lin = nn.Linear(4, 3).double()
    witness = GradientWitness(lin.parameters())
    x = torch.randn(5, 4, dtype=torch.float64)

    def backward():
        lin(x).square().sum().backward()

    backward()
    assert witness.untouched()
    lin.weight.grad.mul_(1.0)          # in place, even by 1: the version moves
    assert not witness.untouched()
    witness.reset()
    lin.zero_grad(set_to_none=True)
    backward()
    lin.bias.grad = lin.bias.grad.clone()  # replaced
    assert not witness.untouched()
    witness.reset()
    lin.zero_grad(set_to_none=True)
    backward()
    backward()                          # accumulated twice
    assert not witness.untouched()
    witness.reset()
    assert not witness.untouched()      # nothing accumulated since the reset
    witness.remove()
    lin.zero_grad(set_to_none=True)
    backward()
    assert not witness.untouched()      # removed: it sees nothing any more


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probe_accepts_rounding_and_refuses_a_small_change(dtype):
    torch.manual_seed(0)
    n, d_in, d_out = 96, 50, 40
    a = torch.randn(n, d_in, dtype=dtype) * 3
    go = torch.randn(n, d_out, dtype=dtype) / n
    grad = torch.cat([go.T @ a, go.sum(0)[:, None]], dim=1)
    batch = LayerBatch(a=a[:, None], g=(go * n)[:, None])
    gen = torch.Generator().manual_seed(0)
    assert all(bool(rows_match(grad, batch, True, gen)) for _ in range(20))
    # a contribution along the whole gradient (a penalty, a tied use) above the tolerance ~4·N·eps
    relative = 1e-3 if dtype == torch.float32 else 1e-10
    assert not bool(rows_match(grad * (1 + relative), batch, True, gen))
    assert not bool(rows_match(grad + relative * grad.abs().max() * torch.randn_like(grad), batch, True, gen))


# -- K-FAC's factored damping ----------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["pi", "sqrt"])
def test_factored_damping_is_its_dense_solve(split):
    """One exact step (factors of this batch, fresh basis): each layer moves by
    ``-lr (G + γI)⁻¹ ∇W̄ (A + (λ/γ)I)⁻¹``, solved densely in float64, in both forms."""
    lr, damping = 0.1, 0.3
    for mode, n in (("gradient", 6), ("auto", 6), ("auto", 64)):
        model = make_mlp((20, 30, 12))
        opt = EKFAC(model, curvature="kfac", lr=lr, damping=damping, factored_damping=split, momentum=0.0, kl_clip=None,
                    weight_decay=0.0, factor_decay=0.0, eigen_every=1, projected_gradient=mode)
        x, y = torch.randn(n, 20, dtype=torch.float64), torch.randn(n, 12, dtype=torch.float64)
        half_mse(model(x), y).backward()
        layers = [m for m in model if isinstance(m, nn.Linear)]
        before = [torch.cat([m.weight, m.bias[:, None]], 1).detach().clone() for m in layers]
        grads = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone() for m in layers]
        opt.step()
        for m, w0, grad, layer in zip(layers, before, grads, opt.preconditioner.layers):
            c = layer.curvature
            g_f, a_f = c.out_factor, c.in_factor
            d_out, d_in = g_f.shape[0], a_f.shape[0]
            if split == "pi":
                gamma = (damping * (g_f.trace() / d_out) / (a_f.trace() / d_in)).sqrt()
            else:
                gamma = torch.tensor(damping, dtype=torch.float64).sqrt()
            u = torch.linalg.solve(g_f + gamma * torch.eye(d_out, dtype=torch.float64), grad)
            u = torch.linalg.solve(a_f + damping / gamma * torch.eye(d_in, dtype=torch.float64), u.T).T
            moved = torch.cat([m.weight, m.bias[:, None]], 1).detach() - w0
            assert_rel_close(moved, -lr * u, 1e-10, f"{split} {mode} N={n}")
            expect = "rows" if (mode == "auto" and n == 6) else "gradient"
            assert c.last_projection == expect, (mode, n, c.last_projection)


def test_factored_damping_rows_equal_gradient_form_over_steps():
    _lockstep((20, 30, 12), 6, "kfac", expect="rows", factored_damping="pi")


def test_factored_damping_refuses_an_unknown_split():
    with pytest.raises(ValueError, match="factored_damping"):
        EKFAC(make_mlp((3, 2)), curvature="kfac", lr=0.1, damping=0.1, factored_damping="tikhonov")


@pytest.mark.slow
def test_factored_damping_compiled_step_equals_eager_rows():
    """The compiled step keeps the gradient form (no guard there); it equals the eager row form."""
    model = make_mlp((20, 30, 12))
    ref_model = copy.deepcopy(model)
    kw = dict(curvature="kfac", lr=0.05, damping=0.3, factored_damping="pi", eigen_every=2)
    opt, ref = EKFAC(model, compile_step=True, **kw), EKFAC(ref_model, **kw)
    gen = torch.Generator().manual_seed(1)
    for k in range(3):
        x, y = torch.randn(6, 20, generator=gen, dtype=torch.float64), torch.randn(6, 12, generator=gen,
                                                                                     dtype=torch.float64)
        for mdl, o in ((model, opt), (ref_model, ref)):
            mdl.zero_grad()
            half_mse(mdl(x), y).backward()
            o.step()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert_rel_close(p, q, 1e-10, f"compiled step {k} {name}")
        assert _forms(opt) == ["gradient", "gradient"] and _forms(ref) == ["rows", "rows"]


def test_half_precision_weights_keep_the_gradient_form():
    """The probe's tolerance is N·eps of the gradient's dtype, which in bfloat16 exceeds what it must
    detect (here an L2 penalty in the loss): half-precision layers never take the row form."""
    torch.manual_seed(0)
    model = make_mlp((12, 16, 4), dtype=torch.bfloat16)
    opt = EKFAC(model, lr=0.01, projected_gradient="rows")
    for _ in range(2):
        x, y = torch.randn(64, 12, dtype=torch.bfloat16), torch.randn(64, 4, dtype=torch.bfloat16)
        (half_mse(model(x), y) + 0.05 * model[0].weight.square().sum()).backward()
        opt.step()
        opt.zero_grad()
    assert [layer.curvature.last_projection for layer in opt.preconditioner.layers] == ["gradient", "gradient"]
