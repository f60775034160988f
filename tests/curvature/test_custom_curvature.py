"""A new curvature is one file: a :class:`Curvature` subclass with its own ``Options``, passed to
``EKFAC`` as a class, its option as a keyword argument (validated by its ``Options``).

The example scales each gradient by ``gain``: with momentum μ the step is SGD's with lr·gain, so
its trajectory is checked against ``torch.optim.SGD`` in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor, nn

from ekfac_triton import EKFAC
from ekfac_triton.curvature import Curvature, CurvatureOptions
from tests.helpers import make_mlp

DTYPE = torch.float64


# -- the whole new curvature ------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GainOptions(CurvatureOptions):
    """Options of :class:`ScaledGradient`.

    Attributes:
        gain: the factor the gradient is multiplied by, > 0.
    """

    gain: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.gain, float) or self.gain <= 0:
            raise ValueError(f"Invalid gain={self.gain!r}: must be a float > 0")


class ScaledDirection(NamedTuple):
    grad: Tensor
    at: int

    def run(self, scalars: Any, finite: Tensor | None, backend: str) -> Tensor:
        return self.grad * scalars[self.at]


class ScaledGradient(Curvature):
    name = "scaled-gradient"
    Options = GainOptions

    def __init__(self, shape, dtype, device, options=None) -> None:
        self.shape, self.options, self.updates = shape, options or GainOptions(), 0

    @property
    def has_statistics(self) -> bool:
        return self.updates > 0

    def statistics_job(self, batch, decay, scalars):
        self.updates += 1
        return None

    def statistics(self):
        return ()

    def refresh_due(self, engine, index, step):
        return False

    def refresh(self, engine, index):
        return None

    def direction_job(self, grad, damping, num_examples, decay, scalars):
        scalars.append(self.options.gain)
        return ScaledDirection(grad, len(scalars) - 1)

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates = int(state["updates"])


# -- its tests --------------------------------------------------------------------------------------
def _model() -> nn.Module:
    return make_mlp([5, 8, 3], dtype=DTYPE)


def test_custom_curvature_with_its_own_option_matches_sgd():
    ours, theirs = _model(), _model()
    opt = EKFAC(ours, lr=0.1, momentum=0.9, curvature=ScaledGradient, gain=0.5)
    sgd = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    assert opt.preconditioned_modules() == ["0", "2"]
    assert opt.preconditioner.config.curvature == "scaled-gradient"
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(16, 5, generator=g, dtype=DTYPE), torch.randint(0, 3, (16,), generator=g)
        for model, o in ((ours, opt), (theirs, sgd)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_custom_option_is_validated_and_unknown_elsewhere():
    with pytest.raises(ValueError, match="gain"):
        EKFAC(_model(), curvature=ScaledGradient, gain=-1.0)
    with pytest.raises(TypeError, match="gain"):
        EKFAC(_model(), gain=0.5)  # not an option of EKFAC's curvature
