"""Helpers shared by the test modules: assertions, model builders, seeded data, and the few
problem-specific pieces more than one module needs (curvlinops' parameter order, the implied F̂).

Nothing here is a test. Import with ``from tests.helpers import ...`` (``tests`` is a package;
see tests/README.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.curvature.oracle import kron_basis_matrix

# ---------------------------------------------------------------------------------------------
# assertions
# ---------------------------------------------------------------------------------------------
NORMS = ("fro", "max")


def _index_of_largest(diff: Tensor) -> tuple[int, ...]:
    flat = int(diff.abs().reshape(-1).argmax())
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))


def _first_non_finite(t: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(~torch.isfinite(t))[0])


def assert_rel_close(actual: Tensor, expected: Tensor, tol: float, what: str = "", *, norm: str = "fro") -> None:
    """Assert that ``actual`` is within relative error ``tol`` of ``expected``.

    Checks, in this order (each failure says what and where):

    1. equal shapes (no broadcasting);
    2. both tensors finite;
    3. ``expected`` not identically zero (a relative error to zero is undefined: compare with
       ``torch.equal`` or an absolute bound instead);
    4. the relative error, computed in float64:

       * ``norm="fro"`` (default): ``‖actual − expected‖_F / ‖expected‖_F ≤ tol``;
       * ``norm="max"``: ``max|actual − expected| / max|expected| ≤ tol`` (the error of every
         entry against the largest entry of ``expected``).

    A failure reports the relative error, the largest absolute difference, its index and the
    two values there.
    """
    __tracebackhide__ = True  # report the message, not the tensors
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: must be one of {NORMS}")
    label = f"{what}: " if what else ""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{label}shape {tuple(actual.shape)} != expected shape {tuple(expected.shape)}")
    for name, t in (("actual", actual), ("expected", expected)):
        if not torch.isfinite(t).all():
            n_bad = int((~torch.isfinite(t)).sum())
            idx = _first_non_finite(t)
            raise AssertionError(f"{label}{name} has {n_bad} non-finite entries; first at {idx}: {t[idx].item()}")
    diff = actual - expected
    if norm == "fro":
        err, scale = diff.norm(), expected.norm()
    else:
        err, scale = diff.abs().max(), expected.abs().max()
    if not scale > 0:
        raise AssertionError(f"{label}expected is identically zero: a relative error is undefined")
    rel = (err / scale).item()
    if not rel <= tol:
        idx = _index_of_largest(diff)
        kind = "relative error" if norm == "fro" else "max relative error"
        raise AssertionError(
            f"{label}{kind} {rel:.3e} > {tol:.1e} (norm={norm!r}, scale {scale.item():.3e}); "
            f"largest abs diff {diff[idx].abs().item():.3e} at index {idx}: "
            f"actual {actual[idx].item():.6e}, expected {expected[idx].item():.6e}")


def assert_bitwise_equal(actual: Tensor, expected: Tensor, what: str) -> None:
    """Same shape, same dtype and ``torch.equal``; on failure the largest absolute difference."""
    __tracebackhide__ = True
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        pytest.fail(f"{what}: shape/dtype {tuple(actual.shape)}/{actual.dtype} != "
                    f"{tuple(expected.shape)}/{expected.dtype}")
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs().max().item()
        pytest.fail(f"{what} differs (max abs diff {diff:.3e})")


def assert_allclose(actual: Tensor, expected: Tensor, atol: float, rtol: float, what: str = "") -> None:
    """``torch.testing.assert_close`` of both tensors cast to float64 (``|a − e| ≤ atol + rtol·|e|``
    elementwise, equal shapes)."""
    __tracebackhide__ = True
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}" if what else m)


def assert_close_to_scale(actual: Tensor, expected: Tensor, atol: float, rtol: float, what: str = "") -> None:
    """Elementwise ``|a − e| ≤ atol·max|e| + rtol·|e|`` (atol relative to the largest magnitude
    of ``expected``), on CPU in float64; on failure say where and by how much. The kernel tests'
    tolerance."""
    __tracebackhide__ = True
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = max(expected.abs().max().item(), 1e-30) if expected.numel() else 1.0
    err = (actual - expected).abs()
    bound = atol * scale + rtol * expected.abs()
    bad = ~(err <= bound)
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements off; first at {idx}: "
                             f"{actual[idx].item():.8g} vs {expected[idx].item():.8g} "
                             f"(max err {err.max().item():.3g}, scale {scale:.3g})")


# ---------------------------------------------------------------------------------------------
# devices and the Triton interpreter
# ---------------------------------------------------------------------------------------------
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available() and not INTERPRET
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs under TRITON_INTERPRET=1 in the subprocess "
                                                             "of the module's interpreter-suite test")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def make_mlp(widths: Sequence[int], *, act: type[nn.Module] = nn.Tanh, bias: bool | Sequence[bool] = True,
        norm_after: Sequence[int] = (), seed: int | None = 0, dtype: torch.dtype | None = torch.float64
        ) -> nn.Sequential:
    """``nn.Sequential`` of Linear layers ``widths[0] → widths[1] → …`` with ``act()`` after every
    Linear but the last.

    * ``bias``: one flag for all layers or one per layer;
    * ``norm_after``: indices of the Linear layers (0-based) followed by an ``nn.LayerNorm`` of
      their width, placed before the activation;
    * ``seed``: ``torch.manual_seed(seed)`` right before the layers are created; None leaves the
      global RNG as the caller set it;
    * ``dtype``: the layers are created in torch's default dtype and then cast (so a float64 model
      has the float32 initial values), None leaves them uncast.

    Only the Linear layers draw from the RNG, in order, so a given ``widths``/``bias``/``seed``
    always gives the same values whatever the activations and norms.
    """
    n = len(widths) - 1
    biases = list(bias) if isinstance(bias, (list, tuple)) else [bias] * n
    if len(biases) != n:
        raise ValueError(f"bias={bias!r}: one flag per Linear layer ({n}) expected")
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(n):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=biases[i]))
        if i in norm_after:
            layers.append(nn.LayerNorm(widths[i + 1]))
        if i < n - 1:
            layers.append(act())
    model = nn.Sequential(*layers)
    return model if dtype is None else model.to(dtype)


class TokenMean(nn.Module):
    """Mean over the token dimension: (B, T, d) -> (B, d)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def pooled_sequence_net() -> nn.Sequential:
    """Linear layers on (B, T, 4) (R = T positions each; the middle one without bias), mean over
    tokens, a final Linear to 3 outputs. Uses the global RNG as set by the caller."""
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5, bias=False), nn.Tanh(), TokenMean(),
                         nn.Linear(5, 3))


def strided_cnn(outputs: int) -> nn.Sequential:
    """Two Conv2d layers on (N, 2, 6, 7) inputs (padding; then stride, rectangular kernel,
    dilation, no bias), Flatten, a Linear to ``outputs``. Uses the global RNG as set by the caller."""
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(3, 4, (2, 3), stride=2, padding=(1, 0), dilation=(1, 2), bias=False), nn.Tanh(),
                         nn.Flatten(), nn.Linear(32, outputs))


class SharedLinearSequence(nn.Module):
    """(B, T, 5) -> (B, 3): Linear layers shared over positions, then mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.mix = nn.Linear(8, 8, bias=False)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.mix(h))
        return self.out(h).mean(1)


def _compile_mlp(dtype: torch.dtype) -> nn.Module:
    return make_mlp([5, 7, 6, 3], norm_after=(1,), seed=0, dtype=dtype)


def _compile_conv(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).to(dtype)


def _compile_sequence(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return SharedLinearSequence().to(dtype)


# The three layer kinds of the torch.compile tests: kind -> (builder(dtype), input shape of one example).
# (N, d) Linear (with a LayerNorm), Conv2d, (B, T, d) sequence; every model has 3 outputs.
COMPILE_MODELS: dict[str, tuple[Callable[[torch.dtype], nn.Module], tuple[int, ...]]] = {
    "linear": (_compile_mlp, (5,)),
    "conv2d": (_compile_conv, (2, 5, 5)),
    "sequence": (_compile_sequence, (4, 5)),
}


def compile_batch(kind: str, n: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A batch for ``COMPILE_MODELS[kind]`` (generator seed ``100 + seed``)."""
    return seeded_batch(n, COMPILE_MODELS[kind][1], 3, 100 + seed, dtype)


# ---------------------------------------------------------------------------------------------
# data, losses
# ---------------------------------------------------------------------------------------------
def seeded_batch(n: int, x_shape: Sequence[int], y_dim: int, seed: int, dtype: torch.dtype = torch.float64
                 ) -> tuple[Tensor, Tensor]:
    """Standard-normal inputs (n, *x_shape) and targets (n, y_dim) from one generator seeded with
    ``seed`` (inputs first), drawn in float64 and then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *x_shape), generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(n, y_dim, generator=g, dtype=torch.float64).to(dtype)
    return x, y


def half_mse(out: Tensor, y: Tensor) -> Tensor:
    """½ mean_n ‖out_n − y_n‖² (the mean over the first dimension, summed over the rest)."""
    return (out - y).square().sum() / (2 * out.shape[0])


def mean_ce(out: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy averaged over all positions: for (B, T, C) outputs ℓ_n is example n's mean
    over its T tokens and L = mean_n ℓ_n still holds."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# ---------------------------------------------------------------------------------------------
# exact-step settings and the F̂ a layer's state implies
# ---------------------------------------------------------------------------------------------
# With these, one step() changes each preconditioned layer by exactly -lr·(F̂ + λI)⁻¹ ∇L.
EXACT_STEP = dict(momentum=0.0, weight_decay=0.0, factor_decay=0.0, eigen_every=1, kl_clip=None)


def preconditioned(model: nn.Module) -> list[nn.Module]:
    """The model's Linear and Conv2d modules, in module order."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def grad_matrix_of(module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``[W | b]``-shaped (d_out, d_in̄) matrix from weight-like and bias-like tensors of ``module``."""
    w = weight.reshape(module.weight.shape[0], -1)
    return w if bias is None else torch.cat([w, bias.reshape(-1, 1)], dim=1)


def library_fhat(curv, curvature: str) -> Tensor:
    """The F̂ a layer's stored state implies, over the column-major vec of ``[W | b]``: K-FAC
    ``A ⊗ G``; EKFAC/TEKFAC ``(Q_A ⊗ Q_G) diag(vec S) (Q_A ⊗ Q_G)ᵀ``."""
    if curvature == "kfac":
        return torch.kron(curv.in_factor, curv.out_factor)
    return kron_basis_matrix(curv.q_in, curv.q_out, curv.scaling)


# ---------------------------------------------------------------------------------------------
# curvlinops (the test-only reference installed from tests/oracle-requirements.txt)
# ---------------------------------------------------------------------------------------------
def curvlinops_dense(cls, model: nn.Module, loss_fn: nn.Module, X: Tensor, Y: Tensor, fisher_type: str) -> Tensor:
    """curvlinops' K-FAC/EKFAC operator ``cls`` (K-FAC-expand, weight and bias together, mean
    loss) as a dense float64 matrix over all trainable parameters, in curvlinops' row order."""
    params = [p for p in model.parameters() if p.requires_grad]
    op = cls(model, loss_fn, params, [(X, Y)], fisher_type=fisher_type, kfac_approx="expand",
             separate_weight_and_bias=False, check_deterministic=False)
    return op @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)


def layer_indices(model: nn.Module, module: nn.Module) -> Tensor:
    """Rows of curvlinops' matrix, in the library's order: entry ``j·d_out + i`` (column-major
    vec of ``[W | b]``) maps to W[i, j]'s row-major position (j < d_in) or to b[i]."""
    offsets, start = {}, 0
    for p in model.parameters():
        offsets[p] = start
        start += p.numel()
    d_out, d_in = module.weight.shape[0], module.weight[0].numel()
    idx = [offsets[module.weight] + i * d_in + j if j < d_in else offsets[module.bias] + i
           for j in range(d_in + int(module.bias is not None)) for i in range(d_out)]
    return torch.tensor(idx)


# ---------------------------------------------------------------------------------------------
# trajectories
# ---------------------------------------------------------------------------------------------
def curvature_tensors(opt) -> list[Tensor]:
    """Each preconditioned layer's factors, then its scaling and bases where it has them."""
    tensors = []
    for layer in opt.preconditioner.layers:
        c = layer.curvature
        tensors += [c.in_factor, c.out_factor] + [t for t in (c.scaling, c.q_in, c.q_out) if t is not None]
    return tensors


def train_in_lockstep(model: nn.Module, opt, ref_model: nn.Module, ref, make_data, loss_fn, steps: int, what: str,
                      tol: float) -> None:
    """Step the library's optimizer and a reference implementation on the same batches
    (``make_data(generator)``, generator seed 1); after every step each parameter of ``model``
    is within relative error ``tol`` (Frobenius) of ``ref_model``'s."""
    __tracebackhide__ = True
    g = torch.Generator().manual_seed(1)
    for k in range(steps):
        x, y = make_data(g)
        for mdl, o in ((model, opt), (ref_model, ref)):
            mdl.zero_grad()
            loss_fn(mdl(x), y).backward()
            o.step()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert_rel_close(p, q, tol, f"{what} step {k} {name}")


# MAC settings shared by the MAC tests: one exact step, and several steps with every feature on
MAC_EXACT_ONE = dict(lr=0.3, damping=0.7, momentum=0.0, weight_decay=0.0, factor_decay=0.0, factor_every=1,
                     eigen_every=1)
MAC_SEVERAL = dict(lr=0.2, damping=0.5, momentum=0.9, weight_decay=1e-2, factor_decay=0.9, factor_every=2,
                   eigen_every=4)
