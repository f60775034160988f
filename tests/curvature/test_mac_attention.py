"""MAC's attention preconditioning against an independent dense float64 computation.

The oracle uses none of the library's code. The attention probabilities come from torch itself:
``nn.MultiheadAttention(need_weights=True, average_attn_weights=False)`` on a copy of the module
(the masks of the call included) and, for a fused q/k/v layer, ``F.scaled_dot_product_attention``
with the identity as values (so its output *is* the probability matrix). ``out_proj``'s rows come
from a copy of the module whose output projection is the identity. Then the official algorithm
with explicit matrices: non-normalised EMAs of m = mean x̃ and v = X̄ᵀ p̄ with a global bias
correction, ``R = ρ(m̂m̂ᵀ + ρI)⁻¹`` and ``R_v = ρ(v̂v̂ᵀ + ρI)⁻¹`` by ``torch.linalg.inv`` (no
Sherman–Morrison), query/key rows times R, value rows times R_v, and momentum SGD.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ekfac_triton import MAC, AttentionSpec
from ekfac_triton.layers import attention as attention_module

from tests.helpers import MAC_EXACT_ONE, MAC_SEVERAL, assert_rel_close, mean_ce, train_in_lockstep

DTYPE = torch.float64
TOL = 1e-10
N, T, D_IN, E, HEADS, CLASSES = 4, 6, 5, 6, 2, 3


# -- models ----------------------------------------------------------------------------------------
def masks(kind: str, n: int = N, t: int = T) -> dict:
    """Keyword arguments of an nn.MultiheadAttention call for each mask kind."""
    if kind == "none":
        return {}
    if kind == "causal":
        return dict(attn_mask=torch.ones(t, t, dtype=torch.bool).triu(1), is_causal=True)
    kpm = torch.zeros(n, t, dtype=torch.bool)  # examples 1 and 3 lose their last keys
    kpm[1, -2:] = True
    kpm[3, -1] = True
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    if kind == "padding":  # bool key padding and a bool attention mask (no query loses every key)
        return dict(key_padding_mask=kpm, attn_mask=((i + 2 * j) % 5 == 0) & (i != j))
    if kind == "float":  # float key padding (−inf) and a float bias added to the scores
        bias = torch.linspace(-1.0, 1.0, t * t, dtype=DTYPE).reshape(t, t)
        return dict(key_padding_mask=torch.zeros(n, t, dtype=DTYPE).masked_fill(kpm, -math.inf), attn_mask=bias)
    raise ValueError(kind)


class MHAModel(nn.Module):
    """Linear -> self-attention (nn.MultiheadAttention) with a residual -> Linear head."""

    def __init__(self, batch_first: bool, bias: bool, mask: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D_IN, E)
        self.attn = nn.MultiheadAttention(E, HEADS, bias=bias, batch_first=batch_first)
        self.head = nn.Linear(E, CLASSES)
        self.batch_first, self.mask = batch_first, mask

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        if not self.batch_first:
            h = h.transpose(0, 1)
        y, _ = self.attn(h, h, h, need_weights=False, **masks(self.mask))
        y = y + h
        if not self.batch_first:
            y = y.transpose(0, 1)
        return self.head(torch.tanh(y))


class QKVModel(nn.Module):
    """A GPT/ViT-style block with a fused q/k/v nn.Linear (columns [q | k | v], heads contiguous)."""

    def __init__(self, causal: bool, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(D_IN, E)
        self.qkv = nn.Linear(E, 3 * E, bias=bias)
        self.proj = nn.Linear(E, E)
        self.head = nn.Linear(E, CLASSES)
        self.causal = causal

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        n, t, _ = h.shape
        q, k, v = (z.reshape(n, t, HEADS, E // HEADS).transpose(1, 2) for z in self.qkv(h).split(E, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2).reshape(n, t, E)
        return self.head(torch.tanh(h + self.proj(o)))


def make_data(g: torch.Generator) -> tuple[Tensor, Tensor]:
    return (torch.randn(N, T, D_IN, generator=g, dtype=DTYPE) + 0.4, torch.randint(0, CLASSES, (N, T), generator=g))


# -- the independent oracle ----------------------------------------------------------------------
def with_bias_column(rows: Tensor, bias: bool) -> Tensor:
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1) if bias else rows


class DenseAttentionMAC:
    """The official algorithm with explicit matrices and torch's own attention probabilities."""

    def __init__(self, model: nn.Module, *, lr, damping, momentum, weight_decay, factor_decay, factor_every,
                 eigen_every, qkv_heads: dict[nn.Linear, tuple[int, bool]] | None = None):
        self.model, self.lr, self.rho, self.mu, self.wd = model, lr, damping, momentum, weight_decay
        self.beta, self.t_cov, self.t_inv = factor_decay, factor_every, eigen_every
        self.qkv_heads = qkv_heads or {}
        self.calls: dict[nn.Module, tuple[tuple, dict]] = {}
        # (kind, module, weight, bias): "plain" Linear, "in"/"out" of an MHA, "qkv" fused Linear
        self.blocks = []
        for m in model.modules():
            if isinstance(m, nn.MultiheadAttention):
                self.blocks += [("in", m, m.in_proj_weight, m.in_proj_bias),
                                ("out", m, m.out_proj.weight, m.out_proj.bias)]
            elif type(m) is nn.Linear:
                self.blocks.append(("qkv" if m in self.qkv_heads else "plain", m, m.weight, m.bias))
            else:
                continue
            m.register_forward_hook(lambda mod, args, kwargs, out: self.calls.__setitem__(mod, (args, kwargs)),
                                    with_kwargs=True)
        self.m_ema, self.v_ema, self.R, self.Rv, self.buf = {}, {}, {}, {}, {}
        self.step_count = self.ema_steps = 0

    def tokens(self, mha: nn.MultiheadAttention, z: Tensor) -> Tensor:
        return z if mha.batch_first else z.transpose(0, 1)

    def rows_and_weights(self, kind: str, m: nn.Module) -> tuple[Tensor, Tensor | None]:
        """The (N, T, d) rows and, for the attention blocks, p̄ (T,)."""
        args, kwargs = self.calls[m]
        x = args[0].detach()
        if kind == "plain":
            return x, None
        if kind == "qkv":
            heads, causal = self.qkv_heads[m]
            q, k, _ = (z.reshape(N, T, heads, -1).transpose(1, 2) for z in F.linear(x, m.weight, m.bias).split(E, dim=-1))
            eye = torch.eye(T, dtype=DTYPE).expand(N, heads, T, T)
            probs = F.scaled_dot_product_attention(q, k, eye, is_causal=causal)  # P @ I = P
            return x, probs.mean(dim=(0, 1, 2))
        clone = copy.deepcopy(m)
        with torch.no_grad():
            if kind == "in":
                _, probs = clone(x, x, x, **{**kwargs, "need_weights": True, "average_attn_weights": False})
                return self.tokens(m, x), probs.mean(dim=(0, 1, 2))
            clone.out_proj.weight.copy_(torch.eye(E, dtype=DTYPE))
            if clone.out_proj.bias is not None:
                clone.out_proj.bias.zero_()
            out, _ = clone(x, x, x, **kwargs)
            return self.tokens(m, out), None

    def dense_r(self, vec: Tensor) -> Tensor:
        eye = torch.eye(vec.numel(), dtype=DTYPE)
        return self.rho * torch.linalg.inv(torch.outer(vec, vec) + self.rho * eye)

    @torch.no_grad()
    def step(self) -> None:
        if self.step_count % self.t_cov == 0:
            self.ema_steps += 1
            for kind, m, w, b in self.blocks:
                x, p = self.rows_and_weights(kind, m)
                has_b = b is not None
                mean = with_bias_column(x.reshape(-1, x.shape[-1]), has_b).mean(0)
                key = (kind, m)
                self.m_ema[key] = self.beta * self.m_ema.get(key, torch.zeros_like(mean)) + (1 - self.beta) * mean
                if p is not None:
                    v = with_bias_column(x.mean(0), has_b).T @ p          # X̄ᵀ p̄, X̄ with its bias column
                    self.v_ema[key] = self.beta * self.v_ema.get(key, torch.zeros_like(v)) + (1 - self.beta) * v
        correction = 1 - self.beta ** self.ema_steps
        for kind, m, w, b in self.blocks:
            key = (kind, m)
            if self.step_count % self.t_inv == 0:
                self.R[key] = self.dense_r(self.m_ema[key] / correction)
                if key in self.v_ema:
                    self.Rv[key] = self.dense_r(self.v_ema[key] / correction)
            g = w.grad if b is None else torch.cat([w.grad, b.grad[:, None]], dim=1)
            d = g @ self.R[key]
            if key in self.Rv:  # value rows [2E, 3E)
                d[2 * E:] = g[2 * E:] @ self.Rv[key]
            w.grad.copy_(d[:, : w.shape[1]])
            if b is not None:
                b.grad.copy_(d[:, -1])
        for p in self.model.parameters():
            u = p.grad + self.wd * p
            self.buf[p] = u if p not in self.buf else self.mu * self.buf[p] + u
            p.sub_(self.lr * self.buf[p])
        self.step_count += 1


# -- exactness ---------------------------------------------------------------------------------------
MASKS = ["none", "causal", "padding", "float"]


@pytest.mark.parametrize("settings", ["one", "several"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_attention_equals_dense_oracle(batch_first, bias, mask, settings):
    """in_proj: q/k rows × R, v rows × R_v; out_proj: plain MAC on the attention output."""
    kw = MAC_EXACT_ONE if settings == "one" else MAC_SEVERAL
    model = MHAModel(batch_first, bias, mask).to(DTYPE)
    ref_model = copy.deepcopy(model)
    opt = MAC(model, **kw)
    assert opt.preconditioned_modules() == ["inp", "attn", "attn.out_proj", "head"]
    ref = DenseAttentionMAC(ref_model, **kw)
    train_in_lockstep(model, opt, ref_model, ref, make_data, mean_ce, 1 if settings == "one" else 9,
                      f"mha {mask}", TOL)
    curv = opt.preconditioner.layers[1].curvature
    assert_rel_close(curv.value_mean, ref.v_ema[("in", ref_model.attn)] / (1 - ref.beta ** ref.ema_steps), TOL, "v̂")


@pytest.mark.parametrize("settings", ["one", "several"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fused_qkv_equals_dense_oracle(bias, causal, settings):
    kw = MAC_EXACT_ONE if settings == "one" else MAC_SEVERAL
    model = QKVModel(causal, bias).to(DTYPE)
    ref_model = copy.deepcopy(model)
    spec = {"num_heads": HEADS, "causal": causal} if causal else HEADS
    opt = MAC(model, attention_layers={"qkv": spec}, **kw)
    ref = DenseAttentionMAC(ref_model, qkv_heads={ref_model.qkv: (HEADS, causal)}, **kw)
    train_in_lockstep(model, opt, ref_model, ref, make_data, mean_ce, 1 if settings == "one" else 9,
                      f"qkv causal={causal}", TOL)


def test_attention_spec_forms_are_equivalent():
    specs = [2, AttentionSpec(num_heads=2), {"num_heads": 2}, {"num_heads": 2, "causal": False}]
    finals = []
    for spec in specs:
        model = QKVModel(False, True).to(DTYPE)
        opt = MAC(model, attention_layers={"qkv": spec}, **MAC_SEVERAL)
        x, y = make_data(torch.Generator().manual_seed(3))
        for _ in range(3):
            opt.zero_grad()
            mean_ce(model(x), y).backward()
            opt.step()
        finals.append(torch.cat([p.flatten() for p in model.parameters()]))
    for f in finals[1:]:
        assert torch.equal(f, finals[0])


def test_plain_mac_of_the_same_linear_differs():
    """The attention statistics matter: without marking, the qkv layer's value rows move differently."""
    runs = []
    for marked in (False, True):
        model = QKVModel(True, True).to(DTYPE)
        opt = MAC(model, attention_layers={"qkv": {"num_heads": HEADS, "causal": True}} if marked else None,
                  **MAC_EXACT_ONE)
        x, y = make_data(torch.Generator().manual_seed(0))
        mean_ce(model(x), y).backward()
        opt.step()
        runs.append(model.qkv.weight.detach().clone())
    assert torch.equal(runs[0][: 2 * E], runs[1][: 2 * E])
    assert (runs[0][2 * E:] - runs[1][2 * E:]).abs().max() > 1e-6


# -- cost: attention only on statistics steps ---------------------------------------------------------
@pytest.mark.parametrize("factor_every", [1, 3])
def test_attention_recomputed_only_on_statistics_steps(monkeypatch, factor_every):
    calls = []
    real = attention_module.attention_probabilities

    def counting(q, k, mask):
        calls.append(q.shape[0])
        return real(q, k, mask)

    monkeypatch.setattr(attention_module, "attention_probabilities", counting)
    mha, qkv = MHAModel(True, True, "causal").to(DTYPE), QKVModel(True, True).to(DTYPE)
    opts = [MAC(mha, factor_every=factor_every, eigen_every=2),
            MAC(qkv, factor_every=factor_every, eigen_every=2, attention_layers={"qkv": {"num_heads": HEADS,
                                                                                          "causal": True}})]
    g = torch.Generator().manual_seed(0)
    steps = 7
    for _ in range(steps):
        x, y = make_data(g)
        for model, opt in zip((mha, qkv), opts):
            opt.zero_grad()
            mean_ce(model(x), y).backward()
            opt.step()
    stats_steps = len(range(0, steps, factor_every))
    # per statistics step: MHA in_proj + out_proj, and the fused qkv layer (one chunk each: small)
    assert len(calls) == 3 * stats_steps
    assert all(n == N for n in calls)


def test_attention_chunks_cover_the_batch(monkeypatch):
    """With a tiny chunk budget the probabilities are built a few examples at a time, same result."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(5, 2, 4, 3, dtype=DTYPE) for _ in range(3))
    mask = attention_module.causal_mask(4, 4, DTYPE, q.device)
    whole = (attention_module.mean_attention(q, k, mask), attention_module.attention_output(q, k, v, mask))
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", 2 * 4 * 4 * 2)  # two examples per chunk
    chunked = (attention_module.mean_attention(q, k, mask), attention_module.attention_output(q, k, v, mask))
    for a, b in zip(whole, chunked):
        assert_rel_close(b, a, 1e-14, "chunked")
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(3) + mask, dim=-1)
    assert_rel_close(whole[0], probs.mean(dim=(0, 1, 2)), 1e-14, "p̄")
    assert abs(float(whole[0].sum()) - 1.0) < 1e-14


def test_memory_is_two_vector_pairs_per_attention_layer():
    model = QKVModel(False, True).to(DTYPE)
    opt = MAC(model, attention_layers={"qkv": HEADS}, factor_every=1, eigen_every=1)
    x, y = make_data(torch.Generator().manual_seed(0))
    mean_ce(model(x), y).backward()
    opt.step()
    state = opt.state_dict()["preconditioner"]["layers"]
    qkv = next(s for s in state if s["name"] == "qkv")
    for key in ("mean_ema", "mean", "value_ema", "value_mean"):
        assert qkv[key].shape == (E + 1,), key
    plain = next(s for s in state if s["name"] == "proj")
    assert plain["value_ema"] is None


def test_state_dict_round_trip_with_attention():
    model = MHAModel(True, True, "padding").to(DTYPE)
    opt = MAC(model, **MAC_SEVERAL)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = make_data(g)
        opt.zero_grad()
        mean_ce(model(x), y).backward()
        opt.step()
    model2 = copy.deepcopy(model)
    opt2 = MAC(model2, **MAC_SEVERAL)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        x, y = make_data(g)
        for mdl, o in ((model, opt), (model2, opt2)):
            mdl.zero_grad()
            mean_ce(mdl(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


# -- bad input ---------------------------------------------------------------------------------------
def test_bad_attention_layers_raise():
    def qkv_model():
        return QKVModel(False, True).to(DTYPE)

    with pytest.raises(ValueError, match="no module named 'nope'"):
        MAC(qkv_model(), attention_layers={"nope": 2})
    with pytest.raises(ValueError, match="'' is a QKVModel"):
        MAC(qkv_model(), attention_layers={"": 2})
    with pytest.raises(ValueError, match=r"num_heads=4: does not divide E"):
        MAC(qkv_model(), attention_layers={"qkv": 4})
    with pytest.raises(ValueError, match="out_features=8 is not divisible by 3"):
        MAC(nn.Sequential(nn.Linear(4, 8)), attention_layers={"0": 2})
    for bad in (0, -1, 2.0, True, "2", None):
        with pytest.raises(ValueError, match=r"attention_layers\['qkv'\].*num_heads"):
            MAC(qkv_model(), attention_layers={"qkv": bad})
    with pytest.raises(ValueError, match="causal"):
        MAC(qkv_model(), attention_layers={"qkv": {"num_heads": 2, "causal": 1}})
    with pytest.raises(ValueError, match="expected keys"):
        MAC(qkv_model(), attention_layers={"qkv": {"heads": 2}})
    with pytest.raises(ValueError, match="attention_layers=.*must be None or a dict"):
        MAC(qkv_model(), attention_layers=["qkv"])
    mha = MHAModel(True, True, "none").to(DTYPE)
    with pytest.raises(ValueError, match="num_heads=2"):
        MAC(mha, attention_layers={"attn": 3})
    MAC(MHAModel(True, True, "none").to(DTYPE), attention_layers={"attn": HEADS})  # naming an MHA is allowed


def test_fused_qkv_needs_token_sequences():
    model = nn.Sequential(nn.Linear(4, 12), nn.Linear(12, 2)).to(DTYPE)
    opt = MAC(model, attention_layers={"0": 2})
    model(torch.randn(3, 4, dtype=DTYPE)).sum().backward()
    with pytest.raises(ValueError, match=r"\(batch, tokens, features\)"):
        opt.step()


def test_cross_attention_is_refused():
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)

        def forward(self, x: Tensor, memory: Tensor) -> Tensor:
            return self.attn(x, memory, memory)[0]

    model = Cross().to(DTYPE)
    opt = MAC(model)
    x, mem = torch.randn(2, 3, E, dtype=DTYPE), torch.randn(2, 5, E, dtype=DTYPE)
    model(x, mem).square().mean().backward()
    with pytest.raises(ValueError, match="cross-attention"):
        opt.step()


def test_unsupported_multihead_attention_configurations_warn():
    with pytest.warns(UserWarning, match="add_bias_kv"):
        opt = MAC(nn.Sequential(nn.MultiheadAttention(E, HEADS, add_bias_kv=True), nn.Linear(E, 2)))
    assert opt.preconditioned_modules() == ["1"]
    with pytest.warns(UserWarning, match="kdim/vdim"):
        MAC(nn.Sequential(nn.MultiheadAttention(E, HEADS, kdim=3, vdim=3), nn.Linear(E, 2)))


def test_other_curvatures_leave_multihead_attention_to_the_plain_update():
    """EKFAC cannot precondition MHA (its out_proj's input is never captured): a warning, and the
    in_proj and out_proj parameters get the plain momentum update (no capture error)."""
    from ekfac_triton import EKFAC

    model = MHAModel(True, True, "none").to(DTYPE)
    with pytest.warns(UserWarning, match="out_proj"):
        opt = EKFAC(model, lr=0.1, momentum=0.0)
    assert opt.preconditioned_modules() == ["inp", "head"]
    x, y = make_data(torch.Generator().manual_seed(0))
    mean_ce(model(x), y).backward()
    before = model.attn.out_proj.weight.detach().clone()
    grad = model.attn.out_proj.weight.grad.clone()
    opt.step()
    assert_rel_close(model.attn.out_proj.weight, before - 0.1 * grad, 1e-14, "plain update")
