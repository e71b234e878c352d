"""The stages of a gmpq run as plain functions: :func:`pretrain`, :func:`finetune`, :func:`evaluate`.

Each takes a :class:`~gmpq.recipes.Recipe` and works in its own directory ``<output_dir>/<stage>`` holding
``recipe.yaml``, ``env.json``, ``metrics.jsonl`` / ``metrics.csv`` (per epoch), ``checkpoints/epoch_NNNN`` (the last
two), ``model/`` (final weights) and ``metrics.json`` (final numbers, also the return value):

* ``pretrain`` — a full-precision model on ``data`` (the search's teacher); initialised from ``model.checkpoint``
  (gmpq dir, state-dict file or Hub id) or timm weights (``model.pretrained``) when given.
* ``finetune`` — a fresh model of ``model.arch`` initialised from float weights (``model.checkpoint``, else this
  run's ``pretrain/model``), quantized with the policy (``finetune.policy``: a JSON file or ``wXaY`` for uniform
  bits, else this run's ``search/policy.json``; kept layers at ``model.kept_bits``), calibrated on
  ``finetune.calibration_batches`` real training batches (activation clips and sign modes, weight steps) before
  ``accelerator.prepare`` so every rank holds the same quantizers, then trained (QAT) with optional distillation
  from the float teacher (``finetune.distill`` > 0). Metrics add the policy's searched and total BOPs at
  ``model.deploy_arch`` / ``model.deploy_input_size`` and the model size.
* ``evaluate`` — top-1 / top-5 / loss on the evaluation split, BOPs and size, of the model of a run, stage or model
  directory (or of a recipe's run), written to ``<output_dir>/evaluate/metrics.json``.

``resume=true`` continues a stage from its last checkpoint (a finished stage is returned as is); ``force=true``
restarts it. Works the same under ``torchrun --nproc_per_node N`` (global batches are split across processes).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from gmpq.complexity import count_bops
from gmpq.errors import CheckpointError, RecipeError
from gmpq.hub import is_model_dir, load_model_dir, resolve_model_dir, write_model_dir
from gmpq.hub.format import is_quantized
from gmpq.hub.format import read_config as read_model_config
from gmpq.models import base_arch, create_model, quantize, uniform_policy
from gmpq.policy import LayerBits, Policy, as_policy
from gmpq.quant import QuantMixin, calibrate
from gmpq.train.checkpoint import find_model_dir, init_from_checkpoint
from gmpq.train.engine import evaluate as evaluate_loader
from gmpq.train.engine import fit, make_accelerator
from gmpq.train.loaders import build_dataloaders, calibration_batches
from gmpq.train.losses import distillation_loss
from gmpq.train.runlog import prepare_output_dir, write_metrics_json, write_run_info

if TYPE_CHECKING:
    from accelerate import Accelerator

    from gmpq.recipes import Recipe

_UNIFORM = re.compile(r"^w([2-8]|32)a([2-8]|32)$")


def stage_dir(recipe: Recipe, stage: str) -> Path:
    """``<output_dir>/<stage>``: where a stage of ``recipe`` writes."""
    return Path(recipe.output_dir) / stage


# ------------------------------------------------------------------------------------------------ pretrain
def pretrain(recipe: Recipe) -> dict[str, Any]:
    """Train the full-precision model of ``recipe`` (section ``pretrain``); return its metrics."""
    recipe.require("model.arch", "to pretrain")
    out = stage_dir(recipe, "pretrain")
    accelerator = make_accelerator(recipe, recipe.pretrain)
    if prepare_output_dir(out, recipe.resume, recipe.force, accelerator):
        return _read_metrics(out)
    t0 = time.perf_counter()
    loaders = build_dataloaders(recipe, accelerator)
    model = create_model(recipe.model.arch, num_classes=loaders.num_classes, pretrained=recipe.model.pretrained)
    if recipe.model.checkpoint:
        _report_init(accelerator, recipe.model.checkpoint, init_from_checkpoint(model, recipe.model.checkpoint))
    write_run_info(out, recipe, accelerator)
    result = fit(model, loaders.train, loaders.eval, recipe.pretrain, accelerator, out, resume=recipe.resume,
                 stage="pretrain")
    if accelerator.is_main_process:
        write_model_dir(model, out / "model", input_size=loaders.input_size, extra=_data_extra(recipe))
    metrics = {
        **_accuracy(result.final), "stage": "pretrain", "arch": recipe.model.arch, "precision": "float",
        "epochs": recipe.pretrain.epochs, "resumed_from_epoch": result.resumed_from,
        "world_size": accelerator.num_processes, "num_train_samples": len(loaders.train.dataset),
        "num_eval_samples": result.final["num_samples"], "model_dir": str(out / "model"),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "model_size_mb": model_size_mb(model),
        **_deploy_macs(recipe, loaders.num_classes),
    }
    return _finish(out, metrics, t0, accelerator)


# ------------------------------------------------------------------------------------------------ finetune
def finetune(recipe: Recipe, policy: Policy | str | os.PathLike | None = None) -> dict[str, Any]:
    """Quantization-aware fine-tuning of ``recipe``'s model under a policy (section ``finetune``); return metrics.

    ``policy`` (a :class:`Policy` or path) takes precedence over ``finetune.policy``.
    """
    recipe.require("model.arch", "to fine-tune")
    cfg = recipe.finetune
    out = stage_dir(recipe, "finetune")
    accelerator = make_accelerator(recipe, cfg)
    float_source = _float_source(recipe)
    if prepare_output_dir(out, recipe.resume, recipe.force, accelerator):
        return _read_metrics(out)
    t0 = time.perf_counter()
    loaders = build_dataloaders(recipe, accelerator)
    model = create_model(recipe.model.arch, num_classes=loaders.num_classes, pretrained=recipe.model.pretrained)
    if float_source is not None:
        _report_init(accelerator, float_source, init_from_checkpoint(model, float_source))
    pol = resolve_policy(recipe, model, policy)
    quantize(model, pol)
    teacher = None
    if cfg.distill > 0:
        teacher_source = cfg.teacher or float_source
        teacher = create_model(recipe.model.arch, num_classes=loaders.num_classes,
                               pretrained=teacher_source is None and recipe.model.pretrained)
        if teacher_source is not None:
            init_from_checkpoint(teacher, teacher_source)
        teacher.eval().requires_grad_(False)
    used = calibrate(model, calibration_batches(recipe, cfg.calibration_batches, accelerator))
    accelerator.print(f"finetune: calibrated {sum(isinstance(m, QuantMixin) for m in model.modules())} quantized "
                      f"layers on {used} batches")
    write_run_info(out, recipe, accelerator)
    if accelerator.is_main_process:
        pol.save(out / "policy.json")
    loss_fn = distillation_loss(teacher, cfg.distill, cfg.label_smoothing) if teacher is not None else None
    result = fit(model, loaders.train, loaders.eval, cfg, accelerator, out, resume=recipe.resume, loss_fn=loss_fn,
                 stage="finetune", extra_modules=[teacher] if teacher is not None else [])
    if accelerator.is_main_process:
        write_model_dir(model, out / "model", input_size=loaders.input_size, extra=_data_extra(recipe))
    w_mean, a_mean = pol.mean_bits
    metrics = {
        **_accuracy(result.final), "stage": "finetune", "arch": recipe.model.arch, "precision": "quantized",
        "epochs": cfg.epochs, "resumed_from_epoch": result.resumed_from, "world_size": accelerator.num_processes,
        "num_train_samples": len(loaders.train.dataset), "num_eval_samples": result.final["num_samples"],
        "model_dir": str(out / "model"), "float_checkpoint": float_source, "distill": cfg.distill,
        "mean_w_bits": w_mean, "mean_a_bits": a_mean, "model_size_mb": model_size_mb(model),
        **policy_bops(recipe, pol, loaders.num_classes),
    }
    return _finish(out, metrics, t0, accelerator)


def resolve_policy(recipe: Recipe, model: nn.Module, policy: Policy | str | os.PathLike | None = None) -> Policy:
    """The policy to fine-tune: ``policy`` > ``finetune.policy`` (file or ``wXaY``) > ``<output_dir>/search/policy.json``.

    The kept layers get ``model.kept_bits``.
    """
    spec = policy if policy is not None else recipe.finetune.policy
    if spec is None:
        searched = stage_dir(recipe, "search") / "policy.json"
        if not searched.exists():
            raise RecipeError(f"no policy to fine-tune: set finetune.policy (a policy JSON file, or wXaY such as w4a4 "
                              f"for uniform bits) or run the search first (it writes {searched})")
        spec = searched
    if isinstance(spec, str) and _UNIFORM.match(spec.lower()):
        w, a = (int(b) for b in _UNIFORM.match(spec.lower()).groups())
        pol = uniform_policy(model, w, a, kept_bits=recipe.model.kept_bits, arch=recipe.model.arch)
    else:
        pol = as_policy(spec)
    kept = recipe.model.kept_bits
    return Policy(arch=pol.arch, input_size=pol.input_size, layers=dict(pol.layers),
                  kept={n: LayerBits(kept, kept) for n in pol.kept}, candidate_bits=pol.candidate_bits,
                  bops_searched_g=pol.bops_searched_g, bops_total_g=pol.bops_total_g, provenance=dict(pol.provenance))


def _float_source(recipe: Recipe) -> str | None:
    if recipe.model.checkpoint:
        return recipe.model.checkpoint
    own = stage_dir(recipe, "pretrain") / "model"
    if is_model_dir(own) and read_model_config(own).get("arch") == recipe.model.arch:
        return str(own)
    if recipe.model.pretrained:
        return None
    raise RecipeError(f"fine-tuning needs float weights: set model.checkpoint (a gmpq model dir, a .safetensors/.pth "
                      f"file or a Hub id), set model.pretrained=true, or run `gmpq pretrain` first (it writes {own})")


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate(target: Recipe | str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Evaluate the model of ``target`` and write ``<output_dir>/evaluate/metrics.json``; return the metrics.

    ``target``: a :class:`Recipe` or recipe YAML (its run's ``finetune/model``, else ``pretrain/model``), a run
    directory, a stage directory (``.../finetune``) or a model directory (``config.json`` + ``model.safetensors``).
    ``overrides`` (``dotted.key=value``) adjust the recipe, e.g. ``data.path=...`` or ``evaluate.split=train``.
    """
    recipe, model_dir = _evaluation_target(target, list(overrides))
    accelerator = make_accelerator(recipe, None)
    t0 = time.perf_counter()
    model = load_model_dir(model_dir)
    cfg = read_model_config(model_dir)
    loaders = build_dataloaders(recipe, accelerator, train=False, eval_split=recipe.evaluate.split,
                                eval_batch_size=recipe.evaluate.batch_size)
    if loaders.num_classes != cfg["num_classes"] and recipe.model.num_classes is None:
        raise CheckpointError(f"model in {str(model_dir)!r} has {cfg['num_classes']} classes but dataset "
                              f"{recipe.data.dataset!r} has {loaders.num_classes}")
    prepared = accelerator.prepare(model)
    eval_loader = accelerator.prepare(loaders.eval)
    result = evaluate_loader(prepared, eval_loader, accelerator, desc="evaluate")
    policy = getattr(model, "gmpq_policy", None)
    metrics: dict[str, Any] = {
        **_accuracy(result), "stage": "evaluate", "arch": cfg["arch"], "model_dir": str(model_dir),
        "precision": "quantized" if policy is not None else "float", "dataset": recipe.data.dataset,
        "split": recipe.evaluate.split or recipe.data.eval_split or "default", "num_eval_samples": result["num_samples"],
        "world_size": accelerator.num_processes, "model_size_mb": model_size_mb(model),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    metrics.update(policy_bops(recipe, policy, cfg["num_classes"]) if policy is not None
                   else _deploy_macs(recipe, cfg["num_classes"]))
    out = stage_dir(recipe, "evaluate")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    write_run_info(out, recipe, accelerator)
    return _finish(out, metrics, t0, accelerator)


def _evaluation_target(target: Recipe | str | os.PathLike, overrides: list[str]) -> tuple[Recipe, Path]:
    from gmpq.recipes import Recipe, load_recipe  # the faces layer; imported here only to read a saved recipe

    if isinstance(target, Recipe):
        return _model_of_run(target.override(overrides))
    path = Path(target)
    if path.is_file():
        return _model_of_run(load_recipe(path, overrides))
    if not path.is_dir():
        path = resolve_model_dir(target)  # hub/<name> of the gmpq checkout, or a Hugging Face Hub repo id
    for stage in ("finetune", "pretrain"):
        if find_model_dir(path / stage) is not None and (path / stage / "recipe.yaml").exists():
            return load_recipe(path / stage / "recipe.yaml", overrides), path / stage / "model"
    if (path / "model").is_dir() and (path / "recipe.yaml").exists():
        return load_recipe(path / "recipe.yaml", overrides), path / "model"
    model_dir = find_model_dir(path)
    if model_dir is None:
        raise CheckpointError(f"{str(path)!r} holds no gmpq model (config.json + model.safetensors) or run")
    if (model_dir.parent / "recipe.yaml").exists():
        return load_recipe(model_dir.parent / "recipe.yaml", overrides), model_dir
    cfg = read_model_config(model_dir)
    metrics = cfg.get("metrics") or {}  # an export made outside a run records where it was measured
    data = cfg.get("data") or {"dataset": metrics.get("dataset"), "eval_split": metrics.get("eval_split")}
    base = [f"model.arch={cfg['arch']}", f"output_dir={Path('runs') / ('evaluate-' + model_dir.resolve().name)}"]
    base += [f"data.{k}={json.dumps(v)}" for k, v in data.items() if v is not None]
    if is_quantized(cfg):  # BOPs where the policy states them: its deployment arch and resolution
        policy = Policy.load(model_dir / "policy.json")
        base += [f"model.deploy_arch={policy.arch}", f"model.deploy_input_size={policy.input_size}"]
    return load_recipe(None, base + overrides), model_dir


def _model_of_run(recipe: Recipe) -> tuple[Recipe, Path]:
    for stage in ("finetune", "pretrain"):
        d = find_model_dir(stage_dir(recipe, stage) / "model")
        if d is not None:
            return recipe, d
    raise CheckpointError(f"run {recipe.output_dir!r} has no trained model yet (no finetune/model or pretrain/model); "
                          f"run `gmpq pretrain` or `gmpq finetune` first")


# ------------------------------------------------------------------------------------------------ shared
def model_size_mb(model: nn.Module) -> float:
    """Weight storage in MB (1e6 bytes): quantized layers' weights at their bits, every other parameter at 32 bits."""
    bits = 0
    quantized_weights = set()
    for module in model.modules():
        if isinstance(module, QuantMixin):
            bits += module.weight.numel() * module.w_bits
            quantized_weights.add(id(module.weight))
    for name, p in model.named_parameters():
        if id(p) in quantized_weights or name.endswith(("wq.scale", "aq.clip")):
            continue
        bits += p.numel() * 32
    return bits / 8 / 1e6


def policy_bops(recipe: Recipe, policy: Policy, num_classes: int) -> dict[str, Any]:
    """Searched and total BOPs (G) of ``policy`` on ``model.deploy_arch`` at ``model.deploy_input_size``."""
    arch = recipe.model.deploy_arch or base_arch(recipe.model.arch)
    deploy = create_model(arch, policy=policy, num_classes=num_classes)
    report = count_bops(deploy, recipe.model.deploy_input_size)
    return {"bops_searched_g": report.bops_searched_g, "bops_total_g": report.bops_total_g,
            "macs_g": report.macs / 1e9, "deploy_arch": arch, "deploy_input_size": recipe.model.deploy_input_size}


def _deploy_macs(recipe: Recipe, num_classes: int) -> dict[str, Any]:
    arch = recipe.model.deploy_arch or base_arch(recipe.model.arch)
    report = count_bops(create_model(arch, num_classes=num_classes), recipe.model.deploy_input_size)
    return {"macs_g": report.macs / 1e9, "deploy_arch": arch, "deploy_input_size": recipe.model.deploy_input_size}


def _accuracy(result: dict[str, float]) -> dict[str, float]:
    return {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"]}


def _data_extra(recipe: Recipe) -> dict[str, Any]:
    d = recipe.data
    return {"recipe_name": recipe.name,
            "data": {"dataset": d.dataset, "path": d.path, "train_split": d.train_split, "eval_split": d.eval_split,
                     "input_size": d.input_size}}


def _report_init(accelerator: Accelerator, source: str, report: dict[str, list[str]]) -> None:
    skipped, missing = report["skipped_shape"], report["missing"]
    if skipped or missing:
        accelerator.print(f"initialised from {source}: {len(skipped)} tensors skipped for shape "
                          f"({', '.join(skipped[:4])}{'...' if len(skipped) > 4 else ''}), {len(missing)} left at "
                          f"their initial values")


def _read_metrics(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


def _finish(out: Path, metrics: dict[str, Any], t0: float, accelerator: Accelerator) -> dict[str, Any]:
    metrics["wall_s"] = time.perf_counter() - t0
    write_metrics_json(out, metrics, accelerator)
    accelerator.wait_for_everyone()
    return metrics
