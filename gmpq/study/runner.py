"""``gmpq study STUDY.yaml``: run a study's cells (or a slice of them) and write its results.

Layout of the study directory::

    study.yaml                    the resolved study (and its fingerprint); a directory holds one study
    proxy_float/                  the proxy's float model (a pretrain run): teacher and initialisation of every search
                                  (``proxy_float_<name>/`` for each named proxy that trains one)
    target_float/                 the target's float model (a pretrain run on the target's training split minus its
                                  holdout, or the given one; evaluated once on the test split: the float line) —
                                  initialises every fine-tuning and post-training deployment
    cells/<run_id>/               one ``gmpq run`` directory per cell (search on the proxy, fine-tuning and one
                                  evaluation on the target), ``ptq/`` where the study deploys post-training too
                                  (:mod:`gmpq.study.deploy`), plus ``study_cell.json`` (device, wall time)
    results.csv  summary.md  study.png

Both float models are trained once per study with the base recipe's seed and shared by every cell and seed, so a
cell differs from its neighbours only by strategy, budget and seed. A finished cell (its ``metrics.json`` exists) is
never run again; an interrupted one resumes from its last checkpoint; a killed study resumes by running the same
command. A cell that fails (a diverged search or fine-tuning, an error in its data) is recorded — its
``study_cell_failed.json``, the ``error`` column of results.csv, a line of summary.md — and the other cells go on
(on one process; under torchrun the error stops every rank); rerunning the study retries it. A cell held by another
running process (:class:`~gmpq.errors.BusyError`) stops the call with that one line. ``cells="A:B"`` or ``shard="K/N"`` run a slice, so that several short leases (on several machines) add up to
one study: :mod:`gmpq.study.archive` packs finished cells and unpacks them elsewhere.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from gmpq.errors import BusyError, RecipeError, RunError
from gmpq.faults import fault_point
from gmpq.pipeline import run as run_pipeline
from gmpq.pipeline import target_recipe
from gmpq.recipes import Recipe
from gmpq.rundir import RunDir
from gmpq.stages import evaluate, pretrain, search
from gmpq.study.archive import pack_study, unpack_study
from gmpq.study.baselines import adopt_float_models
from gmpq.study.config import TARGET, Cell, StudyConfig, load_study
from gmpq.study.deploy import post_training, ptq_stage
from gmpq.study.grid import expand_grid
from gmpq.study.report import write_report
from gmpq.study.results import collect_rows, failed_rows
from gmpq.train.engine import process_state
from gmpq.utils import atomic_write_text


@dataclass
class StudyResult:
    """What a study call left behind: its directory, the result rows of every finished cell, what this call ran, the
    cells whose last attempt failed."""

    directory: Path
    rows: list[dict[str, Any]]
    total_cells: int
    ran: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    float_top1: float | None = None
    summary: Path | None = None
    figure: Path | None = None


def run_study(study: StudyConfig | str | os.PathLike, overrides: Sequence[str] = (), *, cells: str | None = None,
              shard: str | None = None, report_only: bool = False, unpack: Sequence[str | os.PathLike] = (),
              pack: str | os.PathLike | None = None, pack_models: bool = False) -> StudyResult:
    """Run ``study`` (a :class:`StudyConfig` or a STUDY.yaml path) and write its results (module docstring).

    ``cells`` (``"A:B"``, a Python slice over the study's runs in grid order) or ``shard`` (``"K/N"``: every N-th run
    from the K-th, 0-based) select the runs of this call; ``report_only`` runs nothing and rewrites the results
    from the finished cells; ``unpack`` archives are merged in first and ``pack`` writes one at the end
    (:mod:`gmpq.study.archive`).
    """
    if not isinstance(study, StudyConfig):
        study = load_study(study, list(overrides))
    elif overrides:
        raise RecipeError("overrides apply to a STUDY.yaml path; pass them to load_study for a StudyConfig")
    state = process_state(study.recipe.dist_timeout_s)
    directory = study.directory
    grid = expand_grid(study)
    runs = _unique_runs(grid)
    selected = _select(runs, cells, shard)
    if state.is_main_process:
        _claim_directory(study)
        for archive in unpack:
            unpack_study(study, archive)
        if not report_only:
            adopt_float_models(study)
    state.wait_for_everyone()
    ran: list[str] = []
    if not report_only:
        proxy_models, target_model = _float_models(study)
        todo = [c for c in selected if not study.cell_finished(c.run_id)]
        bar = tqdm(todo, desc=f"study {study.name}", unit="cell", disable=not state.is_local_main_process)
        for cell in bar:
            bar.set_postfix_str(cell.run_id)
            try:
                _run_cell(study, cell, proxy_models.get(cell.proxy, target_model), target_model,
                          state.is_main_process)
            except BusyError:
                raise
            except Exception as e:
                if state.num_processes > 1:  # the other ranks are in the cell's collectives: stop them all
                    raise
                error = _record_failure(study, cell, e)
                tqdm.write(f"study: cell {cell.run_id} failed ({error}); recorded in results.csv, the other cells "
                           "go on", file=sys.stderr)
            else:
                ran.append(cell.run_id)
            state.wait_for_everyone()
            if state.is_main_process:
                write_report(study, collect_rows(study, grid), len(grid), failed_rows(study, grid))
            fault_point("cell")
    rows, failures = collect_rows(study, grid), failed_rows(study, grid)
    result = StudyResult(directory, rows, len(grid), ran, float_top1=study.float_top1(),
                         failed=[r["run_id"] for r in failures])
    if state.is_main_process:
        result.summary, result.figure = write_report(study, rows, len(grid), failures)
        if pack is not None:
            pack_study(study, pack, with_models=pack_models)
    state.wait_for_everyone()
    return result


# ------------------------------------------------------------------------------------------------ the grid
def _unique_runs(grid: list[Cell]) -> list[Cell]:
    """The first cell of each run id, in grid order (uniform runs serve several budgets)."""
    seen: dict[str, Cell] = {}
    for cell in grid:
        seen.setdefault(cell.run_id, cell)
    return list(seen.values())


def _select(runs: list[Cell], cells: str | None, shard: str | None) -> list[Cell]:
    if cells is not None and shard is not None:
        raise RecipeError("choose either --cells A:B or --shard K/N, not both")
    if cells is not None:
        start, sep, stop = cells.partition(":")
        try:
            if not sep:
                raise ValueError
            return runs[slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)]
        except ValueError:
            raise RecipeError(f"--cells {cells!r} must be A:B (0-based, B excluded; either may be empty) over the "
                              f"study's {len(runs)} runs") from None
    if shard is not None:
        k, sep, n = shard.partition("/")
        try:
            k_i, n_i = int(k), int(n)
            if not sep or n_i < 1 or not 0 <= k_i < n_i:
                raise ValueError
        except ValueError:
            raise RecipeError(f"--shard {shard!r} must be K/N with 0 <= K < N") from None
        return runs[k_i::n_i]
    return runs


def _claim_directory(study: StudyConfig) -> None:
    """Write ``study.yaml``, or check that the directory holds this study (same fingerprint)."""
    path = study.study_file
    if path.exists():
        try:
            held = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RunError(f"cannot read {str(path)!r}: {e}") from None
        if held.get("fingerprint") != study.fingerprint():
            raise RunError(f"study directory {str(study.directory)!r} holds another study (its recipe or target "
                           f"float training differs: fingerprint {held.get('fingerprint')} vs {study.fingerprint()}); "
                           f"use another output_dir (study.output_dir=...)")
        grown = {k: sorted(set(held.get(k) or []) | set(study.to_dict()[k])) for k in ("strategies", "budgets", "seeds")}
        data = {**study.to_dict(), **grown}
    else:
        data = study.to_dict()
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


# ------------------------------------------------------------------------------------------------ float models
def proxy_float_recipe(study: StudyConfig) -> Recipe:
    """The proxy float model's pretrain run (the base recipe in ``<study>/proxy_float``)."""
    return study.recipe.override([f"output_dir={study.proxy_float_dir}", "resume=true", "force=false"])


def target_float_recipe(study: StudyConfig) -> Recipe:
    """The target float model's pretrain run: the target's data and architecture, ``target_pretrain`` training."""
    data = target_recipe(study.recipe, require_weights=False).to_dict()
    data["pretrain"] = dict(study.target_pretrain)
    data["data"]["eval_split"] = "holdout"
    data["output_dir"] = str(study.target_float_dir)
    data["resume"], data["force"] = True, False
    return Recipe.from_dict(data)


def named_proxy_float_recipe(study: StudyConfig, proxy: str, target_model: str) -> Recipe:
    """The float model of a named proxy that trains one: the base recipe with the proxy's data, initialised from the
    target float model (its classifier, of another class count, left new), trained by the proxy's ``float``
    section, in ``<study>/proxy_float_<name>``."""
    p = study.proxies[proxy]
    data = study.recipe.override([*p.overrides, f"output_dir={study.named_proxy_float_dir(proxy)}", "resume=true",
                                  "force=false", f"model.checkpoint={target_model}"]).to_dict()
    data["pretrain"] = dict(p.float)
    return Recipe.from_dict(data)


def _float_models(study: StudyConfig) -> tuple[dict[str, str], str]:
    """({proxy: float model directory}, target float model directory): the recipe's checkpoints, else trained here
    once (module docstring); without named proxies the one proxy is ``""``. The target float model is evaluated once
    on the target's test split (``evaluate.split``): the study's float line."""
    proxies: dict[str, str] = {}
    if not study.proxies:
        proxies[""] = study.recipe.model.checkpoint
        if proxies[""] is None:
            proxies[""] = _pretrained(proxy_float_recipe(study))
    recipe = target_float_recipe(study)
    target = study.recipe.target.checkpoint
    if target is not None and not Path(target).is_dir():  # timm:NAME, a Hub id or a state-dict file: made a model
        target = _pretrained(recipe.override(["pretrain.epochs=0"]))  # directory once (no training), as given
    elif target is None and study.target_float is not None:
        target = _pretrained(study.target_float.override([f"output_dir={study.target_float_dir}", "resume=true",
                                                          "force=false"]))
    elif target is None:
        target = _pretrained(recipe)
    if not RunDir.of(recipe).evaluate.metrics.exists():
        if study.recipe.target.checkpoint is None and study.target_float is None:
            evaluate(recipe)
        else:  # a given model directory, evaluated on the target data into the study's target_float/
            d = recipe.data
            evaluate(target, [f"output_dir={recipe.output_dir}", f"evaluate.split={json.dumps(recipe.evaluate.split)}",
                              *(f"data.{k}={json.dumps(getattr(d, k))}" for k in ("dataset", "path", "input_size"))])
    for name, proxy in study.proxies.items():
        proxies[name] = _pretrained(named_proxy_float_recipe(study, name, target)) if proxy.trains_float else target
    return proxies, target


def _pretrained(recipe: Recipe) -> str:
    """The float model of the pretrain run ``recipe``, trained (or resumed) here unless it has finished: a finished
    one is only read, so that shards started together do not contend for its directory."""
    run = RunDir.of(recipe)
    if not run.pretrain.finished:
        pretrain(recipe)
    return str(run.float_model)


# ------------------------------------------------------------------------------------------------ cells
def cell_recipe(study: StudyConfig, cell: Cell, proxy_model: str, target_model: str) -> Recipe:
    """The ``gmpq run`` recipe of ``cell``: the base recipe, the cell's strategy, budget and seed, the shared float
    models, no uniform comparison of its own (the study has uniform cells)."""
    student = target_model if cell.strategy == TARGET else proxy_model
    return study.recipe.override([
        f"seed={cell.seed}", f"search.budget_g={cell.budget_g!r}", *cell.overrides,
        f"output_dir={study.cell_dir(cell.run_id)}", f"model.checkpoint={student}",
        f"target.checkpoint={target_model}", "target.pretrained=false", "target.eval_split=holdout",
        "run.compare_uniform=false", f"name={study.name}-{cell.run_id}",
    ])


def _run_cell(study: StudyConfig, cell: Cell, proxy_model: str, target_model: str, main: bool) -> None:
    """The cell's search and each of its deployments: ``qat`` is the whole ``gmpq run`` (search, fine-tuning, one
    evaluation, export), ``ptq`` the searched policy on the target float model (:mod:`gmpq.study.deploy`)."""
    t0 = time.perf_counter()
    recipe = cell_recipe(study, cell, proxy_model, target_model)
    if "qat" in study.deploy:
        run_pipeline(recipe)
    else:
        with RunDir.of(recipe).claim():
            search(recipe.override(["resume=true", "force=false"]))
    if "ptq" in study.deploy:
        with RunDir.of(recipe).claim():
            post_training(target_recipe(recipe), str(RunDir.of(recipe).policy), study.ptq, ptq_stage(recipe))
    if main:
        study.cell_failure(cell.run_id).unlink(missing_ok=True)
        info = {"run_id": cell.run_id, "device": device_name(), "cell_s": time.perf_counter() - t0,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(study.cell_info(cell.run_id), json.dumps(info, indent=1) + "\n")


def _record_failure(study: StudyConfig, cell: Cell, error: Exception) -> str:
    """Write the cell's ``study_cell_failed.json`` (its error in one line); return that line."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0] if text else ''}".strip()
    atomic_write_text(study.cell_failure(cell.run_id),
                      json.dumps({"run_id": cell.run_id, "error": line,
                                  "failed": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n")
    return line


def device_name() -> str:
    """The device this process trains on, as results.csv records it."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


