"""Recipes: the YAML schema of a gmpq run, its validation and command-line overrides.

A recipe is a YAML file whose top level holds ``name``, ``seed``, ``output_dir``, ``resume``, ``force`` and the
sections ``model``, ``data``, ``pretrain``, ``search``, ``finetune``, ``ptq``, ``evaluate``, ``export``, ``target`` and
``run`` (the last two used by ``gmpq run``); every section is a dataclass below, and every field has a default except
``model.arch``. Loading checks every key against the schema: an unknown key, a value of the wrong type, a value
outside its allowed set or range, or a missing required value raises
:class:`~gmpq.errors.RecipeError` naming the dotted key (``finetune.lr``) and, for a misspelt key, the closest valid
one. Any field can be overridden as ``dotted.key=value``; the value is parsed as YAML (``search.bits=[2,4]``,
``model.checkpoint=null``, ``finetune.lr=1e-3``).

The quick-start and the paper's recipes ship inside the package (``gmpq/recipe_files``; a checkout's ``recipes/``
links to it): a recipe argument that is no existing file but a packaged recipe's name (``quickstart``,
``resnet18_cifar10``, with or without ``.yaml``) loads that one (:func:`resolve_recipe`); ``gmpq recipes`` lists them
(:func:`packaged_recipes`).

Python use::

    from gmpq.recipes import load_recipe
    recipe = load_recipe("finetune_quick", ["finetune.epochs=1", "output_dir=runs/try1"])   # or a YAML path
    recipe.finetune.lr, recipe.to_dict()

This module depends only on :mod:`gmpq.errors` and :mod:`gmpq.utils`, so every layer can consume a :class:`Recipe`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from gmpq.errors import RecipeError
from gmpq.utils import read_user_text

#: The recipes shipped inside the package.
PACKAGED_RECIPES_DIR = Path(__file__).resolve().parent / "recipe_files"
RECIPE_SUFFIXES = (".yaml", ".yml")

#: Marks a field that the recipe must set.
REQUIRED: Any = "<required>"


def _f(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, doc: str = "", **limits: float) -> Any:
    """A dataclass field with a docstring and optional numeric limits (``ge``, ``gt``, ``le``)."""
    meta = {"doc": doc, **limits}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """The network: a registered backbone or timm name, and how it is initialised and deployed."""

    arch: str = _f(REQUIRED, doc="registered backbone or timm model name")
    num_classes: int | None = _f(None, gt=0, doc="classifier outputs; None takes the dataset's class count")
    pretrained: bool = _f(False, doc="start from timm's pretrained weights (needs the Hub or its cache)")
    checkpoint: str | None = _f(None, doc="float checkpoint (gmpq run dir, model dir, .safetensors/.pth file or a "
                                           "timm/HF Hub id) to initialise from")
    kept_bits: int = _f(8, doc="bits of the kept layers (stem, classifier); 32 keeps them float")
    deploy_arch: str | None = _f(None, doc="architecture whose BOPs are reported; None = base_arch(arch)")
    deploy_input_size: int = _f(224, gt=0, doc="resolution at which deployment BOPs are counted")


@dataclass
class DataConfig:
    """The dataset, its split names and loader sizes."""

    dataset: str = _f("cifar10_embedded", doc="dataset name (see gmpq.data.list_datasets())")
    path: str | None = _f(None, doc="local copy: parquet folder, imagefolder or Hub cache dir")
    train_split: str | None = _f(None, doc="training split; None = the dataset's default")
    eval_split: str | None = _f(None, doc="evaluation split; None = the dataset's default")
    input_size: int | None = _f(None, gt=0, doc="image resolution; None = the model's native resolution")
    batch_size: int = _f(64, gt=0, doc="global training batch (summed over processes)")
    eval_batch_size: int | None = _f(None, gt=0, doc="global evaluation batch; None = 2 * batch_size")
    num_workers: int = _f(0, ge=0, doc="dataloader worker processes per training process")
    max_train_samples: int | None = _f(None, gt=0, doc="use only the first N training samples (after shuffling "
                                                       "with the recipe seed)")
    max_eval_samples: int | None = _f(None, gt=0, doc="use only N evaluation samples (the same N for every seed)")
    subset_seed: int | None = _f(None, ge=0, doc="seed of the shuffle that picks max_train_samples; None = the recipe "
                                                 "seed (set it for one fixed subset whatever the run's seed)")
    holdout: int | None = _f(None, gt=0, doc="hold N training samples out of training as split 'holdout' (the same "
                                             "fixed slice for every seed); evaluate on it with eval_split=holdout")
    classes: int | None = _f(None, gt=0, doc="use only the samples of the first N classes (labels 0..N-1) of every "
                                             "split: a smaller task on the same images")


@dataclass
class TrainConfig:
    """One training stage: optimiser, schedule and loop settings."""

    epochs: int = _f(10, ge=0, doc="epochs")
    optimizer: Literal["sgd", "adamw"] = _f("sgd", doc="sgd or adamw")
    lr: float = _f(0.05, gt=0, doc="peak learning rate (for the global batch)")
    momentum: float = _f(0.9, ge=0, le=1, doc="SGD momentum (AdamW: beta1)")
    nesterov: bool = _f(False, doc="SGD: Nesterov momentum")
    weight_decay: float = _f(5e-4, ge=0, doc="weight decay (not applied to biases, norms and quantizer steps)")
    schedule: Literal["cosine", "step"] = _f("cosine", doc="cosine to 0, or step decay")
    step_size: int = _f(30, gt=0, doc="step schedule: epochs between decays")
    gamma: float = _f(0.1, gt=0, le=1, doc="step schedule: decay factor")
    warmup_epochs: float = _f(0.0, ge=0, doc="linear warm-up from lr/100, in epochs")
    label_smoothing: float = _f(0.0, ge=0, le=1, doc="label smoothing of the cross-entropy")
    grad_accum: int = _f(1, gt=0, doc="gradient accumulation steps (the optimiser steps every N batches)")
    mixed_precision: Literal["no", "bf16"] = _f("no", doc="bf16 autocast (GPU); 'no' = float32")
    max_steps: int | None = _f(None, gt=0, doc="stop each epoch after N batches (smoke tests)")
    max_grad_norm: float | None = _f(None, gt=0, doc="clip the global gradient norm to this value; None = no clipping")


@dataclass
class FinetuneConfig(TrainConfig):
    """Quantization-aware fine-tuning of a policy, optionally distilled from the float teacher."""

    epochs: int = _f(5, ge=0, doc="epochs")
    lr: float = _f(0.01, gt=0, doc="peak learning rate (for the global batch)")
    weight_decay: float = _f(1e-4, ge=0, doc="weight decay (not applied to biases, norms and quantizer steps)")
    policy: str | None = _f(None, doc="policy JSON path, or 'wXaY' for a uniform policy; None = given by the "
                                      "pipeline (the search output)")
    teacher: str | None = _f(None, doc="float teacher checkpoint for distillation; None = the float weights the "
                                       "student starts from")
    distill: float = _f(0.0, ge=0, le=1, doc="KD weight: loss = (1-d) CE + d T^2 KL(teacher || student), T=1")
    calibration_batches: int = _f(8, gt=0, doc="training batches used to calibrate clips and sign modes")
    mode: Literal["qat", "ptq"] = _f("qat", doc="how the policy is deployed: qat (quantization-aware training, this "
                                               "section) or ptq (post-training reconstruction on ptq.num_images "
                                               "training images, the ptq section; no training epochs)")
    freeze_bn: bool = _f(False, doc="keep BatchNorm running statistics fixed at the float model's during QAT "
                                    "(affine parameters still train); avoids the gradient blow-up of channels that "
                                    "2-bit activations make constant before a BatchNorm")


@dataclass
class PtqConfig:
    """Post-training quantization of a policy (``gmpq ptq``, or ``finetune.mode=ptq``): calibration, then learned
    rounding fitted block by block to the float model's block outputs (AdaRound + BRECQ, optionally QDrop)."""

    num_images: int = _f(1024, gt=0, doc="calibration images, drawn from the training split (never the test split)")
    rounding: Literal["learned", "nearest"] = _f("learned", doc="learned (block reconstruction) or nearest "
                                                               "(round-to-nearest after calibration: the baseline)")
    iters: int = _f(800, gt=0, doc="reconstruction iterations per block")
    batch_size: int = _f(32, gt=0, doc="images per reconstruction iteration")
    lr: float = _f(1e-3, gt=0, doc="Adam learning rate of the rounding variables")
    act_lr: float = _f(4e-5, ge=0, doc="Adam learning rate of the activation steps (clip / levels), cosine-annealed; "
                                       "0 keeps the calibrated clips")
    reg_weight: float = _f(0.01, gt=0, doc="weight of AdaRound's rounding regulariser")
    beta: list[float] = _f(factory=lambda: [20.0, 2.0], doc="the regulariser's exponent, annealed from the first "
                                                            "to the second value")
    warmup: float = _f(0.2, ge=0, le=0.9, doc="fraction of the iterations before the regulariser starts")
    qdrop: float = _f(0.5, ge=0, le=1, doc="QDrop: probability of dropping each activation's quantization during "
                                           "reconstruction (0 = BRECQ)")
    batchnorm: Literal["keep", "fold"] = _f("keep", doc="keep BatchNorm after the quantized convolutions (folded "
                                                        "into the per-channel steps at export), or fold it into the "
                                                        "weights before they are quantized")
    calibration_batch_size: int = _f(128, gt=0, doc="images per forward pass of calibration and block capture")


@dataclass
class SearchConfig:
    """The mixed-precision search: a strategy (a trained supernet, or score + decode) under a BOPs budget."""

    strategy: Literal["gmpq", "edmips", "hawq", "ompq", "uniform", "random"] = _f(
        "gmpq", doc="gmpq | edmips (trained supernet) | hawq | ompq (scores of the float model) | uniform | random")
    budget_g: float | None = _f(None, gt=0, doc="BOPs budget in G at the deployment size, counted as bops_preset "
                                               "says (required when searching)")
    uniform_side: Literal["below", "above"] = _f("below", doc="strategy uniform: the nearest uniform policy at or below "
                                                           "the budget, or the nearest one above it")
    bops_preset: Literal["searched", "kept8", "all"] = _f(
        "searched", doc="what the budget counts: searched layers only | + kept layers at 8/8 bits (HAWQ-V3, OMPQ) | "
                        "all layers at their bits")
    bits: list[int] = _f(factory=lambda: [2, 3, 4, 6], doc="candidate bit widths of weights and activations")
    w_bits: list[int] | None = _f(None, doc="candidate weight bit widths; None = bits")
    a_bits: list[int] | None = _f(None, doc="candidate activation bit widths; None = bits (e.g. [3, 4, 6, 8]: no "
                                            "2-bit activations)")
    epochs: int = _f(25, ge=0, doc="search epochs")
    batch_size: int | None = _f(None, gt=0, doc="search batch; None = data.batch_size")
    lr_w: float = _f(0.1, gt=0, doc="learning rate of the supernet weights (SGD)")
    lr_alpha: float = _f(0.01, gt=0, doc="learning rate of the architecture parameters")
    momentum: float = _f(0.9, ge=0, le=1, doc="SGD momentum of the weights")
    weight_decay: float = _f(5e-4, ge=0, doc="weight decay of the weights")
    alpha_weight_decay: float = _f(0.0, ge=0, doc="weight decay of the architecture parameters")
    step_size: int = _f(10, gt=0, doc="epochs between learning-rate decays")
    gamma: float = _f(0.1, gt=0, le=1, doc="learning-rate decay factor")
    lambda_attr: float = _f(40.0, ge=0, doc="weight of the attribution rank-preservation loss")
    p: float | str = _f(3.0, doc="capacity-aware exponent p, or 'auto'")
    kappa: float = _f(24.0, gt=0, doc="kappa of the capacity-aware attribution loss")
    teacher: str | None = _f(None, doc="float teacher checkpoint; None = the pretrain output")
    pretrained_teacher: bool = _f(False, doc="allow timm's pretrained weights (model.pretrained) as the attribution "
                                             "teacher when no float model was trained on the proxy; their "
                                             "classifier never saw the proxy's classes")
    max_steps: int | None = _f(None, gt=0, doc="stop each epoch after N batches (smoke tests)")
    grad_accum: int = _f(1, gt=0, doc="gradient accumulation steps (both optimizers step every N batches)")
    mixed_precision: Literal["no", "bf16"] = _f("no", doc="bf16 autocast of the supernet (GPU); 'no' = float32")
    max_grad_norm: float | None = _f(None, gt=0, doc="clip the global gradient norm (weights and architecture "
                                                     "logits together) to this value; None = no clipping")
    score_batches: int = _f(2, gt=0, doc="hawq / ompq: labelled proxy batches they score on")
    score_batch_size: int | None = _f(None, gt=0, doc="hawq / ompq: images per scoring batch; None = "
                                                      "search.batch_size or data.batch_size")
    hutchinson_samples: int = _f(2, gt=0, doc="hawq: Rademacher probes per layer block and batch (the Hessian traces' "
                                             "standard errors are in scores.json)")
    ompq_beta: float = _f(1.0, gt=0, doc="ompq: beta of the layer importance exp(-beta * summed orthogonality)")

    def candidates(self) -> tuple[list[int], list[int]]:
        """The (weight, activation) candidate bit widths: ``w_bits`` and ``a_bits``, each ``bits`` where unset."""
        return (self.bits if self.w_bits is None else self.w_bits,
                self.bits if self.a_bits is None else self.a_bits)


@dataclass
class EvaluateConfig:
    """Evaluation of a float or quantized model."""

    split: str | None = _f(None, doc="split to evaluate; None = data.eval_split")
    batch_size: int | None = _f(None, gt=0, doc="global batch; None = data.eval_batch_size")


@dataclass
class ExportConfig:
    """Export of the fine-tuned model."""

    format: Literal["packed", "float"] = _f("packed", doc="packed integer weights, or float fake-quant weights")
    dir: str | None = _f(None, doc="export directory; None = <output_dir>/export")
    name: str | None = _f(None, doc="model name in the export; None = the recipe name")


@dataclass
class TargetConfig:
    """The target task of a proxy-searched policy (GMPQ's transfer: search on CIFAR-10, fine-tune on ImageNet).

    When ``dataset`` is set, ``gmpq run`` fine-tunes, evaluates and exports on the target with ``arch`` instead of
    the proxy's ``data``/``model``; unset fields fall back to the proxy's.
    """

    dataset: str | None = _f(None, doc="target dataset; None = fine-tune on the proxy (the data section)")
    path: str | None = _f(None, doc="local copy of the target dataset")
    arch: str | None = _f(None, doc="target architecture; None = model.deploy_arch or base_arch(model.arch)")
    input_size: int | None = _f(None, gt=0, doc="target resolution; None = the target arch's native resolution")
    train_split: str | None = _f(None, doc="target training split; None = the dataset's default")
    eval_split: str | None = _f(None, doc="target evaluation split; None = the dataset's default")
    batch_size: int | None = _f(None, gt=0, doc="global fine-tuning batch on the target; None = data.batch_size")
    max_train_samples: int | None = _f(None, gt=0, doc="use only the first N target training samples")
    max_eval_samples: int | None = _f(None, gt=0, doc="use only the first N target evaluation samples")
    holdout: int | None = _f(None, gt=0, doc="hold N target training samples out as split 'holdout' (see data.holdout)")
    classes: int | None = _f(None, gt=0, doc="use only the first N classes of the target (see data.classes)")
    pretrained: bool = _f(False, doc="initialise the target model from timm's pretrained weights")
    checkpoint: str | None = _f(None, doc="float checkpoint of the target model; None = pretrained or the pretrain "
                                           "output when the target is the proxy")


@dataclass
class RunConfig:
    """What ``gmpq run`` does besides the pretrain -> search -> finetune -> evaluate -> export chain."""

    compare_uniform: bool = _f(True, doc="also fine-tune the best uniform policy under the budget and report "
                                         "both")
    compare_uniform_above: bool = _f(False, doc="also fine-tune the nearest uniform policy above the budget (more "
                                               "BOPs than the searched model may use) and report it")


@dataclass
class Recipe:
    """A complete run description. Sections are dataclasses; see the module docstring for loading and overrides."""

    name: str = _f("gmpq", doc="run name")
    seed: int = _f(0, ge=0, doc="seed of every random number generator")
    output_dir: str | None = _f(None, doc="run directory; None = runs/<name>")
    resume: bool = _f(False, doc="continue from the last checkpoint in the output directory")
    force: bool = _f(False, doc="overwrite an output directory holding a finished or different run")
    dist_timeout_s: float = _f(600.0, gt=0, doc="seconds a process of a distributed run (torchrun) waits in a "
                                                "collective for the others: a hung process then stops the run "
                                                "with one line (exit 3) instead of hanging it")
    model: ModelConfig = _f(factory=ModelConfig)
    data: DataConfig = _f(factory=DataConfig)
    pretrain: TrainConfig = _f(factory=TrainConfig)
    search: SearchConfig = _f(factory=SearchConfig)
    finetune: FinetuneConfig = _f(factory=FinetuneConfig)
    ptq: PtqConfig = _f(factory=PtqConfig)
    evaluate: EvaluateConfig = _f(factory=EvaluateConfig)
    export: ExportConfig = _f(factory=ExportConfig)
    target: TargetConfig = _f(factory=TargetConfig)
    run: RunConfig = _f(factory=RunConfig)

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.name)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every field (what ``recipe.yaml`` in a run directory holds)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Build and validate a recipe from a nested dict (missing keys take their defaults)."""
        recipe = _build(cls, data, "")
        _check_values(recipe)
        return recipe

    def override(self, overrides: Iterable[str] = ()) -> Recipe:
        """A new recipe with ``dotted.key=value`` overrides applied and validated."""
        data = self.to_dict()
        apply_overrides(data, overrides)
        return Recipe.from_dict(data)

    def require(self, dotted: str, why: str) -> Any:
        """The value at ``dotted``; raise :class:`RecipeError` when it is unset (None / required)."""
        value: Any = self
        for part in dotted.split("."):
            value = getattr(value, part)
        if value is None or value is REQUIRED:
            raise RecipeError(f"recipe key {dotted!r} must be set {why} (set it in the YAML or pass {dotted}=VALUE)")
        return value


def packaged_recipes(kind: Literal["recipe", "study"] = "recipe") -> dict[str, Path]:
    """The recipes (or, ``kind="study"``, the studies) shipped inside the package: name -> YAML path, by name."""
    folder = PACKAGED_RECIPES_DIR / "studies" if kind == "study" else PACKAGED_RECIPES_DIR
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def recipe_description(path: str | os.PathLike) -> str:
    """The first line of a recipe file's leading comment ('' when it has none)."""
    for line in read_user_text(path, "recipe", RecipeError).splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def resolve_recipe(path_or_name: str | os.PathLike, kind: Literal["recipe", "study"] = "recipe") -> Path:
    """The recipe file ``path_or_name`` means: an existing file as it is, else the packaged recipe (or study) of
    that name (``quickstart`` or ``quickstart.yaml``, no directory part). A bare name that is neither raises
    :class:`RecipeError` listing the packaged ones; any other path is returned for the reader to report."""
    p = Path(path_or_name)
    if p.exists() or p.parent != Path():
        return p
    name = p.stem if p.suffix in RECIPE_SUFFIXES else p.name
    packaged = packaged_recipes(kind)
    if name in packaged:
        return packaged[name]
    if p.suffix:
        return p
    close = difflib.get_close_matches(name, packaged, n=3)
    raise RecipeError(f"no {kind} file {str(p)!r} and no packaged {kind} of that name"
                      + (f" (did you mean {', '.join(close)}?)" if close else "")
                      + f"; packaged: {', '.join(packaged)} (`gmpq recipes`), or give a YAML path")


def load_recipe(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), **defaults: Any) -> Recipe:
    """Load a YAML recipe — a path or a packaged recipe's name (:func:`resolve_recipe`) — or start from the defaults
    when ``path`` is None; apply ``overrides``, validate.

    ``name`` defaults to the file's stem. Raises :class:`RecipeError` for an unknown name, an unreadable or
    non-UTF-8 file, invalid YAML or any schema violation, naming the dotted key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = resolve_recipe(path)
        text = read_user_text(p, "recipe", RecipeError)
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe {str(p)!r} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"recipe {str(p)!r} must be a YAML mapping at the top level, got {type(loaded).__name__}")
        data = loaded
        data.setdefault("name", p.stem)
    for key, value in defaults.items():
        data.setdefault(key, value)
    apply_overrides(data, overrides)
    try:
        return Recipe.from_dict(data)
    except RecipeError as e:
        if path is not None:
            raise RecipeError(f"{path}: {e}") from None
        raise


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` strings to a nested dict in place (values parsed as YAML); return it.

    Keys are checked against the schema, so a misspelt override fails with a did-you-mean hint.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"override {item!r} must have the form dotted.key=value (e.g. finetune.epochs=1)")
        parts = key.split(".")
        field_type = _check_path(parts)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if value is not None and not isinstance(value, str) and _is_text_type(field_type):
            value = raw.strip()  # a text field keeps the text as typed (YAML reads `no` as false, `1e3` as a string)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"recipe key {'.'.join(parts[: i + 1])!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def describe() -> list[tuple[str, str, Any, str]]:
    """Every recipe key as ``(dotted key, type, default, doc)`` — the schema's reference table."""
    rows: list[tuple[str, str, Any, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((prefix + f.name, _type_name(tp), default, f.metadata.get("doc", "")))

    walk(Recipe, "")
    return rows


# ---------------------------------------------------------------------------------------------- validation
def _is_text_type(tp: Any) -> bool:
    """True when ``tp`` accepts strings and no bool/number (str, a Literal of strings, or those or None)."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    options = tuple(o for o in options if o is not type(None))
    return bool(options) and all(
        o is str or (typing.get_origin(o) is Literal and all(isinstance(a, str) for a in typing.get_args(o)))
        for o in options)


def _check_path(parts: list[str]) -> Any:
    """Check that the dotted path exists in the schema; return the type of its last key."""
    cls: Any = Recipe
    tp: Any = None
    for i, part in enumerate(parts):
        if cls is None or not dataclasses.is_dataclass(cls):
            raise RecipeError(f"recipe key {'.'.join(parts[:i])!r} is a value, not a section; "
                              f"cannot set {'.'.join(parts)!r}")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            _unknown(cls, part, ".".join(parts[:i]))
        tp = hints[part]
        cls = tp if dataclasses.is_dataclass(tp) else None
    return tp


def _unknown(cls: type, key: str, prefix: str) -> typing.NoReturn:
    names = [f.name for f in dataclasses.fields(cls)]
    dotted = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    raise RecipeError(f"unknown recipe key {dotted!r}{hint} (valid keys{' of ' + prefix if prefix else ''}: "
                      f"{', '.join(names)})")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise RecipeError(f"recipe key {where!r} must be a mapping (section), got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in hints:
            _unknown(cls, str(key), prefix.rstrip("."))
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        dotted = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data.get(f.name), dotted + ".")
            continue
        if f.name not in data:
            if f.default is REQUIRED:
                raise RecipeError(f"recipe key {dotted!r} is required ({f.metadata.get('doc', '')}); "
                                  f"set it in the YAML or pass {dotted}=VALUE")
            continue
        value = _coerce(data[f.name], tp, dotted)
        _check_limits(value, f.metadata, dotted)
        kwargs[f.name] = value
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, dotted: str) -> Any:
    """``value`` checked (and losslessly converted: int->float, '1e-3'->float) against type ``tp``."""
    origin = typing.get_origin(tp)
    bad = RecipeError(f"recipe key {dotted!r} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, dotted)
            except RecipeError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads no/off/false (yes/on/true) as booleans
            spelled = [a for a in allowed if isinstance(a, str) and a.lower() in
                       (("yes", "on", "true") if value else ("no", "off", "false"))]
            if spelled:
                return spelled[0]
        if value in allowed and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        raise RecipeError(f"recipe key {dotted!r} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _check_values(recipe: Recipe) -> None:
    """Cross-field and domain checks that the types alone do not express."""
    bits_ok = set(range(2, 9))
    if recipe.model.kept_bits not in bits_ok | {32}:
        raise RecipeError(f"recipe key 'model.kept_bits' must be in 2..8 or 32 (float), got {recipe.model.kept_bits}")
    for key in ("bits", "w_bits", "a_bits"):
        candidates = getattr(recipe.search, key)
        if candidates is None:
            continue
        if not candidates:
            raise RecipeError(f"recipe key 'search.{key}' must list at least one bit width, e.g. [2, 3, 4, 6]")
        for i, b in enumerate(candidates):
            if b not in bits_ok:
                raise RecipeError(f"recipe key 'search.{key}[{i}]' must be in 2..8, got {b}")
    if isinstance(recipe.search.p, str) and recipe.search.p != "auto":
        raise RecipeError(f"recipe key 'search.p' must be a number or 'auto', got {recipe.search.p!r}")
    if isinstance(recipe.search.p, float) and recipe.search.p <= 0:
        raise RecipeError(f"recipe key 'search.p' must be > 0, got {recipe.search.p}")
    beta = recipe.ptq.beta
    if len(beta) != 2 or not all(isinstance(b, (int, float)) and b > 0 for b in beta) or beta[0] < beta[1]:
        raise RecipeError(f"recipe key 'ptq.beta' must be [start, end] with start >= end > 0, got {beta!r}")
    if not recipe.name or "/" in recipe.name:
        raise RecipeError(f"recipe key 'name' must be a non-empty name without '/', got {recipe.name!r}")


def _check_limits(value: Any, meta: Mapping[str, Any], dotted: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if "ge" in meta and not value >= meta["ge"]:
        raise RecipeError(f"recipe key {dotted!r} must be >= {meta['ge']}, got {value!r}")
    if "gt" in meta and not value > meta["gt"]:
        raise RecipeError(f"recipe key {dotted!r} must be > {meta['gt']}, got {value!r}")
    if "le" in meta and not value <= meta["le"]:
        raise RecipeError(f"recipe key {dotted!r} must be <= {meta['le']}, got {value!r}")
