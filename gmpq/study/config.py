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

Optional keys for a study with several proxies and two deployments (``resnet20_cifar10_jpeg``)::

    proxies:                 # each a different claim; the searched strategies run on every proxy
      indomain: {float: target, data: {...}}                  # the target float model is teacher and search start
      ood: {float: {epochs: 6, lr: 0.01}, data: {...}}        # a pretrain section: the target float model's backbone
      oracle: {float: target, data: {...}, search: {...}}     #   and a new head, trained on the proxy once per study
    deploy: [ptq, qat]       # ptq: the policy applied to the target float model (ptq section); qat: fine-tuning
    ptq: {method: bn, calibration_images: 1024}               # see gmpq.study.deploy
    target_float: resnet20_cifar10_float   # a pretrain recipe that makes the target float model once per study
    references: [{method: ..., paper: ..., bits: ..., top1: ..., float_top1: ..., training: ...}]  # published figures
    baselines: runs/studies/<other>   # borrow that study's cells of the strategies this one does not run
                                      # (a rerun of some strategies with other search settings: gmpq.study.baselines)

A proxy's ``data`` and ``search`` mappings replace those keys of the base recipe for its cells. ``random`` and
``uniform`` read no proxy data and run once per budget and seed. Without ``proxies`` the base recipe's data is the
one proxy and its float model is trained by the base recipe's ``pretrain`` section (``proxy_float/``). The target
float model is ``recipe.target.checkpoint`` when set (taken as given), else made by ``target_float`` or
``target_pretrain`` (from scratch) once per study.

Protocol checks (so that a study cannot read its test split twice): the proxy holds a slice of its training split
out (``data.holdout``; the search's decoded-policy evaluation reads it, and search hyperparameters are chosen on
it), and the target too (``target.holdout``; fine-tuning monitors it), so the target's test split
(``evaluate.split``) is read once per cell, by the final evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gmpq.errors import RecipeError
from gmpq.recipes import Recipe, apply_overrides, packaged_recipes, resolve_recipe
from gmpq.study.deploy import PTQ_METHODS, PTQConfig, ptq_stage

#: Strategies a study expands specially (the others are ``search.strategy`` values run as they are).
UNIFORM = "uniform"
TARGET = "target"
#: The resolved study a study directory holds (see :attr:`StudyConfig.study_file`).
STUDY_FILE = "study.yaml"
STUDY_KEYS = ("name", "description", "strategies", "budgets", "seeds", "recipe", "target_pretrain", "output_dir",
              "proxies", "deploy", "ptq", "target_float", "references", "baselines")
#: Strategies that read no proxy data: one cell per budget and seed, whatever the proxies.
PROXY_FREE = ("random", UNIFORM, TARGET)
#: How a cell's policy is deployed on the target: ``qat`` (fine-tuning, the pipeline's) and ``ptq`` (post-training).
DEPLOYS = ("ptq", "qat")
#: A proxy whose float model is the target's (``float: target``).
TARGET_FLOAT = "target"
#: Recipe sections a proxy may replace keys of.
PROXY_SECTIONS = ("data", "search")
REFERENCE_KEYS = ("method", "paper", "bits", "top1", "float_top1", "training", "note")


@dataclass(frozen=True)
class Proxy:
    """A search proxy: its recipe overrides (``data.*``, ``search.*``) and its float model — ``"target"`` (the target
    float model) or a pretrain section (trained once per study from the target float model, a new head)."""

    name: str
    overrides: tuple[str, ...]
    float: str | dict[str, Any]

    @property
    def trains_float(self) -> bool:
        return self.float != TARGET_FLOAT


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
    proxy: str = ""

    @property
    def key(self) -> str:
        """The row's name: ``<strategy>[@<proxy>]_b<budget>_s<seed>``."""
        return f"{self.strategy}{'@' + self.proxy if self.proxy else ''}_b{self.budget_g:g}_s{self.seed}"


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
    proxies: dict[str, Proxy] = field(default_factory=dict)
    deploy: list[str] = field(default_factory=lambda: ["qat"])
    ptq: PTQConfig = field(default_factory=PTQConfig)
    target_float: Recipe | None = None
    references: list[dict[str, Any]] = field(default_factory=list)
    baselines: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

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

    def named_proxy_float_dir(self, proxy: str) -> Path:
        """The float model run of a named proxy that trains one (``proxy_float_<name>``)."""
        return self.directory / f"proxy_float_{proxy}"

    @property
    def target_float_dir(self) -> Path:
        return self.directory / "target_float"

    def float_dirs(self) -> list[Path]:
        """Every shared float run of the study (the proxy's or each named proxy's, the target's): what every cell
        starts from, so an archive carries them."""
        named = [self.named_proxy_float_dir(name) for name, proxy in self.proxies.items() if proxy.trains_float]
        return [self.proxy_float_dir, *named, self.target_float_dir]

    @property
    def cells_dir(self) -> Path:
        return self.directory / "cells"

    def cell_dir(self, run_id: str) -> Path:
        """The gmpq run directory of the cell ``run_id``."""
        return self.cells_dir / run_id

    def cell_info(self, run_id: str) -> Path:
        """The cell's ``study_cell.json`` (device, wall time), written after its run: the cell is finished."""
        return self.cell_dir(run_id) / "study_cell.json"

    def cell_failure(self, run_id: str) -> Path:
        """The cell's ``study_cell_failed.json`` (the error of its last attempt), removed when the cell finishes."""
        return self.cell_dir(run_id) / "study_cell_failed.json"

    def cell_finished(self, run_id: str) -> bool:
        """Whether the cell wrote its ``study_cell.json`` and every deployment's final numbers."""
        from gmpq.rundir import RunDir

        run = RunDir(self.cell_dir(run_id))
        done = {"qat": run.summary, "ptq": ptq_stage(run).metrics}
        return self.cell_info(run_id).exists() and all(done[d].exists() for d in self.deploy)

    @property
    def study_file(self) -> Path:
        """``study.yaml``: the resolved study and its fingerprint (a directory holds one study)."""
        return self.directory / STUDY_FILE

    def float_top1(self) -> float | None:
        """The target float model's top-1 on the target's test split (None until measured)."""
        from gmpq.rundir import RunDir

        path = RunDir(self.target_float_dir).evaluate.metrics
        return float(json.loads(path.read_text())["top1"]) if path.exists() else None

    def fingerprint_content(self) -> dict[str, Any]:
        """What determines every cell's result: the base recipe (without run-directory keys) and the target float
        model's training, with the proxies, deployments and post-training settings where set."""
        recipe = self.recipe.to_dict()
        for key in ("output_dir", "resume", "force", "name", "dist_timeout_s"):
            recipe.pop(key, None)
        if recipe["data"].get("subset_seed") is None:  # unset, it changes nothing: older studies keep their print
            recipe["data"].pop("subset_seed", None)
        content: dict[str, Any] = {"recipe": _without_unset_candidates(recipe), "target_pretrain": self.target_pretrain}
        for key in ("proxies", "deploy", "ptq", "target_float"):  # only where set: older studies keep their print
            if key in self.extra:
                content[key] = self.extra[key]
        if "target_float" in content:
            content["target_float"] = _without_unset_candidates(content["target_float"])
        return json.loads(json.dumps(content, default=str))

    def fingerprint(self) -> str:
        """A hash of :meth:`fingerprint_content`. The grid itself (strategies, budgets, seeds) may grow between runs,
        and ``baselines`` (borrowed rows, :mod:`gmpq.study.baselines`) changes only the report."""
        blob = json.dumps(self.fingerprint_content(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "strategies": list(self.strategies),
                "budgets": list(self.budgets), "seeds": list(self.seeds), "output_dir": self.output_dir,
                "target_pretrain": dict(self.target_pretrain), "recipe": self.recipe.to_dict(),
                **json.loads(json.dumps(self.extra)), "fingerprint": self.fingerprint()}


def _without_unset_candidates(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict without ``search.w_bits`` / ``search.a_bits`` where they are unset: they came after the first
    studies, and unset they change nothing, so those studies keep their fingerprint."""
    search = {k: v for k, v in recipe["search"].items() if not (k in ("w_bits", "a_bits") and v is None)}
    return {**recipe, "search": search}


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
    extra: dict[str, Any] = {}
    proxies = _proxies(data.get("proxies"), recipe)
    if proxies:
        extra["proxies"] = data["proxies"]
    deploy = _deploy(data.get("deploy"))
    if data.get("deploy") is not None:
        extra["deploy"] = deploy
    ptq = _ptq(data.get("ptq"))
    if data.get("ptq") is not None:
        extra["ptq"] = dataclasses.asdict(ptq)
    target_float = _target_float(data.get("target_float"), Path(base_dir))
    if target_float is not None:
        if target_pretrain:
            raise RecipeError("set either target_float (a recipe that makes the target float model) or "
                              "target_pretrain (training from scratch), not both")
        extra["target_float"] = target_float.to_dict()
    references = _references(data.get("references"))
    if references:
        extra["references"] = references
    baselines = data.get("baselines")
    if baselines is not None:
        if not isinstance(baselines, str) or not baselines:
            raise RecipeError(f"study key 'baselines' must be the path of another study's output directory, got "
                              f"{baselines!r}")
        extra["baselines"] = baselines
    study = StudyConfig(name=name, strategies=strategies, budgets=budgets, seeds=seeds, recipe=recipe,
                        target_pretrain=dict(target_pretrain), description=str(data.get("description") or ""),
                        output_dir=data.get("output_dir"), source=source, proxies=proxies, deploy=deploy, ptq=ptq,
                        target_float=target_float, references=references, baselines=baselines, extra=extra)
    check_protocol(study)
    return study


def _proxies(value: Any, recipe: Recipe) -> dict[str, Proxy]:
    """The ``proxies`` mapping (module docstring); each proxy's recipe is validated here."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not value:
        raise RecipeError("study key 'proxies' must be a mapping of proxy names to {float, data, search}")
    out = {}
    for name, spec in value.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise RecipeError(f"proxy name {name!r} must be a plain name (letters, digits, _)")
        if not isinstance(spec, dict) or "float" not in spec:
            raise RecipeError(f"proxy {name!r} must be a mapping with 'float' (target, or a pretrain section) and "
                              f"optional {', '.join(PROXY_SECTIONS)}")
        unknown = sorted(set(spec) - {"float", *PROXY_SECTIONS})
        if unknown:
            raise RecipeError(f"unknown key {unknown[0]!r} in proxy {name!r}; valid keys: float, "
                              f"{', '.join(PROXY_SECTIONS)}")
        overrides = []
        for section in PROXY_SECTIONS:
            part = spec.get(section) or {}
            if not isinstance(part, dict):
                raise RecipeError(f"proxy {name!r}: {section} must be a mapping of {section} keys")
            overrides += [f"{section}.{k}={json.dumps(v)}" for k, v in part.items()]
        try:
            proxied = recipe.override(overrides)
        except RecipeError as e:
            raise RecipeError(f"proxy {name!r}: {e}") from None
        floating = spec["float"]
        if floating != TARGET_FLOAT:
            if not isinstance(floating, dict):
                raise RecipeError(f"proxy {name!r}: float must be 'target' (the target float model) or a pretrain "
                                  f"section (a float model trained on the proxy from the target float model)")
            try:
                Recipe.from_dict({"model": {"arch": recipe.model.arch}, "pretrain": floating})
            except RecipeError as e:
                raise RecipeError(f"proxy {name!r}: float: {e}") from None
        if not proxied.data.holdout:
            raise RecipeError(f"proxy {name!r}: set data.holdout=N (the decoded-policy evaluation and the choice of "
                              f"search settings use a held-out slice of the proxy's training split)")
        out[name] = Proxy(name, tuple(overrides), floating)
    return out


def _deploy(value: Any) -> list[str]:
    if value is None:
        return ["qat"]
    if not isinstance(value, list) or not value or any(v not in DEPLOYS for v in value) or \
            len(set(value)) != len(value):
        raise RecipeError(f"study key 'deploy' must be a list of distinct {' / '.join(DEPLOYS)}, got {value!r}")
    return [d for d in DEPLOYS if d in value]


def _ptq(value: Any) -> PTQConfig:
    if value is None:
        return PTQConfig()
    fields = {f.name for f in dataclasses.fields(PTQConfig)}
    if not isinstance(value, dict) or set(value) - fields:
        raise RecipeError(f"study key 'ptq' must be a mapping with keys {', '.join(sorted(fields))}")
    cfg = PTQConfig(**value)
    if cfg.method not in PTQ_METHODS:
        raise RecipeError(f"ptq.method {cfg.method!r} is not one of {', '.join(PTQ_METHODS)}")
    for key in ("calibration_images", "batch_size"):
        if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) <= 0:
            raise RecipeError(f"ptq.{key} must be a positive integer, got {getattr(cfg, key)!r}")
    if cfg.calibration_images % cfg.batch_size:
        raise RecipeError(f"ptq.calibration_images={cfg.calibration_images} must be a multiple of ptq.batch_size="
                          f"{cfg.batch_size}")
    return cfg


def _target_float(value: Any, base_dir: Path) -> Recipe | None:
    """``target_float``: a packaged recipe's name, a recipe path (relative to the study file) or an inline one."""
    from gmpq.recipes import load_recipe

    if value is None:
        return None
    if isinstance(value, dict):
        try:
            return Recipe.from_dict(value)
        except RecipeError as e:
            raise RecipeError(f"study target_float: {e}") from None
    if not isinstance(value, str):
        raise RecipeError("study key 'target_float' must be a recipe name, a recipe path or a recipe mapping")
    path = Path(value)
    if not path.is_absolute() and (base_dir / path).exists():
        path = base_dir / path
    return load_recipe(path)


def _references(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise RecipeError(f"study key 'references' must be a list of mappings with keys {', '.join(REFERENCE_KEYS)}")
    for r in value:
        unknown = sorted(set(r) - set(REFERENCE_KEYS))
        if unknown or not {"method", "paper"} <= set(r):
            raise RecipeError(f"a study reference needs method and paper and may have {', '.join(REFERENCE_KEYS)}; "
                              f"got {sorted(r)}")
    return [dict(r) for r in value]


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
    if not study.proxies and r.model.checkpoint is None and r.pretrain.epochs == 0:
        raise RecipeError("the proxy float model needs recipe.pretrain.epochs > 0 or recipe.model.checkpoint")
    if r.target.checkpoint is None and study.target_float is None and not study.target_pretrain.get("epochs"):
        raise RecipeError("the target float model needs recipe.target.checkpoint (given), target_float (a recipe "
                          "that makes it) or target_pretrain.epochs > 0")
    if study.target_float is not None and r.target.checkpoint is None:
        _check_target_float(study)


def _check_target_float(study: StudyConfig) -> None:
    """The target float model's recipe must train on the target's data with the same held-out slice: else the
    float model would have trained on the images fine-tuning monitors, or on another task."""
    f, t = study.target_float, study.recipe.target
    arch = t.arch or study.recipe.model.deploy_arch or study.recipe.model.arch
    pairs = {"model.arch": (f.model.arch, arch), "data.dataset": (f.data.dataset, t.dataset),
             "data.path": (f.data.path, t.path), "data.holdout": (f.data.holdout, t.holdout),
             "data.classes": (f.data.classes, t.classes), "data.input_size": (f.data.input_size, t.input_size)}
    for key, (mine, theirs) in pairs.items():
        if mine != theirs:
            raise RecipeError(f"target_float recipe {f.name!r} has {key}={mine!r} but the study's target has "
                              f"{theirs!r}: the target float model must be trained on the target's training split "
                              f"minus the same held-out slice")


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
