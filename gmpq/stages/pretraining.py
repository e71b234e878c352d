"""``pretrain(recipe)``: the full-precision model of a recipe (the search's teacher) — what ``gmpq pretrain`` runs.

Initialised from ``model.checkpoint`` (a gmpq model directory, a state-dict file or a Hub id) or timm's weights
(``model.pretrained``) when given, trained by :func:`gmpq.train.fit` with the ``pretrain`` section, saved as the
run's float model (``<output_dir>/pretrain/model``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gmpq.hub import write_model_dir
from gmpq.models import create_model
from gmpq.rundir import RunDir
from gmpq.stages.common import (
    accuracy,
    deploy_macs,
    finish,
    model_dir_extra,
    model_size_mb,
    read_metrics,
    report_init,
)
from gmpq.train import (
    build_dataloaders,
    fit,
    init_from_checkpoint,
    make_accelerator,
    prepare_output_dir,
    write_run_info,
)

if TYPE_CHECKING:
    from gmpq.recipes import Recipe


def pretrain(recipe: Recipe) -> dict[str, Any]:
    """Train the full-precision model of ``recipe`` (section ``pretrain``); return its metrics."""
    recipe.require("model.arch", "to pretrain")
    run = RunDir.of(recipe)
    stage = run.pretrain
    with run.claim():
        accelerator = make_accelerator(recipe, recipe.pretrain)
        if prepare_output_dir(stage, recipe.resume, recipe.force, accelerator):
            return read_metrics(stage)
        t0 = time.perf_counter()
        loaders = build_dataloaders(recipe, accelerator)
        model = create_model(recipe.model.arch, num_classes=loaders.num_classes, pretrained=recipe.model.pretrained)
        if recipe.model.checkpoint:
            report_init(accelerator, recipe.model.checkpoint, init_from_checkpoint(model, recipe.model.checkpoint))
        write_run_info(stage, recipe, accelerator)
        result = fit(model, loaders.train, loaders.eval, recipe.pretrain, accelerator, stage, resume=recipe.resume,
                     stage="pretrain")
        if accelerator.is_main_process:
            weights_from = recipe.model.checkpoint or (f"timm:{recipe.model.arch}" if recipe.model.pretrained else None)
            write_model_dir(model, stage.model, input_size=loaders.input_size,
                            extra=model_dir_extra(recipe, weights_from))
        metrics = {
            **accuracy(result.final), "stage": "pretrain", "arch": recipe.model.arch, "precision": "float",
            "epochs": recipe.pretrain.epochs, "resumed_from_epoch": result.resumed_from,
            "world_size": accelerator.num_processes, "num_train_samples": len(loaders.train.dataset),
            "num_eval_samples": result.final["num_samples"], "model_dir": str(stage.model),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "model_size_mb": model_size_mb(model),
            **deploy_macs(recipe, loaders.num_classes),
        }
        return finish(stage, metrics, t0, accelerator)
