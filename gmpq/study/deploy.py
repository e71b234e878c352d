"""A cell's post-training deployment (``deploy: [ptq, ...]``): its policy applied to the target float model.

The float reference (``target.checkpoint``) is quantized with the cell's searched policy (kept layers at
``model.kept_bits``) and made ready on ``ptq.calibration_images`` target training images — the first ones of a
permutation seeded with the cell's seed (:func:`gmpq.train.calibration_batches`; the training split minus
``target.holdout``, evaluation transform) — by ``ptq.method``:

* ``rtn``: round to nearest — activation clips and weight steps set to their MSE-optimal values on those images
  (:func:`gmpq.quant.calibrate`);
* ``bn``: ``rtn``, then the batch-norm statistics re-estimated under quantization on the same images
  (``torch.optim.swa_utils.update_bn``: the cumulative mean and variance of every BatchNorm's input), then the
  clips calibrated again on the activations the new statistics produce;
* ``reconstruct``: ``gmpq.ptq(model, policy, images) -> nn.Module`` (the learned rounding of the post-training
  issue, AdaRound / BRECQ-style) when this gmpq has it; refused with one clear error otherwise.

The quantized model is evaluated once on the target's test split (``evaluate.split``); its numbers go to
``<cell>/ptq/metrics.json`` (top-1, top-5, loss, BOPs, mean bits, method, images, wall time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from gmpq.errors import RecipeError
from gmpq.models import create_model, quantize
from gmpq.policy import Policy
from gmpq.quant import calibrate
from gmpq.rundir import RunDir, StageDir
from gmpq.stages.common import accuracy, finish, policy_bops, read_metrics
from gmpq.stages.finetuning import resolve_policy
from gmpq.train import build_dataloaders, calibration_batches, init_from_checkpoint, make_accelerator, write_run_info
from gmpq.train import evaluate as evaluate_loader

if TYPE_CHECKING:
    from gmpq.recipes import Recipe

#: The post-training methods (module docstring).
PTQ_METHODS = ("bn", "rtn", "reconstruct")
#: The stage directory of a cell's post-training deployment.
PTQ_STAGE = "ptq"


@dataclass(frozen=True)
class PTQConfig:
    """The post-training deployment: ``method`` (``bn``: calibration and batch-norm re-estimation; ``rtn``:
    calibration only; ``reconstruct``: ``gmpq.ptq``, learned rounding) on ``calibration_images`` target training
    images (a seed-dependent draw), in batches of ``batch_size``."""

    method: str = "bn"
    calibration_images: int = 1024
    batch_size: int = 64


def ptq_stage(run: Recipe | RunDir) -> StageDir:
    """``<output_dir>/ptq`` of a cell (its recipe or run directory)."""
    root = run.root if isinstance(run, RunDir) else RunDir.of(run).root
    return StageDir(root / PTQ_STAGE, PTQ_STAGE)


def post_training(target: Recipe, policy: Policy | str, cfg: PTQConfig, stage: StageDir) -> dict[str, Any]:
    """Deploy ``policy`` on the float model of ``target`` (a target recipe: its data, arch and ``model.checkpoint``)
    without training (module docstring); write and return the metrics. A finished stage is reused."""
    if stage.finished:
        return read_metrics(stage)
    source = target.require("model.checkpoint", "for a post-training deployment (the target float model)")
    t0 = time.perf_counter()
    accelerator = make_accelerator(target, None)
    loaders = build_dataloaders(target, accelerator, train=False, eval_split=target.evaluate.split,
                                eval_batch_size=target.evaluate.batch_size)
    model = create_model(target.model.arch, num_classes=loaders.num_classes)
    init_from_checkpoint(model, source)
    pol = resolve_policy(target, model, policy)
    images = calibration_batches(target.override([f"data.batch_size={cfg.batch_size}"]),
                                 cfg.calibration_images // cfg.batch_size, accelerator)
    model = _quantize(model, pol, images, cfg.method)
    stage.path.mkdir(parents=True, exist_ok=True)
    write_run_info(stage, target, accelerator)
    if accelerator.is_main_process:
        pol.save(stage.policy)
    result = evaluate_loader(accelerator.prepare(model), accelerator.prepare(loaders.eval), accelerator,
                             desc=f"ptq ({cfg.method}) eval")
    w_mean, a_mean = pol.mean_bits
    metrics = {
        **accuracy(result), "stage": PTQ_STAGE, "method": cfg.method, "arch": target.model.arch,
        "precision": "quantized", "float_checkpoint": source, "calibration_images": sum(len(b) for b in images),
        "dataset": target.data.dataset, "split": target.evaluate.split, "num_eval_samples": result["num_samples"],
        "mean_w_bits": w_mean, "mean_a_bits": a_mean, **policy_bops(target, pol, loaders.num_classes),
    }
    return finish(stage, metrics, t0, accelerator)


def _quantize(model: nn.Module, policy: Policy, images: list[torch.Tensor], method: str) -> nn.Module:
    if method == "reconstruct":
        import gmpq

        reconstruct = getattr(gmpq, "ptq", None)
        if reconstruct is None:
            raise RecipeError("ptq.method=reconstruct needs gmpq.ptq (learned rounding, the post-training issue), "
                              "which this gmpq does not have yet; use ptq.method=bn")
        return reconstruct(model, policy, torch.cat(images))
    quantize(model, policy)
    calibrate(model, images)
    if method == "bn":
        update_bn(images, model, device=next(model.parameters()).device)
        calibrate(model, images)
    model.eval()
    return model
