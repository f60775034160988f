"""The forward Laplacian: an MLP run in Taylor mode, as a network with shared weights over positions.

For a batch of N points x ∈ R^d the network carries, per point, S = d + 2 *positions*
(Dangel, Müller & Zeinhofer 2024; ARCHITECTURE.md, "K-FAC for PINNs"):

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

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    """One Linear layer's position inputs ā (N, S, d_in [+1]) and outputs z (value, derivatives,
    Laplacian; the last two None for a value-only pass), and — once a backward has gone through
    the layer — the position output-gradients ĝ (N, S, d_out) (zero where the residual does not
    depend on a position, e.g. the last layer's value in −Δu = f)."""

    inputs: Tensor
    outputs: tuple[Tensor, Tensor | None, Tensor | None]
    parts: list[Tensor | None] = field(default_factory=lambda: [None, None, None])

    def output_tensors(self) -> list[Tensor]:
        return [t for t in self.outputs if t is not None]

    def set_grads(self, grads: Sequence[Tensor | None]) -> None:
        """Store the gradients of :meth:`output_tensors` (None: not reached)."""
        self.parts = [None if g is None else g.detach() for g in grads]

    @property
    def grads(self) -> Tensor | None:
        """ĝ (N, S, d_out), or None before any backward reached this layer."""
        if all(g is None for g in self.parts):
            return None
        parts = [torch.zeros_like(t) if g is None else g for t, g in zip(self.output_tensors(), self.parts)]
        if len(parts) == 1:
            return parts[0].unsqueeze(-2)
        v, d, lap = parts
        return torch.cat([v.unsqueeze(-2), d, lap.unsqueeze(-2)], dim=-2)


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


Positions = tuple[Tensor, Tensor | None, Tensor | None]  # value (..., N, w), ∂ (..., N, d, w), Δ (..., N, w)


def first_positions(x: Tensor, derivatives: bool) -> Positions:
    """The first layer's position inputs: x, the unit vectors e_i, 0."""
    if not derivatives:
        return x, None, None
    n, d = x.shape
    return x, torch.eye(d, dtype=x.dtype, device=x.device).expand(n, d, d), x.new_zeros(n, d)


def stack_positions(h: Positions) -> Tensor:
    """The positions as one (..., N, S, w) tensor: value, d derivatives, Laplacian."""
    v, d, lap = h
    if d is None:
        return v.unsqueeze(-2)
    return torch.cat([v.unsqueeze(-2), d, lap.unsqueeze(-2)], dim=-2)


def with_bias_column(h: Tensor) -> Tensor:
    """ā: append the bias input, 1 at the value position and 0 at every other position."""
    col = torch.zeros(*h.shape[:-1], 1, dtype=h.dtype, device=h.device)
    col[..., 0, :] = 1
    return torch.cat([h, col], dim=-1)


def _matmul_positions(d: Tensor, weight_t: Tensor, batched: bool) -> Tensor:
    """``∂ @ Wᵀ`` for derivative positions d (..., N, d, w) and Wᵀ (w, d_out) or (K, w, d_out)."""
    if weight_t.ndim == 2:
        return d @ weight_t
    if batched:  # (K, N, d, w) @ (K, 1, w, d_out)
        return d @ weight_t.unsqueeze(-3)
    flat = d.reshape(-1, d.shape[-1]) @ weight_t  # (K, N·d, d_out)
    return flat.reshape(weight_t.shape[0], *d.shape[:-1], weight_t.shape[-1])


def linear_positions(h: Positions, weight: Tensor, bias: Tensor | None) -> Positions:
    """z = W h at every position, + b at the value position only. ``weight`` is (d_out, d_in) or
    batched (K, d_out, d_in) (then the positions are unbatched or carry the same K)."""
    v, d, lap = h
    wt = weight.transpose(-1, -2)
    zv = v @ wt  # (N, w) or (K, N, w) against (w, d_out) or (K, w, d_out)
    if bias is not None:
        zv = zv + bias.unsqueeze(-2)
    if d is None:
        return zv, None, None
    return zv, _matmul_positions(d, wt, v.ndim > 2), lap @ wt


def activation_positions(z: Positions, act: Derivatives, weights: Tensor | None) -> Positions:
    """σ in Taylor mode: value σ(z), derivatives σ′(z)∂z, Laplacian σ′(z)Δz + σ″(z)Σ c_i(∂_i z)²."""
    v, d, lap = z
    s0, s1, s2 = act(v)
    if d is None:
        return s0, None, None
    curvature = torch.einsum("...ij,i->...j", d * d, weights)
    return s0, s1.unsqueeze(-2) * d, s1 * lap + s2 * curvature


def taylor_forward(params: Sequence[tuple[Tensor, Tensor | None]], acts: Sequence[Derivatives | None], x: Tensor,
                   laplacian_weights: Tensor, *, derivatives: bool = True,
                   records: list[LayerRecord] | None = None) -> Taylor:
    """Run the MLP ``params``/``acts`` (see :func:`parse_model`) in Taylor mode on points ``x``
    (N, d). Weights may carry a leading grid dimension K (then every output has it). When
    ``records`` is a list, each Linear's ā (detached), its outputs z (value, derivatives,
    Laplacian) and a record are appended to it."""
    h = first_positions(x, derivatives)
    for (weight, bias), act in zip(params, acts):
        z = linear_positions(h, weight, bias)
        if records is not None:
            a = stack_positions(tuple(t if t is None else t.detach() for t in h))
            records.append(LayerRecord(with_bias_column(a) if bias is not None else a, z))
        h = z if act is None else activation_positions(z, act, laplacian_weights)
    v, d, lap = h
    return Taylor(v[..., 0], None if d is None else d[..., 0], None if lap is None else lap[..., 0])


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
                tensors = rec.output_tensors()
                if all(t.requires_grad for t in tensors):
                    _GradCollector(rec, tensors)
            self.records = records
        return out


class _GradCollector:
    """Tensor hooks that store a record's output gradients as a backward reaches them. The hooks
    hold the record weakly: a strong reference would make a cycle through the autograd graph
    (record → output tensor → hook → record) that Python's collector cannot see, leaking every
    recorded graph."""

    def __init__(self, rec: LayerRecord, tensors: list[Tensor]) -> None:
        rec.parts = [None] * len(tensors)
        ref = weakref.ref(rec)
        for i, t in enumerate(tensors):
            t.register_hook(_store(ref, i))


def _store(ref: weakref.ref, i: int) -> Callable[[Tensor], None]:
    def hook(grad: Tensor) -> None:
        rec = ref()
        if rec is not None:
            rec.parts[i] = grad.detach()
    return hook
