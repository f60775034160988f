"""torch.optim conventions a user relies on: a layer left out of some steps, attaching to a model
whose compiled forward already ran, parameter groups added later and layers unfrozen later, and
a step without a backward."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn

from ekfac_triton import EKFAC, Preconditioner
from tests.helpers import assert_allclose, assert_bitwise_equal, half_mse, make_mlp, seeded_batch

D_IN, D_H, D_OUT = 5, 6, 3


class Alternating(nn.Module):
    """``middle`` runs on the steps the caller asks for only (e.g. every other step)."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.middle, self.head = nn.Linear(D_IN, D_H), nn.Linear(D_H, D_H), nn.Linear(D_H, D_OUT)
        self.to(dtype)

    def forward(self, x: Tensor, use_middle: bool) -> Tensor:
        h = torch.tanh(self.first(x))
        if use_middle:
            h = torch.tanh(self.middle(h))
        return self.head(h)


def batch(n: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    return seeded_batch(n, (D_IN,), D_OUT, 2000 + seed, dtype)


def layer_state(opt: EKFAC, name: str) -> dict[str, Tensor]:
    layer = next(layer for layer in opt.preconditioner.layers if layer.name == name)
    state = layer.curvature.state_dict()
    return {k: v.clone() for k, v in state.items() if isinstance(v, Tensor)} | {
        k: v for k, v in state.items() if isinstance(v, int)}


# ---------------------------------------------------------------------------------------------
# 1. a layer that no backward reached this step: no statistics, the maths of its gradient
# ---------------------------------------------------------------------------------------------
def train_alternating(compile_step: bool, scaling: str, steps: int = 6) -> tuple[Alternating, EKFAC, list]:
    model = Alternating()
    opt = EKFAC(model, lr=0.05, damping=1e-2, momentum=0.9, eigen_every=2, scaling=scaling,
                compile_step=compile_step)
    record = []
    for i in range(steps):
        use = i % 2 == 0
        x, y = batch(8, i)
        opt.zero_grad(set_to_none=False)  # the unused layer's gradient is zeros, not None
        half_mse(model(x, use), y).backward()
        before = layer_state(opt, "middle")
        w = model.middle.weight.detach().clone()
        buf = opt.state[model.middle.weight]["momentum_buffer"].clone() if model.middle.weight in opt.state else None
        opt.step()
        record.append((use, before, layer_state(opt, "middle"), w, buf, model.middle.weight.detach().clone()))
    return model, opt, record


@pytest.mark.parametrize("scaling", ["per_example", "batch"])
@pytest.mark.parametrize("compile_step", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_layer_used_on_alternate_steps(compile_step, scaling):
    """``zero_grad(set_to_none=False)`` and a layer used every other step: on its unused steps its
    statistics (factors, scaling, counts) stay bit-identical, its direction is that of a zero
    gradient (zero), and momentum still moves it; the other layers train as usual."""
    model, opt, record = train_alternating(compile_step, scaling)
    pre = opt.preconditioner
    assert pre.steps == 6 and pre.skipped_steps == 0
    updates = {layer.name: layer.curvature.factor_updates for layer in pre.layers}
    assert updates == {"first": 6, "middle": 3, "head": 6}
    for i, (use, before, after, w, buf, w_after) in enumerate(record):
        if use:
            assert after["factor_updates"] == before["factor_updates"] + 1, f"step {i}"
            continue
        for k in before:
            if isinstance(before[k], Tensor):
                assert_bitwise_equal(after[k], before[k], f"middle.{k} on unused step {i}")
            else:
                assert after[k] == before[k], f"middle.{k} on unused step {i}"
        # zero direction: m = 0.9 m, p -= lr m
        assert_allclose(w_after, w - 0.05 * 0.9 * buf, atol=1e-15, rtol=1e-14, what=f"middle weight, step {i}")


@pytest.mark.slow
def test_alternating_layer_compiled_step_equals_eager():
    eager, _, _ = train_alternating(False, "per_example")
    compiled, _, _ = train_alternating(True, "per_example")
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert_allclose(q, p, atol=1e-12, rtol=1e-10, what=name)


def test_layer_unused_with_set_to_none_gets_no_update():
    """``zero_grad()`` (None gradients): the unused layer is not touched at all."""
    model = Alternating()
    opt = EKFAC(model, lr=0.05, momentum=0.0)
    x, y = batch(8, 0)
    half_mse(model(x, True), y).backward()
    opt.step()
    opt.zero_grad()
    w = model.middle.weight.detach().clone()
    half_mse(model(x, False), y).backward()
    opt.step()
    assert_bitwise_equal(model.middle.weight.detach(), w, "unused middle weight")
    assert opt.preconditioner.steps == 2


def test_gradient_the_capture_did_not_see_raises():
    """A backward that reached a layer's weight but not its capture (the hook is missing from the
    code that ran) is refused, naming the layer, rather than silently giving no statistics."""
    model = make_mlp([D_IN, D_H, D_OUT], seed=0, dtype=torch.float64)
    opt = EKFAC(model)
    layer = opt.preconditioner.layers[0]
    layer.capture._handle.remove()  # as a compiled graph traced before the hook existed
    x, y = batch(8, 0)
    half_mse(model(x), y).backward()
    with pytest.raises(RuntimeError, match="layer '0' received a gradient in a backward that its capture hook"):
        opt.step()


# ---------------------------------------------------------------------------------------------
# 2. attaching to a model whose compiled forward already ran
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
def test_attach_after_a_compiled_forward_ran(how):
    """``m = torch.compile(model); m(x)...; opt = EKFAC(model)``: the cached graph has no capture
    hooks (dynamo does not guard on them); attaching makes it retrace, so the compiled run
    trains exactly as the eager one (float64)."""
    model = make_mlp([D_IN, D_H, D_OUT], seed=0, dtype=torch.float64)
    ref = copy.deepcopy(model)
    if how == "model.compile()":
        model.compile()
        compiled = model
    else:
        compiled = torch.compile(model)
    x, y = batch(8, 99)
    half_mse(compiled(x), y).backward()  # a compiled forward and backward before the optimizer exists
    model.zero_grad()
    opt, opt_ref = EKFAC(model, lr=0.05, eigen_every=2), EKFAC(ref, lr=0.05, eigen_every=2)
    for i in range(4):
        x, y = batch(8, i)
        for m, o in ((compiled, opt), (ref, opt_ref)):
            o.zero_grad()
            half_mse(m(x), y).backward()
            o.step()
    assert opt.preconditioner.steps == 4
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert_allclose(q, p, atol=1e-12, rtol=1e-10, what=name)
    opt.remove_hooks()


@pytest.mark.slow
def test_a_compiled_function_around_the_model_traced_before_attaching_raises():
    """``torch.compile(train_step)`` traced before the optimizer existed keeps running without the
    hooks (its code is the user's, not a module call): the step refuses, saying what to do."""
    model = make_mlp([D_IN, D_H, D_OUT], seed=0, dtype=torch.float64)

    @torch.compile
    def loss_of(x, y):
        return half_mse(model(x), y)

    x, y = batch(8, 0)
    loss_of(x, y).backward()
    model.zero_grad()
    opt = EKFAC(model)
    loss_of(x, y).backward()
    with pytest.raises(RuntimeError, match=r"capture hook did not see.*torch._dynamo.reset\(\)"):
        opt.step()
    opt.remove_hooks()


# ---------------------------------------------------------------------------------------------
# 3. parameter groups added later, layers unfrozen later
# ---------------------------------------------------------------------------------------------
def test_add_param_group_warns_naming_the_layers_left_unpreconditioned():
    model = make_mlp([D_IN, D_H, D_H, D_OUT], seed=0, dtype=torch.float64)
    head = list(model[4].parameters())
    opt = EKFAC(model, params=[p for m in (model[0], model[2]) for p in m.parameters()])
    assert opt.preconditioned_modules() == ["0", "2"]
    with pytest.warns(UserWarning, match=r"add_param_group: modules \['4'\] are layers .* plain update"):
        opt.add_param_group({"params": head, "lr": 0.01})
    assert "add_param_group" in opt.plain_update_report()["4"]
    w = model[4].weight.detach().clone()
    x, y = batch(8, 0)
    half_mse(model(x), y).backward()
    g = model[4].weight.grad.clone()
    opt.step()
    assert_bitwise_equal(model[4].weight.detach(), w - 0.01 * g, "added group: plain update at its lr")


def test_add_param_group_of_plain_parameters_does_not_warn():
    model = make_mlp([D_IN, D_H, D_OUT], seed=0, dtype=torch.float64, norm_after=(0,))
    norm = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    opt = EKFAC(model, params=[p for p in model.parameters() if all(p is not q for q in norm)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.add_param_group({"params": norm})


def test_layer_unfrozen_after_construction_warns_once():
    model = make_mlp([D_IN, D_H, D_OUT], seed=0, dtype=torch.float64)
    model[0].requires_grad_(False)
    with pytest.warns(UserWarning, match="frozen"):
        opt = EKFAC(model)
    model[0].requires_grad_(True)
    for i in range(2):
        x, y = batch(8, i)
        opt.zero_grad()
        half_mse(model(x), y).backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        unfrozen = [w for w in caught if "were frozen" in str(w.message)]
        assert len(unfrozen) == (1 if i == 0 else 0), [str(w.message) for w in caught]
        if unfrozen:
            assert "['0']" in str(unfrozen[0].message)
            assert unfrozen[0].filename == __file__, unfrozen[0].filename


# ---------------------------------------------------------------------------------------------
# 5. step() without a backward
# ---------------------------------------------------------------------------------------------
def snapshot(model: nn.Module, opt: EKFAC) -> list[Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    tensors += [v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)]
    tensors += [t.clone() for layer in opt.preconditioner.layers
                for t in layer.curvature.state_dict().values() if isinstance(t, Tensor)]
    return tensors


@pytest.mark.parametrize("between", ["nothing", "zero_grad()", "zero_grad(set_to_none=False)"])
def test_step_without_backward_warns_and_changes_nothing(between):
    model = make_mlp([D_IN, D_H, D_OUT], seed=0, dtype=torch.float64, norm_after=(0,))
    opt = EKFAC(model)
    x, y = batch(8, 0)
    half_mse(model(x), y).backward()
    opt.step()
    if between == "zero_grad()":
        opt.zero_grad()
    elif between == "zero_grad(set_to_none=False)":
        opt.zero_grad(set_to_none=False)
    before = snapshot(model, opt)
    for _ in range(2):  # one warning per occurrence
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        assert len(caught) == 1, [str(w.message) for w in caught]
        assert "without a backward since the last step" in str(caught[0].message)
        assert caught[0].filename == __file__, caught[0].filename  # points at the caller's step()
    for a, b in zip(snapshot(model, opt), before):
        assert_bitwise_equal(a, b, "state after a step without backward")
    assert opt.preconditioner.steps == 1 and opt.preconditioner.skipped_steps == 0
    # the next real step works as usual
    opt.zero_grad()
    half_mse(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.preconditioner.steps == 2


def test_backward_through_plain_parameters_only_is_a_step():
    """A backward that reaches only parameters outside the preconditioned layers is a real step."""
    model = make_mlp([D_IN, D_H, D_OUT], seed=0, dtype=torch.float64, norm_after=(0,))
    norm = next(m for m in model.modules() if isinstance(m, nn.LayerNorm))
    opt = EKFAC(model, momentum=0.0, lr=0.1)
    w = norm.weight.detach().clone()
    norm.weight.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert_bitwise_equal(norm.weight.detach(), w - 0.1, "LayerNorm weight")
    assert opt.preconditioner.steps == 1


def test_preconditioner_step_without_backward_returns_false():
    model = make_mlp([D_IN, D_H, D_OUT], seed=0, dtype=torch.float64)
    pre = Preconditioner(model)
    x, y = batch(8, 0)
    half_mse(model(x), y).backward()
    assert pre.step()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="without a backward") as caught:
        assert pre.step() is False
    assert caught[0].filename == __file__
    for p, g in zip(model.parameters(), grads):
        assert_bitwise_equal(p.grad, g, "gradients left untouched")
    assert pre.steps == 1


def test_tied_head_reached_only_through_the_embedding_keeps_its_statistics():
    """A step whose loss uses the embedding but not the tied head: the head (the shared weight's
    owner) gets a gradient without a capture; that is the other use, not a missed hook."""
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.mid, self.head = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 16, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: Tensor, use_head: bool = True) -> Tensor:
            h = torch.tanh(self.mid(self.emb(x)))
            return self.head(h) if use_head else h

    torch.manual_seed(0)
    model = Tied()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = EKFAC(model, lr=0.05)
    assert opt.preconditioner.tied == {"emb": "head"}
    x, y = torch.randint(0, 16, (6,)), torch.randint(0, 16, (6,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    head = next(layer for layer in opt.preconditioner.layers if layer.name == "head")
    factors = [t.clone() for t in (head.curvature.in_factor, head.curvature.out_factor)]
    model(x, use_head=False).square().mean().backward()
    opt.step()
    assert_bitwise_equal(head.curvature.in_factor, factors[0], "head's A")
    assert_bitwise_equal(head.curvature.out_factor, factors[1], "head's G")


def test_remove_hooks_stays_removed_after_load_state_dict():
    model = make_mlp((4, 4, 2))
    opt = EKFAC(model, lr=0.1)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    half_mse(model(x), y).backward()
    opt.step()
    state = opt.state_dict()
    opt.remove_hooks()
    opt.load_state_dict(state)
    opt.zero_grad()
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
