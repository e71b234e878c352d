"""``evaluate(target)``: top-1 / top-5 / loss on the evaluation split, BOPs and size of a model — what
``gmpq evaluate`` runs.

The target is a recipe (its run's fine-tuned model, else its float model), a run directory, a stage directory, or
any gmpq model directory: a stage's ``model/``, an export, a published ``hub/<name>`` (also found in the gmpq
checkout's ``hub/``) or a Hugging Face Hub repo id. A model directory outside a run brings its own data section (or,
for an export, the dataset and split its card was measured on) and, when quantized, the deployment arch and
resolution its policy states. The metrics go to the run's ``evaluate`` stage (``runs/evaluate-<name>`` for a
model directory outside a run).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from gmpq.errors import CheckpointError
from gmpq.hub import load_model_dir, resolve_model_dir
from gmpq.hub.format import POLICY_FILE, is_quantized, read_config
from gmpq.policy import Policy
from gmpq.recipes import Recipe, load_recipe
from gmpq.rundir import RunDir, StageDir
from gmpq.stages.common import accuracy, deploy_macs, finish, model_size_mb, policy_bops
from gmpq.train import build_dataloaders, find_model_dir, make_accelerator, write_run_info
from gmpq.train import evaluate as evaluate_loader


def evaluate(target: Recipe | str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Evaluate the model of ``target`` (module docstring) and write the evaluate stage's metrics; return them.

    ``overrides`` (``dotted.key=value``) adjust the recipe, e.g. ``data.path=...`` or ``evaluate.split=train``.
    """
    recipe, model_dir = evaluation_target(target, list(overrides))
    run = RunDir.of(recipe)
    stage = run.evaluate
    with run.claim():
        accelerator = make_accelerator(recipe, None)
        t0 = time.perf_counter()
        model = load_model_dir(model_dir)
        cfg = read_config(model_dir)
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
            **accuracy(result), "stage": "evaluate", "arch": cfg["arch"], "model_dir": str(model_dir),
            "precision": "quantized" if policy is not None else "float", "dataset": recipe.data.dataset,
            "split": recipe.evaluate.split or recipe.data.eval_split or "default",
            "num_eval_samples": result["num_samples"], "world_size": accelerator.num_processes,
            "model_size_mb": model_size_mb(model), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        }
        metrics.update(policy_bops(recipe, policy, cfg["num_classes"]) if policy is not None
                       else deploy_macs(recipe, cfg["num_classes"]))
        if accelerator.is_main_process:
            stage.path.mkdir(parents=True, exist_ok=True)
        write_run_info(stage, recipe, accelerator)
        return finish(stage, metrics, t0, accelerator)


def evaluation_target(target: Recipe | str | os.PathLike, overrides: list[str]) -> tuple[Recipe, Path]:
    """The recipe to evaluate with and the model directory to evaluate (module docstring)."""
    if isinstance(target, Recipe):
        return _trained_model(target.override(overrides))
    path = Path(target)
    if path.is_file():
        return _trained_model(load_recipe(path, overrides))
    if not path.is_dir():
        path = resolve_model_dir(target)  # hub/<name> of the gmpq checkout, or a Hugging Face Hub repo id
    model_dir = find_model_dir(path)
    if model_dir is None:
        raise CheckpointError(f"{str(path)!r} holds no gmpq model directory or run; give a recipe YAML, a run, a "
                              "stage or a model directory")
    stage = StageDir.holding(model_dir)
    if stage is not None and stage.recipe.exists():  # a stage's model: evaluated with the stage's recipe
        return load_recipe(stage.recipe, overrides), model_dir
    return load_recipe(None, _recipe_of_model_dir(model_dir) + overrides), model_dir


def _recipe_of_model_dir(model_dir: Path) -> list[str]:
    """Overrides that evaluate a model directory outside a run: its arch, data and deployment."""
    cfg = read_config(model_dir)
    metrics = cfg.get("metrics") or {}  # an export made outside a run records where it was measured
    data = cfg.get("data") or {"dataset": metrics.get("dataset"), "eval_split": metrics.get("eval_split")}
    base = [f"model.arch={cfg['arch']}", f"output_dir={Path('runs') / ('evaluate-' + model_dir.resolve().name)}"]
    base += [f"data.{k}={json.dumps(v)}" for k, v in data.items() if v is not None]
    if is_quantized(cfg):  # BOPs where the policy states them: its deployment arch and resolution
        policy = Policy.load(model_dir / POLICY_FILE)
        base += [f"model.deploy_arch={policy.arch}", f"model.deploy_input_size={policy.input_size}"]
    return base


def _trained_model(recipe: Recipe) -> tuple[Recipe, Path]:
    run = RunDir.of(recipe)
    model_dir = find_model_dir(run.root)
    if model_dir is not None:
        return recipe, model_dir
    raise CheckpointError(f"run {recipe.output_dir!r} has no trained model yet (neither {run.tuned_model} nor "
                          f"{run.float_model}); run `gmpq pretrain` or `gmpq finetune` first")
