"""Baselines borrowed from another study: its finished cells of the strategies this study does not run.

A rerun of some strategies with other search settings (``study.strategies=[gmpq,edmips] search.lr_alpha=0.3`` in a
fresh ``study.output_dir``) needs the uniform, random and other strategies' cells to compare with, and those cells do
not depend on the changed settings. ``baselines: DIR`` (``study.baselines=DIR``) names the study directory that ran
them; its rows join this study's report (paired by budget and seed like its own), each marked with where it came
from. Borrowing is refused unless both studies would deploy a policy identically: the same recipe but for its
``search`` section, the same deployments, post-training settings and target float training, and float models with
identical weights wherever both have one. The search settings that differ are named in the summary, since a borrowed
*searched* strategy (hawq, ompq) ran under the other study's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmpq.errors import RecipeError
from gmpq.study.archive import float_weights_digest
from gmpq.study.config import StudyConfig, load_study_directory


@dataclass
class Borrowed:
    """The rows a study borrows (``borrowed_from`` set on each), the study they come from, and the search settings
    (``search.<key>``: (here, there)) in which the two studies differ."""

    study: StudyConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    search_differences: dict[str, tuple[Any, Any]] = field(default_factory=dict)


def borrow_baselines(study: StudyConfig) -> Borrowed | None:
    """The finished cells of ``study.baselines`` whose strategies ``study`` does not run, restricted to its budgets,
    seeds and deployments; None without ``baselines``. Raises :class:`RecipeError` when the two studies are not
    comparable (module docstring)."""
    from gmpq.study.grid import expand_grid
    from gmpq.study.results import collect_rows

    if not study.baselines:
        return None
    if Path(study.baselines).resolve() == study.directory.resolve():
        raise RecipeError(f"study key 'baselines' names this study's own directory {study.baselines!r}; name the "
                          f"directory of the study whose cells serve as baselines")
    other = load_study_directory(study.baselines)
    differences = comparable(study, other)
    mine = {cell.strategy for cell in expand_grid(study)}
    rows = [dict(r, borrowed_from=str(other.directory)) for r in collect_rows(other, expand_grid(other))
            if r["strategy"] not in mine and r["budget_g"] in study.budgets and r["seed"] in study.seeds
            and r["deploy"] in study.deploy]
    return Borrowed(other, rows, differences)


def comparable(study: StudyConfig, other: StudyConfig) -> dict[str, tuple[Any, Any]]:
    """Check that ``other``'s cells deploy a policy exactly as ``study``'s would (module docstring); return the
    ``search`` settings in which they differ, as ``{"search.<key>": (here, there)}``."""
    mine, theirs = study.fingerprint_content(), other.fingerprint_content()
    search_mine, search_theirs = mine["recipe"].pop("search"), theirs["recipe"].pop("search")
    for key in sorted(set(mine) | set(theirs)):
        difference = _first_difference(mine.get(key), theirs.get(key), key)
        if difference is not None:
            raise RecipeError(f"study.baselines {str(other.directory)!r} is not comparable with this study: {difference}"
                              f"; borrow only from a study that differs in its search settings alone")
    for here, there in zip(study.float_dirs(), other.float_dirs(), strict=True):
        a, b = float_weights_digest(here), float_weights_digest(there)
        if a is not None and b is not None and a != b:
            raise RecipeError(f"study.baselines {str(other.directory)!r} started from other float weights "
                              f"({there.name} differs from {here}); cells from different float models are not "
                              f"comparable")
    keys = sorted(set(search_mine) | set(search_theirs))
    return {f"search.{k}": (search_mine.get(k), search_theirs.get(k)) for k in keys
            if search_mine.get(k) != search_theirs.get(k)}


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    """The first dotted key at which ``a`` and ``b`` differ, as ``key: here vs there``; None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{path}.{key}")
            if found is not None:
                return found
        return None
    return None if a == b else f"{path} is {a!r} here and {b!r} there"


def adopt_float_models(study: StudyConfig) -> list[Path]:
    """Copy ``study.baselines``' float runs that ``study`` has not made yet into its directory (checked comparable
    first), so that its cells start from the float models its borrowed baselines started from; return the copies."""
    if not study.baselines:
        return []
    other = load_study_directory(study.baselines)
    comparable(study, other)
    copied = []
    for here, there in zip(study.float_dirs(), other.float_dirs(), strict=True):
        if here.exists() or float_weights_digest(there) is None:
            continue
        here.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{here.name}.", dir=here.parent))
        shutil.copytree(there, staging, dirs_exist_ok=True)
        os.replace(staging, here)
        copied.append(here)
    return copied
