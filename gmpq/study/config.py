"""A study's description (``STUDY.yaml``) and its grid of cells.

A study measures what a search strategy buys on a *target* task when its policy is searched on a *proxy*: every
cell searches a policy on the proxy under one budget with one seed, fine-tunes it on the target from the target's
float model and evaluates it once on the target's test split. ``STUDY.yaml``::

    name: embedded_to_tinyimagenet
    description: what this study asks, and how it was sized
    strategies: [gmpq, edmips, random, uniform]   # uniform: two cells, the nearest uniform policy below and above
    budgets: [0.21, 0.25, 0.45]                    # searched-layer GBOPs at model.deploy_input_size
    seeds: [0, 1, 2]                               # each changes the search, the fine-tuning order, the random policy
    recipe: {...}            # the `gmpq run` recipe every cell starts from (inline, or a path relative to this file)
    target_pretrain: {...}   # the target float model's training (a pretrain section), trained once per study
    output_dir: runs/studies/<name>                # default

Strategies are the search strategies (``gmpq``, ``edmips``, ``random``, ...: any ``search.strategy``), ``uniform``
(expands to ``uniform_below`` and ``uniform_above``: :func:`gmpq.search.budget.decode_uniform`) and ``target``
(the GMPQ search run directly on the target data: the paper's oracle for accuracy against search cost).

Protocol checks (so that a study cannot read its test split twice): the proxy holds a slice of its training split
out (``data.holdout``; the search's decoded-policy evaluation reads it, and search hyperparameters are chosen on
it), and the target too (``target.holdout``; fine-tuning monitors it), so the target's test split
(``evaluate.split``) is read once per cell, by the final evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gmpq.errors import RecipeError
from gmpq.recipes import Recipe, apply_overrides, packaged_recipes, resolve_recipe

#: Strategies a study expands specially (the others are ``search.strategy`` values run as they are).
UNIFORM = "uniform"
TARGET = "target"
#: The resolved study a study directory holds (see :attr:`StudyConfig.study_file`).
STUDY_FILE = "study.yaml"
STUDY_KEYS = ("name", "description", "strategies", "budgets", "seeds", "recipe", "target_pretrain", "output_dir")


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: a strategy (as reported), a budget and a seed, run in ``cells/<run_id>``.

    Uniform cells whose (w, a) pair is the same for several budgets share one run (the policy and its fine-tuning
    do not depend on the budget), so ``run_id`` names the pair, not the budget.
    """

    strategy: str
    budget_g: float
    seed: int
    run_id: str
    overrides: tuple[str, ...]

    @property
    def key(self) -> str:
        """The row's name: ``<strategy>_b<budget>_s<seed>``."""
        return f"{self.strategy}_b{self.budget_g:g}_s{self.seed}"


@dataclass
class StudyConfig:
    """A validated ``STUDY.yaml`` (see the module docstring); ``recipe`` is the resolved base recipe."""

    name: str
    strategies: list[str]
    budgets: list[float]
    seeds: list[int]
    recipe: Recipe
    target_pretrain: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    output_dir: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / "studies" / self.name)

    @property
    def directory(self) -> Path:
        """The study directory: ``proxy_float/`` and ``target_float/`` (the shared float runs), ``cells/<run_id>/``
        (one gmpq run directory per grid cell), ``study.yaml``, ``results.csv``, ``summary.md``, figures."""
        return Path(self.output_dir)

    @property
    def proxy_float_dir(self) -> Path:
        return self.directory / "proxy_float"

    @property
    def target_float_dir(self) -> Path:
        return self.directory / "target_float"

    @property
    def cells_dir(self) -> Path:
        return self.directory / "cells"

    def cell_dir(self, run_id: str) -> Path:
        """The gmpq run directory of the cell ``run_id``."""
        return self.cells_dir / run_id

    def cell_info(self, run_id: str) -> Path:
        """The cell's ``study_cell.json`` (device, wall time), written after its run: the cell is finished."""
        return self.cell_dir(run_id) / "study_cell.json"

    def cell_finished(self, run_id: str) -> bool:
        from gmpq.rundir import RunDir

        return RunDir(self.cell_dir(run_id)).summary.exists() and self.cell_info(run_id).exists()

    @property
    def study_file(self) -> Path:
        """``study.yaml``: the resolved study and its fingerprint (a directory holds one study)."""
        return self.directory / STUDY_FILE

    def float_top1(self) -> float | None:
        """The target float model's top-1 on the target's test split (None until measured)."""
        from gmpq.rundir import RunDir

        path = RunDir(self.target_float_dir).evaluate.metrics
        return float(json.loads(path.read_text())["top1"]) if path.exists() else None

    def fingerprint(self) -> str:
        """A hash of what determines every cell's result: the base recipe (without run-directory keys) and the
        target float model's training. The grid itself (strategies, budgets, seeds) may grow between runs."""
        recipe = self.recipe.to_dict()
        for key in ("output_dir", "resume", "force", "name"):
            recipe.pop(key, None)
        blob = json.dumps({"recipe": recipe, "target_pretrain": self.target_pretrain}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "strategies": list(self.strategies),
                "budgets": list(self.budgets), "seeds": list(self.seeds), "output_dir": self.output_dir,
                "target_pretrain": dict(self.target_pretrain), "recipe": self.recipe.to_dict(),
                "fingerprint": self.fingerprint()}


def load_study(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Read and validate ``STUDY.yaml``; ``overrides`` (``dotted.key=value``) apply to the base recipe.

    ``path`` may name a packaged study (``embedded_to_tinyimagenet_cpu``). Study-level keys can be overridden too,
    as ``study.seeds=[0,1]`` or ``study.output_dir=...``.
    """
    p = resolve_recipe(path, "study")
    loaded = _read_study_mapping(p)
    study_overrides = [o[len("study."):] for o in overrides if o.startswith("study.")]
    recipe_overrides = [o for o in overrides if not o.startswith("study.")]
    for item in study_overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in STUDY_KEYS or key == "recipe":
            raise RecipeError(f"study override 'study.{item}' must be study.KEY=VALUE with KEY one of "
                              f"{', '.join(k for k in STUDY_KEYS if k != 'recipe')}")
        loaded[key] = yaml.safe_load(raw)
    loaded.setdefault("name", p.stem)
    packaged = packaged_recipes("study").get(p.stem) == p.resolve()
    return study_from_dict(loaded, base_dir=p.parent, recipe_overrides=recipe_overrides,
                           source=p.stem if packaged else str(p))


def _read_study_mapping(p: Path) -> dict[str, Any]:
    """The YAML mapping of a study file, or one :class:`RecipeError` line saying why not."""
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecipeError(f"cannot read study {str(p)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"study {str(p)!r} is not UTF-8 text; give a study YAML file") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"study {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise RecipeError(f"study {str(p)!r} must be a YAML mapping with keys {', '.join(STUDY_KEYS)}")
    return loaded


def is_study_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a study's output directory (it holds the study's ``study.yaml``)."""
    return (Path(path) / STUDY_FILE).is_file()


def load_study_directory(path: str | os.PathLike) -> StudyConfig:
    """The study a study directory holds (its ``study.yaml``: every cell it ran), located at ``path`` wherever it
    was run from."""
    file = Path(path) / STUDY_FILE
    if not file.is_file():
        raise RecipeError(f"{str(path)!r} is not a study directory (it has no {STUDY_FILE}); pass the output_dir of "
                          f"a gmpq study")
    held = _read_study_mapping(file)
    held.pop("fingerprint", None)  # written beside the study by gmpq study (runner._claim_directory)
    held["output_dir"] = str(path)
    return study_from_dict(held, base_dir=path, source=str(file))


def study_from_dict(data: dict[str, Any], base_dir: str | os.PathLike = ".", recipe_overrides: list[str] | None = None,
                    source: str | None = None) -> StudyConfig:
    """Validate a study mapping (the YAML's content); see :func:`load_study`."""
    unknown = sorted(set(data) - set(STUDY_KEYS))
    if unknown:
        raise RecipeError(f"unknown study key {unknown[0]!r}; valid keys: {', '.join(STUDY_KEYS)}")
    name = str(data.get("name") or "")
    if not name or "/" in name:
        raise RecipeError(f"study key 'name' must be a non-empty name without '/', got {name!r}")
    strategies = _strategies(data.get("strategies"))
    budgets = _numbers(data.get("budgets"), "budgets", float)
    seeds = _numbers(data.get("seeds"), "seeds", int)
    if any(b <= 0 for b in budgets):
        raise RecipeError(f"study key 'budgets' must hold positive GBOPs values, got {budgets}")
    if any(s < 0 for s in seeds):
        raise RecipeError(f"study key 'seeds' must hold non-negative integers, got {seeds}")
    recipe = _base_recipe(data.get("recipe"), Path(base_dir), name, list(recipe_overrides or ()))
    target_pretrain = data.get("target_pretrain") or {}
    if not isinstance(target_pretrain, dict):
        raise RecipeError("study key 'target_pretrain' must be a mapping (a pretrain section)")
    Recipe.from_dict({"model": {"arch": recipe.model.arch}, "pretrain": target_pretrain})  # validates its keys
    study = StudyConfig(name=name, strategies=strategies, budgets=budgets, seeds=seeds, recipe=recipe,
                        target_pretrain=dict(target_pretrain), description=str(data.get("description") or ""),
                        output_dir=data.get("output_dir"), source=source)
    check_protocol(study)
    return study


def check_protocol(study: StudyConfig) -> None:
    """Refuse a study whose cells would read the target's test split more than once or tune on it."""
    r = study.recipe
    if r.target.dataset is None:
        raise RecipeError("a study fine-tunes on a target: set recipe.target.dataset (and target.path for a local "
                          "copy)")
    if not r.target.holdout:
        raise RecipeError("set recipe.target.holdout=N: fine-tuning monitors a held-out slice of the target's "
                          "training split, so that the test split is read once per cell")
    if r.target.eval_split not in (None, "holdout"):
        raise RecipeError(f"recipe.target.eval_split is {r.target.eval_split!r}: in a study fine-tuning evaluates on "
                          f"'holdout'; the test split is evaluate.split")
    if r.evaluate.split in (None, "holdout"):
        raise RecipeError("set recipe.evaluate.split to the target's test split (e.g. test, or valid on the Hub): "
                          "each cell reads it once, for its final evaluation")
    if not r.data.holdout:
        raise RecipeError("set recipe.data.holdout=N: the search's decoded-policy evaluation and the choice of search "
                          "hyperparameters use a held-out slice of the proxy's training split, never a test split")
    if r.data.eval_split not in (None, "holdout"):
        raise RecipeError(f"recipe.data.eval_split is {r.data.eval_split!r}: in a study the proxy evaluation is "
                          f"'holdout'")
    if r.model.checkpoint is None and r.pretrain.epochs == 0:
        raise RecipeError("the proxy float model needs recipe.pretrain.epochs > 0 or recipe.model.checkpoint")
    if r.target.checkpoint is None and not study.target_pretrain.get("epochs"):
        raise RecipeError("the target float model needs target_pretrain.epochs > 0 or recipe.target.checkpoint")


def _strategies(value: Any) -> list[str]:
    from gmpq.search.strategies import STRATEGIES

    known = [n for n in STRATEGIES if n != UNIFORM] + [UNIFORM, TARGET]
    if not isinstance(value, list) or not value:
        raise RecipeError(f"study key 'strategies' must be a non-empty list of {', '.join(known)}")
    for s in value:
        if s not in known:
            raise RecipeError(f"unknown study strategy {s!r}; choose among {', '.join(known)}")
    if len(set(value)) != len(value):
        raise RecipeError(f"study key 'strategies' lists a strategy twice: {value}")
    return [str(s) for s in value]


def _numbers(value: Any, key: str, kind: type) -> list:
    if not isinstance(value, list) or not value:
        raise RecipeError(f"study key {key!r} must be a non-empty list")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise RecipeError(f"study key {key!r} must hold {kind.__name__} values, got {v!r}")
        out.append(kind(v))
    if len(set(out)) != len(out):
        raise RecipeError(f"study key {key!r} lists a value twice: {out}")
    return out


def _base_recipe(value: Any, base_dir: Path, name: str, overrides: list[str]) -> Recipe:
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        try:
            value = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RecipeError(f"cannot read the study's recipe {str(path)!r}: {e}") from None
    if not isinstance(value, dict):
        raise RecipeError("study key 'recipe' must be a recipe mapping or the path of a recipe YAML")
    data = json.loads(json.dumps(value))  # a deep copy
    data.setdefault("name", name)
    apply_overrides(data, overrides)
    try:
        return Recipe.from_dict(data)
    except RecipeError as e:
        raise RecipeError(f"study recipe: {e}") from None
