"""An on-disk cache of allocation costs, so that a second budget (or a second allocator) over the
same model, data and candidates costs only the solve.

A cost is the error of one matrix under one candidate configuration (:func:`lqframe.pipeline.
layer_cost`). Its key is a SHA-256 over everything the number depends on:

* the weight (its exact bytes, dtype and shape),
* the statistics the candidate's components read (the exact bytes of every tensor, the token count),
* the quantizer and reconstructor specs (names and resolved options) and the versions of lqframe
  and of the distributions that provide the two plugins,
* the device type the decomposition ran on (CPU and CUDA round differently).

Entries live in one SQLite file (stdlib ``sqlite3``: every write is a committed transaction, so an
interrupted run leaves the finished entries and no torn ones). The default file is
``$LQFRAME_CACHE/costs.sqlite``, else ``$XDG_CACHE_HOME/lqframe/costs.sqlite``, else
``~/.cache/lqframe/costs.sqlite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import torch

from lqframe.types import STAT_NAMES, LayerStats

__all__ = ["CostCache", "default_cache_path", "tensor_digest", "stats_digest"]


def default_cache_path() -> Path:
    if os.environ.get("LQFRAME_CACHE"):
        return Path(os.environ["LQFRAME_CACHE"]) / "costs.sqlite"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lqframe" / "costs.sqlite"


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and exact bytes."""
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    data = t.detach().contiguous().cpu()
    if data.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
        data = data.view(torch.int16)
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def stats_digest(stats: LayerStats | None, names: frozenset[str]) -> str:
    """SHA-256 of the named statistics (and the token count); computed once per statistics
    object and set of names."""
    if stats is None or not names:
        return "none"

    def compute() -> str:
        h = hashlib.sha256(f"tokens={stats.n_tokens}|".encode())
        for name in sorted(names):
            value = getattr(stats, name) if name in STAT_NAMES else stats.extra.get(name)
            h.update(f"{name}=".encode())
            h.update((tensor_digest(value) if value is not None else "missing").encode())
        return h.hexdigest()

    return stats.cached(("cost-cache digest", tuple(sorted(names))), compute)


class CostCache:
    """``get(key)`` / ``put(key, cost, seconds)`` over one SQLite file; :meth:`key` builds a key."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60)
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS costs (key TEXT PRIMARY KEY, cost REAL NOT NULL, "
                             "seconds REAL NOT NULL, layer TEXT, config TEXT)")
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(weight_digest: str, stats_key: str, components: Any, device: str) -> str:
        """The key of one (matrix, candidate) pair; ``components`` is any JSON-able description of
        the two components (specs, resolved options, versions)."""
        blob = json.dumps({"weight": weight_digest, "stats": stats_key, "components": components,
                           "device": device}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> tuple[float, float] | None:
        row = self._db.execute("SELECT cost, seconds FROM costs WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return float(row[0]), float(row[1])

    def put(self, key: str, cost: float, seconds: float, layer: str = "", config: Any = None) -> None:
        with self._db:  # one committed transaction per entry
            self._db.execute("INSERT OR REPLACE INTO costs VALUES (?, ?, ?, ?, ?)",
                             (key, float(cost), float(seconds), layer, json.dumps(config, sort_keys=True, default=str)))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM costs").fetchone()[0])

    def close(self) -> None:
        self._db.close()
