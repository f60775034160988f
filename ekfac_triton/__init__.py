"""ekfac_triton: EKFAC, K-FAC, TEKFAC and MAC second-order optimizers for PyTorch.

    from ekfac_triton import EKFAC
    opt = EKFAC(model, lr=0.1, damping=1e-3)
    loss.backward(); opt.step(); opt.zero_grad()
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .discovery import register_adapter
from .layers import AttentionSpec, LayerAdapter
from .mac import MAC
from .optimizer import EKFAC, KFAC, TEKFAC
from .preconditioner import Preconditioner

__version__ = "0.1.0"
__all__ = ["EKFAC", "KFAC", "TEKFAC", "MAC", "AttentionSpec", "LayerAdapter", "Preconditioner", "register_adapter",
           "load_checkpoint", "save_checkpoint", "__version__"]
