"""What every layer adapter provides: the layer's per-position inputs ā and output-gradients ĝ,
and its gradient as one matrix ``[∇W | ∇b]`` (ARCHITECTURE.md, "Layer adapters")."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerBatch:
    """One mini-batch of a layer's curvature statistics, positions kept apart (K-FAC-expand).

    Attributes:
        a: (N, R, d_in) layer inputs per example n and position s, without the bias column; for
            one-hot inputs (``LayerAdapter.one_hot_inputs``) the (N, R) token indices instead, -1
            for a zero input row.
        g: (M·N, R, d_out) output-gradients ĝ_ns = ∂ℓ_n/∂z_ns of example n's own loss, i.e. N times
            the gradient of the mean loss that autograd delivers; None where the layer's
            output-gradients do not factor with its inputs (depthwise convolutions, which only
            curvatures reading the inputs alone support). M = ``draws`` output-gradients per
            example, draw-major (``g[j·N + n]``): 1 for the empirical Fisher, the MC samples or
            the type-2 columns otherwise (:mod:`ekfac_triton.fisher`); the statistics treat the
            (draw, example) pairs as M·N examples that share their inputs ā.
        draws: M.
        token_weights: (R,) attention layers only (MAC): p̄, the mean over examples,
            heads and queries of the attention probabilities of each position (token) as a key;
            None for other layers (ARCHITECTURE.md, "MAC").
    """

    a: Tensor
    g: Tensor | None
    draws: int = 1
    token_weights: Tensor | None = None

    @property
    def num_examples(self) -> int:
        return self.a.shape[0]

    def g_of_draw(self, j: int) -> Tensor:
        """(N, R, d_out): the output-gradients of draw ``j``."""
        n = self.num_examples
        return self.g[j * n: (j + 1) * n]

    @property
    def num_positions(self) -> int:
        return self.a.shape[1]


class MatrixLayout(NamedTuple):
    """Where a layer's parameters sit in its (d_out, d_in̄) matrix ``[∇W | ∇b]``: the weight as
    its first d_in columns, reshaped to the weight's shape (or, ``transposed``, their transpose: a
    weight stored (d_in, d_out), as an embedding's E = Wᵀ), the bias as the last column. Plain
    constants, so the compiled step splits with it too."""

    weight_shape: torch.Size
    d_in: int
    transposed: bool = False

    def part(self, matrix: Tensor, index: int) -> Tensor:
        """The weight (``index`` 0) or the bias (1) part of ``matrix``."""
        if index == 1:
            return matrix[:, self.d_in]
        weight = matrix[:, : self.d_in]
        return weight.T if self.transposed else weight.reshape(self.weight_shape)


class LayerAdapter(ABC):
    """Turns one module's captured tensors into a :class:`LayerBatch` and its gradients into a
    matrix, and writes a preconditioned matrix back. One subclass per layer kind."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        weight = module.weight
        bias = getattr(module, "bias", None)
        self.weight: nn.Parameter = weight
        # A frozen bias is a constant: it has no gradient and no column in the factors.
        self.bias: nn.Parameter | None = bias if bias is not None and bias.requires_grad else None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        """Input dimension without the bias column."""
        return self.weight[0].numel()

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    #: number of dimensions of one example's input (Linear: 1, Conv2d: 3); one more is a batch
    example_dims: int
    #: whether the inputs are one-hot vectors passed as indices (``nn.Embedding``): ``LayerBatch.a``
    #: is then (N, R) integer tokens, -1 for a zero row, and the curvature works in its one-hot mode
    one_hot_inputs: bool = False

    #: whether the compiled step covers this kind: dense inputs, and a gradient matrix and layout
    #: the compiled functions can take as they are (``EKFAC(..., compile_step=...)``)
    compiles: bool = False

    #: attention layers (MAC): the rows ``[start, stop)`` of the weight that project the values
    #: and get MAC's R_v; None for other layers
    value_rows: tuple[int, int] | None = None

    @property
    def hooked_module(self) -> nn.Module:
        """The module whose calls are captured (``module``, unless its input lives elsewhere)."""
        return self.module

    def read_call(self, args: tuple, kwargs: dict) -> tuple[Tensor, Any]:
        """The input tensor whose rows are captured from one call of :attr:`hooked_module`, and
        whatever else the adapter needs of that call (passed back to :meth:`batch` as ``record``)."""
        return args[0], None

    def num_examples(self, input_shape: torch.Size) -> int:
        """N, the number of examples in a call with inputs of this shape."""
        return input_shape[0] if len(input_shape) > self.example_dims else 1

    def input_rows(self, inputs: Tensor) -> Tensor:
        """The (N, R, d_in) rows ā (without the bias column) of one call's inputs."""
        return self.batch(inputs, None).a

    @abstractmethod
    def batch(self, inputs: Tensor, grad_output: Tensor | None, record: Any = None) -> LayerBatch:
        """Per-position ā and ĝ from the module's input and the gradient of the mean loss wrt its
        output (``grad_output=None``: the rows ā alone, ``g`` None); ``record``: what
        :meth:`read_call` returned for that call."""

    @abstractmethod
    def output_rows(self, grad_output: Tensor, n: int) -> Tensor:
        """The (N, R, d_out) rows ĝ (times N) of one output-gradient of a call with N examples."""

    def batch_draws(self, inputs: Tensor, grad_outputs: list[Tensor]) -> LayerBatch:
        """One batch from several output-gradients of the same forward (the curvature backward
        passes of :mod:`ekfac_triton.fisher`), stacked draw-major; ā computed once."""
        first = self.batch(inputs, grad_outputs[0])
        if len(grad_outputs) == 1:
            return first
        n = first.num_examples
        g = torch.cat([first.g] + [self.output_rows(go, n) for go in grad_outputs[1:]])
        return LayerBatch(a=first.a, g=g, draws=len(grad_outputs))

    def has_grad(self) -> bool:
        return self.weight.grad is not None

    def grad_matrix(self) -> Tensor:
        """``[∇W | ∇b]`` as a (d_out, d_in̄) matrix (a copy only when there is a bias)."""
        gw = self.weight.grad.reshape(self.d_out, -1)
        if self.bias is None:
            return gw
        gb = self.bias.grad if self.bias.grad is not None else torch.zeros_like(self.bias)
        return torch.cat([gw, gb.reshape(-1, 1)], dim=1)

    @property
    def layout(self) -> MatrixLayout:
        """Where the weight and bias sit in the ``[∇W | ∇b]`` matrix."""
        return MatrixLayout(self.weight.shape, self.d_in)

    def split(self, matrix: Tensor) -> list[Tensor]:
        """Split a (d_out, d_in̄) matrix into tensors shaped like the weight (and bias)."""
        layout = self.layout
        return [layout.part(matrix, index) for index in range(len(self.params))]

    def describe(self) -> str:
        return repr(self.module)
