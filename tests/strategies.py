"""The hypothesis strategies moved to :mod:`lqframe.testing` (public, for plugin authors too); this
module re-exports them for the test modules that import them from here."""

from __future__ import annotations

from lqframe.testing import DTYPES, make_matrix, matrices, synthetic_stats
from lqframe.testing import MATRIX_KINDS as KINDS

__all__ = ["DTYPES", "KINDS", "make_matrix", "matrices", "synthetic_stats"]
