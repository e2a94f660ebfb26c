"""lqframe: compress language models into packed low-bit weights plus low-rank terms, W ≈ Q + L·R.

Public API::

    import lqframe
    reg = lqframe.registry()                       # components from all installed plugins
    q = reg.create("quantizer", "nf", bits=4, block_size=64)
    rec = reg.create("reconstructor", "svd", rank=32)
    dec = rec.decompose(weight, q)                 # Decomposition(qweight, lowrank)
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from lqframe.errors import (
    BudgetError,
    CheckpointError,
    DataError,
    LqframeError,
    MissingStatisticError,
    ModelError,
    OptionError,
    PluginError,
    RecipeError,
    UnknownComponentError,
    WeightError,
)
from lqframe.hookspecs import hookimpl
from lqframe.interfaces import BudgetAllocator, Component, ErrorReconstructor, LossObjective, Quantizer
from lqframe.registry import Registry, registry
from lqframe.types import (
    STAT_NAMES,
    Choice,
    CostTable,
    Decomposition,
    LayerStats,
    LowRank,
    QuantizedWeight,
    StatsAccumulator,
    average_bits,
)

try:
    __version__ = version("lqframe")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "registry",
    "Registry",
    "hookimpl",
    "Component",
    "Quantizer",
    "ErrorReconstructor",
    "BudgetAllocator",
    "LossObjective",
    "QuantizedWeight",
    "LowRank",
    "Decomposition",
    "LayerStats",
    "StatsAccumulator",
    "CostTable",
    "Choice",
    "STAT_NAMES",
    "average_bits",
    "LqframeError",
    "PluginError",
    "UnknownComponentError",
    "OptionError",
    "WeightError",
    "MissingStatisticError",
    "BudgetError",
    "DataError",
    "ModelError",
    "RecipeError",
    "CheckpointError",
]
