"""Gradient accumulation (ARCHITECTURE.md, "Gradient accumulation"): k ``backward()`` calls
before ``step()``, micro-batch i's mean loss scaled by n_i / N, give the step of one batch of N —
in float64 to 1e-10 over 3 steps, for every curvature and scaling, equal and unequal micro-batch
sizes, the eager and the compiled step and a compiled model. The running sums do not grow with k;
a module run twice in one graph (shared weights) is still refused.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_triton import EKFAC
from tests.helpers import (COMPILE_MODELS, EXACT_STEP, assert_rel_close, compile_batch, curvature_tensors, half_mse,
                           make_mlp, mean_ce, seeded_batch)

N = 24
SIZES = {"one": [N], "equal": [12, 12], "unequal": [5, 11, 8], "four": [6, 6, 6, 6]}
CURVATURES = {  # name -> EKFAC arguments
    "kfac": dict(curvature="kfac"),
    "ekfac": dict(curvature="ekfac"),
    "ekfac-batch": dict(curvature="ekfac", scaling="batch"),
    "ekfac-per_position": dict(curvature="ekfac", scaling="per_position"),
    "tekfac": dict(curvature="tekfac"),
    "mac": dict(curvature="mac"),
}
SETTINGS = {
    # every step refreshes every basis: the per-example projections use the step's new basis
    "exact": dict(EXACT_STEP),
    # the defaults (EMAs, momentum, eigen_every=10): steps 1 and 2 keep the first basis
    "defaults": {},
    # staggered refreshes: on each step some layers refresh and others do not
    "stagger": dict(factor_decay=0.0, eigen_every=2),
    # statistics every other step: the steps between capture nothing, yet the batch scaling's N
    # is still every micro-batch's examples
    "sparse": dict(factor_every=2, eigen_every=2),
}


def accumulate(model: nn.Module, run: nn.Module, opt: EKFAC, kind: str, sizes: list[int], steps: int = 3) -> None:
    """``steps`` steps on the batches of ``compile_batch(kind, N, step)``, each split into
    micro-batches of ``sizes``, micro-batch i's mean loss scaled by n_i / N."""
    total = sum(sizes)
    for step in range(steps):
        x, y = compile_batch(kind, total, step, torch.float64)
        for xi, yi in zip(x.split(sizes), y.split(sizes)):
            (half_mse(run(xi), yi) * (len(xi) / total)).backward()
        for layer in opt.preconditioner.layers:  # the accumulation path ran (the compiled capture's too)
            assert layer.capture.micro_batches == len(sizes)
            assert (layer.accumulation is not None) == (len(sizes) > 1 and layer.capture.enabled)
        opt.step()
        opt.zero_grad()


def trained(kind: str, sizes: list[int], compiled_model: bool = False, **kwargs):
    model = COMPILE_MODELS[kind][0](torch.float64)
    opt = EKFAC(model, lr=0.1, **kwargs)
    run = torch.compile(model, fullgraph=True) if compiled_model else model
    accumulate(model, run, opt, kind, sizes)
    return model, opt


def assert_same_step(kind: str, sizes: list[int], compiled_model: bool = False, **kwargs) -> None:
    __tracebackhide__ = True
    # the reference is the eager step on the eager model (the compiled ones equal it, and its
    # graphs would cost as much to compile again)
    ref_model, ref_opt = trained(kind, SIZES["one"], **{k: v for k, v in kwargs.items() if k != "compile_step"})
    model, opt = trained(kind, sizes, compiled_model=compiled_model, **kwargs)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert_rel_close(p, q, 1e-10, f"parameter {name}")
    if kwargs.get("curvature") != "mac":
        for i, (a, b) in enumerate(zip(curvature_tensors(opt), curvature_tensors(ref_opt))):
            assert_rel_close(a, b, 1e-9, f"curvature tensor {i}")
    else:
        for layer, ref in zip(opt.preconditioner.layers, ref_opt.preconditioner.layers):
            assert_rel_close(layer.curvature.mean_ema, ref.curvature.mean_ema, 1e-12, "MAC mean")


@pytest.mark.parametrize("settings", sorted(SETTINGS))
@pytest.mark.parametrize("curvature", sorted(CURVATURES))
def test_micro_batches_give_the_step_of_one_batch(curvature, settings):
    for sizes in ("equal", "unequal"):
        assert_same_step("linear", SIZES[sizes], **CURVATURES[curvature], **SETTINGS[settings])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["conv2d", "sequence"])
@pytest.mark.parametrize("curvature", sorted(CURVATURES))
def test_micro_batches_of_conv_and_sequence_layers(kind, curvature):
    for settings in ("exact", "stagger"):
        assert_same_step(kind, SIZES["unequal"], **CURVATURES[curvature], **SETTINGS[settings])


# "stagger": every step has layers that refresh (projections of kept micro-batches in the new
# basis) and, from step 1 on, layers that do not (projections folded per micro-batch)
@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "ekfac-batch", "tekfac"])
def test_compiled_step_accumulates_exactly(curvature):
    assert_same_step("linear", SIZES["unequal"], compile_step=True, **CURVATURES[curvature], **SETTINGS["stagger"])


@pytest.mark.slow
@pytest.mark.parametrize("kind, curvature", [("linear", "kfac"), ("linear", "ekfac"), ("linear", "tekfac"),
                                             ("linear", "mac"), ("conv2d", "ekfac")])
def test_compiled_model_accumulates_exactly(kind, curvature):
    """The compiled capture (the ``ekfac_triton::stash`` op) folds its micro-batches the same way."""
    assert_same_step(kind, SIZES["unequal"], compiled_model=True, **CURVATURES[curvature], **SETTINGS["stagger"])


def test_embedding_micro_batches():
    """One-hot inputs (nn.Embedding): the token-count factor and the scattered scaling add up."""
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(11, 4), nn.Flatten(), nn.Linear(12, 3)).to(torch.float64)

    results = []
    for sizes in (SIZES["one"], SIZES["unequal"]):
        model = make()
        opt = EKFAC(model, lr=0.1, eigen_every=2)
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            x = torch.randint(0, 11, (N, 3), generator=g)
            y = torch.randn(N, 3, generator=g, dtype=torch.float64)
            for xi, yi in zip(x.split(sizes), y.split(sizes)):
                (half_mse(model(xi), yi) * (len(xi) / N)).backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        assert_rel_close(p, q, 1e-10, "embedding model")


# -- memory: running sums, not stacked captures ------------------------------------------------------
def retained(opt: EKFAC) -> tuple[int, int, int]:
    """(tensors, elements) held by the captures and the running sums, and the kept micro-batches."""
    tensors = elements = kept = 0
    for layer in opt.preconditioner.layers:
        cap = layer.capture
        held = [t for t in (cap.inputs, cap.grad_output) if t is not None]
        if layer.accumulation is not None:
            held += layer.accumulation.tensors()
            kept += len(layer.accumulation.kept)
        tensors += len(held)
        elements += sum(t.numel() for t in held)
    return tensors, elements, kept


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "tekfac", "mac"])
def test_memory_does_not_grow_with_the_number_of_micro_batches(curvature):
    """On a step without refresh the captures hold nothing after k >= 2 backwards and the running
    sums have the same count and size for every k; on a refresh step of EKFAC/TEKFAC the kept
    micro-batches hold N examples whatever k."""
    found = {}
    for k in (2, 4, 8):
        model = make_mlp([5, 7, 6, 3], seed=0)
        opt = EKFAC(model, curvature=curvature)  # eigen_every=10: step 1 keeps the first basis
        for step in range(2):
            x, y = seeded_batch(N, (5,), 3, step)
            for xi, yi in zip(x.chunk(k), y.chunk(k)):
                (half_mse(model(xi), yi) / k).backward()
            if step == 0 and curvature in ("ekfac", "tekfac"):  # the first basis: projections wait for it
                kept_rows = sum(kept[0].shape[0] for layer in opt.preconditioner.layers
                                for kept in layer.accumulation.kept)
                assert kept_rows == N * len(opt.preconditioner.layers)
            if step == 1:
                found[k] = retained(opt)
                assert all(layer.capture.micro_batches == k for layer in opt.preconditioner.layers)
            opt.step()
            opt.zero_grad()
    assert found[2] == found[4] == found[8], found
    assert found[2][2] == 0  # nothing kept on a step without refresh


# -- what is refused, what is kept apart ------------------------------------------------------------
class Shared(nn.Module):
    """One Linear applied twice in one forward (shared weights within one graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_module_run_twice_in_one_graph_is_still_refused_and_the_optimizer_recovers():
    model = Shared().to(torch.float64)
    opt = EKFAC(model)
    x, y = seeded_batch(8, (4,), 2, 0)
    half_mse(model(x), y).backward()
    with pytest.raises(RuntimeError, match="ran 2 times in one backward pass.*shared weights"):
        opt.step()
    assert opt.preconditioner.steps == 0
    opt.zero_grad()
    half_mse(model.out(torch.tanh(model.inner(x))), y).backward()  # one call per backward: fine
    opt.step()
    assert opt.preconditioner.steps == 1


def test_two_backwards_with_the_same_module_once_each_are_micro_batches():
    """The distinction: a pair's gradient in a new backward pass is the next micro-batch, even
    when the two forwards were both built before the first backward."""
    model = make_mlp([4, 5, 2], seed=0)
    opt = EKFAC(model)
    x, y = seeded_batch(8, (4,), 2, 0)
    first, second = half_mse(model(x[:4]), y[:4]) / 2, half_mse(model(x[4:]), y[4:]) / 2
    first.backward()
    second.backward()
    assert all(layer.capture.micro_batches == 2 and not layer.capture.shared for layer in opt.preconditioner.layers)
    opt.step()
    reference = make_mlp([4, 5, 2], seed=0)
    ref_opt = EKFAC(reference)
    half_mse(reference(x), y).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_rel_close(p, q, 1e-10, "two pending forwards")


@pytest.mark.parametrize("fisher", ["mc", "type-2"])
def test_mc_and_type2_refuse_accumulation_with_a_clear_message(fisher):
    model = make_mlp([4, 5, 3], seed=0)
    opt = EKFAC(model, fisher=fisher, loss=nn.CrossEntropyLoss())
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    opt.backward(model(x[:4]), y[:4])
    with pytest.raises(RuntimeError, match="fisher='empirical' only"):
        opt.backward(model(x[4:]), y[4:])
    opt.zero_grad()
    opt.preconditioner.discard_capture()
    opt.backward(model(x), y)
    opt.step()


def test_a_first_micro_batch_overwritten_in_place_is_refused():
    model = make_mlp([4, 5, 2], seed=0)
    opt = EKFAC(model)
    x, y = seeded_batch(8, (4,), 2, 0)
    buffer = x[:4].clone()
    half_mse(model(buffer), y[:4]).backward()
    buffer.copy_(x[4:])  # a loader reusing its buffer before step()
    half_mse(model(buffer), y[4:]).backward()
    with pytest.raises(RuntimeError, match="modified in place"):
        opt.step()
    opt.zero_grad()
    half_mse(model(x), y).backward()
    opt.step()
    assert opt.preconditioner.steps == 1


def test_non_finite_micro_batch_skips_the_step_and_state_dict_mid_accumulation():
    """A non-finite micro-batch skips the whole step, state unchanged; a state_dict taken
    between micro-batches is the state before the step (pending micro-batches are not in it) and
    does not disturb the accumulation."""
    model = make_mlp([4, 5, 2], seed=0)
    opt = EKFAC(model, lr=0.1)
    reference = make_mlp([4, 5, 2], seed=0)
    ref_opt = EKFAC(reference, lr=0.1)
    x, y = seeded_batch(8, (4,), 2, 0)
    half_mse(reference(x), y).backward()
    ref_opt.step()
    bad = x.clone()
    bad[5, 0] = float("nan")
    half_mse(model(x[:4]), y[:4]).mul(0.5).backward()
    half_mse(model(bad[4:]), y[4:]).mul(0.5).backward()
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    assert opt.preconditioner.steps == 0 and opt.preconditioner.layers[0].curvature.factor_updates == 0
    opt.zero_grad()
    half_mse(model(x[:4]), y[:4]).mul(0.5).backward()
    saved = opt.state_dict()
    assert saved["preconditioner"]["steps"] == 0
    half_mse(model(x[4:]), y[4:]).mul(0.5).backward()
    opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert_rel_close(p, q, 1e-10, "after the skipped step")


@pytest.mark.parametrize("kind", ["fused-qkv", "multihead"])
def test_mac_attention_micro_batches(kind):
    """MAC's attention statistic v = X̄ᵀ p̄ is a product of two batch means: both are accumulated
    and multiplied at the step (a sum of per-micro-batch products would differ)."""
    from ekfac_triton import MAC
    from tests.curvature.test_mac_attention import CLASSES, D_IN, HEADS, MHAModel, QKVModel

    def make():
        if kind == "fused-qkv":
            model = QKVModel(causal=True, bias=True).to(torch.float64)
            return model, MAC(model, attention_layers={"qkv": {"num_heads": HEADS, "causal": True}}, lr=0.2,
                              eigen_every=2)
        model = MHAModel(batch_first=True, bias=True, mask="causal").to(torch.float64)
        return model, MAC(model, lr=0.2, eigen_every=2)

    results = []
    for sizes in ([8], [3, 5]):
        model, opt = make()
        g = torch.Generator().manual_seed(3)
        for _ in range(3):
            x = torch.randn(8, 6, D_IN, generator=g, dtype=torch.float64) + 0.4
            y = torch.randint(0, CLASSES, (8, 6), generator=g)
            for xi, yi in zip(x.split(sizes), y.split(sizes)):
                (mean_ce(model(xi), yi) * (len(xi) / 8)).backward()
            opt.step()
            opt.zero_grad()
        assert any(layer.curvature.value_ema is not None for layer in opt.preconditioner.layers)
        results.append(([p.detach().clone() for p in model.parameters()],
                        [t for layer in opt.preconditioner.layers for t in (layer.curvature.mean_ema,
                         layer.curvature.value_ema) if t is not None]))
    for p, q in zip(results[1][0], results[0][0]):
        assert_rel_close(p, q, 1e-10, f"{kind} parameters")
    for p, q in zip(results[1][1], results[0][1]):
        assert_rel_close(p, q, 1e-12, f"{kind} MAC statistics")


def test_projections_in_a_basis_the_step_replaces_are_refused(monkeypatch):
    """The guard behind the keep-or-fold decision: projections folded in a basis that the step
    then refreshes raise instead of entering S (the step is undone)."""
    from ekfac_triton.step.engine import StepEngine

    model = make_mlp([4, 5, 2], seed=0)
    opt = EKFAC(model, **EXACT_STEP)  # every step refreshes every basis
    x, y = seeded_batch(8, (4,), 2, 0)
    half_mse(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    before = [t.clone() for t in curvature_tensors(opt)]
    monkeypatch.setattr(StepEngine, "_basis_may_change", lambda self, layer: False)
    for xi, yi in zip(x.chunk(2), y.chunk(2)):
        (half_mse(model(xi), yi) / 2).backward()
    with pytest.raises(RuntimeError, match="changed after its micro-batches were projected"):
        opt.step()
    for a, b in zip(curvature_tensors(opt), before):
        assert torch.equal(a, b)


def test_preconditioner_under_sgd_and_a_grad_scaler_accumulate_exactly():
    """The standalone Preconditioner (under torch's SGD) and the GradScaler recipe: the captured
    output-gradients of every micro-batch are unscaled when folded (a power-of-two scale is exact)."""
    from ekfac_triton import Preconditioner

    def run(sizes: list[int], scaled: bool) -> list[torch.Tensor]:
        model = make_mlp([5, 7, 6, 3], seed=0)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
        pre = Preconditioner(model, damping=1e-2, eigen_every=2, grad_scaler=scaler)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            x, y = seeded_batch(N, (5,), 3, step)
            for xi, yi in zip(x.split(sizes), y.split(sizes)):
                loss = half_mse(model(xi), yi) * (len(xi) / N)
                (scaler.scale(loss) if scaled else loss).backward()
            if scaled:
                scaler.unscale_(sgd)
            assert pre.step()
            if scaled:
                scaler.step(sgd)
                scaler.update()
            else:
                sgd.step()
            sgd.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    reference = run(SIZES["one"], scaled=False)
    for sizes, scaled in ((SIZES["unequal"], False), (SIZES["unequal"], True)):
        for p, q in zip(run(sizes, scaled), reference):
            assert_rel_close(p, q, 1e-10, f"Preconditioner, scaled={scaled}")


def test_asynchronous_refresh_in_flight_keeps_the_micro_batches():
    """A basis computed on the worker is installed at the start of the next step, before its
    scalings: the micro-batches are then kept and projected in that basis (the worker is waited
    for before each step, so both runs install on the same steps)."""
    results = []
    for sizes in (SIZES["one"], SIZES["unequal"]):
        model = make_mlp([5, 7, 6, 3], seed=0)
        opt = EKFAC(model, lr=0.1, eigen_every=2, stagger=False, synchronous=False)
        kept = []
        for step in range(5):
            x, y = seeded_batch(N, (5,), 3, step)
            for xi, yi in zip(x.split(sizes), y.split(sizes)):
                (half_mse(model(xi), yi) * (len(xi) / N)).backward()
            kept.append(sum(len(layer.accumulation.kept) for layer in opt.preconditioner.layers
                            if layer.accumulation is not None))
            opt.preconditioner.eigen.wait()
            opt.step()
            opt.zero_grad()
        results.append(([p.detach().clone() for p in model.parameters()], kept))
    (ref, _), (got, kept) = results
    # step 0: the first basis; step 2 submits, step 3 installs: kept on steps 0 and 3 only
    assert [k > 0 for k in kept] == [True, False, False, True, False], kept
    for p, q in zip(got, ref):
        assert_rel_close(p, q, 1e-10, "asynchronous refreshes")


def test_scaler_step_without_grad_scaler_refuses_accumulation():
    """Under ``scaler.step(opt)`` without ``grad_scaler=`` the loss scale is known only at the step,
    after the backward passes folded their scaled output-gradients: refused, naming the fix (an
    unrefused step would make G and S scale² too large); with ``grad_scaler=`` it is the big batch."""
    def run(pass_scaler: bool, micro: int):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        opt = EKFAC(model, lr=0.1, kl_clip=None, **({"grad_scaler": scaler} if pass_scaler else {}))
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
            scaler.scale(nn.functional.cross_entropy(model(xs), ys) * (len(xs) / 8)).backward()
        scaler.step(opt)
        return model
    with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
        run(False, 2)
    for p, q in zip(run(True, 2).parameters(), run(True, 1).parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
