"""The memory measurements of the step-time benchmark (bench/memory.py).

The expected byte counts are built from the definitions: the tensors a method must hold per layer
(K-FAC/EKFAC's factors, eigenbases, eigenvalues and scaling; MAC's mean EMA, its snapshot and
the snapshot's squared norm), from the layer shapes alone; the peak is checked
against allocations of known size."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:          # bench/ lives beside the package, not inside it
    sys.path.insert(0, str(ROOT))

from bench.memory import PeakMemory, state_bytes, tensor_bytes  # noqa: E402
from ekfac_triton import EKFAC  # noqa: E402
from tests.helpers import make_mlp  # noqa: E402

F32 = 4
BOOKKEEPING_PER_LAYER = 64  # bytes a layer may hold beyond the maths (counters): far below any factor


def _mlp() -> nn.Sequential:
    # odd sizes, a layer with and one without bias
    return make_mlp([7, 5, 3, 4], bias=[True, False, True], seed=0, dtype=None)


def _linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(d_out, d_in̄) of each Linear layer, d_in̄ counting the bias column."""
    return [(m.out_features, m.in_features + int(m.bias is not None)) for m in model.modules()
            if isinstance(m, nn.Linear)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(torch.randn(11, 7, generator=gen)).pow(2).mean().backward()
        opt.step()


def _sgd_state(model: nn.Module) -> int:
    model_copy = _mlp()
    model_copy.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD(model_copy.parameters(), lr=0.1, momentum=0.9)
    _train(model_copy, sgd)
    return state_bytes(sgd, model_copy)


def test_sgd_state_is_its_momentum_buffers() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert state_bytes(opt, model) == 0  # no buffer before the first step
    _train(model, opt)
    assert state_bytes(opt, model) == tensor_bytes(model.parameters())  # one buffer per parameter
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, plain)
    assert state_bytes(plain, model) == 0  # without momentum SGD holds nothing


def test_state_bytes_counts_shared_storage_once_and_skips_the_model() -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    buffer = torch.zeros(10)
    opt.state[model.weight]["a"] = buffer
    opt.state[model.weight]["b"] = buffer[2:5]          # a view: same storage
    opt.state[model.bias]["c"] = model.weight.detach()  # the model's own storage: not state
    assert state_bytes(opt, model) == 10 * F32


@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
def test_eigenbasis_state_holds_factors_bases_and_scaling(curvature: str) -> None:
    model = _mlp()
    opt = EKFAC(model, lr=0.1, damping=0.1, curvature=curvature, momentum=0.9, eigen_every=1)
    _train(model, opt)
    # per layer: A and Q_A (d_in̄²), G and Q_G (d_out²), their eigenvalues, and the d_out x d_in̄ scaling
    # (EKFAC's diagonal; K-FAC keeps λ_G λ_Aᵀ as the same matrix)
    needed = sum(F32 * (2 * d_in * d_in + 2 * d_out * d_out + d_in + d_out + d_out * d_in)
                 for d_out, d_in in _linear_shapes(model))
    extra = state_bytes(opt, model) - _sgd_state(model)
    assert needed <= extra <= needed + BOOKKEEPING_PER_LAYER * len(opt.preconditioner.layers)


def test_mac_state_is_two_vectors_per_layer() -> None:
    model = _mlp()
    opt = EKFAC(model, lr=0.1, damping=1.0, curvature="mac", momentum=0.9, factor_every=1, eigen_every=1)
    _train(model, opt)
    # per layer: the EMA of the mean row m, its snapshot m̂ (d_in̄ each) and ‖m̂‖² (a scalar)
    needed = sum(F32 * (2 * d_in + 1) for _, d_in in _linear_shapes(model))
    extra = state_bytes(opt, model) - _sgd_state(model)
    assert needed <= extra <= needed + BOOKKEEPING_PER_LAYER * len(opt.preconditioner.layers)


def test_cpu_peak_of_known_allocations() -> None:
    before = torch.empty(100)  # allocated before the baseline: never counted
    peak = PeakMemory(torch.device("cpu"))
    alive = torch.empty(1000)  # 4000 B allocated before the window and alive in it: counted
    gone = torch.empty(500)    # freed before the window: not counted
    del gone
    peak.start_window()
    big = torch.empty(2000)    # 4000 + 8000 = 12000 at the peak
    del big
    small = torch.empty(250)   # 4000 + 1000 after
    del before                 # a free of pre-baseline memory lowers nothing
    assert peak.stop() == 12000
    del alive, small


def test_cpu_peak_of_an_sgd_step_covers_gradients_and_momentum() -> None:
    model = nn.Linear(300, 200)
    x = torch.randn(16, 300)
    opt_bytes = tensor_bytes(model.parameters())
    peak = PeakMemory(torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    peak.start_window()
    model(x).square().mean().backward()
    opt.step()
    # gradients and momentum buffers (one parameter's worth each) are alive at the end of the step
    assert peak.stop() >= 2 * opt_bytes


def test_peak_memory_rejects_other_devices() -> None:
    with pytest.raises(ValueError, match="device"):
        PeakMemory(torch.device("meta"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_of_known_allocations() -> None:
    device = torch.device("cuda")
    peak = PeakMemory(device)
    alive = torch.empty(1 << 20, device=device)  # 4 MiB before the window
    peak.start_window()
    big = torch.empty(2 << 20, device=device)    # 8 MiB more
    del big
    assert peak.stop() == 12 << 20
    del alive
