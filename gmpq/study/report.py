"""A study's report: ``results.csv`` (every cell), ``summary.md`` (statistics) and ``study.png`` (top-1 vs BOPs).

``summary.md`` has, per budget and strategy, the mean and standard deviation of the target top-1 over seeds, the
searched BOPs as a fraction of the budget, the mean bits, and the paired difference (95 % interval over seeds, see
:mod:`gmpq.study.stats`) to the uniform policies below and above the budget and to the random policy; then every cell,
including those where a searched policy loses. Uniform policies are named with their BOPs: the one below the budget
may use much less of it, and a comparison with it is not one "at the same budget".

A study with several proxies names each searched strategy ``<strategy>@<proxy>`` and adds, per deployment
(``qat``, ``ptq``): each proxy's policy against the oracle's (the proxy named ``oracle``) paired by seed and budget,
gmpq against edmips per proxy, the per-layer bits of every strategy side by side (seed 0), the search wall time per
strategy and proxy, and the study's ``references`` (published figures) as a table. ``study.png`` shows the QAT cells
(or the one deployment), ``study_ptq.png`` the PTQ cells of a study that has both.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gmpq.policy import describe_candidates
from gmpq.study.baselines import Borrowed, borrow_baselines
from gmpq.study.config import StudyConfig
from gmpq.study.results import finished_cells, results_csv, row_cell_dir
from gmpq.study.stats import PairedDifference, paired_difference, spread
from gmpq.utils import atomic_write_text

RESULTS_FILE, SUMMARY_FILE, FIGURE_FILE = "results.csv", "summary.md", "study.png"
BASELINES = ("uniform_below", "uniform_above", "random")
#: The proxy every other proxy's policies are compared with (searching on the target's own training split).
ORACLE = "oracle"
#: Strategies whose transfer (proxy against oracle) the summary reports.
TRANSFER_STRATEGIES = ("gmpq", "edmips", "hawq", "ompq")
DEPLOY_NAMES = {"qat": "QAT (fine-tuning with distillation)", "ptq": "PTQ (post-training)"}
#: Table order of strategies a study did not run itself (borrowed rows).
_CANONICAL_ORDER = ("gmpq", "edmips", "hawq", "ompq", "target", "random", "uniform_below", "uniform_above")
#: The mark of a borrowed row's strategy in the tables.
BORROWED_MARK = " †"


def label(row: dict[str, Any]) -> str:
    """A row's strategy as the tables name it: ``<strategy>@<proxy>`` for a searched strategy of a named proxy."""
    return f"{row['strategy']}@{row['proxy']}" if row.get("proxy") else row["strategy"]


def _deployed(rows: list[dict[str, Any]], deploy: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("deploy", "qat") == deploy]


def _figure_file(study: StudyConfig, deploy: str) -> str:
    return FIGURE_FILE if deploy == ("qat" if "qat" in study.deploy else study.deploy[0]) else f"study_{deploy}.png"


def write_report(study: StudyConfig, rows: list[dict[str, Any]], total_cells: int,
                 failed: Sequence[dict[str, Any]] = ()) -> tuple[Path, Path | None]:
    """Write ``results.csv``, ``summary.md``, ``study.png`` and, where gmpq and edmips both ran, one figure per budget
    of their policies side by side (``policies_b<budget>.png``); return the summary's and study.png's paths.
    ``failed`` (:func:`~gmpq.study.results.failed_rows`) are listed in results.csv and the summary; rows borrowed
    from ``study.baselines`` (:mod:`gmpq.study.baselines`) join every table, marked."""
    directory = study.directory
    borrowed = borrow_baselines(study)
    if borrowed is not None:
        rows = [*rows, *borrowed.rows]
    atomic_write_text(directory / RESULTS_FILE, results_csv(rows, failed))
    float_line = study.float_top1()
    attribution = attribution_effect(study, _deployed(rows, study.deploy[0]))
    text = summary_markdown(study, rows, total_cells, float_line, failed, borrowed)
    text += _attribution_markdown(attribution)
    text += _loss_terms_markdown(search_loss_terms(study, _deployed(rows, study.deploy[0])))
    if study.proxies:
        text += proxies_markdown(study, rows)
    text += references_markdown(study)
    summary = atomic_write_text(directory / SUMMARY_FILE, text)
    figure = None
    for deploy in study.deploy:
        deployed = _deployed(rows, deploy)
        if deployed:
            path = plot_study(study, deployed, directory / _figure_file(study, deploy), float_line, deploy)
            figure = path if path.name == FIGURE_FILE else figure
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
        if strategy.partition("@")[0] != "gmpq" or (budget, strategy.replace("gmpq", "edmips", 1)) not in table:
            continue
        proxy = strategy.partition("@")[2]
        others = table[(budget, strategy.replace("gmpq", "edmips", 1))]
        for seed in sorted(set(cells) & set(others)):
            g = Policy.load(RunDir(row_cell_dir(study, cells[seed])).policy)
            e = Policy.load(RunDir(row_cell_dir(study, others[seed])).policy)
            diff = [n for n in g.layers if (g.layers[n].w_bits, g.layers[n].a_bits) !=
                    (e.layers[n].w_bits, e.layers[n].a_bits)]
            dw = sum(abs(g.layers[n].w_bits - e.layers[n].w_bits) for n in g.layers) / len(g.layers)
            da = sum(abs(g.layers[n].a_bits - e.layers[n].a_bits) for n in g.layers) / len(g.layers)
            out.append({"budget_g": budget, "proxy": proxy, "seed": seed, "layers": len(g.layers),
                        "differ": len(diff), "mean_abs_dw": dw, "mean_abs_da": da})
            if seed == min(set(cells) & set(others)):
                on = f", proxy {proxy}" if proxy else ""
                plot_policies([g, e], study.directory / f"policies_b{budget:g}{'_' + proxy if proxy else ''}.png",
                              labels=[f"gmpq (attribution loss), budget {budget:g} G{on}, seed {seed}",
                                      f"edmips (same search without it), budget {budget:g} G{on}, seed {seed}"])
    return out


def _section(title: str, intro: str, columns: list[str], rows: list[str]) -> str:
    """A summary section: its heading, one paragraph and a table of ``columns`` with ``rows`` (formatted cells
    joined by `` | ``); empty without rows."""
    if not rows:
        return ""
    lines = ["", f"## {title}", "", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + [f"| {row} |" for row in rows]) + "\n"


def _attribution_markdown(effect: list[dict[str, Any]]) -> str:
    return _section(
        "What the attribution loss changes in the policy",
        "gmpq and edmips run the same search, with and without the attribution loss, from the same float model, "
        "data order and seed. Per budget and seed: searched layers whose (w, a) differ, and the mean absolute "
        "difference in weight / activation bits over the searched layers (`policies_b<budget>.png`: the first "
        "seed's two policies).",
        ["budget G", "proxy", "seed", "layers that differ", "mean abs Δ W bits", "mean abs Δ A bits"],
        [f"{e['budget_g']:g} | {e['proxy'] or '–'} | {e['seed']} | {e['differ']} of {e['layers']} | "
         f"{e['mean_abs_dw']:.2f} | {e['mean_abs_da']:.2f}" for e in effect])


def search_loss_terms(study: StudyConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The supernet searches' loss terms at their last epoch (``search_log.jsonl``), per budget and strategy@proxy
    as mean over seeds: cross-entropy, lambda_attr * L_attr, the budget term, the architecture logits' mean entropy
    and expected BOPs over the budget. A collapsed search (entropy near 0, E[BOPs] off the budget) decodes its
    policy from residual probabilities, whatever the other terms say."""
    from gmpq.rundir import RunDir

    out = []
    for (budget, strategy), cells in sorted(_by(rows).items()):
        terms = []
        for r in cells.values():
            stage = RunDir(row_cell_dir(study, r)).search
            log = stage.path / "search_log.jsonl"
            if not log.exists():
                break  # a score + decode strategy: no supernet, no loss terms
            last = json.loads(log.read_text().splitlines()[-1])
            lam = float(json.loads(stage.policy.read_text())["provenance"].get("lambda_attr") or 0.0)
            terms.append({"ce": last["loss_ce"], "attr": lam * last["loss_attr"],
                          "complexity": last["loss_complexity"], "entropy": last["alpha_entropy"],
                          "bops_ratio": last["expected_bops_g"] / last["budget_g"], "epoch": last["epoch"]})
        if terms:
            mean = {k: sum(t[k] for t in terms) / len(terms) for k in ("ce", "attr", "complexity", "entropy",
                                                                    "bops_ratio")}
            out.append({"budget_g": budget, "strategy": strategy, "n": len(terms), "epoch": terms[0]["epoch"],
                        **mean})
    return out


def _loss_terms_markdown(terms: list[dict[str, Any]]) -> str:
    return _section(
        "The search's loss terms",
        "At the last search epoch, mean over seeds: cross-entropy, lambda_attr * L_attr, the budget term, the mean "
        "entropy of the architecture logits' softmax (nats; a uniform one over 4 bits is 1.39) and the expected BOPs "
        "over the budget. An entropy near 0 with expected BOPs off the budget is a collapsed search: its policy is "
        "decoded from residual probabilities.",
        ["budget G", "strategy", "n", "epoch", "CE", "λ·L_attr", "budget term", "entropy", "E[BOPs] / budget"],
        [f"{t['budget_g']:g} | {t['strategy']} | {t['n']} | {t['epoch']} | {t['ce']:.3f} | {t['attr']:.3f} | "
         f"{t['complexity']:+.3f} | {t['entropy']:.4f} | {t['bops_ratio']:.2f}" for t in terms])


def _by(rows: list[dict[str, Any]]) -> dict[tuple[float, str], dict[int, dict[str, Any]]]:
    table: dict[tuple[float, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        table[(r["budget_g"], label(r))][r["seed"]] = r
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
                     float_line: float | None, failed: Sequence[dict[str, Any]] = (),
                     borrowed: Borrowed | None = None) -> str:
    """The text of ``summary.md`` (module docstring): the header, then per deployment the per-budget table and every
    cell."""
    r = study.recipe
    t = r.target
    devices = sorted({row["device"] for row in rows if row.get("device")})
    cells_done = finished_cells(rows)
    lines = [f"# Study `{study.name}`", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines.append(f"- command: `gmpq study {study.source or '<config>'}`")
    if study.proxies:
        for p in study.proxies.values():
            pr = r.override(p.overrides)
            lines.append(f"- proxy `{p.name}`: {_proxy_data(pr)}; {pr.search.epochs} search epochs"
                         f"{f' of {pr.search.max_steps} steps' if pr.search.max_steps else ''}; float model: "
                         + ("the target float model" if not p.trains_float else
                            f"the target float model's backbone and a new head, {p.float.get('epochs')} epochs on "
                            "the proxy"))
        lines.append(f"- {describe_candidates(*r.search.candidates())}; budgets in GBOPs of the searched layers of "
                     f"`{r.model.deploy_arch or r.model.arch}` at {r.model.deploy_input_size}x"
                     f"{r.model.deploy_input_size}")
    else:
        lines.append(f"- search: `{r.model.arch}` on `{r.data.dataset}` (input {r.data.input_size or 'native'}, "
                     f"{r.data.holdout} training images held out for the decoded-policy evaluation), "
                     f"{describe_candidates(*r.search.candidates())}, {r.search.epochs} search epochs; budgets in "
                     f"GBOPs of the searched layers of `{r.model.deploy_arch or r.model.arch}` at "
                     f"{r.model.deploy_input_size}x"
                     f"{r.model.deploy_input_size}")
    lines.append(f"- target: `{t.dataset}`{f' (first {t.classes} classes)' if t.classes else ''} (input "
                 f"{t.input_size or 'native'}, {t.holdout} training images held out for monitoring)"
                 + (f", {_finetune_length(r)} of fine-tuning from the target float model" if "qat" in study.deploy
                    else "")
                 + (f"; post-training: `{study.ptq.method}` on {study.ptq.calibration_images} target training "
                    f"images" if "ptq" in study.deploy else "")
                 + f"; top-1 on the test split `{r.evaluate.split or 'default'}`, read once per cell and deployment")
    lines += [
        f"- float target model: top-1 {float_line:.2f} %" if float_line is not None else "- float target model: "
        "not evaluated yet",
        f"- cells finished: {cells_done} of {total_cells}; seeds {study.seeds}; devices: {', '.join(devices) or '–'}",
    ]
    if borrowed is not None:
        lines.append(_borrowed_line(borrowed))
    if failed:
        lines.append(f"- cells failed: {len(failed)} (not in the statistics; rerunning the study retries them): "
                     + "; ".join(f"`{f['run_id']}` {f['error']}" for f in failed))
    order = {s: i for i, s in enumerate(_strategy_order(study, rows))}
    titled = bool(study.proxies) or study.deploy != ["qat"]
    for deploy in study.deploy:
        lines += _budget_table(study, _deployed(rows, deploy), order,
                               f" — {DEPLOY_NAMES[deploy]}" if titled else "")
    lines += ["", "## Every cell", "",
              "| budget G | strategy | deploy | seed | top-1 | top-5 | searched GBOPs | % of budget | W / A bits | "
              "proxy holdout top-1 (decoded) | alpha entropy | search s | cell s | device |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda x: (x["budget_g"], order.get(label(x), 99), x["seed"], x.get("deploy", ""))):
        lines.append(
            f"| {row['budget_g']:g} | {_shown(row)} | {row.get('deploy', 'qat')} | {row['seed']} | {row['top1']:.2f} | "
            f"{row['top5']:.2f} | {row['bops_searched_g']:.4f} | {100 * row['budget_fraction']:.1f} | "
            f"{row['mean_w_bits']:.2f} / {row['mean_a_bits']:.2f} | {_opt(row.get('proxy_holdout_top1'))} | "
            f"{_opt(row.get('alpha_entropy'), 3)} | {_opt(row.get('search_s'), 0)} | {_opt(row.get('cell_s'), 0)} | "
            f"{row.get('device') or '–'} |")
    return "\n".join(lines) + "\n"


def _proxy_data(recipe: Any) -> str:
    d = recipe.data
    size = f"{d.max_train_samples} images (a fixed slice)" if d.max_train_samples else "the whole training split"
    return (f"`{d.dataset}`{f' (first {d.classes} classes)' if d.classes else ''} at input "
            f"{d.input_size or 'native'}, {size}, {d.holdout} training images held out for the decoded-policy "
            f"evaluation")


def _budget_table(study: StudyConfig, rows: list[dict[str, Any]], order: dict[str, int], title: str) -> list[str]:
    """The per-budget table of one deployment's rows: each strategy against the uniform and random baselines."""
    lines = [
        "",
        f"## Per budget and strategy{title}",
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
        lines.append(f"| {budget:g} | {_shown(next(iter(cells.values())))} | {len(cells)} | {_pm(list(top1.values()))} | {_pm(bops, 3)} "
                     f"({100 * spread(bops).mean / budget:.0f} %) | {w_bits} / {a_bits} | {' | '.join(diffs)} | "
                     f"{search_s} |")
    return lines


def _paired_over(rows_x: list[dict[str, Any]], rows_y: list[dict[str, Any]]) -> PairedDifference | None:
    """``x - y`` paired by (seed, budget)."""
    x = {(r["seed"], r["budget_g"]): r["top1"] for r in rows_x}
    y = {(r["seed"], r["budget_g"]): r["top1"] for r in rows_y}
    return paired_difference(x, y)  # type: ignore[arg-type]


def proxies_markdown(study: StudyConfig, rows: list[dict[str, Any]]) -> str:
    """The sections of a study with named proxies (module docstring): transfer to the oracle, gmpq against edmips
    per proxy, the bits per layer, the search cost."""
    proxies = list(study.proxies)
    budgets = sorted({r["budget_g"] for r in rows})
    lines: list[str] = []
    if ORACLE in proxies:
        lines += ["", "## Transfer: each proxy's policy against the oracle's", "",
                  f"Top-1 of a strategy's policy searched on a proxy minus the same strategy's policy searched on "
                  f"`{ORACLE}` (the target's own training split, the same number of search steps), paired by seed "
                  f"(per budget) and by seed and budget (all budgets): mean [95 % t-interval], * excludes 0.", "",
                  "| deploy | strategy | proxy | " + " | ".join(f"{b:g} G" for b in budgets) + " | all budgets |",
                  "|---|---|---|" + "---|" * (len(budgets) + 1)]
        for deploy in study.deploy:
            deployed = _deployed(rows, deploy)
            for strategy in TRANSFER_STRATEGIES:
                oracle = [r for r in deployed if r["strategy"] == strategy and r["proxy"] == ORACLE]
                for proxy in proxies:
                    mine = [r for r in deployed if r["strategy"] == strategy and r["proxy"] == proxy]
                    if proxy == ORACLE or not mine or not oracle:
                        continue
                    per = [_diff(_paired_over([r for r in mine if r["budget_g"] == b],
                                              [r for r in oracle if r["budget_g"] == b])) for b in budgets]
                    lines.append(f"| {deploy} | {strategy} | {proxy} | {' | '.join(per)} | "
                                 f"{_diff(_paired_over(mine, oracle))} |")
    lines += ["", "## gmpq against edmips on each proxy", "",
              "Top-1 of gmpq minus edmips (the same search without the attribution loss), paired by seed (per budget) "
              "and by seed and budget (all budgets). The paper's claim is the out-of-domain row.", "",
              "| deploy | proxy | " + " | ".join(f"{b:g} G" for b in budgets) + " | all budgets |",
              "|---|---|" + "---|" * (len(budgets) + 1)]
    for deploy in study.deploy:
        deployed = _deployed(rows, deploy)
        for proxy in proxies:
            g = [r for r in deployed if r["strategy"] == "gmpq" and r["proxy"] == proxy]
            e = [r for r in deployed if r["strategy"] == "edmips" and r["proxy"] == proxy]
            if not g or not e:
                continue
            per = [_diff(_paired_over([r for r in g if r["budget_g"] == b], [r for r in e if r["budget_g"] == b]))
                   for b in budgets]
            lines.append(f"| {deploy} | {proxy} | {' | '.join(per)} | {_diff(_paired_over(g, e))} |")
    lines += _bits_tables(study, _deployed(rows, study.deploy[0]), budgets)
    lines += ["", "## Search cost", "",
              "Wall time of the search stage per cell (seconds, mean ± sd over budgets and seeds; one CPU thread "
              "unless the device column says otherwise).", "",
              "| strategy | cells | search s |", "|---|---|---|"]
    order = {s: i for i, s in enumerate(_strategy_order(study, rows))}
    cost: dict[str, list[float]] = defaultdict(list)
    shown: dict[str, str] = {}
    for r in _deployed(rows, study.deploy[0]):
        if r.get("search_s") is not None:
            cost[label(r)].append(r["search_s"])
            shown[label(r)] = _shown(r)
    for name in sorted(cost, key=lambda k: order.get(k, 99)):
        lines.append(f"| {shown[name]} | {len(cost[name])} | {_pm(cost[name], 0)} |")
    return "\n".join(lines) + "\n"


def _bits_tables(study: StudyConfig, rows: list[dict[str, Any]], budgets: list[float]) -> list[str]:
    """Per budget, the (w, a) bits of every searched layer for each strategy's policy of the first seed."""
    from gmpq.policy import Policy
    from gmpq.rundir import RunDir

    order = {s: i for i, s in enumerate(_strategy_order(study, rows))}
    lines = ["", "## Where the bits went", "",
             "Weight / activation bits of each searched layer in each strategy's policy (the first seed), per budget."]
    for budget in budgets:
        chosen: dict[str, dict[str, Any]] = {}
        for r in sorted((r for r in rows if r["budget_g"] == budget), key=lambda r: r["seed"]):
            chosen.setdefault(label(r), r)
        if not chosen:
            continue
        names = sorted(chosen, key=lambda k: order.get(k, 99))
        policies = {n: Policy.load(RunDir(row_cell_dir(study, chosen[n])).policy) for n in names}
        layers = list(next(iter(policies.values())).layers)
        lines += ["", f"### {budget:g} G (seed {min(c['seed'] for c in chosen.values())})", "",
                  "| layer | " + " | ".join(_shown(chosen[n]) for n in names) + " |", "|---|" + "---|" * len(names)]
        for layer in layers:
            cells = [f"{p.layers[layer].w_bits}/{p.layers[layer].a_bits}" if layer in p.layers else "–"
                     for p in policies.values()]
            lines.append(f"| `{layer}` | " + " | ".join(cells) + " |")
    return lines


def references_markdown(study: StudyConfig) -> str:
    """The study's ``references``: published figures to place its numbers beside (empty without any)."""
    if not study.references:
        return ""
    lines = ["", "## Published figures for comparison", "",
             "As reported in the papers (not measured here). They train far longer than this study's cells: see the "
             "training column and the study's description.", "",
             "| method | bits (W/A) | top-1 % | float top-1 % | training | paper | note |", "|---|---|---|---|---|---|---|"]
    for ref in study.references:
        lines.append(" | ".join(["", *(str(ref.get(k, "–")) for k in
                                       ("method", "bits", "top1", "float_top1", "training", "paper", "note")), ""])
                     .strip())
    return "\n".join(lines) + "\n"


def _opt(value: Any, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _strategy_order(study: StudyConfig, rows: Sequence[dict[str, Any]] = ()) -> list[str]:
    """Row labels in table order: each strategy (per proxy where it reads one), uniform as its two sides; then the
    labels of ``rows`` the study does not run (borrowed ones), in :data:`_CANONICAL_ORDER`."""
    from gmpq.study.config import PROXY_FREE

    out = []
    for s in study.strategies:
        if s == "uniform":
            out += ["uniform_below", "uniform_above"]
        elif study.proxies and s not in PROXY_FREE:
            out += [f"{s}@{p}" for p in study.proxies]
        else:
            out.append(s)
    rank = {s: i for i, s in enumerate(_CANONICAL_ORDER)}
    others = {label(r) for r in rows} - set(out)
    return out + sorted(others, key=lambda k: (rank.get(k.partition("@")[0], len(rank)), k))


def _shown(row: dict[str, Any]) -> str:
    """A row's label as the tables show it: marked when it was borrowed from another study."""
    return label(row) + (BORROWED_MARK if row.get("borrowed_from") else "")


def _borrowed_line(borrowed: Borrowed) -> str:
    """The header line of borrowed rows: where from, which strategies, the search settings that differ."""
    cells = len({r["run_id"] for r in borrowed.rows})
    names = sorted({label(r) for r in borrowed.rows})
    differs = "; ".join(f"`{k}` {here!r} here, {there!r} there"
                        for k, (here, there) in borrowed.search_differences.items()) or "none"
    return (f"- rows marked †: {cells} finished cells borrowed from study `{borrowed.study.name}` "
            f"(`{borrowed.study.directory}`): {', '.join(names) or 'none yet'}; the same float models, recipe, "
            f"deployments and target, the search settings aside ({differs})")


def plot_study(study: StudyConfig, rows: list[dict[str, Any]], path: Path, float_line: float | None,
               deploy: str = "qat") -> Path:
    """``study.png``: target top-1 against searched BOPs; per strategy (a colour) and proxy (a marker) and budget the
    mean over seeds with ±1 sd error bars, each seed as a small dot; the float model as a horizontal line, the budgets
    as dotted lines."""
    from gmpq.viz._render import new_figure, save_figure
    from gmpq.viz.compare import COLORS, MARKERS

    present = {label(r): r for r in rows}
    strategies = [s for s in _strategy_order(study, rows) if s in present]
    bases = list(dict.fromkeys(s.partition("@")[0] for s in strategies))
    proxies = list(dict.fromkeys(s.partition("@")[2] for s in strategies if "@" in s))
    fig = new_figure(8.0, 5.0)
    ax = fig.subplots()
    table = _by(rows)
    for strategy in strategies:
        base, _, proxy = strategy.partition("@")
        color = COLORS[bases.index(base) % len(COLORS)]
        marker = MARKERS[(proxies.index(proxy) + 1) % len(MARKERS)] if proxy else MARKERS[0]
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
                    markeredgewidth=0.5, ms=7, capsize=3, lw=1, label=_shown(present[strategy]), zorder=3)
    for budget in study.budgets:
        ax.axvline(budget, color="#9e9e9e", ls=":", lw=0.8, zorder=1)
    if float_line is not None:
        ax.axhline(float_line, color="#303030", ls="--", lw=1, label=f"float ({float_line:.1f} %)", zorder=1)
    r = study.recipe
    ax.set_xlabel(f"searched GBOPs ({r.model.deploy_arch or r.model.arch} at {r.model.deploy_input_size}px; "
                  f"dotted: budgets)", fontsize=9)
    ax.set_ylabel(f"top-1 on {r.target.dataset} (%)", fontsize=9)
    searched_on = ", ".join(study.proxies) if study.proxies else r.data.dataset
    deployed = "fine-tune on" if deploy == "qat" else f"post-training ({study.ptq.method}) on"
    ax.set_title(f"{study.name}\nsearch on {searched_on}, {deployed} {r.target.dataset} "
                 f"(mean ± sd over {len(study.seeds)} seeds)", fontsize=9, loc="left")
    ax.grid(color="#e0e0e0", lw=0.5)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_figure(fig, path)
