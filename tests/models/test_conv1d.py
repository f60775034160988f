"""transformers' ``Conv1D`` (GPT-2's projections, weight stored (d_in, d_out)): recognised without
ekfac_triton importing transformers, and exact in float64 — a tiny GPT-2 and its twin with every
``Conv1D`` replaced by the ``nn.Linear`` holding the transposed weight take the same steps for
every curvature, eager and compiled, including MAC's attention preconditioning of the fused
``c_attn`` against the fused-q/k/v ``nn.Linear`` path; the optimizer state resumes as for Linear."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch

from ekfac_triton import EKFAC, MAC
from ekfac_triton.layers import Conv1DAdapter, FusedQKVAdapter, FusedQKVConv1DAdapter

from tests.helpers import assert_rel_close
from tests.models import zoo

pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DTYPE = torch.float64
SMALL = dict(n_embd=16, n_head=2, vocab_size=32, n_positions=16)
SETTINGS = dict(lr=0.05, damping=1e-2, eigen_every=2, factor_every=1, weight_decay=1e-3)
ATTENTION = {f"transformer.h.{i}.attn.c_attn": {"num_heads": 2, "causal": True} for i in range(2)}


def pair(seed: int = 0):
    model = zoo.tiny_gpt2(seed, dtype=DTYPE, **SMALL)
    return model, zoo.linear_twin(model)


def lockstep(model, opt, twin, twin_opt, steps: int, what: str, tol: float = 1e-12) -> None:
    """The same batches for both; after every step each parameter (Conv1D weights transposed)
    equals its twin's to relative error ``tol``. 12 x 8 positions exceed every factor's dimension
    (at most 65): with rank-deficient factors the null-space eigenvectors are arbitrary, and
    rounding-level differences (the compiled step's fusions) then rotate them."""
    from transformers.pytorch_utils import Conv1D
    twins = dict(twin.named_modules())
    transposed = {f"{name}.weight" for name, m in model.named_modules()
                  if isinstance(m, Conv1D) and not isinstance(twins[name], Conv1D)}
    for step in range(steps):
        tokens = zoo.token_batch(step, batch=12, length=9, vocab=SMALL["vocab_size"])
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            zoo.lm_loss(m, tokens).backward()
            o.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            expected = q.T if name in transposed else q
            assert_rel_close(p, expected, tol, f"{what} step {step} {name}")


@pytest.mark.slow
def test_ekfac_does_not_import_transformers():
    code = "import sys, ekfac_triton; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_conv1d_layers_are_preconditioned_by_their_adapter():
    model, _ = pair()
    opt = EKFAC(model)
    adapters = {layer.name: layer.adapter for layer in opt.preconditioner.layers}
    for name in ("c_attn", "c_proj"):
        adapter = adapters[f"transformer.h.0.attn.{name}"]
        assert type(adapter) is Conv1DAdapter and adapter.layout.transposed
    assert (adapters["transformer.h.0.mlp.c_fc"].d_out, adapters["transformer.h.0.mlp.c_fc"].d_in) == (64, 16)


@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "tekfac", "mac"])
def test_conv1d_steps_equal_the_linear_twin_float64(curvature):
    model, twin = pair()
    settings = dict(SETTINGS, momentum=0.9)
    if curvature == "mac":
        opt, twin_opt = MAC(model, **settings), MAC(twin, **settings)
    else:
        opt, twin_opt = (EKFAC(m, curvature=curvature, **settings) for m in (model, twin))
    assert opt.preconditioned_modules() == twin_opt.preconditioned_modules()
    lockstep(model, opt, twin, twin_opt, 5, curvature)


@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "tekfac"])
def test_conv1d_compiled_step_equals_the_linear_twin_float64(curvature, one_torch_thread):
    """compile_step on the Conv1D model (the embeddings, which the compiled step does not cover,
    left out of params) against the eager step of the Linear twin."""
    torch._dynamo.reset()
    model, twin = pair()

    def params(m):
        return [p for name, p in m.named_parameters() if "wpe" not in name]

    opt = EKFAC(model, curvature=curvature, params=params(model), compile_step=True, **SETTINGS)
    twin_opt = EKFAC(twin, curvature=curvature, params=params(twin), **SETTINGS)
    assert "lm_head" in opt.preconditioned_modules()  # the tied head compiles too
    lockstep(model, opt, twin, twin_opt, 5, f"compiled {curvature}", tol=1e-11)
    torch._dynamo.reset()


def test_mac_attention_on_fused_c_attn_equals_the_fused_linear_path_float64():
    model, twin = pair()
    opt = MAC(model, attention_layers=ATTENTION, **SETTINGS)
    twin_opt = MAC(twin, attention_layers=ATTENTION, **SETTINGS)
    layers = {layer.name: layer for layer in opt.preconditioner.layers}
    twins = {layer.name: layer for layer in twin_opt.preconditioner.layers}
    for name in ATTENTION:
        assert type(layers[name].adapter) is FusedQKVConv1DAdapter
        assert type(twins[name].adapter) is FusedQKVAdapter
        assert layers[name].curvature.value_rows == (32, 48)
    lockstep(model, opt, twin, twin_opt, 5, "mac attention")
    for name in ATTENTION:  # the attention statistic itself, not only its effect
        assert_rel_close(layers[name].curvature.value_ema, twins[name].curvature.value_ema, 1e-12, name)


def test_marked_c_attn_moves_its_value_rows_differently_from_plain_mac():
    """The marking matters: the value rows of c_attn (columns [2E, 3E) of its (d_in, 3E) weight)
    take another step than under plain MAC, the query and key rows the same."""
    finals = []
    for marked in (False, True):
        model, _ = pair()
        opt = MAC(model, attention_layers=ATTENTION if marked else None, lr=0.3, damping=0.7, momentum=0.0,
                  weight_decay=0.0, factor_decay=0.0, factor_every=1, eigen_every=1)
        zoo.lm_loss(model, zoo.token_batch(0, batch=6, length=9, vocab=SMALL["vocab_size"])).backward()
        opt.step()
        finals.append(model.transformer.h[0].attn.c_attn.weight.detach().clone())
    assert torch.equal(finals[0][:, :32], finals[1][:, :32])
    assert (finals[0][:, 32:] - finals[1][:, 32:]).abs().max() > 1e-8


def test_conv1d_state_dict_resumes_exactly_and_matches_the_linear_twin():
    """Saved after 3 steps and loaded into a fresh optimizer, the run continues as if
    uninterrupted; the curvature state is the Linear twin's (the same factors, bases, scalings)."""
    model, twin = pair()
    opt, twin_opt = EKFAC(model, **SETTINGS), EKFAC(twin, **SETTINGS)
    lockstep(model, opt, twin, twin_opt, 3, "before saving")
    saved = copy.deepcopy(opt.state_dict())  # a state_dict holds references, as torch's does
    for layer, other in zip(saved["preconditioner"]["layers"], twin_opt.state_dict()["preconditioner"]["layers"]):
        for key in ("in_factor", "out_factor", "scaling"):
            assert_rel_close(layer[key], other[key], 1e-12, f"{layer['name']} {key}")
    resumed_model = zoo.tiny_gpt2(1, dtype=DTYPE, **SMALL)
    resumed_model.load_state_dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = EKFAC(resumed_model, **SETTINGS)
    resumed.load_state_dict(saved)
    lockstep(model, opt, resumed_model, resumed, 2, "resumed", tol=0.0)
