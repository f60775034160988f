"""The defaults train real models; the AdamW update of parameters without curvature is exactly
``torch.optim.AdamW``; a run whose steps are all skipped stops with a clear error.

The models are the small equivalents of ``bench/defaults.py`` (``python -m bench.defaults``
measures the full-size ones, ARCHITECTURE.md, "Default hyperparameters"): a ResNet-like net
(BatchNorm, strided and depthwise convolutions, residuals), a ViT-like net (patch-embedding
Conv2d, LayerNorm, attention with a fused q/k/v Linear) and the demo's sigmoid autoencoder at a
smaller width, each on one fixed seeded batch, with ``EKFAC(model, curvature=...)`` and no other
argument.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.defaults import ResNet, train_model
from bench.zoo import ViTLike
from bench.experiments import autoencoder, reconstruction_loss
from ekfac_triton import EKFAC
from tests.helpers import assert_allclose, assert_bitwise_equal

CURVATURES = ("ekfac", "kfac", "tekfac")


def _small_task(name: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "autoencoder":
        model = autoencoder(encoder_widths=(64, 32, 16, 8))
        # low-rank images, mostly dark with near-binary pixels as MNIST's
        images = torch.sigmoid(4 * torch.randn(32, 4, generator=g) @ torch.randn(4, 64, generator=g) - 4)
        return model, lambda m: reconstruction_loss(m(images), images)
    model = ResNet(width=4, blocks=1) if name == "resnet" else ViTLike(image=16, patch=4, dim=32, depth=1, heads=2)
    images = torch.randn(16, 3, 16, 16, generator=g)
    labels = torch.randint(0, 10, (16,), generator=g)
    return model, lambda m: F.cross_entropy(m(images), labels)


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("name", ["resnet", "vit", "autoencoder"])
def test_defaults_train_small_models(name, curvature):
    """40 steps with no hyperparameter: the loss falls to at most 0.9 × the first, no step skipped."""
    model, loss_of = _small_task(name)
    r = train_model(model, loss_of, curvature, steps=40)
    assert r["error"] is None, r["error"]
    assert r["skipped"] == 0, f"{name}/{curvature}: {r['skipped']} skipped steps"
    assert r["last"] <= 0.9 * r["first"], f"{name}/{curvature}: loss {r['first']:.4g} -> {r['last']:.4g}"


def test_old_defaults_diverge_on_the_small_vit():
    """The measurement the new defaults answer: lr 0.1, damping 1e-3 and no trust region (the old
    defaults) do not train the ViT-like model (so the test above is not passed by any setting)."""
    model, loss_of = _small_task("vit")
    r = train_model(model, loss_of, "kfac", steps=40, damping=1e-3, kl_clip=None)
    assert not r["passed"], r


@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_defaults_train_tiny_transformers(name, curvature):
    """transformers' GPT-2 (its Conv1D layers by their adapter, the tied head by the head's
    factors), BERT and Llama, tiny configs without weights (tests/models/zoo.py)."""
    pytest.importorskip("transformers")
    from tests.models import zoo

    net = {"gpt2": zoo.tiny_gpt2, "bert": zoo.tiny_bert, "llama": zoo.tiny_llama}[name](0)
    loss = zoo.mlm_loss if name == "bert" else zoo.lm_loss
    tokens = zoo.token_batch(1, batch=8, length=16)
    r = train_model(net, lambda m: loss(m, tokens), curvature, steps=40)
    assert r["error"] is None and r["skipped"] == 0, r
    assert r["last"] <= 0.9 * r["first"], f"{name}/{curvature}: loss {r['first']:.4g} -> {r['last']:.4g}"


# -- plain_update="adamw" ----------------------------------------------------------------------------
def _norm_net() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize("compiled", [False, True])
def test_plain_adamw_equals_torch_adamw(compiled):
    """The LayerNorm (no curvature) moves exactly as torch.optim.AdamW moves it, given the same
    gradients, over 6 steps in float64 (1e-12), eager and compiled step; the Linear layers keep
    their preconditioned update (momentum buffers, no Adam state)."""
    model = _norm_net()
    norm_ref = copy.deepcopy(model[1])
    opt = EKFAC(model, plain_update="adamw", plain_lr=3e-2, plain_betas=(0.8, 0.99), plain_eps=1e-6,
                plain_weight_decay=0.1, compile_step=compiled)
    adam = torch.optim.AdamW(norm_ref.parameters(), lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        y = torch.randn(16, 3, generator=g, dtype=torch.float64)
        ((model(x) - y) ** 2).mean().backward()
        for p, q in zip(model[1].parameters(), norm_ref.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        adam.step()
        opt.zero_grad()
        for p, q in zip(model[1].parameters(), norm_ref.parameters()):
            assert_allclose(p.detach(), q.detach(), 1e-12, 0, f"LayerNorm parameter after step {step}")
    for p, q in zip(model[1].parameters(), norm_ref.parameters()):
        assert float(opt.state[p]["step"]) == float(adam.state[q]["step"]) == 6
        for key in ("exp_avg", "exp_avg_sq"):
            assert_allclose(opt.state[p][key], adam.state[q][key], 1e-12, 0, key)
    assert all("momentum_buffer" in opt.state[p] and "exp_avg" not in opt.state[p]
               for p in (*model[0].parameters(), *model[3].parameters()))


def test_plain_update_sgd_keeps_the_momentum_update():
    """``plain_update="sgd"``: the LayerNorm moves by SGD with momentum on its gradient, with the
    group's lr and momentum (bit for bit as torch.optim.SGD)."""
    model = _norm_net()
    norm_ref = copy.deepcopy(model[1])
    opt = EKFAC(model, lr=0.05, momentum=0.5, plain_update="sgd")
    sgd = torch.optim.SGD(norm_ref.parameters(), lr=0.05, momentum=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
        ((model(x) - y) ** 2).mean().backward()
        for p, q in zip(model[1].parameters(), norm_ref.parameters()):
            q.grad = p.grad.clone()
        opt.step(); sgd.step(); opt.zero_grad()
    for p, q in zip(model[1].parameters(), norm_ref.parameters()):
        assert_allclose(p.detach(), q.detach(), 1e-14, 0, "LayerNorm parameter")
        assert "exp_avg" not in opt.state[p]


def test_plain_adamw_state_dict_resumes_exactly():
    """The AdamW state (step, exp_avg, exp_avg_sq) and the plain_* group values are in the
    state_dict: a resumed optimizer continues bit for bit."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64))
            for _ in range(6)]

    def run(opt, model, batches):
        for x, y in batches:
            ((model(x) - y) ** 2).mean().backward()
            opt.step(); opt.zero_grad()

    model = _norm_net()
    opt = EKFAC(model, plain_update="adamw", plain_lr=1e-2)
    run(opt, model, data[:3])
    saved, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    assert saved["param_groups"][0]["plain_lr"] == 1e-2
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(saved["state"][2])  # the LayerNorm weight
    run(opt, model, data[3:])
    resumed = _norm_net()
    resumed.load_state_dict(saved_model)
    opt2 = EKFAC(resumed, plain_update="adamw")
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["plain_lr"] == 1e-2
    run(opt2, resumed, data[3:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert_bitwise_equal(q.detach(), p.detach(), "parameter after resuming")


def test_state_dict_of_the_other_plain_update_is_refused():
    """A state saved with plain_update="sgd" cannot be loaded with "adamw" (and back): its groups
    lack (or carry) the AdamW hyperparameters and its state the moments."""
    sgd = EKFAC(_norm_net(), plain_update="sgd")
    adamw = EKFAC(_norm_net(), plain_update="adamw")
    with pytest.raises(ValueError, match="plain_update='sgd'"):
        adamw.load_state_dict(sgd.state_dict())
    with pytest.raises(ValueError, match="plain_update='adamw'"):
        sgd.load_state_dict(adamw.state_dict())


def test_plain_update_arguments_are_validated():
    model = _norm_net()
    with pytest.raises(ValueError, match="plain_update"):
        EKFAC(model, plain_update="adam")
    with pytest.raises(ValueError, match="plain_betas"):
        EKFAC(model, plain_update="adamw", plain_betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="plain_eps"):
        EKFAC(model, plain_update="adamw", plain_eps=0.0)


def test_plain_adamw_skipped_step_leaves_its_state():
    """A non-finite step leaves the AdamW moments and step counts as they were."""
    model = _norm_net()
    opt = EKFAC(model, plain_update="adamw")
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    ((model(x) - y) ** 2).mean().backward(); opt.step(); opt.zero_grad()
    before = copy.deepcopy(opt.state_dict()["state"])
    ((model(x) - y) ** 2).mean().backward()
    model[1].weight.grad[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        opt.step()
    after = opt.state_dict()["state"]
    for key, entry in before.items():
        for name, value in entry.items():
            assert_bitwise_equal(after[key][name], value, f"state {key}/{name}")


# -- max_skipped_steps -----------------------------------------------------------------------------
def _nan_steps(opt, model, steps: int) -> None:
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    for _ in range(steps):
        ((model(x * float("nan")) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_consecutive_skips_raise_a_clear_error():
    """The K-th non-finite step in a row raises, naming what happened and what to change; the
    parameters are those of the last good step; a good step resets the count."""
    model = _norm_net()
    opt = EKFAC(model, max_skipped_steps=3)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    ((model(x) - y) ** 2).mean().backward(); opt.step(); opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _nan_steps(opt, model, 2)
        ((model(x) - y) ** 2).mean().backward(); opt.step(); opt.zero_grad()  # resets the run
        good = [p.detach().clone() for p in model.parameters()]
        _nan_steps(opt, model, 2)
        with pytest.raises(RuntimeError, match=r"last 3 steps were all skipped.*lower lr.*max_skipped_steps=None"):
            _nan_steps(opt, model, 1)
    for p, q in zip(model.parameters(), good):
        assert_bitwise_equal(p.detach(), q, "parameter after the error")
    assert opt.preconditioner.skipped_steps == 5


def test_max_skipped_steps_none_never_raises():
    model = _norm_net()
    opt = EKFAC(model, max_skipped_steps=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _nan_steps(opt, model, 15)
    assert opt.preconditioner.skipped_steps == 15
    with pytest.raises(ValueError, match="max_skipped_steps"):
        EKFAC(_norm_net(), max_skipped_steps=0)


def test_compiled_step_raises_on_device_skips():
    """The compiled step counts its device skips on the device and reads the run every K steps:
    K=4 non-finite ordinary steps in a row raise by the 2K-th step."""
    model = _norm_net()
    opt = EKFAC(model, compile_step=True, max_skipped_steps=4, eigen_every=100)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    for _ in range(3):  # first basis, first EMA updates: the next steps are ordinary (device skips)
        ((model(x) - y) ** 2).mean().backward(); opt.step(); opt.zero_grad()
    raised_at = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(8):
            try:
                _nan_steps(opt, model, 1)
            except RuntimeError as e:
                assert "all skipped" in str(e)
                raised_at = i + 1
                break
    assert raised_at is not None and 4 <= raised_at <= 8, raised_at
    assert opt.preconditioner._host_skipped_steps == 0, "the skips were decided on the device"


@pytest.mark.parametrize("curvature", CURVATURES)
def test_the_contract_call_is_the_exact_step(curvature):
    """The public contract's call, ``EKFAC(model, lr=..., damping=1e-3, momentum=0,
    weight_decay=0, factor_decay=0, eigen_every=1)`` with no ``kl_clip``, is the exact step (the
    oracle-tested ``kl_clip=None`` path, bit for bit): the default trust region is off there only."""
    contract = dict(lr=0.1, damping=1e-3, curvature=curvature, momentum=0.0, weight_decay=0.0, factor_decay=0.0,
                    eigen_every=1)
    runs = []
    for extra in ({}, {"kl_clip": None}):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        opt = EKFAC(model, **contract, **extra)
        assert opt.preconditioner.config.kl_clip is None
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        runs.append(list(model.parameters()))
    for p, q in zip(*runs):
        assert_bitwise_equal(p, q, "contract call vs kl_clip=None")
    # any other configuration keeps the default trust region, and an explicit number always applies
    for changed in ({"momentum": 0.9}, {"weight_decay": 1e-4}, {"factor_decay": 0.95}, {"eigen_every": 2}):
        opt = EKFAC(nn.Linear(3, 2), **{**contract, **changed})
        assert opt.preconditioner.config.kl_clip == 1e-3, changed
    assert EKFAC(nn.Linear(3, 2), **contract, kl_clip=1e-2).preconditioner.config.kl_clip == 1e-2
