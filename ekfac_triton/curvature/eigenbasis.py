"""The curvatures that precondition in a Kronecker-factored eigenbasis (K-FAC, EKFAC, TEKFAC):
their per-layer state, its bookkeeping, and the jobs that do its tensor work.

A layer keeps an input-side factor (A, or TEKFAC's Φ) and an output-side factor (G, or Ψ) as
bias-corrected EMAs, their eigenbases, and the scaling S that divides the projected gradient
(George et al. 2018, Alg. 1):

    ΔW̄ ∝ Q_out [ (Q_outᵀ ∇W̄ Q_in) / (S + λ) ] Q_inᵀ

Subclasses say how the factors are weighted and whether S is estimated: K-FAC's eigenvalue
products, EKFAC's diagonal, TEKFAC's diagonal in the trace-weighted basis. The normalisations
follow K-FAC-expand (ARCHITECTURE.md, "Weight sharing"): ``A = 1/(N·R) Σ_ns ā āᵀ`` and
``G = 1/(N·M) Σ_jns ĝ ĝᵀ`` (M draws of the output-gradients per example for the MC and type-2
Fisher, 1 for the empirical one).
"""

from __future__ import annotations

import dataclasses

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .. import ops
from ..eigen import Eigh
from ..layers import LayerBatch
from . import one_hot
from .base import AccumulatedEMA, Curvature, CurvatureOptions, Direction, LayerShape, RefreshRequest, ema_weights

if TYPE_CHECKING:
    from ..eigen_engine import Decomposition, EigenEngine

#: ``(a, g, dtype, bias, one_hot, draws) -> (input-row weights, output-row weights)``
RowWeights = Callable[[Tensor, Tensor, torch.dtype, bool, bool, int], tuple[Tensor, Tensor]]


# -- the jobs: pure tensor work, run eagerly or inside torch.compile -----------------------------------
class FactorJob(NamedTuple):
    """The factor EMAs of one layer: ``A <- β A + α_A Σ w_in ā āᵀ``, ``G <- β G + α_G Σ w_out ĝ ĝᵀ``
    with ``(β, α_A, α_G) = scalars[at:at+3]``."""

    in_factor: Tensor
    out_factor: Tensor
    a: Tensor
    g: Tensor
    at: int
    bias: bool
    one_hot: bool
    draws: int
    row_weights: RowWeights | None  # TEKFAC's trace weights; None: unweighted

    def mutated(self) -> tuple[Tensor, ...]:
        return self.in_factor, self.out_factor

    def run(self, scalars: Any, finite: Tensor | None, backend: str) -> None:
        beta, alpha_in, alpha_out = scalars[self.at], scalars[self.at + 1], scalars[self.at + 2]
        w_in = w_out = None
        if self.row_weights is not None:
            w_in, w_out = self.row_weights(self.a, self.g, self.in_factor.dtype, self.bias, self.one_hot, self.draws)
        if self.one_hot:
            one_hot.factor_update(self.in_factor, self.a, alpha=alpha_in, beta=beta, weights=w_in, finite=finite)
        else:
            ops.factor_update(self.in_factor, self.a, alpha=alpha_in, beta=beta, bias=self.bias, weights=w_in,
                              finite=finite, backend=backend)
        ops.factor_update(self.out_factor, self.g, alpha=alpha_out, beta=beta, bias=False, weights=w_out,
                          finite=finite, backend=backend)


class ScalingJob(NamedTuple):
    """EKFAC's scaling EMA of one layer from its per-example gradients (George et al. 2018,
    Eq. 9-10): ``S <- β S + α Σ_jn (Σ_s (Q_outᵀ ĝ_jns)(Q_inᵀ ā_ns)ᵀ)²`` with
    ``(β, α) = scalars[at:at+2]``, α already divided by the N·M (draw, example) pairs."""

    scaling: Tensor
    g: Tensor
    a: Tensor
    q_out: Tensor
    q_in: Tensor | None
    at: int
    bias: bool
    one_hot: bool
    per_position: bool
    draws: int
    #: (d_out, d_in̄) scratch that receives ``Q_outᵀ ∇W̄ Q_in = (ĜQ_out)ᵀ(ĀQ_in)/N`` from the same
    #: projections (one position per example and draw, the step's guard having established
    #: ``∇W̄ = ĜᵀĀ/N``; ARCHITECTURE.md, "The projected gradient from the rows"); None: not wanted
    projected: Tensor | None = None

    def mutated(self) -> tuple[Tensor, ...]:
        return (self.scaling,)

    def run(self, scalars: Any, finite: Tensor | None, backend: str) -> None:
        beta, alpha = scalars[self.at], scalars[self.at + 1]
        if self.projected is not None:
            # the reference's R = 1 formula, its projections kept for the direction (plain torch)
            gq, aq = ops.example_projections(self.g[:, 0], self.a[:, 0], self.q_out, self.q_in, bias=self.bias)
            ops.per_example_scaling_rows(self.scaling, gq, aq, alpha=alpha, beta=beta, finite=finite)
            ops.projected_gradient(gq, aq, out=self.projected)
            return
        a, m = self.a, self.draws
        if self.per_position:  # positions as examples: an approximation
            a = a.reshape(-1, 1, a.shape[-1])
        if m > 1 and a.shape[1] == 1 and not self.one_hot:
            self._fold_draws(a[:, 0], beta, alpha, finite)
            return
        n = self.a.shape[0]
        for j in range(m):  # one call per draw: ā is never repeated M times
            g = self.g[j * n:(j + 1) * n]
            if self.per_position:
                g = g.reshape(-1, 1, g.shape[-1])
            beta_j = beta if j == 0 else 1.0
            if self.one_hot:
                one_hot.scaling_update(self.scaling, g, a.reshape(g.shape[:2]), self.q_out, alpha=alpha, beta=beta_j,
                                       finite=finite)
            else:
                ops.per_example_scaling(self.scaling, g, a, self.q_out, self.q_in, alpha=alpha, beta=beta_j,
                                        bias=self.bias, finite=finite, backend=backend)

    def _fold_draws(self, a: Tensor, beta: Any, alpha: Any, finite: Tensor | None) -> None:
        """One position per example and M draws: ``Σ_j ((Q_outᵀ ĝ_jn)(Q_inᵀ ā_n)ᵀ)²`` factors as
        ``(Σ_j (Q_outᵀ ĝ_jn)²)(Q_inᵀ ā_n)²ᵀ``, so the draws fold into one GEMM instead of M (type-2
        with 784 outputs: 784 times fewer; plain torch whatever the backend)."""
        dtype = self.scaling.dtype
        g = self.g.reshape(self.draws, a.shape[0], -1)
        g_sq = (g.to(dtype) @ self.q_out).square().sum(0)                  # (N, d_out)
        a = a.to(dtype)
        if self.bias:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        ops.ema(self.scaling, g_sq.T @ (a @ self.q_in).square(), beta, alpha, finite)


class EigenbasisDirection(NamedTuple):
    """``Q_out [(Q_outᵀ G Q_in) / (S + λ)] Q_inᵀ`` for one layer's gradient matrix G, with
    ``scalars[at:at+3] = (λ, β, α·N)``; ``batch``: EKFAC's batch scaling, S first updated with
    ``β S + α·N·P²``; ``effective_damping``: TEKFAC's ``max(mean S, λ)`` (Gao et al. 2020,
    Eq. 3.5), from S before its update."""

    grad: Tensor
    q_out: Tensor
    q_in: Tensor | None
    scaling: Tensor
    at: int
    batch: bool
    effective_damping: bool
    one_hot: bool
    #: ``Q_outᵀ ∇W̄ Q_in`` already formed by this step's scaling job (overwritten here), or None
    projected: Tensor | None = None
    #: ``(ĝ, ā)``, (N, d_out) and (N, d_in) rows with ``∇W̄ = ĜᵀĀ/N`` exactly (the step's guard
    #: checked it): the projection is formed from them, ``2N(d_out² + d_in̄² + d_out·d_in̄)``
    #: flops; None: from ``grad``
    rows: tuple[Tensor, Tensor] | None = None
    #: whether ``rows``' inputs get the bias column
    bias: bool = False

    def mutated(self) -> tuple[Tensor, ...]:
        return (self.scaling,) if self.batch else ()

    def run(self, scalars: Any, finite: Tensor | None, backend: str) -> Tensor:
        damping = scalars[self.at]
        if self.effective_damping:
            damping = self.scaling.mean().clamp_min(damping)
        batch_update = (scalars[self.at + 1], scalars[self.at + 2]) if self.batch else None
        projected = self.projected
        if projected is None and self.rows is not None:
            gq, aq = ops.example_projections(*self.rows, self.q_out, self.q_in, bias=self.bias)
            projected = ops.projected_gradient(gq, aq)
        if projected is not None:
            return ops.precondition_projected(projected, self.q_out, self.q_in, self.scaling, damping,
                                              batch_update=batch_update, finite=finite)
        grad = self.grad.to(self.q_out.dtype)
        if self.one_hot:
            return one_hot.precondition(grad, self.q_out, self.scaling, damping, batch_update=batch_update,
                                        finite=finite)
        return ops.precondition(grad, self.q_out, self.q_in, self.scaling, damping, batch_update=batch_update,
                                finite=finite, backend=backend)


def _identity_eigh(factor: Tensor) -> Eigh:
    if factor.dim() == 1:  # a diagonal factor is its own eigendecomposition
        return Eigh(factor.clone(), None)
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    return Eigh(factor.diagonal().clone(), eye)


# -- the state --------------------------------------------------------------------------------------
class EigenbasisCurvature(Curvature):
    """Per-layer state and bookkeeping of a Kronecker-eigenbasis preconditioner.

    Args:
        shape: the layer's dimensions.
        dtype, device: where the factors, bases and scalings live (float32 or float64).
        options: the curvature's options (``scaling``: see :class:`CurvatureOptions`).
    """

    #: the trust region of the defaults (config.py, kl_clip; measured in ARCHITECTURE.md,
    #: "Default hyperparameters")
    default_kl_clip = 1e-3

    #: whether S is estimated (EKFAC, TEKFAC) rather than derived from the eigenvalues (K-FAC)
    estimates_scaling: ClassVar[bool] = True
    compiles: ClassVar[bool] = True
    #: the factor rows' weights (TEKFAC's trace weights), or None
    row_weights: ClassVar[RowWeights | None] = None

    #: dtype of the bases, eigenvalues and scaling (None: the factors'); the preconditioner sets it
    basis_dtype: torch.dtype | None = None
    #: copy a new basis, eigenvalues and scaling into the existing tensors instead of replacing
    #: them (set by the CUDA-graph compiled step, whose graphs read them at fixed addresses)
    install_in_place: bool = False

    _TENSORS = ("in_factor", "out_factor", "in_eigenvalues", "out_eigenvalues", "q_in", "q_out", "scaling")
    _COUNTS = ("factor_updates", "scaling_updates")

    def __init__(self, shape: LayerShape, dtype: torch.dtype, device: torch.device,
                 options: CurvatureOptions | None = None):
        self.options = options or self.Options()
        self.shape = shape
        self.scaling_mode = self.options.scaling
        in_shape = (shape.d_in_bar,) if shape.one_hot else (shape.d_in_bar, shape.d_in_bar)
        self.in_factor = torch.zeros(in_shape, dtype=dtype, device=device)
        self.out_factor = torch.zeros(shape.d_out, shape.d_out, dtype=dtype, device=device)
        self.in_eigenvalues: Tensor | None = None
        self.out_eigenvalues: Tensor | None = None
        self.q_in: Tensor | None = None
        self.q_out: Tensor | None = None
        self.scaling: Tensor | None = None
        self.factor_updates = 0
        self.scaling_updates = 0
        #: this step's captured batch when the step's guard established ``∇W̄ = ĜᵀĀ/N`` and the
        #: row form pays (:meth:`rows_pay`); set by the step before the scaling jobs, consumed by
        #: :meth:`direction_job`
        self.rows: LayerBatch | None = None
        self._projected: Tensor | None = None
        #: how the last direction's projection was formed: ``"rows"``, ``"gradient"`` or None
        self.last_projection: str | None = None

    def rows_pay(self, num_examples: int) -> bool:
        """Whether forming ``Q_outᵀ ∇W̄ Q_in`` from the rows of a batch of ``num_examples`` (one
        position each) costs fewer flops than from the gradient matrix: ``2N·d_out·d_in̄`` (plus
        ``2N(d_out² + d_in̄²)`` for the projections themselves when no per-example scaling forms
        them) against ``2·d_out·d_in̄·(d_in̄ + d_out)``."""
        if self.shape.one_hot:
            return False
        d_out, d_in, n = self.shape.d_out, self.shape.d_in_bar, num_examples
        rows = n * d_out * d_in + (0 if self.estimates_per_example else n * (d_out * d_out + d_in * d_in))
        return rows < d_out * d_in * (d_in + d_out)

    @property
    def estimates_per_example(self) -> bool:
        """Whether S is estimated from per-example gradients (on statistics steps)."""
        return self.estimates_scaling and self.scaling_mode != "batch"

    @property
    def estimates_from_batch(self) -> bool:
        """Whether S is estimated from the mini-batch gradient (on every step)."""
        return self.estimates_scaling and self.scaling_mode == "batch"

    # -- statistics ---------------------------------------------------------------------------
    def next_factor_weights(self, decay: float) -> tuple[float, float]:
        """Count one factor update; its EMA weights ``(beta, alpha)`` (:func:`ema_weights`)."""
        self.factor_updates += 1
        return ema_weights(decay, self.factor_updates)

    def next_scaling_weights(self, decay: float) -> tuple[float, float]:
        """Count one update of the estimated scaling S; its EMA weights ``(beta, alpha)``."""
        self.scaling_updates += 1
        return ema_weights(decay, self.scaling_updates)

    @property
    def has_statistics(self) -> bool:
        return self.factor_updates > 0

    def statistics_job(self, batch: LayerBatch, decay: float, scalars: list[float]) -> FactorJob:
        beta, alpha = self.next_factor_weights(decay)
        n, r = batch.num_examples, batch.num_positions
        at = len(scalars)
        scalars += [beta, alpha / (n * r), alpha / (n * batch.draws)]
        return FactorJob(self.in_factor, self.out_factor, batch.a, batch.g, at, self.shape.bias, self.shape.one_hot,
                         batch.draws, type(self).row_weights)

    def first_update_due(self) -> bool:
        return self.factor_updates == 0 or (self.estimates_per_example and self.scaling_updates == 0)

    def statistics(self) -> tuple[Tensor, ...]:
        return self.in_factor, self.out_factor

    def refreshed_statistics(self) -> tuple[Tensor, ...]:
        # the per-example / per-position scalings; the ``batch`` one comes from the averaged gradient
        return (self.scaling,) if self.estimates_per_example else ()

    # -- eigenbasis -----------------------------------------------------------------------------
    @property
    def has_basis(self) -> bool:
        return self.q_out is not None  # q_in stays None for one-hot inputs (the identity)

    def refresh_cost(self) -> float:
        return float((0 if self.shape.one_hot else self.shape.d_in_bar ** 3) + self.shape.d_out ** 3)

    def refresh_due(self, engine: EigenEngine, index: int, step: int) -> bool:
        return not self.has_basis or engine.due(index, step)

    def refresh(self, engine: EigenEngine, index: int) -> RefreshRequest:
        """Ask for the eigendecomposition of the factors: now for the first basis or a synchronous
        engine, else on the engine's worker (installed at a later step through :meth:`install`)."""
        warm = engine.warm_basis(index, self.q_in, self.q_out)
        return RefreshRequest(index, self.in_factor, self.out_factor, warm,
                              not self.has_basis or engine.synchronous)

    def install(self, result: Decomposition) -> str | None:
        """Install a finished decomposition; returns its failure note, if any."""
        had_basis = self.has_basis
        installed = self.install_basis(result.new_in, result.new_out)
        if not result.note:
            return None
        if installed:
            return result.note
        return result.note + ("; keeping the previous basis" if had_basis else
                              "; using the identity basis with the factors' diagonals (a diagonal approximation)")

    def installs_in_place(self) -> tuple[Tensor, ...]:
        if not self.install_in_place:
            return ()
        return tuple(t for t in (self.q_in, self.q_out, self.in_eigenvalues, self.out_eigenvalues, self.scaling)
                     if t is not None)

    def install_basis(self, new_in: Eigh | None, new_out: Eigh | None) -> bool:
        """Install freshly computed eigendecompositions of the factors (None: that one failed).

        On success the scaling is re-initialised to the K-FAC eigenvalue products in the new basis
        and its EMA restarts, so the next estimate replaces it. If either failed, the previous basis
        and scaling are kept; a layer that never had a basis gets the identity basis with the
        factors' diagonals as eigenvalues (a diagonal approximation). Returns whether the new
        basis was installed.
        """
        if new_in is not None and new_out is not None:
            self._set_basis(new_in, new_out)
            return True
        if not self.has_basis:
            self._set_basis(_identity_eigh(self.in_factor), _identity_eigh(self.out_factor))
        return False

    def _basis_dtype(self) -> torch.dtype:
        return self.basis_dtype or self.in_factor.dtype

    def _set_basis(self, e_in: Eigh, e_out: Eigh) -> None:
        dtype = self._basis_dtype()
        # q_in stays None for one-hot inputs (the identity basis)
        self._put("q_in", None if e_in.vectors is None else e_in.vectors.to(dtype))
        self._put("in_eigenvalues", e_in.values.to(dtype))
        self._put("q_out", e_out.vectors.to(dtype))
        self._put("out_eigenvalues", e_out.values.to(dtype))
        self._put("scaling", self.eigenvalue_products())
        self.scaling_updates = 0

    def _put(self, name: str, value: Tensor | None) -> None:
        old = getattr(self, name)
        if self.install_in_place and old is not None and value is not None and old.shape == value.shape:
            old.copy_(value)  # CUDA graphs read these tensors at fixed addresses
        else:
            setattr(self, name, value)

    def eigenvalue_products(self) -> Tensor:
        """K-FAC's scaling ``λ_out λ_inᵀ`` (eigenvalues clamped at 0: the factors are PSD)."""
        return torch.outer(self.out_eigenvalues.clamp_min(0), self.in_eigenvalues.clamp_min(0))

    # -- scaling and preconditioning ------------------------------------------------------------
    def scaling_job(self, batch: LayerBatch, decay: float, scalars: list[float]) -> ScalingJob | None:
        """The per-example / per-position S update in the current basis (the ``batch`` mode
        updates S in its direction job). With M draws per example the (draw, example) pairs are
        the examples: ``1/(N·M) Σ_jn (...)²``."""
        if not self.estimates_per_example:
            return None
        beta, alpha = self.next_scaling_weights(decay)
        at = len(scalars)
        scalars += [beta, alpha / (batch.num_examples * batch.draws)]
        self._projected = None
        if self.rows is batch:  # the direction reuses this job's projections
            self._projected = torch.empty_like(self.scaling)
        return ScalingJob(self.scaling, batch.g, batch.a, self.q_out, self.q_in, at, self.shape.bias,
                          self.shape.one_hot, self.scaling_mode == "per_position", batch.draws, self._projected)

    # -- gradient accumulation (ARCHITECTURE.md, "Gradient accumulation") ------------------------
    @property
    def projects_examples(self) -> bool:  # type: ignore[override]
        return self.estimates_per_example

    def fold(self, sums: dict[str, Any], batch: LayerBatch, num_examples: int, *, factors: bool,
             scaling: bool) -> None:
        """The factor sums ``Σ w_in ā āᵀ / R`` and ``Σ w_out g gᵀ`` and the projection sum
        ``Σ_n (Σ_s (Q_outᵀ g)(Q_inᵀ ā)ᵀ)²`` of one micro-batch, g = ĝ / n its autograd
        output-gradients: the same jobs as one batch, with ``β = 1`` into the sums and the batch's
        1/n² (g is quadratic in every term; TEKFAC's ‖ĝ‖² input weights too) in α."""
        inv_sq = 1.0 / (num_examples * num_examples)
        if factors:
            a_in = sums.setdefault("in", torch.zeros_like(self.in_factor))
            a_out = sums.setdefault("out", torch.zeros_like(self.out_factor))
            weighted = type(self).row_weights is not None
            job = FactorJob(a_in, a_out, batch.a, batch.g, 0, self.shape.bias, self.shape.one_hot, batch.draws,
                            type(self).row_weights)
            job.run([1.0, (inv_sq if weighted else 1.0) / batch.num_positions, inv_sq], None, self.backend)
        if scaling and self.estimates_per_example:
            total = sums.setdefault("scaling", torch.zeros_like(self.scaling))
            job = ScalingJob(total, batch.g, batch.a, self.q_out, self.q_in, 0, self.shape.bias, self.shape.one_hot,
                             self.scaling_mode == "per_position", batch.draws)
            job.run([1.0, inv_sq], None, self.backend)

    def accumulated_statistics_job(self, sums: dict[str, Any], num_examples: int, decay: float,
                                   scalars: list[float]) -> AccumulatedEMA:
        """The factor EMAs from the sums: ĝ = N·g, so G gets ``α N² / (N·M) = α N / M`` (one
        draw: M = 1), A ``α / N`` and TEKFAC's Φ (weights ‖ĝ‖² = N²‖g‖²) ``α N``."""
        beta, alpha = self.next_factor_weights(decay)
        n = num_examples
        at = len(scalars)
        scalars += [beta, alpha * n if type(self).row_weights is not None else alpha / n, alpha * n]
        return AccumulatedEMA((self.in_factor, self.out_factor), (sums["in"], sums["out"]), at)

    def accumulated_scaling_job(self, sums: dict[str, Any], num_examples: int, decay: float,
                                scalars: list[float]) -> AccumulatedEMA | None:
        """The per-example S from the projection sum: ``α N² / N = α N`` (ĝ = N·g)."""
        if not self.estimates_per_example:
            return None
        beta, alpha = self.next_scaling_weights(decay)
        at = len(scalars)
        scalars += [beta, alpha * num_examples]
        return AccumulatedEMA((self.scaling,), (sums["scaling"],), at)

    def basis_changes(self, engine: EigenEngine, index: int, step: int) -> bool:
        # an asynchronous refresh only submits on its due step (installed at a later one)
        return self.refresh_due(engine, index, step) and (not self.has_basis or engine.synchronous)

    def basis_token(self) -> Any:
        # a new basis is a new tensor, or (CUDA-graph steps) a copy into the old one: a new version
        return tuple((q, q._version) for q in (self.q_out, self.q_in) if q is not None) or None

    def direction_job(self, grad: Tensor, damping: float, num_examples: int, decay: float,
                      scalars: list[float]) -> EigenbasisDirection:
        """The direction; in ``batch`` mode S is first updated with ``num_examples · P²`` (EMA with
        ``decay``), unless ``num_examples`` is 0 (no backward reached the layer this step)."""
        beta = alpha_n = 0.0
        if self.estimates_from_batch and num_examples == 0:
            beta = 1.0  # no backward reached the layer this step: S stays as it is (1·S + 0·P²), uncounted
        elif self.estimates_from_batch:
            beta, alpha = self.next_scaling_weights(decay)
            alpha_n = alpha * num_examples
        at = len(scalars)
        scalars += [damping, beta, alpha_n]
        projected, rows = self._projected, None
        if projected is None and self.rows is not None:
            rows = (self.rows.g[:, 0], self.rows.a[:, 0])
        self.last_projection = "rows" if projected is not None or rows is not None else "gradient"
        self.rows = self._projected = None  # one step's
        return EigenbasisDirection(grad, self.q_out, self.q_in, self.scaling, at, self.estimates_from_batch,
                                   bool(getattr(self.options, "effective_damping", False)), self.shape.one_hot,
                                   projected, rows, self.shape.bias)

    # -- serialisation --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {k: getattr(self, k) for k in self._TENSORS}
        state.update({k: getattr(self, k) for k in self._COUNTS})
        state["curvature"] = self.name
        state["options"] = dataclasses.asdict(self.options)
        state["scaling_mode"] = self.scaling_mode
        return state

    def check_state(self, state: dict[str, Any], layer: str) -> None:
        super().check_state(state, layer)
        if state.get("scaling_mode", self.scaling_mode) != self.scaling_mode:
            raise ValueError(f"Invalid state_dict: layer {layer!r} was saved with scaling={state['scaling_mode']!r}, "
                             f"this optimizer uses scaling={self.scaling_mode!r}")
        missing = [k for k in (*self._TENSORS, *self._COUNTS) if k not in state]
        if missing:
            raise ValueError(f"Invalid state_dict: layer {layer!r} lacks the fields {missing}")
        d_out, d_in = self.shape.d_out, self.shape.d_in_bar
        one_hot = self.shape.one_hot
        shapes = {"in_factor": (d_in,) if one_hot else (d_in, d_in), "out_factor": (d_out, d_out),
                  "in_eigenvalues": (d_in,), "out_eigenvalues": (d_out,), "q_in": None if one_hot else (d_in, d_in),
                  "q_out": (d_out, d_out), "scaling": (d_out, d_in)}
        for k in self._TENSORS:
            dtype = self.in_factor.dtype if k.endswith("_factor") else self._basis_dtype()
            self.check_tensor(layer, k, state[k], shapes[k], dtype)
        if (state["q_out"] is None) != (state["scaling"] is None):
            raise ValueError(f"Invalid state_dict: layer {layer!r} has a basis without a scaling, or the reverse")
        for k in self._COUNTS:
            if not isinstance(state[k], int) or state[k] < 0:
                raise ValueError(f"Invalid state_dict: layer {layer!r} field {k!r}={state[k]!r} is not a count")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state, "?")
        device = self.in_factor.device
        for k in self._TENSORS:
            value = state[k]
            dtype = self.in_factor.dtype if k.endswith("_factor") else self._basis_dtype()
            setattr(self, k, None if value is None else value.to(device=device, dtype=dtype, copy=True))
        for k in self._COUNTS:
            setattr(self, k, int(state[k]))


__all__ = ["Direction", "EigenbasisCurvature", "EigenbasisDirection", "FactorJob", "ScalingJob"]
