"""Layer 8 — training: the one training loop (``fit`` with a ``TrainingStep``) on accelerate, dataloaders,
checkpoints and run logs.

Modules (one concept each):

* :mod:`gmpq.train.engine` — ``fit`` (epochs, schedules, clipping, accumulation, bf16, divergence check,
  checkpoints, resume, logs), ``TrainingStep`` / ``SupervisedStep`` (what one optimisation step does),
  ``make_accelerator``, ``build_optimizer``, ``lr_factor`` / ``build_scheduler``, ``evaluate`` (top-1/top-5 with
  ``gather_for_metrics``).
* :mod:`gmpq.train.loaders` — ``build_dataloaders`` (global batches, split across processes), ``calibration_batches``,
  ``labelled_batches``.
* :mod:`gmpq.train.checkpoint` — ``CheckpointManager`` (atomic ``save_state`` per epoch), ``init_from_checkpoint``,
  ``find_model_dir``.
* :mod:`gmpq.train.runlog` — ``MetricsLogger`` (JSONL + CSV per epoch), ``write_metrics_json``, ``write_run_info``
  (resolved recipe + environment), ``prepare_output_dir`` (resume / force rules).
* :mod:`gmpq.train.losses` — ``distillation_loss``.

A stage (:mod:`gmpq.stages`) is a function over these blocks::

    accelerator = make_accelerator(recipe, recipe.pretrain)
    loaders = build_dataloaders(recipe, accelerator)
    result = fit(model, loaders.train, loaders.eval, recipe.pretrain, accelerator, RunDir.of(recipe).pretrain)
"""

from gmpq.train.checkpoint import CheckpointManager, checkpoint_license, find_model_dir, init_from_checkpoint
from gmpq.train.engine import (
    FitResult,
    LoopConfig,
    Progress,
    ScheduledOptimizer,
    StepOutput,
    SupervisedStep,
    TrainingStep,
    build_optimizer,
    build_scheduler,
    cross_entropy_loss,
    evaluate,
    fit,
    lr_factor,
    make_accelerator,
    optimizer_steps_per_epoch,
    process_state,
)
from gmpq.train.loaders import Loaders, build_dataloaders, calibration_batches, labelled_batches
from gmpq.train.losses import distillation_loss
from gmpq.train.runlog import MetricsLogger, environment, prepare_output_dir, write_metrics_json, write_run_info

__all__ = [
    "CheckpointManager", "FitResult", "Loaders", "LoopConfig", "MetricsLogger", "Progress", "ScheduledOptimizer",
    "StepOutput", "SupervisedStep", "TrainingStep", "build_dataloaders", "build_optimizer", "build_scheduler",
    "calibration_batches", "checkpoint_license", "cross_entropy_loss", "distillation_loss", "environment", "evaluate", "find_model_dir",
    "fit", "init_from_checkpoint", "labelled_batches", "lr_factor", "make_accelerator", "optimizer_steps_per_epoch",
    "prepare_output_dir", "process_state", "write_metrics_json", "write_run_info",
]
