"""A study's results table: one row per finished cell, read from the cells' run directories."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gmpq.errors import RunError
from gmpq.rundir import RunDir
from gmpq.study.config import Cell, StudyConfig, load_study_directory
from gmpq.study.deploy import ptq_stage

RESULT_COLUMNS = ("strategy", "proxy", "deploy", "budget_g", "seed", "bops_searched_g", "budget_fraction",
                  "mean_w_bits", "mean_a_bits", "top1", "top5", "search_s", "finetune_s", "cell_s", "alpha_entropy",
                  "proxy_holdout_top1", "device", "run_id", "error", "borrowed_from")


def finished_cell_dirs(directory: str | os.PathLike) -> list[Path]:
    """The run directories of a study directory's finished cells, in grid order (what ``gmpq compare`` reads)."""
    from gmpq.study.grid import expand_grid

    study = load_study_directory(directory)
    seen: dict[str, Path] = {}
    for cell in expand_grid(study):
        if cell.run_id not in seen and study.cell_finished(cell.run_id):
            seen[cell.run_id] = study.cell_dir(cell.run_id)
    return list(seen.values())


def collect_rows(study: StudyConfig, grid: list[Cell]) -> list[dict[str, Any]]:
    """One row per finished grid cell and deployment (columns :data:`RESULT_COLUMNS`): ``qat`` from the run's
    summary, ``ptq`` from its ``ptq`` stage (``finetune_s`` is then the post-training time)."""
    rows = []
    for cell in grid:
        if not study.cell_finished(cell.run_id):
            continue
        run = RunDir(study.cell_dir(cell.run_id))
        search = _json(run.search.metrics)
        info = _json(study.cell_info(cell.run_id))
        for deploy in study.deploy:
            if deploy == "qat":
                summary = _json(run.summary)
                result, deploy_s = summary, (summary.get("wall_s") or {}).get("finetune")
            else:
                result = _json(ptq_stage(run).metrics)
                deploy_s = result.get("wall_s")
            bops = result["bops_searched_g"]
            rows.append({
                "strategy": cell.strategy, "proxy": cell.proxy, "deploy": deploy, "budget_g": cell.budget_g,
                "seed": cell.seed, "bops_searched_g": bops, "budget_fraction": bops / cell.budget_g,
                "mean_w_bits": result.get("mean_w_bits"), "mean_a_bits": result.get("mean_a_bits"),
                "top1": result["top1"], "top5": result["top5"], "search_s": search.get("wall_s"),
                "finetune_s": deploy_s, "cell_s": info.get("cell_s"), "alpha_entropy": search.get("alpha_entropy"),
                "proxy_holdout_top1": search.get("decoded_top1"), "device": info.get("device"), "run_id": cell.run_id,
            })
    return rows


def row_cell_dir(study: StudyConfig, row: dict[str, Any]) -> Path:
    """The run directory of ``row``'s cell: in ``study``, or in the study it was borrowed from."""
    if row.get("borrowed_from"):
        return Path(row["borrowed_from"]) / "cells" / row["run_id"]
    return study.cell_dir(row["run_id"])


def failed_rows(study: StudyConfig, grid: list[Cell]) -> list[dict[str, Any]]:
    """One row per unfinished grid cell whose last attempt failed: its strategy, budget, seed and ``error``."""
    rows = []
    for cell in grid:
        if study.cell_finished(cell.run_id) or not study.cell_failure(cell.run_id).exists():
            continue
        rows.append({"strategy": cell.strategy, "proxy": cell.proxy, "budget_g": cell.budget_g, "seed": cell.seed,
                     "run_id": cell.run_id, "error": _json(study.cell_failure(cell.run_id)).get("error")})
    return rows


def finished_cells(rows: Sequence[dict[str, Any]]) -> int:
    """How many of the study's own cells ``rows`` come from: a cell deployed twice (PTQ and QAT) has two rows, and
    borrowed rows (:mod:`gmpq.study.baselines`) are another study's cells."""
    return len({row["run_id"] for row in rows if not row.get("borrowed_from")})


def results_csv(rows: list[dict[str, Any]], failed: Sequence[dict[str, Any]] = ()) -> str:
    """``results.csv``: the finished rows, then the failed cells (their ``error`` column set, no results); a borrowed
    row names its study directory in ``borrowed_from``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in [*rows, *failed]:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in row.items()})
    return buf.getvalue()



def _json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"cannot read {str(path)!r}: {e}") from None
