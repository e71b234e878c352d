"""``ptq(recipe)``: post-training quantization of a policy — what ``gmpq ptq`` (and ``finetune.mode=ptq``) runs.

A fresh model of ``model.arch`` is initialised from float weights (``model.checkpoint``, else this run's float
model), and :func:`gmpq.ptq.ptq` applies the policy (:func:`~gmpq.stages.common.resolve_policy`) on
``ptq.num_images`` images of the training split (evaluation transform; never the evaluation split): calibration,
then, with ``ptq.rounding=learned``, block-wise reconstruction of the rounding and the activation steps. No epoch of
training runs. The result is the run's deployed model: it is written where a fine-tuned one is (the ``finetune``
stage directory, so that ``gmpq evaluate``, ``gmpq export`` and ``gmpq run`` take it unchanged), with the metrics
of a fine-tune stage plus ``mode: ptq``, the image count and each block's output error before and after
reconstruction, and the figure ``ptq.png``. A killed reconstruction resumes with ``resume=true`` at the block it
stopped in (its progress is in ``checkpoints/``).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from gmpq.hub import write_model_dir
from gmpq.models import create_model
from gmpq.policy import Policy
from gmpq.ptq import ptq as post_training_quantize
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
    init_from_checkpoint,
    make_accelerator,
    prepare_output_dir,
    write_run_info,
)
from gmpq.train import evaluate as evaluate_loader
from gmpq.viz import plot_ptq

if TYPE_CHECKING:
    from gmpq.recipes import Recipe

#: The stage's figure: per-block output errors and loss curves.
FIGURE = "ptq.png"


def ptq(recipe: Recipe, policy: Policy | str | os.PathLike | None = None) -> dict[str, Any]:
    """Post-training quantization of ``recipe``'s model under a policy (section ``ptq``); return the metrics.

    ``policy`` (a :class:`Policy` or path) takes precedence over ``finetune.policy``, as for fine-tuning.
    """
    recipe.require("model.arch", "to quantize after training")
    cfg = recipe.ptq
    run = RunDir.of(recipe)
    stage = run.finetune
    with run.claim():
        accelerator = make_accelerator(recipe, recipe.finetune)
        float_source = recipe.model.checkpoint or run_float_model(recipe)
        require_float_weights(recipe, float_source, "post-training quantization")
        if prepare_output_dir(stage, recipe.resume, recipe.force, accelerator):
            return read_metrics(stage)
        t0 = time.perf_counter()
        loaders = build_dataloaders(recipe, accelerator, train=False)
        model = create_model(recipe.model.arch, num_classes=loaders.num_classes, pretrained=recipe.model.pretrained)
        if float_source is not None:
            report_init(accelerator, float_source, init_from_checkpoint(model, float_source))
        pol = resolve_policy(recipe, model, policy)
        images = calibration_batches(recipe.override([f"data.batch_size={cfg.num_images}"]), 1)[0]
        model.to(accelerator.device)
        qmodel = post_training_quantize(model, pol, images, cfg, seed=recipe.seed,
                                        progress=accelerator.is_main_process, state_dir=stage.checkpoints)
        report = qmodel.gmpq_ptq
        write_run_info(stage, recipe, accelerator)
        result = evaluate_loader(accelerator.prepare(qmodel), accelerator.prepare(loaders.eval), accelerator,
                                 desc="ptq eval")
        if accelerator.is_main_process:
            pol.save(stage.policy)
            write_model_dir(qmodel, stage.model, input_size=loaders.input_size,
                            extra=model_dir_extra(recipe, float_source))
            if report.blocks:
                plot_ptq(report, stage.path / FIGURE, title=f"{recipe.name}: post-training reconstruction")
        w_mean, a_mean = pol.mean_bits
        metrics = {
            **accuracy(result), "stage": "finetune", "mode": "ptq", "arch": recipe.model.arch,
            "precision": "quantized", "epochs": 0, "ptq_rounding": cfg.rounding, "ptq_images": report.images,
            "ptq_iters": cfg.iters if cfg.rounding == "learned" else 0, "ptq_qdrop": cfg.qdrop,
            "ptq_batchnorm": cfg.batchnorm, "ptq_resumed_at_block": report.resumed_at_block,
            "ptq_wall_s": report.wall_s, "ptq_peak_rss_mb": report.peak_rss_mb,
            "ptq_blocks": [{"name": b.name, "nearest_error": b.nearest_error, "learned_error": b.learned_error,
                            "iters": b.iters, "seconds": b.seconds} for b in report.blocks],
            "num_eval_samples": result["num_samples"], "world_size": accelerator.num_processes,
            "model_dir": str(stage.model), "float_checkpoint": float_source, "mean_w_bits": w_mean,
            "mean_a_bits": a_mean, "model_size_mb": model_size_mb(qmodel),
            **policy_bops(recipe, pol, loaders.num_classes),
        }
        return finish(stage, metrics, t0, accelerator)
