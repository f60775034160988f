"""Small versions of the models people train, for the real-model tests (and any other test):

* tiny transformers models built from configs in the test (no weights, no network):
  :func:`tiny_gpt2`, :func:`tiny_bert`, :func:`tiny_llama` (transformers is imported only when
  one is built), and :func:`linear_twin`, a copy of a model with every transformers ``Conv1D``
  replaced by the ``nn.Linear`` holding the transposed weight;
* :class:`ResNetLike` and :class:`ViTLike` (from :mod:`bench.zoo`, timm-like models written there
  because timm cannot be installed next to the CPU torch), and :func:`image_batch`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.zoo import ResNetLike, ViTLike  # noqa: F401 - re-exported for the tests

VOCAB = 256


def tiny_gpt2(seed: int = 0, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, vocab_size: int = VOCAB,
              n_positions: int = 64, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` (dropout off, eager attention; ``lm_head``
    tied to ``transformer.wte``)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                        n_positions=n_positions, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return GPT2LMHeadModel(config).to(dtype)


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised ``BertForMaskedLM`` (2 layers, hidden 64; the MLM decoder tied to
    the word embedding)."""
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0, attn_implementation="eager")
    return BertForMaskedLM(config).to(dtype)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (2 layers, hidden 64, untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager")
    return LlamaForCausalLM(config).to(dtype)


def linear_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every transformers ``Conv1D`` (weight (d_in, d_out),
    ``y = x W + b``) replaced by an ``nn.Linear`` holding ``Wᵀ``: the same function.

    The Linear weight is the transposed view of a (d_in, d_out) copy of W, so that both layers run
    the same BLAS products (``F.linear`` is ``addmm(b, x, weight.t())``): forwards and gradients
    agree bitwise, and a comparison of the two isolates the layer adapters (a contiguous ``Wᵀ``
    rounds differently, which a near-degenerate eigenbasis amplifies past 1e-12 within steps)."""
    from transformers.pytorch_utils import Conv1D
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                d_in, d_out = child.weight.shape
                linear = nn.Linear(d_in, d_out, dtype=child.weight.dtype)
                linear.weight = nn.Parameter(child.weight.detach().clone().T)
                linear.bias = nn.Parameter(child.bias.detach().clone())
                setattr(parent, name, linear)
    return twin


def lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy of a causal LM over (B, T) tokens, a mean over every position."""
    logits = model(tokens[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def mlm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """BERT's masked-LM loss with every position a target (a mean over every position)."""
    logits = model(tokens).logits
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())


def token_batch(seed: int, batch: int = 4, length: int = 16, vocab: int = VOCAB) -> Tensor:
    """(batch, length) random tokens from a seeded generator."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- vision ---------------------------------------------------------------------------------------------
def image_batch(seed: int, n: int = 8, classes: int = 10, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(n, 3, 16, 16) images and (n,) labels from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)
