"""Fisher types: which output-gradients the curvature statistics are built from.

* ``"empirical"``: the gradients of the training loss with the true targets (what the ordinary
  ``loss.backward()`` delivers). Costs nothing extra.
* ``"type-2"``: the exact generalised Gauss-Newton / type-2 Fisher ``1/N Σ_n J_nᵀ H_n J_n``,
  ``H_n = ∇²_f ℓ_n`` the Hessian of example n's loss wrt the model output f_n, through a factor
  ``H_n = Σ_c s_{n,c} s_{n,c}ᵀ``: each column is backpropagated, giving
  ``ĝ_{n,s,c} = J_{n,s}ᵀ s_{n,c}``. The factor has one column per output entry of an example
  (C classes at each of P output positions: ``P·C`` extra backward passes per statistics step;
  P = 1 for (N, C) outputs). K-FAC's G and EKFAC's per-example S only depend on ``Σ_c s sᵀ``
  (Martens & Grosse 2015 §5; curvlinops' ``FisherType.TYPE2``).
* ``"mc"``: the Monte-Carlo Fisher: targets ỹ drawn from the model's predictive distribution
  p(y | f) and ``s = ∇_f ℓ(f, ỹ)`` (``mc_samples`` draws, one backward pass each); an unbiased
  estimate of type-2 for these losses, since ``E_ỹ[s sᵀ] = H``.

Loss conventions (reduction ``"mean"``; L = mean_n ℓ_n over the batch dimension):

* ``nn.CrossEntropyLoss`` on (N, C) or (N, C, d1, ...) logits (classes in dim 1):
  ``ℓ_n = κ Σ_t CE(f_{n,t}, y_{n,t})`` with κ = 1/P, P = d1·d2·… positions (1 for 2-D output);
  ``H = κ ⊕_t (diag(p_t) − p_t p_tᵀ)``, factor ``s_c = √κ √p_c (e_c − p)`` per position.
* ``nn.MSELoss`` on (N, ..., C): ``ℓ_n = κ Σ (f − y)²`` with κ = 1/(P·C) (mean over all of an
  example's entries); ``H = 2κ I``, factor ``s_c = √(2κ) e_c``.
* ``nn.BCEWithLogitsLoss`` on (N, ..., C): ``ℓ_n = κ Σ BCE``, κ as for MSE;
  ``H = κ diag(σ(f)(1 − σ(f)))``, factor ``s_c = √(κ p_c(1 − p_c)) e_c``.

Writing ℓ = κ·(−log p(y | f)) (MSE: a Gaussian of variance ½; BCE: Bernoulli; CE: categorical),
the MC vectors are ``s = √κ ∇_f(−log p(ỹ | f))``, so ``E[s sᵀ] = κ F_NLL = H`` exactly: MC is an
unbiased estimate of type-2. (The ``√κ``, not κ, is curvlinops' "loss scale adjustment".)

Outputs with positions (sequence models, dense predictions): ``H_n`` is block-diagonal over the
P positions, and type-2 backpropagates a true factor of it, one position's column at a time
(P·C passes). curvlinops 3.0.1's K-FAC instead backpropagates each class column at all
positions at once (C passes); that factor's ``Σ_c s sᵀ`` has cross-position blocks
``s_t s_{t'}ᵀ``, so it agrees with the exact type-2 only where they vanish from the statistic —
K-FAC's G of a model whose positions do not mix (a per-token stack), not EKFAC's S (positions
summed before squaring) nor models that mix positions. MC needs no such care: targets drawn
independently at each position give ``E[s_t s_{t'}ᵀ] = 0`` for t ≠ t', so one pass per draw is
an unbiased estimate of the exact type-2 whatever P is — prefer it for long sequences.

Each draw is handed to autograd as ``grad_outputs = w·s / N``: the captured output-gradients then
look like those of a mean loss (the adapters multiply by N), and ``w = √M`` for type-2 makes the
average over the M = P·C columns (what the statistics take over draws) their sum,
``Σ_c s sᵀ = H``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

FISHER_TYPES = ("empirical", "mc", "type-2")
#: the losses whose output Hessian / predictive distribution is known (reduction "mean")
LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


def check_fisher(fisher: object, mc_samples: object, loss: object) -> None:
    """Validate the Fisher settings; every bad value raises ``ValueError`` naming the argument."""
    if fisher not in FISHER_TYPES:
        raise ValueError(f"Invalid fisher={fisher!r}: must be one of {FISHER_TYPES}")
    if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
        raise ValueError(f"Invalid mc_samples={mc_samples!r}: must be an integer >= 1")
    if mc_samples != 1 and fisher != "mc":
        raise ValueError(f"Invalid mc_samples={mc_samples!r} with fisher={fisher!r}: only fisher='mc' draws samples")
    if loss is None:
        if fisher != "empirical":
            raise ValueError(f"Invalid loss=None with fisher={fisher!r}: the {fisher} Fisher needs the loss "
                             "(loss=nn.CrossEntropyLoss(), nn.MSELoss() or nn.BCEWithLogitsLoss())")
        return
    if type(loss) not in LOSSES:
        raise ValueError(f"Invalid loss={loss!r}: must be an instance of nn.CrossEntropyLoss, nn.MSELoss or "
                         "nn.BCEWithLogitsLoss")
    if loss.reduction != "mean":
        raise ValueError(f"Invalid loss={loss!r}: reduction={loss.reduction!r}, must be 'mean' "
                         "(the statistics are those of L = mean_n ℓ_n)")
    if isinstance(loss, nn.CrossEntropyLoss):
        if loss.weight is not None:
            raise ValueError("Invalid loss: nn.CrossEntropyLoss with class weights is not supported")
        if loss.label_smoothing != 0.0:
            raise ValueError(f"Invalid loss: nn.CrossEntropyLoss with label_smoothing={loss.label_smoothing} "
                             "is not supported")
    if isinstance(loss, nn.BCEWithLogitsLoss) and (loss.weight is not None or loss.pos_weight is not None):
        raise ValueError("Invalid loss: nn.BCEWithLogitsLoss with weight or pos_weight is not supported")


def _check_output(loss: nn.Module, output: Tensor) -> None:
    if isinstance(loss, nn.CrossEntropyLoss) and output.dim() < 2:
        raise ValueError(f"Invalid output of shape {tuple(output.shape)} for nn.CrossEntropyLoss: the curvature "
                         "needs batched logits (N, C) or (N, C, d1, ...)")
    if output.dim() < 1 or output.shape[0] == 0:
        raise ValueError(f"Invalid output of shape {tuple(output.shape)}: needs a batch dimension")


def curvature_grad_outputs(fisher: str, loss: nn.Module, output: Tensor, mc_samples: int,
                           generator: torch.Generator | None) -> Iterator[Tensor]:
    """The ``grad_outputs`` of the curvature backward passes (one tensor shaped like ``output``
    per pass, made when asked for: P·C type-2 columns never exist at once): ``w·s/N`` with s the
    type-2 columns (w = √(P·C)) or the MC vectors (w = 1). The output is checked at the call.

    Args:
        fisher: ``"mc"`` or ``"type-2"``.
        loss: the training loss module (validated by :func:`check_fisher`).
        output: the model output the loss is applied to (its values are read, never its graph).
        mc_samples: number of MC draws.
        generator: the generator MC samples are drawn with.
    """
    _check_output(loss, output)
    f = output.detach()
    n = f.shape[0]
    if isinstance(loss, nn.CrossEntropyLoss):
        return _cross_entropy(fisher, f, n, mc_samples, generator)
    return _elementwise(fisher, loss, f, n, mc_samples, generator)


def _cross_entropy(fisher: str, f: Tensor, n: int, mc_samples: int,
                   generator: torch.Generator | None) -> Iterator[Tensor]:
    c = f.shape[1]
    kappa = 1.0 / (f[0, 0].numel())          # 1 / positions per example
    p = torch.softmax(f, dim=1)
    if fisher == "type-2":
        # at position t, column k of diag(√p) − √p pᵀ (times its transpose: diag(p) − ppᵀ as
        # Σp = 1), times √κ, the √M (M = C·P columns) of the average over columns, and 1/N
        flat = p.reshape(n, c, -1)                     # (N, C, P)
        positions = flat.shape[-1]
        root = flat.sqrt()
        scale = math.sqrt(kappa * c * positions) / n
        for t in range(positions):
            for k in range(c):
                column = torch.zeros_like(flat)
                column[:, :, t] = -flat[:, :, t] * root[:, k, t: t + 1]
                column[:, k, t] += root[:, k, t]
                yield (column * scale).reshape(f.shape)
        return
    # mc: ỹ ~ Categorical(p) at every position; s = √κ (p − onehot(ỹ))
    rows = p.movedim(1, -1).reshape(-1, c)
    for _ in range(mc_samples):
        y = torch.multinomial(rows, 1, generator=generator).squeeze(-1)
        onehot = torch.nn.functional.one_hot(y, c).to(p.dtype).reshape(*p.movedim(1, -1).shape).movedim(-1, 1)
        yield (p - onehot) * (math.sqrt(kappa) / n)


def _elementwise(fisher: str, loss: nn.Module, f: Tensor, n: int, mc_samples: int,
                 generator: torch.Generator | None) -> Iterator[Tensor]:
    entries = f[0].numel()
    kappa = 1.0 / entries                    # 1 / (P·C): the mean over an example's entries
    mse = isinstance(loss, nn.MSELoss)
    if fisher == "type-2":
        # H = 2κ I (MSE) or κ diag(p(1 − p)) (BCE): column e is √(H_ee) e_e, one per entry,
        # times the √M (M = P·C entries) of the average over columns, and 1/N
        flat = f.reshape(n, entries)
        diag = torch.full_like(flat, 2 * kappa) if mse else kappa * torch.sigmoid(flat) * torch.sigmoid(-flat)
        root = diag.sqrt() * (math.sqrt(entries) / n)
        for e in range(entries):
            column = torch.zeros_like(flat)
            column[:, e] = root[:, e]
            yield column.reshape(f.shape)
        return
    for _ in range(mc_samples):
        if mse:
            # ỹ = f + ε/√2 (the Gaussian whose NLL is (f − y)² + const): s = √κ·2(f − ỹ) = −√(2κ) ε
            eps = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
            yield eps * (-math.sqrt(2 * kappa) / n)
        else:
            # ỹ ~ Bernoulli(σ(f)): s = √κ (σ(f) − ỹ)
            p = torch.sigmoid(f)
            y = torch.bernoulli(p, generator=generator)
            yield (p - y) * (math.sqrt(kappa) / n)


# -- the backward passes, as the preconditioner runs them ----------------------------------------
def curvature_backward(pre: Any, output: Tensor) -> None:
    """The curvature backward passes of ``fisher="mc"`` / ``"type-2"`` on the model output of
    this step's forward, for :meth:`ekfac_triton.Preconditioner.curvature_backward` (a no-op for
    ``"empirical"`` and on steps without statistics).

    Each MC draw / type-2 column is backpropagated as ``grad_outputs`` with
    ``torch.autograd.grad`` down to the preconditioned layers' outputs when the eager forward kept
    them all (autograd then computes no weight gradient: about half of each pass; for an embedding
    a V x D tensor), else to the parameters (a compiled model hides its intermediate tensors). No
    ``.grad`` is touched and no forward runs again; the capture records what arrives.
    """
    config = pre.config.fisher
    if config.fisher == "empirical" or not pre.statistics_due:
        return
    if not isinstance(output, Tensor) or not output.requires_grad:
        raise ValueError("Invalid output: curvature_backward needs the model output with its graph "
                         "(requires_grad=True), before loss.backward() frees it")
    if pre._curvature_passes:
        raise RuntimeError(f"ekfac_triton: a second curvature backward before step(): gradient accumulation over "
                           f"several micro-batches is supported with fisher='empirical' only, not with "
                           f"fisher={config.fisher!r}; call step() after each opt.backward(output, target), or use "
                           "fisher='empirical'")
    dtype = torch.promote_types(output.dtype, torch.float32)  # no sqrt/softmax in half precision
    vectors = curvature_grad_outputs(config.fisher, config.loss, output.detach().to(dtype), config.mc_samples,
                                     pre.generator)
    root = math.sqrt(config.loss_scale)  # H and E[ssᵀ] scale with the loss: s by its square root
    outputs = [layer.capture.output for layer in pre.layers]
    targets = outputs if all(o is not None for o in outputs) else [
        p for layer in pre.layers for p in layer.adapter.params]
    for layer in pre.layers:
        layer.capture.curvature_pass = True
    try:
        for v in vectors:  # one vector at a time: P·C type-2 columns never exist at once
            if root != 1.0:
                v = v * root
            torch.autograd.grad(output, targets, grad_outputs=v.to(output.dtype), retain_graph=True,
                                allow_unused=True)
            pre._curvature_passes += 1
    finally:
        for layer in pre.layers:
            layer.capture.curvature_pass = False
            layer.capture.output = None  # not needed any more: do not hold it until the step


def training_backward(pre: Any, output: Tensor, target: Tensor) -> Tensor:
    """``loss_scale · loss(output, target)``, the curvature backward (mc/type-2, on statistics
    steps), then ``loss.backward()`` (through the GradScaler when one is enabled); returns the
    loss, detached and unscaled (:meth:`ekfac_triton.Preconditioner.backward`)."""
    config = pre.config.fisher
    if config.loss is None:
        raise ValueError("Invalid loss=None: backward(output, target) needs the loss module given at "
                         "construction (loss=...)")
    loss = config.loss(output, target)
    if config.loss_scale != 1.0:
        loss = loss * config.loss_scale
    if (config.fisher != "empirical" and pre.statistics_due and isinstance(config.loss, nn.CrossEntropyLoss)
            and bool((target == config.loss.ignore_index).any())):
        raise ValueError(f"Invalid target: it contains ignore_index={config.loss.ignore_index}, which "
                         f"fisher={config.fisher!r} does not model (every position gets curvature)")
    curvature_backward(pre, output)
    scaler = pre.config.statistics.grad_scaler
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()  # fp16: as the user's own loop would
    else:
        loss.backward()
    return loss.detach()
