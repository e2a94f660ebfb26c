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


def load(path, device="cpu"):
    """Load a checkpoint written by ``lqframe run`` (or :func:`lqframe.checkpoint.save_checkpoint`)."""
    from lqframe.checkpoint import load_checkpoint

    return load_checkpoint(path, device)


def compress(model, recipe, data=None, *, progress: bool = True):
    """Compress a loaded transformers model in place.

    ``recipe``: a :class:`lqframe.recipe.Recipe`, a recipe file path, or a recipe mapping.
    ``data``: calibration token windows (a LongTensor ``n × seq_len``, or ``TokenWindows``), or None
    for data-free methods. Returns the per-layer results.
    """
    from pathlib import Path as _Path

    from lqframe.recipe import Recipe, load_recipe, parse_recipe
    from lqframe.run import compress as _compress

    if isinstance(recipe, str | _Path):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = parse_recipe(recipe, "<recipe dict>")
    elif not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe, a path or a mapping, got {type(recipe).__name__}")
    calibration = getattr(data, "calibration", data)
    return _compress(model, recipe, calibration, progress=progress)


try:
    __version__ = version("lqframe")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "load",
    "compress",
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

from lqframe.hf import register_with_transformers as _register_hf  # noqa: E402

_register_hf()
