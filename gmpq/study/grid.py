"""The cells of a study: strategies x budgets x seeds, in the order they run.

Order: seed, then budget, then strategy (then proxy) — a slice of the first cells covers every strategy of one seed
before the next seed starts, so a partial study already holds complete paired comparisons. With ``proxies`` every
strategy that reads proxy data runs once per proxy (``<strategy>_<proxy>_b<budget>_s<seed>``); ``random`` and
``uniform`` once per budget and seed.
"""

from __future__ import annotations

import json

from gmpq.models import base_arch, create_model
from gmpq.search.budget import check_budget, decode_uniform
from gmpq.search.supernet import SearchSpace, deployment_macs, search_space
from gmpq.study.config import PROXY_FREE, TARGET, UNIFORM, Cell, StudyConfig


def proxy_space(study: StudyConfig) -> SearchSpace:
    """The search space of the study's architecture at its deployment resolution (10 classes stand in: the
    classifier is a kept layer, so its size does not enter the searched BOPs)."""
    r = study.recipe
    deploy_arch = r.model.deploy_arch or base_arch(r.model.arch)
    macs = deployment_macs(deploy_arch, r.model.deploy_input_size, num_classes=10)
    return search_space(create_model(r.model.arch, num_classes=10), *r.search.candidates(), r.model.kept_bits, macs,
                        deploy_arch, r.model.deploy_input_size)


def expand_grid(study: StudyConfig, space: SearchSpace | None = None) -> list[Cell]:
    """Every cell of ``study``; each budget is checked (a clear :class:`~gmpq.errors.BudgetError` before any run)."""
    space = space or proxy_space(study)
    for budget in study.budgets:
        check_budget(space, budget)
    cells: list[Cell] = []
    for seed in study.seeds:
        for budget in study.budgets:
            for strategy in study.strategies:
                cells.extend(_cells_of(study, strategy, budget, seed, space))
    return cells


def _cells_of(study: StudyConfig, strategy: str, budget: float, seed: int, space: SearchSpace) -> list[Cell]:
    if strategy == UNIFORM:
        out = []
        for side in ("below", "above"):
            w, a = next(iter(decode_uniform(space, budget, side).choices.values()))
            out.append(Cell(f"uniform_{side}", budget, seed, f"uniform_w{w}a{a}_s{seed}",
                            ("search.strategy=uniform", f"search.uniform_side={side}")))
        return out
    run_id = f"{strategy}_b{budget:g}_s{seed}"
    if strategy == TARGET:
        return [Cell(TARGET, budget, seed, run_id, ("search.strategy=gmpq", *target_search_overrides(study)))]
    if not study.proxies or strategy in PROXY_FREE:
        return [Cell(strategy, budget, seed, run_id, (f"search.strategy={strategy}",))]
    return [Cell(strategy, budget, seed, f"{strategy}_{p.name}_b{budget:g}_s{seed}",
                 (f"search.strategy={strategy}", *p.overrides), proxy=p.name) for p in study.proxies.values()]


def target_search_overrides(study: StudyConfig) -> tuple[str, ...]:
    """Overrides that make the search read the target's data with the target's architecture (strategy ``target``)."""
    t, r = study.recipe.target, study.recipe
    values = {"data.dataset": t.dataset, "data.path": t.path, "data.input_size": t.input_size,
              "data.train_split": t.train_split, "data.holdout": t.holdout, "data.classes": t.classes,
              "data.eval_split": "holdout",
              "data.max_train_samples": t.max_train_samples,
              "model.arch": t.arch or r.model.deploy_arch or base_arch(r.model.arch)}
    return tuple(f"{k}={json.dumps(v)}" for k, v in values.items())
