"""The three kernel families of ekfac_triton, one file each (installed as ``ekfac_triton.kernels``).

* ``factor_accumulation``: ``C <- beta*C + alpha * X̄ᵀ diag(w) X̄``
* ``eigenbasis_projection``: preconditioning in the Kronecker eigenbasis and EKFAC's scalings
* ``moment_update``: weight decay, momentum, KL-clip scale and the parameter update
* ``mac_update``: MAC's Sherman–Morrison preconditioning fused with the moment update

Each file holds, in reading order, the Triton kernel's autotune configs, the kernel, its
launcher registered as a ``torch.library`` op (``ekfac_triton::*``), and a pure-torch reference
with the kernel's contract: the CPU implementation and the oracle the kernels are tested against.
The public launchers (``factor_update``, ...) run the kernel on CUDA tensors (or on CPU under
``TRITON_INTERPRET=1``) and the reference otherwise; ``ekfac_triton.ops`` picks between them
by the optimizer's resolved backend.
"""

from .eigenbasis_projection import (per_example_scaling, per_example_scaling_reference, precondition,
                                    precondition_reference)
from .factor_accumulation import factor_update, factor_update_grouped, factor_update_reference
from .mac_update import mac_update, mac_update_reference
from .moment_update import moment_update, moment_update_reference

__all__ = [
    "factor_update",
    "factor_update_grouped",
    "factor_update_reference",
    "precondition",
    "precondition_reference",
    "per_example_scaling",
    "per_example_scaling_reference",
    "moment_update",
    "moment_update_reference",
    "mac_update",
    "mac_update_reference",
]
