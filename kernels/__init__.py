"""The three kernel families of ekfac_triton, one file each (installed as ``ekfac_triton.kernels``).

* ``factor_accumulation``: ``C <- beta*C + alpha * X̄ᵀ diag(w) X̄``
* ``eigenbasis_projection``: preconditioning in the Kronecker eigenbasis and EKFAC's scalings
* ``moment_update``: weight decay, momentum, KL-clip scale and the parameter update

Each file holds a pure-torch reference with the kernel's contract; it is the CPU implementation
and the oracle the Triton kernels are tested against.
"""

from .eigenbasis_projection import per_example_scaling_reference, precondition_reference
from .factor_accumulation import factor_update_reference
from .moment_update import moment_update_reference

__all__ = [
    "factor_update_reference",
    "precondition_reference",
    "per_example_scaling_reference",
    "moment_update_reference",
]
