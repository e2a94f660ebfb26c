"""Error types. Every error lqframe raises on bad input is a :class:`LqframeError`, whose message
names the problem and the place (recipe path, layer, file); the CLI prints it as one line."""

from __future__ import annotations

__all__ = [
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


class LqframeError(Exception):
    """Base class of all errors that report bad input or configuration."""


class PluginError(LqframeError):
    """A plugin failed to load or registered something invalid."""


class UnknownComponentError(LqframeError, KeyError):
    """A component name that no plugin registered."""

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0]) if self.args else ""


class OptionError(LqframeError, ValueError):
    """An option a component does not accept, or a value out of its range."""


class WeightError(LqframeError, ValueError):
    """A weight that cannot be compressed (NaN/Inf values, wrong rank or dtype)."""


class MissingStatisticError(LqframeError):
    """A plugin needs calibration statistics that were not provided."""


class BudgetError(LqframeError, ValueError):
    """A memory budget that no allocation can meet."""


class DataError(LqframeError, ValueError):
    """Calibration or evaluation data that cannot be read or is too small."""


class ModelError(LqframeError):
    """A model that cannot be found, loaded or compressed."""


class RecipeError(LqframeError, ValueError):
    """A recipe with unknown keys, bad values or patterns that match nothing."""


class CheckpointError(LqframeError):
    """A saved checkpoint that is missing, incomplete or inconsistent."""
