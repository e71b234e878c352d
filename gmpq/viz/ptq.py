"""The figure of a post-training reconstruction: each block's output error before and after, and its loss curve."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gmpq.viz._render import A_COLOR, W_COLOR, new_figure, save_figure


def plot_ptq(report: Any, path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot a :class:`gmpq.ptq.PtqReport` (or its ``to_dict()``): left, each block's output error against the float
    block with round-to-nearest and with the learned rounding (log scale); right, each block's reconstruction loss
    over its iterations. Returns the written path."""
    data: Mapping[str, Any] = report if isinstance(report, Mapping) else report.to_dict()
    blocks = data["blocks"]
    fig = new_figure(11, 4)
    left, right = fig.subplots(1, 2)
    names = [b["name"] for b in blocks]
    xs = range(len(blocks))
    width = 0.4
    left.bar([x - width / 2 for x in xs], [max(b["nearest_error"], 1e-12) for b in blocks], width,
             color=A_COLOR, label="round-to-nearest")
    left.bar([x + width / 2 for x in xs], [max(b["learned_error"], 1e-12) for b in blocks], width,
             color=W_COLOR, label="learned rounding")
    left.set_yscale("log")
    left.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    left.set_ylabel("block output error (squared, per position)")
    left.legend(fontsize=8)
    for i, b in enumerate(blocks):
        if b["curve"]:
            its, losses = zip(*b["curve"], strict=True)  # ten colours, then the next line style
            right.plot(its, losses, lw=1, label=b["name"], color=f"C{i % 10}", ls=("-", "--", ":")[i // 10 % 3])
    right.set_yscale("log")
    right.set_xlabel("iteration")
    right.set_ylabel("reconstruction loss (batch)")
    if len(blocks) <= 24:
        right.legend(fontsize=6, ncol=2)
    fig.suptitle(title or f"post-training reconstruction on {data['images']} images ({data['rounding']} rounding)")
    return save_figure(fig, path)
