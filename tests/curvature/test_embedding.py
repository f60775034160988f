"""``nn.Embedding`` layers (:mod:`ekfac_triton.layers.embedding`, one-hot curvature mode).

* One exact-settings step changes the embedding weight by ``-lr (F̂ + λI)⁻¹ ∇L`` with F̂ built
  densely from the definition (float64, 1e-8): per-example gradients from ``torch.func``, the
  output-gradients ĝ by ``torch.func`` through the rest of the model, the one-hot rows as dense
  vectors, A's eigenbasis the identity (an eigenbasis of the diagonal A; with repeated token counts
  any other would change EKFAC's diagonal), for K-FAC, EKFAC and TEKFAC, with a padding_idx.
* No tensor with V² elements is ever created (V = 50,000): a dispatch mode computes every op's
  output shapes on the meta device *before* running it, and fails on one of V² or more elements.
* Three steps (momentum, EMAs, refreshes) end exactly where a Linear layer on dense one-hot rows
  does, for every curvature, scaling and Fisher type, and resume bit-exactly from a state_dict.
* max_norm, sparse=True, scale_grad_by_freq and MAC leave the module unpreconditioned, reported;
  a weight tied to an output head is preconditioned by the head on the summed gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from ekfac_triton import EKFAC, MAC
from tests.helpers import EXACT_STEP, assert_rel_close

DTYPE = torch.float64
LR, DAMPING = 0.3, 1e-3


class TokenModel(nn.Module):
    """Embedding -> tanh -> Linear per token -> mean over tokens -> Linear: (B, T) -> (B, C)."""

    def __init__(self, vocab: int, dim: int, classes: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.rest = nn.Sequential(nn.Tanh(), nn.Linear(dim, 5), nn.Tanh())
        self.head = nn.Linear(5, classes)

    def after_embedding(self, e: Tensor) -> Tensor:
        return self.head(self.rest(e).mean(-2))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.after_embedding(self.embed(tokens))


def embedding_oracle(model: TokenModel, X: Tensor, Y: Tensor, loss_fn: nn.Module, curvature: str) -> tuple[Tensor, Tensor]:
    """``(F̂, ∇L)`` of the embedding over the column-major vec of ``W = Eᵀ`` (D x V), from the maths."""
    vocab, dim = model.embed.weight.shape
    params = {k: p.detach() for k, p in model.named_parameters()}

    def example_loss(p, x, y):
        return loss_fn(functional_call(model, p, (x[None],)), y[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, X, Y)["embed.weight"]  # (N, V, D)
    grads = per_example.transpose(1, 2)                           # Ḡ_n = ∇Eᵀ (N, D, V)
    n, r = X.shape
    # ĝ_ns = ∂ℓ_n/∂(embedding output at s), through the rest of the model
    emb = model.embed.weight.detach()[X]
    after = _After(model)
    rest = {k: v for k, v in params.items() if not k.startswith("embed.")}

    def head_loss(e, y):
        return loss_fn(functional_call(after, rest, (e[None],)), y[None])

    g = vmap(grad(head_loss))(emb, Y)                             # (N, R, D)
    onehot = nn.functional.one_hot(X, vocab).to(DTYPE)            # (N, R, V)
    if model.embed.padding_idx is not None:
        onehot[X == model.embed.padding_idx] = 0                  # padding: a zero input row
    vec = grads.transpose(1, 2).reshape(n, -1)                    # column-major vec of Ḡ_n
    fisher = vec.T @ vec / n
    a_rows, g_rows = onehot.reshape(-1, vocab), g.reshape(-1, dim)
    if curvature == "tekfac":
        a_sq, g_sq = a_rows.square().sum(1), g_rows.square().sum(1)
        A, G = (a_rows * g_sq[:, None]).T @ a_rows, (g_rows * a_sq[:, None]).T @ g_rows
    else:
        A, G = a_rows.T @ a_rows / (n * r), g_rows.T @ g_rows / n
    assert torch.equal(A, torch.diag(A.diagonal())), "A of one-hot rows is diagonal"
    if curvature == "kfac":
        f_hat = torch.kron(A, G)
    else:
        q = torch.kron(torch.eye(vocab, dtype=DTYPE), torch.linalg.eigh(G)[1].contiguous())
        diag = ((q.T @ fisher) * q.T).sum(1)
        f_hat = (q * diag) @ q.T
    return f_hat, grads.mean(0)


class _After(nn.Module):
    """The model after its embedding, sharing its parameters' names."""

    def __init__(self, model: TokenModel) -> None:
        super().__init__()
        self.rest, self.head = model.rest, model.head

    def forward(self, e: Tensor) -> Tensor:
        return self.head(self.rest(e).mean(-2))


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "tekfac"])
def test_embedding_step_is_damped_natural_gradient(curvature: str, padding_idx: int | None) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    vocab, dim = 6, 3
    model = TokenModel(vocab, dim, 4, padding_idx).to(DTYPE)
    X = torch.randint(0, vocab, (9, 5), generator=g)
    X[0, :2] = 0                                   # make sure the padding token occurs
    Y = torch.randint(0, 4, (9,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    f_hat, grad_matrix = embedding_oracle(model, X, Y, loss_fn, curvature)
    expected = -LR * torch.linalg.solve(f_hat + DAMPING * torch.eye(f_hat.shape[0], dtype=DTYPE),
                                        grad_matrix.T.reshape(-1)).reshape(vocab, dim).T
    opt = EKFAC(model, lr=LR, damping=DAMPING, curvature=curvature, **EXACT_STEP)
    assert opt.preconditioned_modules() == ["embed", "rest.1", "head"]
    before = model.embed.weight.detach().clone()
    loss_fn(model(X), Y).backward()
    assert_rel_close(model.embed.weight.grad.T, grad_matrix, 1e-12, "oracle gradient")
    opt.step()
    delta = (model.embed.weight.detach() - before).T
    assert_rel_close(delta, expected, 1e-8, f"{curvature}: embedding step")
    curv = opt.preconditioner.layers[0].curvature
    assert curv.in_factor.shape == (vocab,) and curv.q_in is None
    if padding_idx is not None:
        assert torch.all(delta[:, padding_idx] == 0)


def test_embedding_type2_matches_mc_mean() -> None:
    """Embedding statistics under the other Fisher types: the MC mean over many draws approaches
    type-2 (G within 0.03, A identical)."""
    torch.manual_seed(2)
    model = TokenModel(8, 3, 3).to(DTYPE)
    X, Y = torch.randint(0, 8, (6, 4)), torch.randint(0, 3, (6,))
    factors = {}
    for fisher, k in (("type-2", 1), ("mc", 3000)):
        m = TokenModel(8, 3, 3).to(DTYPE)
        m.load_state_dict(model.state_dict())
        opt = EKFAC(m, curvature="kfac", fisher=fisher, loss=nn.CrossEntropyLoss(), mc_samples=k, seed=0, **EXACT_STEP)
        opt.backward(m(X), Y)
        opt.step()
        curv = opt.preconditioner.layers[0].curvature
        factors[fisher] = (curv.in_factor, curv.out_factor)
    assert torch.equal(factors["mc"][0], factors["type-2"][0])
    assert_rel_close(factors["mc"][1], factors["type-2"][1], 0.03, "MC vs type-2 G of the embedding")


# -- memory: never a V x V tensor ----------------------------------------------------------------------
class SizeGuard(TorchDispatchMode):
    """Fails before any op would create a tensor of ``limit`` elements or more: each op is first
    run on meta copies of its arguments (no memory) to learn its output shapes. Ops whose output
    shape depends on data (unique, nonzero) cannot run on meta; their outputs are checked after."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.largest = 0

    def _check(self, out, func) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() >= self.limit:
                    raise AssertionError(f"{func} would create a tensor of shape {tuple(t.shape)}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            meta = tree_map(lambda x: x.to("meta") if isinstance(x, Tensor) else x, (args, kwargs))
            if "device" in meta[1]:
                meta[1]["device"] = torch.device("meta")
            shapes = func(*meta[0], **meta[1])
        except Exception:  # data-dependent shapes, meta-less ops: checked after running
            shapes = None
        if shapes is not None:
            self._check(shapes, func)
        out = func(*args, **kwargs)
        self._check(out, func)
        return out


def test_size_guard_catches_a_square_tensor() -> None:
    """The guard can fail: a V x V identity is refused before it is allocated."""
    with pytest.raises(AssertionError, match="would create a tensor of shape"):
        with SizeGuard(limit=300 * 300):
            torch.eye(300)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "tekfac"])
def test_no_vocab_squared_tensor(curvature: str) -> None:
    vocab = 50_000
    torch.manual_seed(3)
    model = TokenModel(vocab, 4, 3, padding_idx=1)
    X, Y = torch.randint(0, vocab, (8, 6)), torch.randint(0, 3, (8,))
    opt = EKFAC(model, curvature=curvature, eigen_every=1)
    guard = SizeGuard(limit=vocab * vocab)
    with guard:
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), Y).backward()
            opt.step()
    assert guard.largest >= vocab * 4  # the guard saw the V x D tensors
    assert opt.preconditioner.layers[0].curvature.scaling.shape == (4, vocab)


@pytest.mark.parametrize("fisher", ["mc", "type-2"])
def test_eager_curvature_passes_compute_no_weight_gradient(fisher: str) -> None:
    """The curvature passes of an eagerly run model stop at the layer outputs: no tensor of the
    embedding's V x D size is made during them (a pass to the parameters would make one per
    pass), while the training backward does make the V x D gradient (the guard sees it)."""
    vocab = 50_000
    torch.manual_seed(5)
    model = TokenModel(vocab, 4, 3)
    X, Y = torch.randint(0, vocab, (8, 6)), torch.randint(0, 3, (8,))
    opt = EKFAC(model, fisher=fisher, loss=nn.CrossEntropyLoss(), seed=0)
    output = model(X)
    assert all(layer.capture.output is not None for layer in opt.preconditioner.layers)
    guard = SizeGuard(limit=vocab * 4)
    with guard:
        opt.curvature_backward(output)
    assert guard.largest < vocab * 4
    assert all(layer.capture.output is None for layer in opt.preconditioner.layers)  # released
    with pytest.raises(AssertionError, match="would create a tensor of shape"):
        with SizeGuard(limit=vocab * 4):
            nn.functional.cross_entropy(output, Y).backward()


# -- unsupported configurations ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,reason", [(dict(max_norm=1.0), "max_norm=1.0"), (dict(sparse=True), "sparse=True"),
                                           (dict(scale_grad_by_freq=True), "scale_grad_by_freq=True")])
def test_unsupported_embedding_is_reported(kwargs: dict, reason: str) -> None:
    model = nn.Sequential(nn.Embedding(10, 3, **kwargs), nn.Flatten(), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match=reason):
        opt = EKFAC(model)
    assert opt.preconditioned_modules() == ["2"]
    assert reason in opt.preconditioner.unsupported["0"]


def test_mac_leaves_embeddings_unpreconditioned() -> None:
    model = nn.Sequential(nn.Embedding(10, 3), nn.Flatten(), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match="leave embeddings unpreconditioned"):
        opt = MAC(model)
    assert opt.preconditioned_modules() == ["2"]


def tied_model(tied: bool = True) -> nn.Sequential:
    """Embedding -> Linear -> output head, the head's weight tied to the embedding's (``tied``) or
    a separate copy of it."""
    torch.manual_seed(0)
    emb, mix, head = nn.Embedding(11, 4), nn.Linear(4, 4), nn.Linear(4, 11, bias=False)
    if tied:
        head.weight = emb.weight
    else:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    return nn.Sequential(emb, mix, head).to(DTYPE)


@pytest.mark.parametrize("curvature", ["ekfac", "kfac", "tekfac", "mac"])
def test_tied_weight_is_preconditioned_by_the_head_on_the_summed_gradient(curvature: str) -> None:
    """An embedding tied to the output head: one tensor, two uses. The head (dense inputs) owns the
    tensor: its statistics alone, applied to the whole gradient (the sum of both uses'); the
    embedding gets no layer and is reported as tied, not plain. Reference: the untied model whose
    head gradient is replaced by the summed gradient, embedding left out, steps the same (1e-12),
    for every curvature (MAC too, although it leaves untied embeddings plain)."""
    tokens = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(2))
    settings = dict(EXACT_STEP, lr=LR, damping=DAMPING, curvature=curvature)
    model, ref = tied_model(True), tied_model(False)
    opt = EKFAC(model, **settings)
    assert opt.preconditioned_modules() == ["1", "2"]
    assert opt.preconditioner.tied == {"0": "2"} and "0" not in opt.plain_update_report()
    assert opt.coverage().fraction == 1.0
    ref_opt = EKFAC(ref, params=[p for p in ref.parameters() if p is not ref[0].weight], **settings)
    assert ref_opt.preconditioned_modules() == ["1", "2"]
    for m in (model, ref):
        nn.functional.cross_entropy(m(tokens).reshape(-1, 11), targets.reshape(-1)).backward()
    with torch.no_grad():
        ref[2].weight.grad += ref[0].weight.grad  # the gradient of the tied tensor: both uses
    torch.testing.assert_close(model[0].weight.grad, ref[2].weight.grad, rtol=1e-13, atol=0)
    opt.step()
    ref_opt.step()
    assert_rel_close(model[2].weight, ref[2].weight, 1e-12, "tied weight")
    assert_rel_close(model[1].weight, ref[1].weight, 1e-12, "middle layer")


def test_tied_weight_follows_modules_and_frozen_users() -> None:
    """The owner is the first preconditioned user with dense inputs: restricting ``modules`` to
    the embedding makes it the owner (one-hot factors on the summed gradient); with neither user
    preconditioned both are reported on the plain update."""
    from ekfac_triton import Preconditioner
    model = tied_model(True)
    pre = Preconditioner(model, modules=[model[0], model[1]])
    assert pre.preconditioned_modules() == ["0", "1"] and pre.tied == {"2": "0"}
    with pytest.warns(UserWarning, match=r"'0', '2': its parameters are not in") as record:
        pre = Preconditioner(model, modules=[model[1]])
    assert len([w for w in record if "not preconditioned" in str(w.message)]) == 1
    assert pre.tied == {} and set(pre.plain_update_report()) == {"0", "2"}
    assert pre.coverage().plain == ("0.weight",)


def test_tied_linear_users_other_than_the_owner_report_their_bias() -> None:
    """Two Linear layers sharing a weight: the first owns it; the second's own bias is named."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second).to(DTYPE)
    with pytest.warns(UserWarning, match="'2': its weight is tied to '0'.*bias"):
        opt = EKFAC(model)
    assert opt.preconditioned_modules() == ["0"] and opt.preconditioner.tied == {"2": "0"}
    assert opt.coverage().plain == ("2.bias",)


class OneHotLinearModel(TokenModel):
    """``TokenModel`` with the embedding replaced by the same map written as a Linear layer on
    dense one-hot rows: what the one-hot curvature mode must reproduce exactly."""

    def __init__(self, source: TokenModel) -> None:
        vocab, dim = source.embed.weight.shape
        super().__init__(vocab, dim, source.head.out_features)
        self.to(DTYPE)
        self.load_state_dict(source.state_dict())
        self.vocab = vocab
        self.embed_linear = nn.Linear(vocab, dim, bias=False).to(DTYPE)
        with torch.no_grad():
            self.embed_linear.weight.copy_(source.embed.weight.T)
        del self.embed

    def forward(self, tokens: Tensor) -> Tensor:
        rows = nn.functional.one_hot(tokens, self.vocab).to(DTYPE)
        return self.after_embedding(self.embed_linear(rows))


@pytest.mark.parametrize("fisher", ["empirical", "mc", "type-2"])
@pytest.mark.parametrize("scaling", ["per_example", "batch", "per_position"])
@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "tekfac"])
def test_embedding_equals_linear_on_one_hot_rows(curvature: str, scaling: str, fisher: str) -> None:
    """Three steps with momentum, EMAs and a refresh period of 2: the embedding (token indices,
    diagonal A, identity basis, scattered S) ends exactly where a Linear layer on the dense one-hot
    rows does (dense A, eigh of a diagonal matrix: the identity up to order and signs, which no
    statistic sees), for every curvature, scaling and Fisher type; and a state_dict round trip of
    the embedding run (1-D input factor, no input basis) resumes bit-exactly."""
    torch.manual_seed(1)
    source = TokenModel(9, 3, 4).to(DTYPE)
    loss_fn = nn.CrossEntropyLoss()
    settings = dict(lr=0.2, damping=1e-2, curvature=curvature, scaling=scaling, momentum=0.9, factor_decay=0.9,
                    eigen_every=2, stagger=False, fisher=fisher, loss=loss_fn, seed=4)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 9, (6, 5), generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(4)]

    def run(model: nn.Module, steps: list, opt: EKFAC | None = None) -> EKFAC:
        opt = opt or EKFAC(model, **settings)
        for tokens, labels in steps:
            opt.zero_grad()
            opt.backward(model(tokens), labels)
            opt.step()
        return opt

    embedded = TokenModel(9, 3, 4).to(DTYPE)
    embedded.load_state_dict(source.state_dict())
    linear = OneHotLinearModel(source)
    opt = run(embedded, batches[:3])
    run(linear, batches[:3])
    torch.testing.assert_close(embedded.embed.weight.T, linear.embed_linear.weight, atol=1e-12, rtol=1e-10)
    for name in ("rest.1.weight", "head.weight"):
        torch.testing.assert_close(embedded.get_parameter(name), linear.get_parameter(name), atol=1e-12, rtol=1e-10)

    saved_model = {k: v.clone() for k, v in embedded.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict holds references, as torch optimizers' do
    run(embedded, batches[3:], opt)
    resumed = TokenModel(9, 3, 4).to(DTYPE)
    resumed.load_state_dict(saved_model)
    opt2 = EKFAC(resumed, **settings)
    opt2.load_state_dict(saved_opt)
    run(resumed, batches[3:], opt2)
    for p, q in zip(resumed.parameters(), embedded.parameters()):
        assert torch.equal(p, q)
