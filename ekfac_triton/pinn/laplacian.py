"""The forward Laplacian: an MLP run in Taylor mode, as a network with shared weights over positions.

For a batch of N points x ∈ R^d the network carries, per point, S = d + 2 *positions*
(DESIGN §5, Dangel, Müller & Zeinhofer 2024):

* position 0: the value z;
* positions 1..d: the directional derivatives ∂_i z (first-layer inputs: the unit vectors e_i);
* position d + 1: the (weighted) Laplacian channel Σ_i c_i ∂_i² z (first-layer input: 0).

Every ``nn.Linear`` applies the same W at every position and its bias at the value position only,
so a layer's position inputs are ``ā_0 = [z; 1]`` and ``ā_s = [∂z or Δz; 0]`` (no bias column
when the layer has no bias). An elementwise σ maps the value to σ(z), the derivatives to
σ′(z)∂_i z and the Laplacian channel to ``σ′(z)Δz + σ″(z) Σ_i c_i (∂_i z)²``.

The weights ``c_i`` (``laplacian_weights``, default all ones) give the plain Laplacian, the
spatial-only one of a time-dependent problem (c_t = 0), or any diagonal second-order operator.
With ``derivatives=False`` only the value position is carried (S = 1): the ordinary forward pass,
used for boundary points.

Functional core (:func:`taylor_forward`) and a recording wrapper (:class:`ForwardLaplacian`): the
wrapper keeps each Linear's position inputs ā and output tensor, so that after a backward of the
residual the position output-gradients ĝ = ∂r_n/∂z_{n,s} are available (``Σ_s ĝ ⊗ ā`` is then the
exact per-point Jacobian of the residual with respect to that layer's [W | b]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

Derivatives = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def _tanh(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tanh(z)
    d1 = 1 - t * t
    return t, d1, -2 * t * d1


def _sigmoid(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(z)
    d1 = s * (1 - s)
    return s, d1, d1 * (1 - 2 * s)


def _relu(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    step = (z > 0).to(z.dtype)
    return z * step, step, torch.zeros_like(z)


#: elementwise activations: σ, σ′, σ″ at once (ReLU: σ″ = 0 away from the kink)
ACTIVATIONS: dict[type[nn.Module], Derivatives] = {nn.Tanh: _tanh, nn.Sigmoid: _sigmoid, nn.ReLU: _relu}


@dataclass(frozen=True)
class Taylor:
    """Value ``u`` (N,), gradient ``grad`` (N, d) and weighted Laplacian ``lap`` (N,) of a scalar
    network at N points (``grad``/``lap`` are None for a value-only pass). With batched weights
    (a leading grid dimension K) every tensor has that leading dimension too."""

    u: Tensor
    grad: Tensor | None
    lap: Tensor | None


@dataclass
class LayerRecord:
    """One Linear layer's position inputs ā (N, S, d_in [+1]) and outputs z (N, S, d_out), and the
    position output-gradients ĝ (N, S, d_out) once a backward has reached z."""

    inputs: Tensor
    outputs: Tensor
    grads: Tensor | None = None


Step = tuple[str, object]  # ("linear", (W, b|None)) or ("act", derivatives)


def parse_model(model: nn.Module) -> tuple[list[nn.Linear], list[Derivatives | None]]:
    """The Linear layers of an ``nn.Sequential`` MLP and, after each, its activation (None when
    two Linears follow each other). Raises ``ValueError`` for anything else."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"Invalid model of type {type(model).__name__}: must be an nn.Sequential of "
                         f"nn.Linear and elementwise activations ({', '.join(c.__name__ for c in ACTIVATIONS)})")
    linears: list[nn.Linear] = []
    acts: list[Derivatives | None] = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            linears.append(m)
            acts.append(None)
        elif type(m) in ACTIVATIONS:
            if not linears or acts[-1] is not None:
                raise ValueError(f"Invalid model: activation {m!r} at index {i} must follow an nn.Linear")
            acts[-1] = ACTIVATIONS[type(m)]
        else:
            raise ValueError(f"Invalid model: unsupported layer {m!r} at index {i}; the forward Laplacian "
                             f"supports nn.Linear and {', '.join(c.__name__ for c in ACTIVATIONS)}")
    if not linears:
        raise ValueError("Invalid model: it has no nn.Linear layer")
    if linears[-1].out_features != 1 or acts[-1] is not None:
        raise ValueError("Invalid model: the last layer must be an nn.Linear with out_features=1 (a scalar u)")
    return linears, acts


def first_positions(x: Tensor, derivatives: bool) -> Tensor:
    """The first layer's position inputs (N, S, d): x, the unit vectors e_i, 0."""
    n, d = x.shape
    if not derivatives:
        return x.unsqueeze(1)
    eye = torch.eye(d, dtype=x.dtype, device=x.device).expand(n, d, d)
    return torch.cat([x.unsqueeze(1), eye, x.new_zeros(n, 1, d)], dim=1)


def with_bias_column(h: Tensor) -> Tensor:
    """ā: append the bias input, 1 at the value position and 0 at every other position."""
    col = torch.zeros(*h.shape[:-1], 1, dtype=h.dtype, device=h.device)
    col[..., 0, :] = 1
    return torch.cat([h, col], dim=-1)


def linear_positions(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """z = W h at every position, + b at the value position. ``h`` is (..., N, S, d_in); ``weight``
    (d_out, d_in) or batched (K, d_out, d_in), with then ``h`` unbatched or (K, N, S, d_in)."""
    n_s = h.shape[-3:-1]
    flat = h.reshape(*h.shape[:-3], n_s[0] * n_s[1], h.shape[-1])
    z = flat @ weight.transpose(-1, -2)
    z = z.reshape(*z.shape[:-2], *n_s, z.shape[-1])
    if bias is None:
        return z
    b = bias.unsqueeze(-2).unsqueeze(-2)  # (..., 1, 1, d_out)
    return torch.cat([z[..., :1, :] + b, z[..., 1:, :]], dim=-2)


def activation_positions(z: Tensor, act: Derivatives, weights: Tensor | None) -> Tensor:
    """σ in Taylor mode: value σ(z), derivatives σ′(z)∂z, Laplacian σ′(z)Δz + σ″(z)Σ c_i(∂_i z)²."""
    s0, s1, s2 = act(z[..., 0, :])
    if z.shape[-2] == 1:
        return s0.unsqueeze(-2)
    d = z[..., 1:-1, :]
    curvature = torch.einsum("...ij,i->...j", d * d, weights)
    lap = s1 * z[..., -1, :] + s2 * curvature
    return torch.cat([s0.unsqueeze(-2), s1.unsqueeze(-2) * d, lap.unsqueeze(-2)], dim=-2)


def taylor_forward(params: Sequence[tuple[Tensor, Tensor | None]], acts: Sequence[Derivatives | None], x: Tensor,
                   laplacian_weights: Tensor, *, derivatives: bool = True,
                   records: list[LayerRecord] | None = None) -> Taylor:
    """Run the MLP ``params``/``acts`` (see :func:`parse_model`) in Taylor mode on points ``x``
    (N, d). Weights may carry a leading grid dimension K (then every output has it). When
    ``records`` is a list, each Linear's ā (detached) and z are appended to it."""
    h = first_positions(x, derivatives)
    for (weight, bias), act in zip(params, acts):
        z = linear_positions(h, weight, bias)
        if records is not None:
            a = h.detach()
            records.append(LayerRecord(with_bias_column(a) if bias is not None else a, z))
        h = z if act is None else activation_positions(z, act, laplacian_weights)
    out = h[..., 0]  # (..., N, S)
    if not derivatives:
        return Taylor(out[..., 0], None, None)
    return Taylor(out[..., 0], out[..., 1:-1], out[..., -1])


class ForwardLaplacian:
    """Taylor-mode wrapper of an ``nn.Sequential`` MLP with a scalar output.

    Args:
        model: ``nn.Sequential`` of ``nn.Linear`` (with or without bias) and ``nn.Tanh``,
            ``nn.Sigmoid`` or ``nn.ReLU``; the last layer a Linear with one output.
        laplacian_weights: the c_i of the Laplacian channel Σ c_i ∂_i² u (default all ones; e.g.
            ``[0, 1, 1]`` for the spatial Laplacian of u(t, x₁, x₂)).

    Calling it on points (N, d) returns a :class:`Taylor` (u, ∇u, Δu); with ``record=True`` the
    list :attr:`records` holds each Linear's ā and z, and a backward through the result fills
    each record's ĝ (tensor hooks).
    """

    def __init__(self, model: nn.Module, laplacian_weights: Sequence[float] | Tensor | None = None) -> None:
        self.linears, self.acts = parse_model(model)
        self.in_features = self.linears[0].in_features
        p = self.linears[0].weight
        if laplacian_weights is None:
            weights = torch.ones(self.in_features, dtype=p.dtype, device=p.device)
        else:
            weights = torch.as_tensor(laplacian_weights, dtype=p.dtype, device=p.device).flatten()
        if weights.numel() != self.in_features:
            raise ValueError(f"Invalid laplacian_weights: {weights.numel()} weights for a model with "
                             f"{self.in_features} inputs")
        self.laplacian_weights = weights
        self.records: list[LayerRecord] = []

    def params(self) -> list[tuple[Tensor, Tensor | None]]:
        return [(m.weight, m.bias) for m in self.linears]

    def check_points(self, x: Tensor, name: str = "points") -> None:
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Invalid {name} of shape {shape}: must be (N, {self.in_features})")
        if x.dtype != self.laplacian_weights.dtype:
            raise ValueError(f"Invalid {name} dtype {x.dtype}: the model is {self.laplacian_weights.dtype}")

    def __call__(self, x: Tensor, *, derivatives: bool = True, record: bool = False) -> Taylor:
        self.check_points(x)
        records: list[LayerRecord] | None = [] if record else None
        out = taylor_forward(self.params(), self.acts, x, self.laplacian_weights, derivatives=derivatives,
                             records=records)
        if records is not None:
            for rec in records:
                if rec.outputs.requires_grad:
                    rec.outputs.register_hook(self._grad_hook(rec))
            self.records = records
        return out

    @staticmethod
    def _grad_hook(rec: LayerRecord) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            rec.grads = grad.detach()
        return hook
