"""Low-level kernels of lqframe.

Every kernel has a plain-torch reference here; Triton versions (added later) must match the
reference exactly and read the same packed layout (see docs/formats.md).
"""

from lqframe.kernels.dispatch import Backend, backends, lq_linear_packed, register_backend, unregister_backend
from lqframe.kernels.packing import pack_bits, packed_nbytes, unpack_bits
from lqframe.kernels.reference import decode_blocks, expand_blocks, lq_linear

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes", "decode_blocks", "expand_blocks", "lq_linear",
           "lq_linear_packed", "Backend", "backends", "register_backend", "unregister_backend"]
