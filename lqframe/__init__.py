"""lqframe: compress language models into packed low-bit weights plus low-rank terms, W ≈ Q + L·R.

Public API (the example runs as a doctest in the test suite)::

    >>> import torch, lqframe
    >>> reg = lqframe.registry()                      # components from all installed plugins
    >>> q = reg.create("quantizer", "nf", bits=4, group_size=64)
    >>> rec = reg.create("reconstructor", "svd", rank=32)
    >>> weight = torch.randn(512, 256)
    >>> dec = rec.decompose(weight, q)                # Decomposition(qweight, lowrank)
    >>> dec.qweight.bits_per_param(), dec.rank        # NF4 codes + a float16 scale per 64 values
    (4.25, 32)
    >>> float((weight - dec.dense()).norm() / weight.norm()) < 0.1
    True

Whole models: ``lqframe.compress(model, recipe, data)`` compresses a loaded transformers model in
place; ``lqframe.load(dir)`` rebuilds a saved checkpoint, and so does transformers'
``from_pretrained(dir)`` once lqframe is imported.
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
from lqframe.stats import StatisticKind, StatsAccumulator
from lqframe.types import (
    OUTPUT_NAMES,
    STAT_NAMES,
    Choice,
    CostTable,
    Decomposition,
    LayerStats,
    LowRank,
    QuantizedWeight,
    average_bits,
)


def load(path, device="cpu"):
    """Load a checkpoint written by ``lqframe run`` (or :func:`lqframe.checkpoint.save_checkpoint`)."""
    from lqframe.checkpoint import load_checkpoint
    from lqframe.hf import register_with_transformers

    register_with_transformers()  # explicitly: transformers is needed now anyway
    return load_checkpoint(path, device)


def compress(model, recipe, data=None, *, device=None, offload=None, progress: bool = True, tuning=None):
    """Compress a loaded transformers model in place.

    ``recipe``: a :class:`lqframe.recipe.Recipe`, a recipe file path, or a recipe mapping.
    ``data``: calibration token windows (a LongTensor ``n × seq_len``, or ``TokenWindows``), or None
    for data-free methods. ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda[:N]``; default:
    the recipe's ``device`` (auto). ``offload``: keep blocks in CPU memory, one on the device at a
    time. ``tuning``: the tune stage's ``(training, validation)`` windows (or a
    ``lqframe.data.TuningWindows``), needed when the recipe has a ``tune_stage``. Returns the
    per-layer results.
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
    return _compress(model, recipe, calibration, device=device, offload=offload, progress=progress, tuning=tuning)


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
    "StatisticKind",
    "CostTable",
    "Choice",
    "STAT_NAMES",
    "OUTPUT_NAMES",
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

# After `import lqframe`, transformers' from_pretrained loads lqframe checkpoints. Registering imports
# transformers' quantizer machinery (seconds), so it happens when transformers imports that, not here.
from lqframe.hf import install as _install_hf  # noqa: E402

_install_hf()
