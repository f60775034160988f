"""Recording each preconditioned module's input and output-gradient during forward/backward.

Two paths with the same semantics, chosen by the forward hook at trace time:

* **eager** (the model runs uncompiled): the forward hook keeps the input and registers a hook on
  the output tensor that keeps the gradient arriving there.
* **compiled** (the hook is being traced by ``torch.compile``): plain Python side effects (dicts,
  ``register_hook``, ``retain_grad``) do not trace, so the hook instead returns
  ``_Capture.apply(output, input, token, key)``: an autograd function whose forward is a view of
  the output (no copy) and whose backward calls the opaque custom op ``ekfac_triton::stash``
  with the saved input and the arriving gradient. The op's implementation runs at run time,
  outside the graph: it copies both tensors (the compiled graph may reuse their buffers
  afterwards) into this module's :class:`LayerCapture`, found through an integer key. It
  declares a mutation of a per-layer counter ``token`` (and increments it), which keeps it in
  the graph and in order. Dynamo traces all of this with no graph break
  (``fullgraph=True`` works), and the statistics are exactly the eager ones.

  No buffer is preallocated, so a changing batch size costs nothing beyond dynamo's own dynamic
  shape handling (at most one recompile, after which the batch dimension is symbolic); and
  whether statistics are wanted is read at run time, so statistics and non-statistics steps
  (``factor_every > 1``) share one graph. The op is tagged ``cudagraph_unsafe``: its side
  effect would not be replayed by a CUDA graph, so inductor keeps it out of any graph it captures
  (``mode="reduce-overhead"`` on the model then graphs around it or not at all).

Both paths keep tensors only while the engine asks for statistics (``enabled``) and only for
forwards that build a graph and are backpropagated: the pair is recorded when the gradient
arrives. The one difference: the eager path reads ``enabled`` at the forward, the compiled path
when the gradient arrives (they differ only if ``step()`` runs between a forward and its
backward). ``torch.func`` transforms (vmap, grad) are ignored on both paths.

**Gradient accumulation** (ARCHITECTURE.md, "Gradient accumulation"). Every arriving pair is
tagged with the autograd graph task (one per ``backward()`` call) it arrives in. Pairs from
*different* backward passes are micro-batches of one step: from the second one on, each is handed
to ``fold`` (set by the engine), which adds it to running sums, so that no micro-batch's tensors
are kept beyond its own backward (except where the engine asks to keep them). Two pairs in the
*same* backward pass are one module run several times in one graph (shared weights within one
forward), which the statistics do not model: ``shared`` records it and the engine refuses it.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def _inside_functorch() -> bool:
    """torch.func transforms (vmap, grad) run module hooks on wrapped tensors: not training data."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


# -- the compiled path --------------------------------------------------------------------------
#: key -> LayerCapture, for the stash op (weak: a dropped optimizer does not keep its captures)
_CAPTURES: weakref.WeakValueDictionary[int, LayerCapture] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@torch.library.custom_op("ekfac_triton::stash", mutates_args={"token"}, tags=(torch._C.Tag.cudagraph_unsafe,))
def _stash(token: Tensor, inputs: Tensor, grad_output: Tensor, key: int) -> None:
    """Hand one (input, output-gradient) pair to the capture registered under ``key`` (run time,
    outside any graph); ``token`` counts the calls."""
    token.add_(1)
    capture = _CAPTURES.get(key)
    if capture is not None:
        capture._receive(inputs.shape, inputs if capture.enabled else None, grad_output, copy=True)


@_stash.register_fake
def _(token: Tensor, inputs: Tensor, grad_output: Tensor, key: int) -> None:
    return None


class _Capture(torch.autograd.Function):
    """Identity on the module's output; its backward stashes (input, output-gradient)."""

    @staticmethod
    def forward(ctx, output: Tensor, inputs: Tensor, token: Tensor, key: int) -> Tensor:
        ctx.save_for_backward(inputs)
        # Not saved for backward: the stash mutates it, and a module run twice in one graph must
        # not trip autograd's version check (the engine refuses that case itself, at the step).
        ctx.token, ctx.key = token, key
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        (inputs,) = ctx.saved_tensors
        torch.ops.ekfac_triton.stash(ctx.token, inputs, grad_output, ctx.key)
        return grad_output, None, None, None


def _first_argument(args: tuple, kwargs: dict) -> tuple[Tensor, None]:
    """The default reading of a call: its first positional argument is the input."""
    return args[0], None


def forget_compiled_calls(model: nn.Module) -> int:
    """Drop dynamo's compiled code through which ``model`` may already have been called, so that
    its next compiled call is traced again, with the capture hooks just registered; returns the
    number of code objects reset.

    Dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``
    is True in torch 2.x): a graph compiled before the hooks existed would keep running without
    them, and no statistics would ever be captured. The compiled entries of a module call live on
    code objects shared by every module called that way — the wrappers of ``torch.compile(model)``
    (in ``torch/_dynamo``), ``nn.Module``'s call path (``model.compile()``) and the model's own
    ``forward`` methods — so those entries are reset (each compiled module using that code
    recompiles once at its next call, correctly) and nothing else: other compiled functions,
    dynamo's counters and configuration are left alone (unlike ``torch._dynamo.reset()``).
    A function compiled around the model (``torch.compile(train_step)``) is not found here; the
    step then raises, naming the layer whose capture saw no gradient.
    """
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list, reset_code
        from torch._dynamo import convert_frame
    except ImportError:  # a torch without dynamo: nothing can be compiled
        return 0
    shared = {nn.Module._wrapped_call_impl.__code__, nn.Module._call_impl.__code__}
    shared |= {type(m).forward.__code__ for m in model.modules() if hasattr(type(m).forward, "__code__")}
    wrappers = os.path.dirname(torch._dynamo.__file__) + os.sep
    reset = 0
    with convert_frame.compile_lock:
        for weak in list(convert_frame.input_codes.seen):
            code = weak()
            if code is None or not (code in shared or code.co_filename.startswith(wrappers)):
                continue
            if _debug_get_cache_entry_list(code):
                reset_code(code)
                reset += 1
    return reset


# -- the capture of one module --------------------------------------------------------------------
class LayerCapture:
    """The completed (input, output-gradient) pairs of one module since ``clear()``.

    ``completed`` counts pairs whose gradient arrived (on statistics steps); ``micro_batches`` the
    backward passes they arrived in, and ``examples`` their examples (counted on every step, one
    count per backward pass). With one micro-batch the pair itself is kept (``inputs``,
    ``grad_output``); with several (gradient accumulation) each is folded into the engine's running
    sums through ``fold`` and none is kept here. ``shared`` is set when a pair arrives in the same
    backward pass as an earlier one (a module run several times in one graph), which the engine
    refuses; ``error`` holds an exception a fold raised inside the backward, re-raised by the step.

    Two modes (:mod:`ekfac_triton.fisher`): with ``keep_loss_grads`` (the empirical Fisher) the
    training backward's output-gradient is kept; without it only the input and the count are, and
    the output-gradients come from the curvature backward passes instead: while ``curvature_pass``
    is set, each arriving gradient is appended to ``curvature_grads`` (not counted in
    ``completed``).
    """

    def __init__(self, module: nn.Module,
                 read_call: Callable[[tuple, dict], tuple[Tensor, Any]] | None = None,
                 num_examples: Callable[[torch.Size], int] | None = None) -> None:
        self.enabled = False
        self.keep_loss_grads = True
        self.curvature_pass = False
        self.inputs: Tensor | None = None
        self.grad_output: Tensor | None = None
        self.curvature_grads: list[Tensor] = []
        #: what ``read_call`` returned beside the input for the captured call (eager path only)
        self.record: Any = None
        #: eager path, with ``keep_outputs`` (mc/type-2 Fisher) on statistics steps: the module's
        #: output of the last forward, so the curvature passes can stop there (no weight gradients)
        self.keep_outputs = False
        self.output: Tensor | None = None
        self.completed = 0
        #: gradients that arrived at the module's output since ``clear()``, whether statistics were
        #: due or not (0: no backward reached this module since the last step)
        self.arrivals = 0
        #: backward passes (autograd graph tasks) whose gradients arrived since ``clear()``
        self.micro_batches = 0
        #: examples of those backward passes (one count per pass), statistics step or not
        self.examples = 0
        #: a pair arrived in the same backward pass as an earlier one (shared weights in one graph)
        self.shared = False
        #: ``fold(inputs, grad_output, record, copy)``: the engine's fold of one micro-batch
        self.fold: Callable[[Tensor, Tensor | None, Any, bool], None] | None = None
        #: an exception a fold raised inside the backward (re-raised by the step)
        self.error: BaseException | None = None
        self._task: int | None = None
        #: the layer's name, for messages (set by the engine)
        self.name = "?"
        self._num_examples = num_examples or (lambda shape: shape[0] if len(shape) else 1)
        #: the tensor version counters of the kept input and output-gradient when captured
        self.versions: tuple[int, int] | None = None
        self.input_shape: torch.Size | None = None
        self._read_call = read_call or _first_argument
        self._key = next(_KEYS)
        # Counts the compiled path's stashes; a tensor, so the graph can declare its mutation.
        device = next(module.parameters()).device
        self._token = torch.zeros((), dtype=torch.int64, device=device)
        _CAPTURES[self._key] = self
        self._handle: RemovableHandle = module.register_forward_hook(self._forward_hook, with_kwargs=True)

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        # A module returning a tuple (nn.MultiheadAttention) is captured at its first element.
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, Tensor) or not out.requires_grad or _inside_functorch():
            return None
        if torch.compiler.is_compiling():
            captured = _Capture.apply(out, args[0].detach(), self._token, self._key)
            return (captured, *output[1:]) if isinstance(output, tuple) else captured
        # The batch shape is needed on every step (the ``batch`` scaling reads N), the tensors only
        # when statistics are due. Both are taken when the gradient arrives, so a forward that is
        # never backpropagated (a metric computed with grad enabled) changes nothing.
        x, record = self._read_call(args, kwargs)
        shape = x.shape
        inputs = x.detach() if self.enabled else None
        if self.enabled and self.keep_outputs:
            self.output = out

        def keep_grad(grad: Tensor) -> None:
            self._receive(shape, inputs, grad, copy=False, record=record)

        out.register_hook(keep_grad)
        return None

    def _receive(self, shape: torch.Size, inputs: Tensor | None, grad: Tensor, *, copy: bool,
                 record: Any = None) -> None:
        """One completed pair. ``copy``: the tensors belong to a compiled graph, which may reuse
        their memory once the stash op returns."""
        self.input_shape = shape
        self.arrivals += 1
        if not self.curvature_pass:
            # one graph task per backward() call: a second pair in the same one is the module run
            # twice in one graph, a pair in a new one is the next micro-batch
            task = torch._C._current_graph_task_id()
            if task >= 0 and task == self._task:
                self.shared = True
            else:
                self._task = task
                self.micro_batches += 1
                self.examples += self._num_examples(shape)
        if inputs is None:  # statistics were not due
            return
        if self.curvature_pass:
            if self.inputs is None:
                self.inputs = inputs.detach().clone() if copy else inputs
                self.record = record
            self.curvature_grads.append(grad.detach().clone() if copy else grad.detach())
            return
        if self.keep_loss_grads:
            if self.micro_batches > 1 and not self.shared and self.fold is not None:
                self._fold_micro_batch(inputs, grad, record, copy)
            else:
                self.inputs = inputs.detach().clone() if copy else inputs
                self.grad_output = grad.detach().clone() if copy else grad.detach()
                self.record = record
                self.versions = (self.inputs._version, self.grad_output._version)
        self.completed += 1

    def _fold_micro_batch(self, inputs: Tensor, grad: Tensor, record: Any, copy: bool) -> None:
        """Gradient accumulation: hand the kept first pair (once) and this one to ``fold``. An
        exception is kept for the step to raise: raising here would abort the user's backward."""
        if self.error is not None:
            return
        try:
            if self.inputs is not None:  # the first micro-batch, kept until now
                self.check_unchanged(self.name)
                first = (self.inputs, self.grad_output, self.record)
                self.inputs = self.grad_output = self.record = self.versions = None
                self.fold(*first, False)
            self.fold(inputs.detach(), grad.detach(), record, copy)
        except Exception as error:  # noqa: BLE001 - re-raised by the step, with its type
            self.error = error

    def check_unchanged(self, name: str) -> None:
        """Raise if the kept input or output-gradient was modified in place since it was captured
        (the eager path keeps views of them, not copies: e.g. a loader that writes the next batch
        into the same buffer before ``step()`` would silently change the statistics)."""
        if self.inputs is None or self.grad_output is None or self.versions is None:
            return
        for what, tensor, version in (("input", self.inputs, self.versions[0]),
                                      ("output-gradient", self.grad_output, self.versions[1])):
            if tensor._version != version:
                raise RuntimeError(f"ekfac_triton: the {what} captured for layer {name!r} was modified in place "
                                   "between backward() and step(); the statistics would silently change. Do not "
                                   "overwrite the batch (or its gradients) before step(), or pass a copy to the "
                                   "model")

    def clear(self) -> None:
        self.versions = None
        self.inputs = None
        self.grad_output = None
        self.curvature_grads = []
        self.record = None
        self.output = None
        self.completed = 0
        self.arrivals = 0
        self.micro_batches = 0
        self.examples = 0
        self.shared = False
        self.error = None
        self._task = None

    def remove(self) -> None:
        self._handle.remove()
        _CAPTURES.pop(self._key, None)
        self.clear()
