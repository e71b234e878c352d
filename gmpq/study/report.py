"""A study's report: ``results.csv`` (every cell), ``summary.md`` (statistics) and ``study.png`` (top-1 vs BOPs).

``summary.md`` has, per budget and strategy, the mean and standard deviation of the target top-1 over seeds, the
searched BOPs as a fraction of the budget, the mean bits, and the paired difference (95 % interval over seeds, see
:mod:`gmpq.study.stats`) to the uniform policies below and above the budget and to the random policy; then every cell,
including those where a searched policy loses. Uniform policies are named with their BOPs: the one below the budget
may use much less of it, and a comparison with it is not one "at the same budget".
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from gmpq.study.config import StudyConfig
from gmpq.study.results import results_csv
from gmpq.study.stats import PairedDifference, paired_difference, spread
from gmpq.utils import atomic_write_text

RESULTS_FILE, SUMMARY_FILE, FIGURE_FILE = "results.csv", "summary.md", "study.png"
BASELINES = ("uniform_below", "uniform_above", "random")


def write_report(study: StudyConfig, rows: list[dict[str, Any]], total_cells: int) -> tuple[Path, Path | None]:
    """Write ``results.csv``, ``summary.md``, ``study.png`` and, where gmpq and edmips both ran, one figure per budget
    of their policies side by side (``policies_b<budget>.png``); return the summary's and study.png's paths."""
    directory = study.directory
    atomic_write_text(directory / RESULTS_FILE, results_csv(rows))
    float_line = study.float_top1()
    attribution = attribution_effect(study, rows)
    text = summary_markdown(study, rows, total_cells, float_line) + _attribution_markdown(attribution)
    summary = atomic_write_text(directory / SUMMARY_FILE, text)
    figure = plot_study(study, rows, directory / FIGURE_FILE, float_line) if rows else None
    return summary, figure


def attribution_effect(study: StudyConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the attribution loss changes in the decoded policy: per budget and seed where both ``gmpq`` and
    ``edmips`` finished, the searched layers whose (w, a) differ and the mean absolute bit difference; writes the
    first seed's two policies side by side as ``policies_b<budget>.png``."""
    from gmpq.policy import Policy
    from gmpq.rundir import RunDir
    from gmpq.viz import plot_policies

    table = _by(rows)
    out = []
    for (budget, strategy), cells in sorted(table.items()):
        if strategy != "gmpq" or (budget, "edmips") not in table:
            continue
        others = table[(budget, "edmips")]
        for seed in sorted(set(cells) & set(others)):
            g = Policy.load(RunDir(study.cell_dir(cells[seed]["run_id"])).policy)
            e = Policy.load(RunDir(study.cell_dir(others[seed]["run_id"])).policy)
            diff = [n for n in g.layers if (g.layers[n].w_bits, g.layers[n].a_bits) !=
                    (e.layers[n].w_bits, e.layers[n].a_bits)]
            dw = sum(abs(g.layers[n].w_bits - e.layers[n].w_bits) for n in g.layers) / len(g.layers)
            da = sum(abs(g.layers[n].a_bits - e.layers[n].a_bits) for n in g.layers) / len(g.layers)
            out.append({"budget_g": budget, "seed": seed, "layers": len(g.layers), "differ": len(diff),
                        "mean_abs_dw": dw, "mean_abs_da": da})
            if seed == min(set(cells) & set(others)):
                plot_policies([g, e], study.directory / f"policies_b{budget:g}.png", labels=[
                    f"gmpq (attribution loss), budget {budget:g} G, seed {seed}",
                    f"edmips (same search without it), budget {budget:g} G, seed {seed}"])
    return out


def _attribution_markdown(effect: list[dict[str, Any]]) -> str:
    if not effect:
        return ""
    lines = ["", "## What the attribution loss changes in the policy", "",
             "gmpq and edmips run the same search, with and without the attribution loss, from the same float model, "
             "data order and seed. Per budget and seed: searched layers whose (w, a) differ, and the mean absolute "
             "difference in weight / activation bits over the searched layers (`policies_b<budget>.png`: the first "
             "seed's two policies).", "",
             "| budget G | seed | layers that differ | mean abs Δ W bits | mean abs Δ A bits |", "|---|---|---|---|---|"]
    for e in effect:
        lines.append(f"| {e['budget_g']:g} | {e['seed']} | {e['differ']} of {e['layers']} | {e['mean_abs_dw']:.2f} | "
                     f"{e['mean_abs_da']:.2f} |")
    return "\n".join(lines) + "\n"


def _by(rows: list[dict[str, Any]]) -> dict[tuple[float, str], dict[int, dict[str, Any]]]:
    table: dict[tuple[float, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        table[(r["budget_g"], r["strategy"])][r["seed"]] = r
    return table


def _diff(d: PairedDifference | None) -> str:
    if d is None:
        return "–"
    if d.low is None:
        return f"{d.mean:+.2f} (n=1)"
    star = " *" if d.excludes_zero else ""
    return f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]{star}"


def _pm(values: list[float], digits: int = 2) -> str:
    s = spread(values)
    return f"{s.mean:.{digits}f}" + ("" if s.sd is None else f" ± {s.sd:.{digits}f}")


def _finetune_length(r: Any) -> str:
    """``N epochs`` or, where ``finetune.max_steps`` cuts each epoch short, ``S steps of B images``."""
    batch = r.target.batch_size or r.data.batch_size
    if r.finetune.max_steps:
        return f"{r.finetune.epochs * r.finetune.max_steps} steps of {batch} images"
    return f"{r.finetune.epochs} epoch{'s' if r.finetune.epochs != 1 else ''}"


def summary_markdown(study: StudyConfig, rows: list[dict[str, Any]], total_cells: int,
                     float_line: float | None) -> str:
    """The text of ``summary.md`` (module docstring)."""
    r = study.recipe
    t = r.target
    devices = sorted({row["device"] for row in rows if row.get("device")})
    lines = [f"# Study `{study.name}`", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines += [
        f"- command: `gmpq study {study.source or '<config>'}`",
        f"- search: `{r.model.arch}` on `{r.data.dataset}` (input {r.data.input_size or 'native'}, "
        f"{r.data.holdout} training images held out for the decoded-policy evaluation), candidate bits "
        f"{list(r.search.bits)}, {r.search.epochs} search epochs; budgets in GBOPs of the searched layers of "
        f"`{r.model.deploy_arch or r.model.arch}` at {r.model.deploy_input_size}x{r.model.deploy_input_size}",
        f"- target: `{t.dataset}`{f' (first {t.classes} classes)' if t.classes else ''} (input "
        f"{t.input_size or 'native'}, {t.holdout} training images held out for monitoring), "
        f"{_finetune_length(r)} of fine-tuning from the target float model; top-1 on the test split "
        f"`{r.evaluate.split or 'default'}`, read once per cell",
        f"- float target model: top-1 {float_line:.2f} %" if float_line is not None else "- float target model: "
        "not evaluated yet",
        f"- cells finished: {len(rows)} of {total_cells}; seeds {study.seeds}; devices: {', '.join(devices) or '–'}",
        "",
        "## Per budget and strategy",
        "",
        "Top-1 (%) on the target's test split, mean ± standard deviation over seeds. Δ: paired difference over seeds "
        "to the baseline, mean [95 % t-interval]; * marks an interval that excludes 0. `uniform_below` / "
        "`uniform_above` are the nearest uniform policies at or below and above the budget (their BOPs are in the "
        "BOPs column).",
        "",
        "| budget G | strategy | n | top-1 | searched GBOPs (% of budget) | mean W / A bits | Δ vs uniform below "
        "| Δ vs uniform above | Δ vs random | search s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = _by(rows)
    order = {s: i for i, s in enumerate(_strategy_order(study))}
    for budget, strategy in sorted(table, key=lambda k: (k[0], order.get(k[1], 99))):
        cells = table[(budget, strategy)]
        top1 = {s: c["top1"] for s, c in cells.items()}
        bops = [c["bops_searched_g"] for c in cells.values()]
        searched = [c["search_s"] for c in cells.values() if c.get("search_s") is not None]
        diffs = []
        for base in BASELINES:
            other = table.get((budget, base))
            diffs.append("" if base == strategy else
                         _diff(paired_difference(top1, {s: c["top1"] for s, c in other.items()}) if other else None))
        search_s = f"{spread(searched).mean:.0f}" if searched else "–"
        w_bits = _pm([c["mean_w_bits"] for c in cells.values()])
        a_bits = _pm([c["mean_a_bits"] for c in cells.values()])
        lines.append(f"| {budget:g} | {strategy} | {len(cells)} | {_pm(list(top1.values()))} | {_pm(bops, 3)} "
                     f"({100 * spread(bops).mean / budget:.0f} %) | {w_bits} / {a_bits} | {' | '.join(diffs)} | "
                     f"{search_s} |")
    lines += ["", "## Every cell", "",
              "| budget G | strategy | seed | top-1 | top-5 | searched GBOPs | % of budget | W / A bits | "
              "proxy holdout top-1 (decoded) | alpha entropy | search s | cell s | device |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda x: (x["budget_g"], order.get(x["strategy"], 99), x["seed"])):
        lines.append(
            f"| {row['budget_g']:g} | {row['strategy']} | {row['seed']} | {row['top1']:.2f} | {row['top5']:.2f} | "
            f"{row['bops_searched_g']:.4f} | {100 * row['budget_fraction']:.1f} | {row['mean_w_bits']:.2f} / "
            f"{row['mean_a_bits']:.2f} | {_opt(row.get('proxy_holdout_top1'))} | {_opt(row.get('alpha_entropy'), 3)} | "
            f"{_opt(row.get('search_s'), 0)} | {_opt(row.get('cell_s'), 0)} | {row.get('device') or '–'} |")
    return "\n".join(lines) + "\n"


def _opt(value: Any, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _strategy_order(study: StudyConfig) -> list[str]:
    out = []
    for s in study.strategies:
        out += ["uniform_below", "uniform_above"] if s == "uniform" else [s]
    return out


def plot_study(study: StudyConfig, rows: list[dict[str, Any]], path: Path, float_line: float | None) -> Path:
    """``study.png``: target top-1 against searched BOPs; per strategy and budget the mean over seeds with ±1 sd
    error bars, each seed as a small dot; the float model as a horizontal line, the budgets as dotted lines."""
    from gmpq.viz._render import new_figure, save_figure
    from gmpq.viz.compare import COLORS, MARKERS

    strategies = [s for s in _strategy_order(study) if any(r["strategy"] == s for r in rows)]
    fig = new_figure(8.0, 5.0)
    ax = fig.subplots()
    table = _by(rows)
    for i, strategy in enumerate(strategies):
        color, marker = COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]
        xs, ys, xerr, yerr = [], [], [], []
        for (_budget, s), cells in sorted(table.items()):
            if s != strategy:
                continue
            b = spread([c["bops_searched_g"] for c in cells.values()])
            t = spread([c["top1"] for c in cells.values()])
            xs.append(b.mean), ys.append(t.mean), xerr.append(b.sd or 0.0), yerr.append(t.sd or 0.0)
            ax.scatter([c["bops_searched_g"] for c in cells.values()], [c["top1"] for c in cells.values()], s=9,
                       color=color, alpha=0.45, linewidth=0, zorder=2)
            if strategy.startswith("uniform"):
                first = next(iter(cells.values()))
                ax.annotate(f"W{first['mean_w_bits']:.0f}A{first['mean_a_bits']:.0f}", (b.mean, t.mean),
                            xytext=(6, -10), textcoords="offset points", fontsize=7, color=color)
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=marker, color=color, markeredgecolor="#1a1a1a",
                    markeredgewidth=0.5, ms=7, capsize=3, lw=1, label=strategy, zorder=3)
    for budget in study.budgets:
        ax.axvline(budget, color="#9e9e9e", ls=":", lw=0.8, zorder=1)
    if float_line is not None:
        ax.axhline(float_line, color="#303030", ls="--", lw=1, label=f"float ({float_line:.1f} %)", zorder=1)
    r = study.recipe
    ax.set_xlabel(f"searched GBOPs ({r.model.deploy_arch or r.model.arch} at {r.model.deploy_input_size}px; "
                  f"dotted: budgets)", fontsize=9)
    ax.set_ylabel(f"top-1 on {r.target.dataset} (%)", fontsize=9)
    ax.set_title(f"{study.name}\nsearch on {r.data.dataset}, fine-tune on {r.target.dataset} "
                 f"(mean ± sd over {len(study.seeds)} seeds)", fontsize=9, loc="left")
    ax.grid(color="#e0e0e0", lw=0.5)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, path)
