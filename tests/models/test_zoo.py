"""The vision models of :mod:`tests.models.zoo` (timm-like, written here): a residual CNN with
BatchNorm, strided and depthwise convolutions, and a ViT with a patch-embedding Conv2d, fused
q/k/v attention and bare parameters. At least 95 % of the trainable elements are preconditioned,
every module on the plain update is named in the one warning, and a step runs and is finite for
every curvature (MAC with the ViT's attention marked), eager and (slow) compiled."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ekfac_triton import EKFAC, MAC

from tests.models import zoo

CURVATURES = ["ekfac", "kfac", "tekfac", "mac"]
MODELS = {"resnet": zoo.ResNetLike, "vit": zoo.ViTLike}
VIT_ATTENTION = {f"blocks.{i}.attn.qkv": 2 for i in range(2)}


def build(name: str, curvature: str, **kwargs):
    model = MODELS[name]()
    if curvature == "mac" and name == "vit":
        kwargs["attention_layers"] = VIT_ATTENTION
    with pytest.warns(UserWarning) as record:
        opt = MAC(model, **kwargs) if curvature == "mac" else EKFAC(model, curvature=curvature, **kwargs)
    return model, opt, [str(w.message) for w in record if str(w.message).startswith("ekfac_triton")]


def steps(model, opt, n: int = 3) -> list[float]:
    losses = []
    for step in range(n):
        x, y = zoo.image_batch(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("curvature", ["ekfac", "mac"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_coverage_and_the_one_plain_update_warning(name, curvature):
    model, opt, messages = build(name, curvature)
    cover = opt.coverage()
    assert cover.fraction >= 0.95, (cover.fraction, cover.plain)
    assert len(messages) == 1, messages
    plain = opt.plain_update_report()
    assert all(repr(module) in messages[0] for module in plain)
    norms = {n for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))}
    depthwise = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    # EKFAC leaves depthwise convolutions plain (their output-gradients do not factor), MAC takes them
    assert set(plain) == norms | (depthwise if curvature != "mac" else set())
    bare = {"cls_token", "pos_embed"} if name == "vit" else set()
    assert set(cover.plain) == bare | {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in plain}


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_step_runs_and_is_finite(name, curvature):
    model, opt, _ = build(name, curvature, lr=0.01)
    losses = steps(model, opt)
    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.preconditioner.steps == 3 and opt.preconditioner.skipped_steps == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_step_runs_and_is_finite(name, one_torch_thread):
    """compile_step on the whole model (the depthwise convolution is on the plain update)."""
    torch._dynamo.reset()
    model, opt, _ = build(name, "ekfac", lr=0.01, compile_step=True)
    losses = steps(model, opt)
    assert all(math.isfinite(v) for v in losses)
    assert opt.preconditioner.skipped_steps == 0
    torch._dynamo.reset()
