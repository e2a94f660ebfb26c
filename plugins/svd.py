"""The ``svd`` reconstructor (ZeroQuant-V2 LoRC): ``Q = q(W)``, then ``L·R`` the rank-r truncated
SVD of the quantization error ``W − Q`` — the smallest weight error ``‖W − Q − LR‖_F`` any rank-r
term can reach for that Q (Eckart–Young). Data-free."""

from __future__ import annotations

from typing import ClassVar

import attrs

from lqframe import hookimpl
from lqframe.lowrank import LowRankReconstructor


@attrs.frozen
class SVDReconstructor(LowRankReconstructor):
    """Rank-``rank`` SVD of ``W − Q``; factors stored in ``factor_dtype``."""

    label: ClassVar[str] = "svd"


@hookimpl
def lqframe_register(registry):
    registry.add_reconstructor("svd", SVDReconstructor)
