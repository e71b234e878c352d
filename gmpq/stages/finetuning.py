"""``finetune(recipe)``: quantization-aware fine-tuning of a policy — what ``gmpq finetune`` runs.

A fresh model of ``model.arch`` is initialised from float weights (``model.checkpoint``, else this run's float
model), quantized with the policy (:func:`resolve_policy`; kept layers at ``model.kept_bits``), calibrated on
``finetune.calibration_batches`` real training batches (activation clips and sign modes, weight steps) before
``accelerator.prepare`` so every rank holds the same quantizers, then trained (QAT) by :func:`gmpq.train.fit` with
optional distillation from the float teacher (``finetune.distill`` > 0). Metrics add the policy's searched and total
BOPs at ``model.deploy_arch`` / ``model.deploy_input_size`` and the model size.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from gmpq.hub import write_model_dir
from gmpq.models import create_model, quantize
from gmpq.policy import Policy
from gmpq.quant import QuantMixin, calibrate
from gmpq.rundir import RunDir
from gmpq.stages.common import (
    accuracy,
    finish,
    model_dir_extra,
    model_size_mb,
    policy_bops,
    read_metrics,
    report_init,
    require_float_weights,
    resolve_policy,
    run_float_model,
)
from gmpq.train import (
    build_dataloaders,
    calibration_batches,
    distillation_loss,
    fit,
    init_from_checkpoint,
    make_accelerator,
    prepare_output_dir,
    write_run_info,
)

if TYPE_CHECKING:
    from gmpq.recipes import Recipe

def finetune(recipe: Recipe, policy: Policy | str | os.PathLike | None = None) -> dict[str, Any]:
    """Quantization-aware fine-tuning of ``recipe``'s model under a policy (section ``finetune``); return metrics.

    ``policy`` (a :class:`Policy` or path) takes precedence over ``finetune.policy``. With ``finetune.mode=ptq``
    the policy is deployed by post-training quantization instead (:func:`gmpq.stages.posttraining.ptq`).
    """
    if recipe.finetune.mode == "ptq":
        from gmpq.stages.posttraining import ptq

        return ptq(recipe, policy)
    recipe.require("model.arch", "to fine-tune")
    cfg = recipe.finetune
    run = RunDir.of(recipe)
    stage = run.finetune
    with run.claim():
        accelerator = make_accelerator(recipe, cfg)
        float_source = recipe.model.checkpoint or run_float_model(recipe)
        require_float_weights(recipe, float_source, "fine-tuning")
        if prepare_output_dir(stage, recipe.resume, recipe.force, accelerator):
            return read_metrics(stage)
        t0 = time.perf_counter()
        loaders = build_dataloaders(recipe, accelerator)
        model = create_model(recipe.model.arch, num_classes=loaders.num_classes, pretrained=recipe.model.pretrained)
        if float_source is not None:
            report_init(accelerator, float_source, init_from_checkpoint(model, float_source))
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
        accelerator.print(f"finetune: calibrated {sum(isinstance(m, QuantMixin) for m in model.modules())} "
                          f"quantized layers on {used} batches")
        write_run_info(stage, recipe, accelerator)
        if accelerator.is_main_process:
            pol.save(stage.policy)
        loss_fn = distillation_loss(teacher, cfg.distill, cfg.label_smoothing) if teacher is not None else None
        result = fit(model, loaders.train, loaders.eval, cfg, accelerator, stage, resume=recipe.resume,
                     loss_fn=loss_fn, stage="finetune", extra_modules=[teacher] if teacher is not None else [])
        if accelerator.is_main_process:
            write_model_dir(model, stage.model, input_size=loaders.input_size,
                            extra=model_dir_extra(recipe, float_source))
        w_mean, a_mean = pol.mean_bits
        metrics = {
            **accuracy(result.final), "stage": "finetune", "arch": recipe.model.arch, "precision": "quantized",
            "epochs": cfg.epochs, "resumed_from_epoch": result.resumed_from, "world_size": accelerator.num_processes,
            "num_train_samples": len(loaders.train.dataset), "num_eval_samples": result.final["num_samples"],
            "model_dir": str(stage.model), "float_checkpoint": float_source, "distill": cfg.distill,
            "mean_w_bits": w_mean, "mean_a_bits": a_mean, "model_size_mb": model_size_mb(model),
            **policy_bops(recipe, pol, loaders.num_classes),
        }
        return finish(stage, metrics, t0, accelerator)
