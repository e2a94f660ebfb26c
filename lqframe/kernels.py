"""Low-level kernels of lqframe: packing, the compute layout, the torch references and the Triton
kernels (see docs/formats.md and docs/kernels.md).

The modules live in the repository's top-level ``kernels/`` folder, which is deliberately *not* a
regular package (it has no ``__init__.py``): a Python started in the repository root puts the root
on ``sys.path``, and a regular package there would shadow every other distribution whose import
name is ``kernels`` — Hugging Face's ``kernels``, which transformers imports, among them. This module
is the package ``lqframe.kernels``: it makes itself one by naming that folder as its ``__path__``
(see :mod:`lqframe._layout`).
"""

from lqframe._layout import source_folder

__path__ = [source_folder(__file__, "kernels", "packing.py")]

from lqframe.kernels.dispatch import (  # noqa: E402
    Backend,
    backends,
    lq_linear_packed,
    register_backend,
    unregister_backend,
)
from lqframe.kernels.packing import pack_bits, packed_nbytes, unpack_bits  # noqa: E402
from lqframe.kernels.reference import decode_blocks, expand_blocks, lq_linear  # noqa: E402

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes", "decode_blocks", "expand_blocks", "lq_linear",
           "lq_linear_packed", "Backend", "backends", "register_backend", "unregister_backend"]
