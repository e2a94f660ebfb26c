"""The ``svd`` reconstructor (ZeroQuant-V2 LoRC): ``Q = q(W)``, then ``L·R`` the rank-r truncated
SVD of the quantization error ``W − Q`` — the smallest weight error ``‖W − Q − LR‖_F`` any rank-r
term can reach for that Q (Eckart–Young). Data-free."""

from __future__ import annotations

import attrs
import torch
from attrs import validators as v

from lqframe import Decomposition, ErrorReconstructor, LowRank, hookimpl
from lqframe.numerics import check_weight, lowrank_solve
from lqframe.quantization import integer

FACTOR_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@attrs.frozen
class SVDReconstructor(ErrorReconstructor):
    """Rank-``rank`` SVD of ``W − Q``; factors stored in ``factor_dtype``."""

    rank: int = attrs.field(default=32, validator=integer(0))
    method: str = attrs.field(default="exact", validator=v.in_(("exact", "randomized")))
    factor_dtype: str = attrs.field(default="float16", validator=v.in_(tuple(FACTOR_DTYPES)))
    oversample: int = attrs.field(default=10, validator=integer(0))
    niter: int = attrs.field(default=2, validator=integer(0))
    seed: int = attrs.field(default=0, validator=integer())

    @classmethod
    def test_configs(cls):
        return [{"rank": 4, "factor_dtype": "float32"}, {"rank": 2, "method": "randomized"}]

    def _rank(self, shape) -> int:
        return min(self.rank, *shape)

    def decompose(self, weight, quantizer, stats=None) -> Decomposition:
        w = check_weight(weight, "svd reconstructor")
        qweight = quantizer.quantize(w, stats)
        rank = self._rank(w.shape)
        if rank == 0:
            return Decomposition(qweight, None, {"rank": 0})
        residual = w - qweight.dequantize(torch.float32)
        sol = lowrank_solve(residual, rank, method=self.method, oversample=self.oversample,
                            niter=self.niter, seed=self.seed)
        dtype = FACTOR_DTYPES[self.factor_dtype]
        lowrank = LowRank(sol.left.to(dtype), sol.right.to(dtype))
        info = {"rank": rank}
        if self.method == "exact":
            info["tail_energy"] = sol.tail_energy(rank)
        return Decomposition(qweight, lowrank, info)

    def lowrank_bits(self, shape) -> int:
        n, m = shape
        return self._rank(shape) * (n + m) * torch.finfo(FACTOR_DTYPES[self.factor_dtype]).bits


@hookimpl
def lqframe_register(registry):
    registry.add_reconstructor("svd", SVDReconstructor)
