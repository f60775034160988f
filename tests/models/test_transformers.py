"""Tiny transformers models (configs built here: no weights, no network): GPT-2 (Conv1D
projections, head tied to the token embedding), BERT (masked-LM decoder tied to the word
embedding) and Llama (RMSNorm, untied head). At least 95 % of the trainable elements are
preconditioned, the modules on the plain update are named in the one warning, and a step runs and
is finite for every curvature, eager and (slow) compiled."""

from __future__ import annotations

import math

import pytest
import torch

from ekfac_triton import EKFAC, MAC

from tests.models import zoo

pytest.importorskip("transformers")

CURVATURES = ["ekfac", "kfac", "tekfac", "mac"]

#: model -> (builder, loss, the normalisation layers' kind, the modules tied to an owner)
MODELS = {
    "gpt2": (zoo.tiny_gpt2, zoo.lm_loss, "LayerNorm", {"transformer.wte": "lm_head"}),
    "bert": (zoo.tiny_bert, zoo.mlm_loss, "LayerNorm", {"bert.embeddings.word_embeddings": "cls.predictions.decoder"}),
    "llama": (zoo.tiny_llama, zoo.lm_loss, "LlamaRMSNorm", {}),
}


def build(name: str, curvature: str, **kwargs):
    """The model and its optimizer, with the construction warnings (messages) recorded."""
    builder, _, _, _ = MODELS[name]
    model = builder()
    with pytest.warns(UserWarning) as record:
        opt = MAC(model, **kwargs) if curvature == "mac" else EKFAC(model, curvature=curvature, **kwargs)
    return model, opt, [str(w.message) for w in record if str(w.message).startswith("ekfac_triton")]


def steps(model, opt, loss_fn, n: int = 3) -> list[float]:
    losses = []
    for step in range(n):
        opt.zero_grad()
        loss = loss_fn(model, zoo.token_batch(step, batch=4, length=16))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(MODELS))
def test_coverage_and_the_one_plain_update_warning(name):
    model, opt, messages = build(name, "ekfac")
    _, _, norm, tied = MODELS[name]
    cover = opt.coverage()
    assert cover.fraction >= 0.95, (cover.fraction, cover.plain)
    assert len(messages) == 1, messages
    plain = opt.plain_update_report()
    assert plain and all(f"no layer adapter for {norm}" in reason for reason in plain.values())
    assert all(repr(module) in messages[0] for module in plain)
    assert opt.preconditioner.tied == tied
    # what is not covered is exactly the normalisation layers' parameters
    assert set(cover.plain) == {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in plain}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mac_names_the_embeddings_it_leaves_plain(name):
    """MAC reads only the inputs and leaves embeddings plain, except a tied one (its owner, the
    head, preconditions it): each is named in the one warning."""
    model, opt, messages = build(name, "mac")
    _, _, _, tied = MODELS[name]
    embeddings = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding) and n not in tied]
    assert embeddings and len(messages) == 1
    for n in embeddings:
        assert repr(n) in messages[0] and "leave embeddings unpreconditioned" in opt.plain_update_report()[n]
    assert opt.preconditioner.tied == tied


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_step_runs_and_is_finite(name, curvature):
    model, opt, _ = build(name, curvature, lr=0.01)
    losses = steps(model, opt, MODELS[name][1])
    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.preconditioner.steps == 3 and opt.preconditioner.skipped_steps == 0


def test_gpt2_mac_with_attention_on_every_c_attn():
    attention = {f"transformer.h.{i}.attn.c_attn": {"num_heads": 2, "causal": True} for i in range(2)}
    model, opt, _ = build("gpt2", "mac", lr=0.01, attention_layers=attention)
    losses = steps(model, opt, zoo.lm_loss)
    assert all(math.isfinite(v) for v in losses)
    layers = {layer.name: layer for layer in opt.preconditioner.layers}
    assert all(layers[n].curvature.value_mean is not None for n in attention)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_compiled_step_runs_and_is_finite(name, one_torch_thread):
    """compile_step covers Linear and Conv1D layers: the untied embeddings are left out of params.
    (BERT, whose layers are the same kinds, is left out: its ~15 layers took 4.5 min to compile on
    the loaded CI box.)"""
    torch._dynamo.reset()
    builder, loss_fn, _, tied = MODELS[name]
    model = builder()
    untied = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding) and n not in tied}
    params = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in untied]
    with pytest.warns(UserWarning):
        opt = EKFAC(model, lr=0.01, params=params, compile_step=True)
    losses = steps(model, opt, loss_fn)
    assert all(math.isfinite(v) for v in losses)
    assert opt.preconditioner.skipped_steps == 0
    torch._dynamo.reset()
