"""K-FAC (Martens & Grosse 2015) in its eigenbasis form: ``F̂ = A ⊗ G``, and
``(A ⊗ G + λI)⁻¹ vec(∇W̄) = vec(Q_G [(Q_Gᵀ ∇W̄ Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ)``.

Optionally the factored (Tikhonov) damping of Martens & Grosse 2015, §6.3:
``((A + (λ/γ)I) ⊗ (G + γI))⁻¹``, i.e. ``U = (G + γI)⁻¹ ∇W̄ (A + (λ/γ)I)⁻¹``, with
``γ = sqrt(λ · (tr G / d_out) / (tr A / d_in̄))`` (π-damping: the damping split so that both
factors get the same relative share) or ``γ = sqrt(λ)``. With one position per example its whole
direction has an ``N·d²`` form, ``U = Σ_n ((G + γI)⁻¹ ĝ_n)((A + (λ/γ)I)⁻¹ ā_n)ᵀ / N``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import ops
from .base import CurvatureOptions
from .eigenbasis import EigenbasisCurvature

#: the factored damping's splits (None: the exact ``λ_G λ_Aᵀ + λ`` damping)
FACTORED_DAMPINGS = ("pi", "sqrt")


@dataclass(frozen=True, kw_only=True)
class KFACOptions(CurvatureOptions):
    """K-FAC's options.

    Attributes:
        factored_damping: None (the default): the exact damping ``(A ⊗ G + λI)⁻¹``; ``"pi"``: the
            factored damping ``((A + (λ/γ)I) ⊗ (G + γI))⁻¹`` with ``γ = sqrt(λ·(tr G/d_out)/(tr
            A/d_in̄))`` (π-damping, Martens & Grosse 2015 §6.3; γ = sqrt(λ) where a trace is 0);
            ``"sqrt"``: the same with ``γ = sqrt(λ)``. The traces are those of the eigenvalues
            of the current basis (clamped at 0).
    """

    factored_damping: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factored_damping is not None and self.factored_damping not in FACTORED_DAMPINGS:
            raise ValueError(f"Invalid factored_damping={self.factored_damping!r}: must be None or one of "
                             f"{FACTORED_DAMPINGS}")


def factored_inverses(out_eigenvalues: Tensor, in_eigenvalues: Tensor, damping: ops.Scalar, split: str
                      ) -> tuple[Tensor, Tensor]:
    """``(1/(λ_G + γ), 1/(λ_A + λ/γ))``, the eigenvalues of ``(G + γI)⁻¹`` and ``(A + (λ/γ)I)⁻¹``
    (Martens & Grosse 2015, §6.3; ``split``: ``"pi"`` or ``"sqrt"``, see :class:`KFACOptions`)."""
    e_out, e_in = out_eigenvalues.clamp_min(0), in_eigenvalues.clamp_min(0)
    root = torch.as_tensor(damping, dtype=e_out.dtype, device=e_out.device).sqrt()
    gamma = root
    if split == "pi":
        mean_out, mean_in = e_out.mean(), e_in.mean()
        usable = (mean_out > 0) & (mean_in > 0)
        ratio = torch.where(usable, mean_out / torch.where(usable, mean_in, 1.0), 1.0)
        gamma = root * ratio.sqrt()
    return (e_out + gamma).reciprocal(), (e_in + root * root / gamma).reciprocal()


class FactoredDampingDirection(NamedTuple):
    """``(G + γI)⁻¹ ∇W̄ (A + (λ/γ)I)⁻¹`` for one layer, ``scalars[at] = λ``: from the gradient,
    ``Q_G [(Q_Gᵀ ∇W̄ Q_A) ⊙ d_G d_Aᵀ] Q_Aᵀ``, or from ``rows = (ĝ, ā)`` with ``∇W̄ = ĜᵀĀ/N``
    exactly (the step's guard checked it), ``XᵀY/N`` with ``X = (ĜQ_G) diag(d_G) Q_Gᵀ`` and
    ``Y = (ĀQ_A) diag(d_A) Q_Aᵀ``: ``4N(d_out² + d_in̄²) + 2N·d_out·d_in̄`` flops instead of
    ``4·d_out·d_in̄·(d_out + d_in̄)``."""

    grad: Tensor
    q_out: Tensor
    q_in: Tensor | None  # None: one-hot inputs, the identity basis
    out_eigenvalues: Tensor
    in_eigenvalues: Tensor
    at: int
    split: str
    rows: tuple[Tensor, Tensor] | None
    bias: bool

    def run(self, scalars: Any, finite: Tensor | None, backend: str) -> Tensor:
        d_out, d_in = factored_inverses(self.out_eigenvalues, self.in_eigenvalues, scalars[self.at], self.split)
        if self.rows is not None:
            gq, aq = ops.example_projections(*self.rows, self.q_out, self.q_in, bias=self.bias)
            x = (gq * d_out) @ self.q_out.T
            y = (aq * d_in) @ self.q_in.T
            return (x.T @ y).div_(gq.shape[0])
        projected = self.q_out.T @ self.grad.to(self.q_out.dtype)
        if self.q_in is not None:
            projected = projected @ self.q_in
        projected.mul_(d_out[:, None]).mul_(d_in[None, :])
        projected = self.q_out @ projected
        return projected if self.q_in is None else projected @ self.q_in.T


class KFACCurvature(EigenbasisCurvature):
    """A = E[ā āᵀ], G = E[ĝ ĝᵀ]; the scaling is the eigenvalue products, never estimated."""

    name = "kfac"
    Options = KFACOptions
    estimates_scaling = False

    def rows_pay(self, num_examples: int) -> bool:
        split = self.options.factored_damping
        if split is None or self.shape.one_hot:
            return super().rows_pay(num_examples)
        d_out, d_in, n = self.shape.d_out, self.shape.d_in_bar, num_examples
        return 2 * n * (d_out * d_out + d_in * d_in) + n * d_out * d_in < 2 * d_out * d_in * (d_out + d_in)

    def direction_job(self, grad: Tensor, damping: float, num_examples: int, decay: float,
                      scalars: list[float]) -> Any:
        split = self.options.factored_damping
        if split is None:
            return super().direction_job(grad, damping, num_examples, decay, scalars)
        rows = None if self.rows is None else (self.rows.g[:, 0], self.rows.a[:, 0])
        self.last_projection = "rows" if rows is not None else "gradient"
        self.rows = None
        at = len(scalars)
        scalars.append(damping)
        return FactoredDampingDirection(grad, self.q_out, self.q_in, self.out_eigenvalues, self.in_eigenvalues, at,
                                        split, rows, self.shape.bias)
