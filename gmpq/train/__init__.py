"""Layer 5 — training: the accelerate engine, checkpoints, run logs and the pretrain / finetune / evaluate stages.

Modules (one concept each):

* :mod:`gmpq.train.engine` — ``make_accelerator``, ``build_optimizer``, ``build_scheduler``, ``evaluate`` (top-1/top-5
  with ``gather_for_metrics``), ``train_one_epoch``, ``fit`` (epochs, logging, per-epoch checkpoints, resume).
* :mod:`gmpq.train.loaders` — ``build_dataloaders`` (global batches, split across processes), ``calibration_batches``,
  ``labelled_batches``, ``model_data_config``.
* :mod:`gmpq.train.checkpoint` — ``CheckpointManager`` (atomic ``save_state`` per epoch), ``save_float_model`` /
  ``load_float_model``, ``save_quantized_model`` / ``load_quantized_model`` / ``load_model`` (safetensors + JSON),
  ``init_from_checkpoint``.
* :mod:`gmpq.train.runlog` — ``MetricsLogger`` (JSONL + CSV per epoch), ``write_metrics_json``, ``write_run_info``
  (resolved recipe + environment), ``prepare_output_dir`` (resume / force rules).
* :mod:`gmpq.train.losses` — ``distillation_loss``.
* :mod:`gmpq.train.stages` — ``pretrain(recipe)``, ``finetune(recipe)``, ``evaluate(recipe_or_dir)``.

A stage written elsewhere (e.g. the search) reuses the same blocks::

    accelerator = make_accelerator(recipe, recipe.pretrain)
    loaders = build_dataloaders(recipe, accelerator)
    model, opt, train_loader = accelerator.prepare(model, build_optimizer(model, cfg), loaders.train)
    ...
    metrics = evaluate(model, accelerator.prepare(loaders.eval), accelerator)
"""

from gmpq.train.checkpoint import (
    CheckpointManager,
    init_from_checkpoint,
    load_float_model,
    load_model,
    load_quantized_model,
    read_model_config,
    resolve_model_dir,
    save_float_model,
    save_quantized_model,
)
from gmpq.train.engine import (
    FitResult,
    build_optimizer,
    build_scheduler,
    cross_entropy_loss,
    evaluate,
    fit,
    make_accelerator,
    optimizer_steps_per_epoch,
    process_state,
    train_one_epoch,
)
from gmpq.train.loaders import (
    Loaders,
    ModelDataConfig,
    build_dataloaders,
    calibration_batches,
    labelled_batches,
    model_data_config,
)
from gmpq.train.losses import distillation_loss
from gmpq.train.runlog import MetricsLogger, environment, prepare_output_dir, write_metrics_json, write_run_info
from gmpq.train.stages import evaluate as evaluate_stage
from gmpq.train.stages import finetune, model_size_mb, policy_bops, pretrain, resolve_policy, stage_dir

__all__ = [
    "CheckpointManager", "FitResult", "Loaders", "MetricsLogger", "ModelDataConfig", "build_dataloaders",
    "build_optimizer", "build_scheduler", "calibration_batches", "cross_entropy_loss", "distillation_loss",
    "environment", "evaluate", "evaluate_stage", "finetune", "fit", "init_from_checkpoint", "labelled_batches",
    "load_float_model", "load_model", "load_quantized_model", "make_accelerator", "model_data_config", "model_size_mb",
    "optimizer_steps_per_epoch", "policy_bops", "prepare_output_dir", "pretrain", "process_state", "read_model_config",
    "resolve_model_dir", "resolve_policy", "save_float_model", "save_quantized_model", "stage_dir",
    "train_one_epoch", "write_metrics_json", "write_run_info",
]
