"""``lqframe inspect DIR --plot out.png``: a per-layer picture of a checkpoint — the bits per
parameter of each matrix's packed Q, with its low-rank factors stacked on top, and the rank of
each matrix's L·R — in the model's layer order. Needs matplotlib (``pip install 'lqframe[plot]'``)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lqframe.errors import LqframeError

__all__ = ["plot_layers"]

_KIND = re.compile(r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|[A-Za-z_]+)$")


def _kind(name: str) -> str:
    m = _KIND.search(name.split(".")[-1])
    return m.group(1) if m else name


def plot_layers(info: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Draw ``info`` (:func:`lqframe.checkpoint.inspect_checkpoint`) to ``path`` (PNG, SVG or PDF
    by suffix); the file is written atomically. Returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise LqframeError("lqframe inspect --plot needs matplotlib: pip install 'lqframe[plot]' "
                           "(or pip install matplotlib)") from None
    layers = list(info["layers"])
    if not layers:
        raise LqframeError(f"{info.get('path', 'checkpoint')}: no compressed layers to plot")
    path = Path(path)
    kinds = sorted({_kind(x["name"]) for x in layers}, key=lambda k: [_kind(x["name"]) for x in layers].index(k))
    colours = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    x = list(range(len(layers)))
    q_bits = [row["storage_bits"] / row["numel"] for row in layers]
    lr_bits = [row["lowrank_bits"] / row["numel"] for row in layers]
    ranks = [row["rank"] for row in layers]
    c = [colours[_kind(row["name"])] for row in layers]

    fig, (ax_bits, ax_rank) = plt.subplots(2, 1, figsize=(max(8.0, len(layers) * 0.06 + 4), 6.5), sharex=True)
    ax_bits.bar(x, q_bits, color=c, width=0.9, label="Q")
    ax_bits.bar(x, lr_bits, bottom=q_bits, color=c, alpha=0.35, width=0.9, label="L·R")
    ax_bits.set_ylabel("bits / parameter\n(solid: Q, light: L·R)")
    avg = info.get("avg_bits")
    avg_lr = info.get("avg_bits_with_lowrank")
    title = f"{info.get('model') or info.get('path', '')}"
    if avg is not None:
        title += f" — {avg:.3f} bits/param (Q), {avg_lr:.3f} with L·R"
    ax_bits.set_title(title, fontsize=10)
    ax_bits.set_ylim(0, max(q + lr for q, lr in zip(q_bits, lr_bits, strict=True)) * 1.3)
    ax_rank.bar(x, ranks, color=c, width=0.9)
    ax_rank.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax_rank.set_ylabel("rank of L·R")
    ax_rank.set_xlabel("matrix (model order)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds]
    ax_bits.legend(handles, kinds, ncol=min(len(kinds), 7), fontsize=8, loc="upper right")
    # block boundaries, when the names carry a block index
    blocks = [re.search(r"\.(\d+)\.", row["name"]) for row in layers]
    starts = [i for i in range(1, len(layers))
              if blocks[i] and blocks[i - 1] and blocks[i].group(1) != blocks[i - 1].group(1)]
    for ax in (ax_bits, ax_rank):
        for s in starts:
            ax.axvline(s - 0.5, color="0.85", linewidth=0.6, zorder=0)
    fig.tight_layout()
    suffix = path.suffix or ".png"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format=suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
