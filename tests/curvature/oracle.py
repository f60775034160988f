"""An independent float64 oracle for K-FAC, EKFAC and TEKFAC, built from the definitions below.

Nothing here imports ``ekfac_triton``: per-example gradients come from ``torch.func``
(``functional_call`` + ``vmap(grad(...))``), the layer inputs ā and output-gradients ĝ from a
separate deep copy of the model run example by example with zero "probe" tensors added to every
Linear/Conv2d output (ĝ_{n,s} = ∂ℓ_n/∂probe_{n,s}), and every approximation is formed as a dense
matrix over ``vec`` of the layer's gradient matrix.

Conventions (one preconditioned layer, weight W of shape d_out x d_in, conv weight reshaped to
(C_out, C_in·kh·kw)):

* ``Ḡ = [∇W | ∇b]`` is the (d_out, d_in̄) gradient matrix, d_in̄ = d_in + 1 with a bias.
* ``vec`` is column-major, so that ``vec(Q_G P Q_Aᵀ) = (Q_A ⊗ Q_G) vec(P)`` and
  ``(A ⊗ G) vec(X) = vec(G X A)`` for symmetric A; ``torch.kron(A, G)`` is ``A ⊗ G``.
* The loss is ``L = mean_n ℓ_n`` over the first dimension of the batch, ℓ_n the loss of example
  n alone (``loss_fn`` applied to a batch of one); :func:`layer_oracles` checks this identity.

Per layer (K-FAC-expand for R > 1 positions per example, Eschenhagen et al. 2023):

* exact empirical Fisher block ``F = 1/N Σ_n vec(Ḡ_n) vec(Ḡ_n)ᵀ``, Ḡ_n = ∇ℓ_n,
* K-FAC ``A = 1/(N·R) Σ_{n,s} ā āᵀ``, ``G = 1/N Σ_{n,s} ĝ ĝᵀ``, ``F̂ = A ⊗ G``,
* EKFAC ``S = diag((Q_A ⊗ Q_G)ᵀ F (Q_A ⊗ Q_G))`` (as a d_out x d_in̄ matrix, i.e.
  ``1/N Σ_n (Q_Gᵀ Ḡ_n Q_A)²``), ``F̂ = (Q_A ⊗ Q_G) diag(vec S) (Q_A ⊗ Q_G)ᵀ``,
* TEKFAC ``Φ ∝ Σ_{n,s} ‖ĝ_{ns}‖² ā āᵀ``, ``Ψ ∝ Σ_{n,s} ‖ā_{ns}‖² ĝ ĝᵀ`` (‖ā‖² counts the bias
  1), Θ the diagonal of F in the basis of their eigenvectors, F̂ likewise,
* the step ``-lr · (F̂ + λI)⁻¹ vec(∇L)`` (``torch.linalg.solve``), ∇L = mean_n Ḡ_n.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["LayerOracle", "layer_oracles", "vec", "unvec", "kron_basis_matrix", "sym_eigh"]

CURVATURES = ("kfac", "ekfac", "tekfac")


# -- vec / matrices --------------------------------------------------------------------------------
def vec(m: Tensor) -> Tensor:
    """Column-major vec of the trailing two dims: ``vec(M)[j·rows + i] = M[i, j]``."""
    return m.transpose(-1, -2).reshape(*m.shape[:-2], -1)


def unvec(v: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of :func:`vec` for a (rows, cols) matrix."""
    return v.reshape(cols, rows).T


def kron_basis_matrix(q_in: Tensor, q_out: Tensor, diag: Tensor) -> Tensor:
    """``(Q_in ⊗ Q_out) diag(vec D) (Q_in ⊗ Q_out)ᵀ`` for a (d_out, d_in̄) diagonal D."""
    q = torch.kron(q_in, q_out)
    return (q * vec(diag)) @ q.T


def sym_eigh(m: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors of the symmetric part of ``m``."""
    return torch.linalg.eigh((m + m.T) / 2)


# -- the per-layer oracle -------------------------------------------------------------------------
@dataclass
class LayerOracle:
    """Everything the maths says about one Linear/Conv2d layer for one batch.

    Attributes:
        name: the module's name in the model.
        a: (N, R, d_in) layer inputs (Conv2d: im2col patches), without the bias column.
        g: (N, R, d_out) ĝ_{n,s} = ∂ℓ_n/∂z_{n,s}.
        bias: whether the layer has a (trainable) bias.
        per_example_grads: (N, d_out, d_in̄) Ḡ_n = [∇W ℓ_n | ∇b ℓ_n] from torch.func.
    """

    name: str
    a: Tensor
    g: Tensor
    bias: bool
    per_example_grads: Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    # shapes
    @property
    def n(self) -> int:
        return self.a.shape[0]

    @property
    def r(self) -> int:
        return self.a.shape[1]

    @property
    def d_out(self) -> int:
        return self.g.shape[-1]

    @property
    def d_in_bar(self) -> int:
        return self.a.shape[-1] + int(self.bias)

    @property
    def a_bar(self) -> Tensor:
        """(N, R, d_in̄): ā with the constant 1 appended when the layer has a bias."""
        if not self.bias:
            return self.a
        return torch.cat([self.a, self.a.new_ones(self.a.shape[:-1] + (1,))], dim=-1)

    @property
    def grad(self) -> Tensor:
        """∇L = mean_n Ḡ_n, (d_out, d_in̄)."""
        return self.per_example_grads.mean(0)

    # exact Fisher
    def fisher(self) -> Tensor:
        """``F = 1/N Σ_n vec(Ḡ_n) vec(Ḡ_n)ᵀ`` (column-major vec)."""
        v = vec(self.per_example_grads)  # (N, D)
        return v.T @ v / self.n

    # K-FAC
    def kfac_factors(self) -> tuple[Tensor, Tensor]:
        """K-FAC-expand: ``A = 1/(N·R) Σ ā āᵀ``, ``G = 1/N Σ ĝ ĝᵀ``."""
        a = self.a_bar.reshape(-1, self.d_in_bar)
        g = self.g.reshape(-1, self.d_out)
        return a.T @ a / (self.n * self.r), g.T @ g / self.n

    def kfac_basis(self) -> tuple[Tensor, Tensor]:
        """``(Q_A, Q_G)``: eigenvectors of A and G."""
        A, G = self.kfac_factors()
        return sym_eigh(A)[1], sym_eigh(G)[1]

    def kfac(self) -> Tensor:
        """``F̂ = A ⊗ G``."""
        A, G = self.kfac_factors()
        return torch.kron(A, G)

    # EKFAC / TEKFAC
    def diagonal_in_basis(self, q_in: Tensor, q_out: Tensor) -> Tensor:
        """The diagonal of F in the basis ``Q_in ⊗ Q_out`` as a (d_out, d_in̄) matrix:
        ``diag((Q_in⊗Q_out)ᵀ F (Q_in⊗Q_out))``, computed from F itself."""
        q = torch.kron(q_in, q_out)
        d = ((q.T @ self.fisher()) * q.T).sum(1)
        return unvec(d, self.d_out, self.d_in_bar)

    def ekfac_scaling(self) -> Tensor:
        """EKFAC's S: the diagonal of F in the K-FAC eigenbasis."""
        q_a, q_g = self.kfac_basis()
        return self.diagonal_in_basis(q_a, q_g)

    def ekfac(self) -> Tensor:
        """``F̂ = (Q_A ⊗ Q_G) diag(vec S) (Q_A ⊗ Q_G)ᵀ``."""
        q_a, q_g = self.kfac_basis()
        return kron_basis_matrix(q_a, q_g, self.diagonal_in_basis(q_a, q_g))

    def per_position_scaling(self, q_in: Tensor, q_out: Tensor) -> Tensor:
        """The ``per_position`` approximation ``1/N Σ_{n,s} (Q_outᵀ ĝ_{ns})² (Q_inᵀ ā_{ns})²ᵀ``
        (positions treated as examples: the cross-position terms of S are dropped)."""
        gq = self.g.reshape(-1, self.d_out) @ q_out
        aq = self.a_bar.reshape(-1, self.d_in_bar) @ q_in
        return gq.square().T @ aq.square() / self.n

    def tekfac_factors(self) -> tuple[Tensor, Tensor]:
        """TKFAC's ``Φ = Σ ‖ĝ‖² ā āᵀ / δ'`` and ``Ψ = Σ ‖ā‖² ĝ ĝᵀ / δ'`` with
        ``δ' = Σ_{n,s} ‖ā‖²‖ĝ‖²`` (tr Φ = tr Ψ = 1; only the eigenvectors matter)."""
        a = self.a_bar.reshape(-1, self.d_in_bar)
        g = self.g.reshape(-1, self.d_out)
        a_sq, g_sq = a.square().sum(1), g.square().sum(1)
        delta = (a_sq * g_sq).sum()
        return (a * g_sq[:, None]).T @ a / delta, (g * a_sq[:, None]).T @ g / delta

    def tekfac_basis(self) -> tuple[Tensor, Tensor]:
        """``(Q_Φ, Q_Ψ)``."""
        phi, psi = self.tekfac_factors()
        return sym_eigh(phi)[1], sym_eigh(psi)[1]

    def tekfac(self) -> Tensor:
        """``F̂ = (Q_Φ ⊗ Q_Ψ) diag(vec Θ) (Q_Φ ⊗ Q_Ψ)ᵀ``, Θ the diagonal of F in that basis."""
        q_phi, q_psi = self.tekfac_basis()
        return kron_basis_matrix(q_phi, q_psi, self.diagonal_in_basis(q_phi, q_psi))

    def approximation(self, curvature: str) -> Tensor:
        """F̂ of ``curvature`` in {"kfac", "ekfac", "tekfac"}."""
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}")
        if curvature not in self._cache:
            self._cache[curvature] = getattr(self, curvature)()
        return self._cache[curvature]

    def step(self, curvature: str, lr: float, damping: float) -> Tensor:
        """The parameter change ``-lr · (F̂ + λI)⁻¹ vec(∇L)`` as a (d_out, d_in̄) matrix."""
        f_hat = self.approximation(curvature)
        eye = torch.eye(f_hat.shape[0], dtype=f_hat.dtype)
        v = torch.linalg.solve(f_hat + damping * eye, vec(self.grad))
        return -lr * unvec(v, self.d_out, self.d_in_bar)


# -- building the oracles from a model --------------------------------------------------------------
def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation))
    return tuple(m.padding)


def _layer_rows(m: nn.Module, inp: Tensor) -> tuple[Tensor, int]:
    """Per-position inputs (R, d_in) of one example's call and R (Linear: every leading dim after
    the batch dim is a position; Conv2d: im2col patches, columns in ``W.reshape(C_out, -1)`` order)."""
    if isinstance(m, nn.Conv2d):
        patches = F.unfold(inp, m.kernel_size, dilation=m.dilation, padding=_conv_padding(m), stride=m.stride)
        return patches[0].T, patches.shape[-1]
    rows = inp.reshape(-1, inp.shape[-1])
    return rows, rows.shape[0]


def _output_rows(m: nn.Module, out_grad: Tensor) -> Tensor:
    """(R, d_out) rows of one example's output-gradient, in the order of :func:`_layer_rows`."""
    if isinstance(m, nn.Conv2d):
        return out_grad[0].reshape(out_grad.shape[1], -1).T
    return out_grad.reshape(-1, out_grad.shape[-1])


def _grad_matrix(module_params: dict[str, Tensor], d_out: int) -> Tensor:
    """``[∇W | ∇b]`` from (possibly batched over n) weight and bias gradients."""
    w = module_params["weight"]
    batched = w.dim() in (3, 5)  # (N, out, in) or (N, out, in, kh, kw)
    n = w.shape[0] if batched else None
    gw = w.reshape(n, d_out, -1) if batched else w.reshape(d_out, -1)
    if "bias" not in module_params:
        return gw
    b = module_params["bias"]
    return torch.cat([gw, b.reshape(*gw.shape[:-1], 1)], dim=-1)


def layer_oracles(model: nn.Module, X: Tensor, Y: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor],
                  *, check: bool = True) -> list[LayerOracle]:
    """One :class:`LayerOracle` per ``nn.Linear`` / ``nn.Conv2d`` of ``model`` (model order).

    Works on a deep copy: ``model`` is not touched (no forward, no hooks fire on it).

    Args:
        model: the network; any module tree whose preconditioned layers are Linear/Conv2d,
            each called exactly once per forward.
        X, Y: the batch; the first dimension indexes examples.
        loss_fn: ``loss_fn(output, target)`` with mean reduction over the batch; the loss of
            example n alone is ``loss_fn(output[n:n+1], target[n:n+1])``.
        check: assert ``L = mean_n ℓ_n`` and ``Ḡ_n = Σ_s ĝ_{ns} ā_{ns}ᵀ`` (the independently
            computed inputs and output-gradients reproduce torch.func's per-example gradients).
    """
    net = copy.deepcopy(model)
    layers = [(name, m) for name, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    params = {k: p.detach() for k, p in net.named_parameters()}

    # 1. per-example gradients of ℓ_n with torch.func
    def example_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(net, p, (x[None],)), y[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, X, Y)

    # 2. ā and ĝ, example by example, with zero probes added to each layer's output
    records: dict[str, dict] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            rec = records[name]
            rec["input"] = args[0].detach()
            rec["probe"] = torch.zeros_like(out, requires_grad=True)
            return out + rec["probe"]
        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m in layers]
    a_rows: dict[str, list[Tensor]] = {name: [] for name, _ in layers}
    g_rows: dict[str, list[Tensor]] = {name: [] for name, _ in layers}
    losses = []
    try:
        for i in range(X.shape[0]):
            for name, _ in layers:
                records[name] = {}
            loss_i = loss_fn(net(X[i:i + 1]), Y[i:i + 1])
            losses.append(loss_i.detach())
            probes = [records[name]["probe"] for name, _ in layers]
            grads = torch.autograd.grad(loss_i, probes, allow_unused=True)
            for (name, m), gp in zip(layers, grads):
                rows, _ = _layer_rows(m, records[name]["input"])
                a_rows[name].append(rows)
                if gp is None:
                    gp = torch.zeros_like(records[name]["probe"])
                g_rows[name].append(_output_rows(m, gp))
    finally:
        for h in handles:
            h.remove()

    if check:
        with torch.no_grad():
            full = loss_fn(net(X), Y)
        mean = torch.stack(losses).mean()
        assert torch.allclose(full, mean, rtol=1e-12, atol=1e-14), (
            f"loss_fn is not a mean over the first dimension: L={full.item()} vs mean ℓ_n={mean.item()}")

    oracles = []
    for name, m in layers:
        has_bias = m.bias is not None and m.bias.requires_grad
        prefix = f"{name}." if name else ""
        pe = {"weight": per_example[prefix + "weight"]}
        if has_bias:
            pe["bias"] = per_example[prefix + "bias"]
        d_out = m.weight.shape[0]
        oracle = LayerOracle(name=name, a=torch.stack(a_rows[name]), g=torch.stack(g_rows[name]), bias=has_bias,
                             per_example_grads=_grad_matrix(pe, d_out))
        if check:
            rebuilt = torch.einsum("nso,nsi->noi", oracle.g, oracle.a_bar)
            err = (rebuilt - oracle.per_example_grads).abs().max() / oracle.per_example_grads.abs().max()
            assert err < 1e-10, f"layer {name!r}: Σ_s ĝ āᵀ differs from torch.func's per-example gradient ({err:.2e})"
        oracles.append(oracle)
    return oracles
