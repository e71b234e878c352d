"""Comparing runs: a table of accuracy and cost per run directory, and a scatter of top-1 against BOPs.

A run directory is the ``output_dir`` of a stage (search, finetune, evaluate) or of a whole pipeline
(``gmpq run``); either way its top-level ``metrics.json`` holds what this module reads: ``top1``, ``top5``
(percent), ``bops_searched_g``, ``bops_total_g``, ``size_bytes``, ``strategy``, ``proxy_dataset`` and
``target_dataset``. A directory without one but with stage subdirectories (``search``, ``finetune``, ``evaluate``,
as in a pipeline's ``uniform/`` baseline) is read by merging the stages' ``metrics.json`` in that order. A pipeline
run that compared itself with the uniform policy brings that baseline along as a second row
(``<run>/uniform``). Missing keys are shown as ``-``. The run's ``policy.json`` (at the top or in a stage
subdirectory) adds the architecture and the mean weight/activation bits, and fills in strategy, proxy dataset and
BOPs where ``metrics.json`` lacks them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gmpq.errors import PolicyError, RunError
from gmpq.rundir import RunDir, StageDir
from gmpq.utils import read_user_text
from gmpq.viz._render import figure_format, new_figure, save_figure

BOPS_AXES = ("searched", "total")
MERGED_STAGES = ("search", "finetune", "evaluate")  # merged in this order when a run has no summary of its own
METRICS_NAME = RunDir(Path()).summary.name


@dataclass
class RunSummary:
    """What one run directory reports (``None`` where it does not say)."""

    run: str
    path: str
    top1: float | None = None
    top5: float | None = None
    bops_searched_g: float | None = None
    bops_total_g: float | None = None
    size_bytes: int | None = None
    strategy: str | None = None
    proxy_dataset: str | None = None
    target_dataset: str | None = None
    arch: str | None = None
    mean_w_bits: float | None = None
    mean_a_bits: float | None = None
    policy_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(read_user_text(path, what, RunError))
    except json.JSONDecodeError as e:
        raise RunError(f"{what} {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno})") from None


def _find_policy(run: Path) -> Path | None:
    """The policy of a stage directory, else the run's searched policy, else its fine-tuned one."""
    for candidate in (StageDir(run).policy, RunDir(run).policy, RunDir(run).finetune.policy):
        if candidate.is_file():
            return candidate
    return None


def _num(metrics: dict[str, Any], key: str, path: Path) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunError(f"{path}: {key!r} must be a number, got {value!r}")
    return float(value)


def _text(metrics: dict[str, Any], key: str) -> str | None:
    value = metrics.get(key)
    return None if value is None else str(value)


def summarize_run(run_dir: str | os.PathLike, label: str | None = None) -> RunSummary:
    """Read one run directory's ``metrics.json`` (and ``policy.json`` where present) into a :class:`RunSummary`."""
    from gmpq.policy import Policy

    run = Path(run_dir)
    if not run.exists():
        raise RunError(f"run directory {str(run)!r} does not exist")
    if not run.is_dir():
        raise RunError(f"{str(run)!r} is not a directory; pass a run's output_dir (it holds {METRICS_NAME})")
    metrics_path = RunDir(run).summary
    stage_paths = [m for m in (RunDir(run).stage(s).metrics for s in MERGED_STAGES) if m.is_file()]
    if not metrics_path.is_file() and not stage_paths:
        raise RunError(f"{str(run)!r} has no {METRICS_NAME}; pass the output_dir of a finished stage or pipeline run")
    metrics: dict[str, Any] = {}
    for path in [metrics_path] if metrics_path.is_file() else stage_paths:
        part = _read_json(path, "metrics file")
        if not isinstance(part, dict):
            raise RunError(f"{path}: expected a JSON object, got {type(part).__name__}")
        metrics.update(part)
        metrics_path = path
    size = _num(metrics, "size_bytes", metrics_path)
    summary = RunSummary(
        run=label or run.resolve().name, path=str(run),
        top1=_num(metrics, "top1", metrics_path), top5=_num(metrics, "top5", metrics_path),
        bops_searched_g=_num(metrics, "bops_searched_g", metrics_path),
        bops_total_g=_num(metrics, "bops_total_g", metrics_path),
        size_bytes=None if size is None else int(size), strategy=_text(metrics, "strategy"),
        proxy_dataset=_text(metrics, "proxy_dataset"),
        target_dataset=_text(metrics, "target_dataset") or (_text(metrics, "dataset") if "top1" in metrics else None),
        arch=_text(metrics, "arch"),
    )
    policy_path = _find_policy(run)
    if policy_path is not None:
        try:
            policy = Policy.load(policy_path)
        except PolicyError as e:
            raise RunError(f"run {str(run)!r}: {e}") from None
        prov = policy.provenance
        summary.policy_path = str(policy_path)
        summary.arch = summary.arch or policy.arch
        summary.mean_w_bits, summary.mean_a_bits = policy.mean_bits
        summary.strategy = summary.strategy or _text(prov, "strategy")
        summary.proxy_dataset = summary.proxy_dataset or _text(prov, "proxy_dataset") or _text(prov, "dataset")
        if summary.bops_searched_g is None:
            summary.bops_searched_g = policy.bops_searched_g
        if summary.bops_total_g is None:
            summary.bops_total_g = policy.bops_total_g
    return summary


def compare_runs(run_dirs: Sequence[str | os.PathLike]) -> list[RunSummary]:
    """A :class:`RunSummary` per run directory; runs whose directory names clash are labelled by their full path."""
    if not run_dirs:
        raise RunError("no run directories to compare; pass at least one")
    names = [Path(d).resolve().name for d in run_dirs]
    given = {Path(d).resolve() for d in run_dirs}
    summaries = []
    for d, n in zip(run_dirs, names, strict=True):
        label = str(d) if names.count(n) > 1 else n
        summaries.append(summarize_run(d, label=label))
        baseline = RunDir(Path(d)).uniform
        if (RunDir(Path(d)).summary.is_file() and baseline.evaluate.finished
                and baseline.root.resolve() not in given):
            summaries.append(summarize_run(baseline.root, label=f"{label}/{baseline.root.name}"))
    return summaries


COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (field, header, format)
    ("run", "run", "{}"), ("arch", "arch", "{}"), ("strategy", "strategy", "{}"), ("proxy_dataset", "proxy", "{}"),
    ("target_dataset", "target", "{}"), ("top1", "top1 %", "{:.2f}"), ("top5", "top5 %", "{:.2f}"),
    ("bops_searched_g", "GBOPs searched", "{:.2f}"), ("bops_total_g", "GBOPs total", "{:.2f}"),
    ("size_bytes", "size MB", "size"), ("mean_w_bits", "mean W", "{:.2f}"), ("mean_a_bits", "mean A", "{:.2f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if fmt == "size":
        return f"{value / 1e6:.2f}"
    return fmt.format(value)


def format_compare_table(runs: Sequence[RunSummary]) -> str:
    """A plain-text table, one row per run, ``-`` where a run does not report a value."""
    rows = [[header for _, header, _ in COLUMNS]]
    rows += [[_cell(getattr(r, f), fmt) for f, _, fmt in COLUMNS] for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    numeric = [fmt != "{}" for _, _, fmt in COLUMNS]
    lines = ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


_LABEL_OFFSETS = ((5, 4), (5, -11), (-5, 4), (-5, -11), (0, 8), (0, -15), (8, -3), (-8, -3), (5, 14), (5, -21),
                  (-5, 14), (-5, -21))


def _place_labels(fig, ax, labels: list) -> None:
    """Move each point label to the first of a few offsets where it overlaps no point and no label placed before.

    Greedy, in display coordinates after the layout is fixed; labels stay out of the layout computation.
    """
    for label in labels:
        label.set_in_layout(False)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pad = 2.0
    points = [ax.transData.transform(label.xy) for label in labels]
    taken = [(x - 5, y - 5, x + 5, y + 5) for x, y in points]
    frame = ax.get_window_extent(renderer)

    def overlap(a: tuple, b: tuple) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return max(w, 0.0) * max(h, 0.0)

    for label in labels:
        best, best_cost = None, float("inf")
        for dx, dy in _LABEL_OFFSETS:
            label.set_position((dx, dy))
            label.set_horizontalalignment("left" if dx >= 0 else "right")
            box = label.get_window_extent(renderer)
            rect = (box.x0 - pad, box.y0 - pad, box.x1 + pad, box.y1 + pad)
            inside = overlap(rect, (frame.x0, frame.y0, frame.x1, frame.y1))
            cost = sum(overlap(rect, t) for t in taken) + (box.width + 2 * pad) * (box.height + 2 * pad) - inside
            if cost < best_cost:
                best, best_cost = (dx, dy, rect), cost
            if cost == 0:
                break
        dx, dy, rect = best
        label.set_position((dx, dy))
        label.set_horizontalalignment("left" if dx >= 0 else "right")
        taken.append(rect)


def plot_compare(
    runs: Sequence[RunSummary | str | os.PathLike], out: str | os.PathLike, bops: str = "searched",
    title: str | None = None,
) -> Path:
    """Scatter of top-1 against BOPs (``bops`` = ``"searched"`` or ``"total"``), colour = strategy, marker = proxy.

    ``runs`` are :class:`RunSummary` objects or run directories. Runs without top-1 or BOPs are listed under the
    plot as not shown; if none has both, :class:`~gmpq.errors.RunError` is raised. Returns the written path.
    """
    from matplotlib.lines import Line2D

    figure_format(out)
    if bops not in BOPS_AXES:
        raise RunError(f"unknown BOPs axis {bops!r}; choose one of {', '.join(BOPS_AXES)}")
    summaries = [r if isinstance(r, RunSummary) else summarize_run(r) for r in runs]
    key = f"bops_{bops}_g"
    plottable = [r.top1 is not None and getattr(r, key) is not None for r in summaries]
    shown = [r for r, ok in zip(summaries, plottable, strict=True) if ok]
    hidden = [r.run for r, ok in zip(summaries, plottable, strict=True) if not ok]
    if not shown:
        raise RunError(f"none of the {len(summaries)} runs reports both top1 and {key} in {METRICS_NAME}; "
                       "nothing to plot")
    strategies = list(dict.fromkeys(r.strategy or "-" for r in shown))
    proxies = list(dict.fromkeys(r.proxy_dataset or "-" for r in shown))
    color = {s: COLORS[i % len(COLORS)] for i, s in enumerate(strategies)}
    marker = {p: MARKERS[i % len(MARKERS)] for i, p in enumerate(proxies)}

    fig = new_figure(7.5, 5.0 + 0.2 * bool(hidden))
    ax = fig.subplots()
    labels = []
    for r in shown:
        x, y = getattr(r, key), r.top1
        ax.scatter([x], [y], s=55, color=color[r.strategy or "-"], marker=marker[r.proxy_dataset or "-"],
                   edgecolor="#1a1a1a", linewidth=0.5, zorder=3)
        labels.append(ax.annotate(r.run, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7,
                                  color="#303030", zorder=4, annotation_clip=False))
    ax.set_xlabel(f"GBOPs ({bops} layers)" if bops == "searched" else "GBOPs (all layers)", fontsize=9)
    ax.set_ylabel("top-1 (%)", fontsize=9)
    ax.grid(color="#e0e0e0", lw=0.5)
    ax.tick_params(labelsize=8)
    ax.margins(x=0.15, y=0.15)
    by_strategy = [Line2D([], [], ls="", marker="o", color=color[s], markeredgecolor="#1a1a1a", label=s)
                   for s in strategies]
    by_proxy = [Line2D([], [], ls="", marker=marker[p], color="#bdbdbd", markeredgecolor="#1a1a1a", label=p)
                for p in proxies]
    first = ax.legend(handles=by_strategy, title="strategy", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      fontsize=8, title_fontsize=8, frameon=False)
    ax.add_artist(first)
    ax.legend(handles=by_proxy, title="proxy dataset", loc="upper left", bbox_to_anchor=(1.01, 0.55), fontsize=8,
              title_fontsize=8, frameon=False)
    targets = sorted({r.target_dataset for r in shown if r.target_dataset})
    ax.set_title(title or ("top-1 against BOPs" + (f" on {', '.join(targets)}" if targets else "")), fontsize=10,
                 loc="left")
    _place_labels(fig, ax, labels)
    if hidden:
        # supxlabel takes part in the constrained layout, so the note sits below the axis label instead of on it
        fig.supxlabel(f"not shown (no top1 or {key}): {', '.join(hidden)}", x=0.01, ha="left", fontsize=7,
                      color="#606060")
    return save_figure(fig, out)
