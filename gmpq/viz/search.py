"""Figures of a search run: BOPs against the budget and per-layer bit probabilities over epochs.

Reads the search stage's per-epoch log ``search_log.jsonl`` (one JSON object per epoch) with the keys ``epoch``,
``expected_bops_g``, ``budget_g``, ``w_bits`` and ``a_bits`` (the candidate weight and activation bit widths; a log
written before they were separate has one ``bits`` for both) and ``probs`` (``{layer: {"w": [...], "a": [...]}}``,
softmax(alpha_w) over ``w_bits`` and softmax(alpha_a) over ``a_bits``), and optionally ``decoded_bops_g``, ``loss``,
``loss_ce``, ``loss_attr``, ``loss_complexity``, ``train_top1``, ``alpha_entropy``, ``p``, ``lr_w``, ``lr_alpha``
and ``policy`` (``{layer: [w_bits, a_bits]}``, the decoded policy at that epoch).

The figure has three curves panels on top (expected and decoded BOPs with the budget and the decoding target
band [97%, 100%] of the budget; the loss terms; train top-1 and the mean alpha entropy) and two heatmaps below:
the expected bits E[b] = sum_i softmax(alpha)_i * bits_i of every searched layer (rows) at every epoch (columns),
for weights (over ``w_bits``) and for activations (over ``a_bits``), on one colour scale, with the last decoded
policy's bits printed on the right.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gmpq.errors import RunError
from gmpq.policy import describe_candidates
from gmpq.rundir import RunDir, StageDir
from gmpq.utils import read_user_text
from gmpq.viz._render import A_COLOR, W_COLOR, figure_format, new_figure, save_figure

LOG_NAME = RunDir(Path()).search.epoch_log.name
REQUIRED_KEYS = ("epoch", "expected_bops_g", "budget_g", "probs")
LOSS_KEYS = ("loss", "loss_ce", "loss_attr", "loss_complexity")
DECODE_LOW = 0.97  # the decoded policy lands in [DECODE_LOW * budget, budget]


def find_search_log(run: str | os.PathLike) -> Path:
    """The search log of ``run``: the file itself, that of a search stage directory or that of a run's search."""
    path = Path(run)
    if path.is_file():
        return path
    if not path.exists():
        raise RunError(f"search run {str(path)!r} does not exist; pass a search output_dir or its {LOG_NAME}")
    for candidate in (StageDir(path, "search").epoch_log, RunDir(path).search.epoch_log):
        if candidate.is_file():
            return candidate
    raise RunError(f"no {LOG_NAME} in {str(path)!r} (nor in its search stage); pass the output_dir of a "
                   "search run")


def read_search_log(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch records of a search log, one per epoch in epoch order.

    A resumed run may log an epoch twice: the later record wins. A truncated last line (a run killed while writing)
    is skipped with a warning; any other malformed line raises :class:`~gmpq.errors.RunError` naming it.
    """
    path = find_search_log(run)
    lines = read_user_text(path, "search log", RunError).splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    by_epoch: dict[int, dict[str, Any]] = {}
    for k, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if k == len(numbered) - 1 and k > 0:
                warnings.warn(f"{path}:{lineno}: skipping a truncated last record ({e.msg})", stacklevel=2)
                continue
            raise RunError(f"{path}:{lineno} is not valid JSON ({e.msg}); each line must be one epoch's record") from None
        if not isinstance(record, dict):
            raise RunError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
        missing = [key for key in REQUIRED_KEYS if key not in record]
        if missing:
            raise RunError(f"{path}:{lineno}: search log record lacks {', '.join(map(repr, missing))}")
        if not isinstance(record["epoch"], int) or isinstance(record["epoch"], bool):
            raise RunError(f"{path}:{lineno}: 'epoch' must be an integer, got {record['epoch']!r}")
        by_epoch[record["epoch"]] = record
    if not by_epoch:
        raise RunError(f"search log {str(path)!r} has no records yet; the search has not finished an epoch")
    return [by_epoch[e] for e in sorted(by_epoch)]


@dataclass(frozen=True)
class SearchTrace:
    """Per-epoch series of a search, ready to plot.

    Attributes:
        epochs: epoch numbers.
        layers: searched layer names in log order.
        w_bits / a_bits: candidate weight and activation bit widths.
        expected_w / expected_a: ``[layer][epoch]`` expected bits E[b] = sum_i p_i * bits_i.
        decoded: the last record's decoded policy ``{layer: (w_bits, a_bits)}`` (empty if not logged).
        series: ``{key: [value or nan per epoch]}`` for every scalar key of the log.
    """

    epochs: list[int]
    layers: list[str]
    w_bits: list[int]
    a_bits: list[int]
    expected_w: list[list[float]]
    expected_a: list[list[float]]
    decoded: dict[str, tuple[int, int]]
    series: dict[str, list[float]]


def _expected(probs: Any, bits: list[int], where: str) -> float:
    if not isinstance(probs, list) or len(probs) != len(bits) or not all(isinstance(v, (int, float)) for v in probs):
        raise RunError(f"{where}: expected {len(bits)} probabilities (one per candidate bit width {bits}), got {probs!r}")
    return float(sum(p * b for p, b in zip(probs, bits, strict=True)))


def _candidates(record: dict[str, Any], where: str) -> tuple[list[int], list[int]]:
    """A record's (weight, activation) candidate bits: ``w_bits`` and ``a_bits``, or an older log's ``bits`` for
    both."""
    if "w_bits" in record and "a_bits" in record:
        return record["w_bits"], record["a_bits"]
    if "bits" in record:
        return record["bits"], record["bits"]
    raise RunError(f"{where}: search log record lacks 'w_bits' and 'a_bits' (or an older log's 'bits')")


def search_trace(records: list[dict[str, Any]]) -> SearchTrace:
    """Turn the records of :func:`read_search_log` into a :class:`SearchTrace` (checks that they agree)."""
    w_bits, a_bits = _candidates(records[0], f"search log, epoch {records[0]['epoch']}")
    layers = list(records[0]["probs"])
    if not layers:
        raise RunError("search log record of epoch {} has no layers in 'probs'".format(records[0]["epoch"]))
    exp_w: list[list[float]] = [[] for _ in layers]
    exp_a: list[list[float]] = [[] for _ in layers]
    for record in records:
        where = f"search log, epoch {record['epoch']}"
        if _candidates(record, where) != (w_bits, a_bits):
            raise RunError(f"{where}: {describe_candidates(*_candidates(record, where))} differ from the first "
                           f"epoch's {describe_candidates(w_bits, a_bits)}")
        probs = record["probs"]
        if not isinstance(probs, dict) or list(probs) != layers:
            raise RunError(f"{where}: 'probs' must name the same layers in the same order as the first epoch")
        for i, name in enumerate(layers):
            entry = probs[name]
            if not isinstance(entry, dict) or "w" not in entry or "a" not in entry:
                raise RunError(f"{where}, layer {name!r}: expected {{'w': [...], 'a': [...]}}, got {entry!r}")
            exp_w[i].append(_expected(entry["w"], w_bits, f"{where}, layer {name!r}, weights"))
            exp_a[i].append(_expected(entry["a"], a_bits, f"{where}, layer {name!r}, activations"))
    scalar_keys = [k for k in dict.fromkeys(k for r in records for k in r)
                   if k != "epoch" and any(_number(r.get(k)) is not None for r in records)]
    series = {k: [v if (v := _number(r.get(k))) is not None else math.nan for r in records] for k in scalar_keys}
    raw_policy = records[-1].get("policy") or {}
    decoded = {n: (int(b[0]), int(b[1])) for n, b in raw_policy.items()
               if isinstance(b, (list, tuple)) and len(b) == 2} if isinstance(raw_policy, dict) else {}
    return SearchTrace([r["epoch"] for r in records], layers, list(w_bits), list(a_bits), exp_w, exp_a, decoded,
                       series)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _curves(fig, trace: SearchTrace, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax_bops, ax_loss, ax_acc = fig.subplots(1, 3)
    x = trace.epochs
    s = trace.series
    budget = s.get("budget_g")
    if budget:
        low = [DECODE_LOW * b for b in budget]
        ax_bops.fill_between(x, low, budget, color="#d62728", alpha=0.12, lw=0, label="decode target [97%, 100%]")
        ax_bops.plot(x, budget, color="#d62728", ls="--", lw=1.2, label="budget")
    ax_bops.plot(x, s["expected_bops_g"], color="#1f4e9a", marker="o", ms=3, lw=1.4, label="expected (softmax alpha)")
    if "decoded_bops_g" in s:
        ax_bops.plot(x, s["decoded_bops_g"], color="#2ca02c", marker="s", ms=3, lw=1.2, label="decoded policy")
    ax_bops.set_title("searched-layer BOPs vs budget", fontsize=9, loc="left")
    ax_bops.set_ylabel("GBOPs", fontsize=8)
    ax_bops.set_ylim(bottom=0)

    colors = {"loss": "#000000", "loss_ce": "#1f77b4", "loss_attr": "#9467bd", "loss_complexity": "#d62728"}
    for key in LOSS_KEYS:
        if key in s:
            ax_loss.plot(x, s[key], marker="o", ms=2.5, lw=1.2, color=colors[key], label=key)
    ax_loss.set_title("loss terms", fontsize=9, loc="left")

    # two y axes, each labelled in its curve's colour instead of a legend that could cover the curves
    acc_color, ent_color = "#1f77b4", "#8c564b"
    if "train_top1" in s:
        ax_acc.plot(x, s["train_top1"], color=acc_color, marker="o", ms=3, lw=1.2)
        ax_acc.set_ylabel("train top-1 (o)", fontsize=8, color=acc_color)
    if "alpha_entropy" in s:
        twin = ax_acc.twinx()
        twin.plot(x, s["alpha_entropy"], color=ent_color, marker="^", ms=3, lw=1.2)
        twin.set_ylabel("mean alpha entropy, nats (^)", fontsize=8, color=ent_color)
        twin.tick_params(labelsize=7)
        twin.set_ylim(bottom=0)
    ax_acc.set_title("train top-1 and alpha entropy", fontsize=9, loc="left")
    for ax in (ax_bops, ax_loss, ax_acc):
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(color="#e0e0e0", lw=0.5)
    for ax in (ax_bops, ax_loss):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")


def _heatmaps(fig, trace: SearchTrace) -> None:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    axes = fig.subplots(1, 2, sharey=True)
    n_layers = len(trace.layers)
    e0, e1 = trace.epochs[0], trace.epochs[-1]
    bits = sorted(set(trace.w_bits) | set(trace.a_bits))  # one colour scale for both heatmaps
    image = None
    for k, (ax, data, what, color) in enumerate(((axes[0], trace.expected_w, "weight", W_COLOR),
                                                  (axes[1], trace.expected_a, "activation", A_COLOR))):
        image = ax.imshow(np.asarray(data), aspect="auto", cmap="viridis", interpolation="nearest",
                          vmin=bits[0], vmax=bits[-1],
                          extent=(e0 - 0.5, e1 + 0.5, n_layers - 0.5, -0.5))
        ax.set_title(f"expected {what} bits per layer", fontsize=9, loc="left", color=color)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.set_yticks(range(n_layers), trace.layers, fontsize=6, family="DejaVu Sans Mono")
        else:
            ax.tick_params(labelleft=False)
        if trace.decoded:
            right = ax.twinx()
            right.set_ylim(ax.get_ylim())
            right.set_yticks(range(n_layers), [str(trace.decoded.get(n, ("?", "?"))[k]) for n in trace.layers],
                             fontsize=6)
            right.tick_params(length=0, pad=2)
            right.set_ylabel(f"decoded {what[0].upper()} bits (last epoch)", fontsize=7)
    cbar = fig.colorbar(image, ax=list(axes), ticks=bits, fraction=0.03, pad=0.01)
    cbar.set_label("E[bits] = sum softmax(alpha) * bits", fontsize=7)
    cbar.ax.tick_params(labelsize=7)


def plot_search(run: str | os.PathLike, out: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the search figure of ``run`` (a search output_dir, a pipeline run dir or a ``search_log.jsonl``) to ``out``.

    Returns the written path (.png, .svg or .pdf, written atomically).
    """
    figure_format(out)
    log = find_search_log(run)
    trace = search_trace(read_search_log(log))
    n_layers = len(trace.layers)
    heat_h = 0.13 * n_layers + 1.1
    curves_h = 2.9
    fig = new_figure(13.0, curves_h + heat_h)
    top, bottom = fig.subfigures(2, 1, height_ratios=[curves_h, heat_h])
    last = trace.series
    stage = log.parent
    run_name = f"{stage.parent.name}/{stage.name}" if stage == RunDir(stage.parent).search.path else stage.name
    summary = [f"search run {run_name}", f"{n_layers} searched layers", describe_candidates(trace.w_bits, trace.a_bits),
               f"{len(trace.epochs)} epochs"]
    if "budget_g" in last:
        summary.append(f"budget {last['budget_g'][-1]:g} G")
    if "decoded_bops_g" in last:
        summary.append(f"final decoded {last['decoded_bops_g'][-1]:.2f} G")
    _curves(top, trace, title or "  ·  ".join(summary))
    _heatmaps(bottom, trace)
    return save_figure(fig, out)
