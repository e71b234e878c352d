"""The training engine on accelerate, in its canonical form: ``prepare``, ``accumulate``, ``backward``,
``gather_for_metrics``, ``save_state`` / ``load_state``.

Building blocks any stage reuses (the search loop included):

* :func:`make_accelerator` — a seeded :class:`accelerate.Accelerator`: bf16 autocast on GPUs when asked, gradient
  accumulation, global batches split across processes (``split_batches=True``) and a seedable sampler.
* :func:`build_optimizer` — SGD (momentum, no Nesterov) or AdamW; weight decay only on tensors with more than one
  dimension (conv/linear weights), never on biases, norm parameters or quantizer steps/clips.
* :func:`build_scheduler` — per-optimizer-step multiplier of the peak lr: linear warm-up from 1% over
  ``warmup_epochs``, then cosine ``0.5 (1 + cos(pi t))`` with ``t`` the post-warm-up progress in [0, 1], or step
  decay ``gamma ** floor(epoch / step_size)``.
* :func:`evaluate` — top-1 / top-5 accuracy (percent) and mean cross-entropy over a loader, gathered across processes
  with ``gather_for_metrics`` (the padding of the last distributed batch is not counted).
* :func:`fit` — the epoch loop: train, evaluate, log (JSONL + CSV), checkpoint atomically each epoch, resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gmpq.errors import RecipeError
from gmpq.train.checkpoint import CheckpointManager
from gmpq.train.runlog import MetricsLogger

if TYPE_CHECKING:
    from gmpq.recipes import Recipe, TrainConfig

#: ``loss_fn(model, images, labels) -> (loss, logits)``; the default is cross-entropy with label smoothing.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def process_state() -> PartialState:
    """This process's rank and world size, set up the way :func:`make_accelerator` sets it up.

    Call this (not a bare ``PartialState()``) before the first accelerator of a process exists: the state is a
    process-wide singleton, and one made without ``cpu=True`` on a machine without CUDA ignores torchrun's
    ``WORLD_SIZE`` — every later accelerator would then run as an independent single process.
    """
    return PartialState(cpu=not torch.cuda.is_available())


def make_accelerator(recipe: Recipe, train_cfg: TrainConfig | None = None) -> Accelerator:
    """A fresh, seeded accelerator for one stage of ``recipe``.

    ``train_cfg`` is any section with ``mixed_precision`` / ``grad_accum`` fields (missing fields: float32, no
    accumulation). bf16 is used only when ``train_cfg.mixed_precision == 'bf16'`` and a CUDA device is present (CPU runs stay in
    float32). Under ``torchrun`` on CPU the processes join a gloo group. The accelerator state of a previous stage in
    this process is reset (accelerate's ``_reset_state``; the process group is kept), so that stages with different
    precision or accumulation settings can run one after another in one process.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    cuda = torch.cuda.is_available()
    precision = "bf16" if (getattr(train_cfg, "mixed_precision", "no") == "bf16" and cuda) else "no"
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=precision,
        gradient_accumulation_steps=getattr(train_cfg, "grad_accum", 1),
        dataloader_config=DataLoaderConfiguration(split_batches=True, even_batches=True, use_seedable_sampler=True,
                                                  data_seed=recipe.seed),
    )
    set_seed(recipe.seed)
    return accelerator


def build_optimizer(params: Iterable[nn.Parameter] | nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over ``params`` (a module or parameters) with weight decay on >1-D tensors only."""
    parameters = list(params.parameters() if isinstance(params, nn.Module) else params)
    decay = [p for p in parameters if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in parameters if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step :class:`~torch.optim.lr_scheduler.LambdaLR` with warm-up then cosine or step decay (module doc)."""
    steps_per_epoch = max(1, steps_per_epoch)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total, int(round(cfg.warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        if cfg.schedule == "cosine":
            t = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * t))
        return cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_steps_per_epoch(loader: DataLoader, cfg: TrainConfig) -> int:
    """Optimizer steps in one epoch: batches (capped by ``max_steps``) over ``grad_accum``, rounded up."""
    batches = len(loader) if cfg.max_steps is None else min(len(loader), cfg.max_steps)
    return max(1, math.ceil(batches / cfg.grad_accum))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator | None = None,
             desc: str = "eval") -> dict[str, float]:
    """``{"top1", "top5", "loss", "num_samples"}`` of ``model`` on ``loader`` (accuracies in percent).

    ``top-k = 100 * #{i : y_i in the k largest logits of x_i} / N`` and ``loss = mean_i CE(logits_i, y_i)``. With an
    accelerator the per-sample results are gathered with ``gather_for_metrics``, so N is the dataset size on any
    number of processes. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    show = accelerator is None or accelerator.is_local_main_process
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, top1, top5, count
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not show):
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()
        loss = F.cross_entropy(logits, labels, reduction="none")
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit1 = topk[:, 0] == labels
        hit5 = (topk == labels[:, None]).any(dim=1)
        if accelerator is not None:
            loss, hit1, hit5 = accelerator.gather_for_metrics((loss, hit1, hit5))
        totals += torch.tensor([loss.sum().item(), hit1.sum().item(), hit5.sum().item(), loss.numel()],
                               dtype=torch.float64)
    model.train(was_training)
    n = max(1.0, float(totals[3]))
    return {"top1": 100.0 * float(totals[1]) / n, "top5": 100.0 * float(totals[2]) / n,
            "loss": float(totals[0]) / n, "num_samples": int(totals[3])}


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    """The default loss: cross-entropy of the model's logits, with optional label smoothing."""

    def loss_fn(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing), logits

    return loss_fn


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, scheduler: Any,
                    accelerator: Accelerator, cfg: TrainConfig, loss_fn: LossFn, desc: str = "train") -> dict[str, float]:
    """One epoch of ``accelerate``'s canonical loop; returns mean training loss and top-1 over all processes.

    With ``cfg.max_grad_norm`` the global gradient norm is clipped before each optimizer step; with a ``freeze_bn``
    field set (fine-tuning) BatchNorm layers keep their running statistics. A non-finite loss stops training with a
    :class:`~gmpq.errors.RecipeError` naming the remedies instead of continuing with NaN weights.
    """
    model.train()
    if getattr(cfg, "freeze_bn", False):
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # loss sum, correct, count
    bar = tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process,
               total=len(loader) if cfg.max_steps is None else min(len(loader), cfg.max_steps))
    for step, (images, labels) in enumerate(bar):
        if cfg.max_steps is not None and step >= cfg.max_steps:
            break
        with accelerator.accumulate(model):
            loss, logits = loss_fn(model, images, labels)
            if not torch.isfinite(loss.detach()).all():
                raise RecipeError(
                    f"{desc}: training diverged (loss {loss.item()}) at batch {step}; lower the learning rate, set "
                    f"max_grad_norm, or for low-bit QAT set finetune.freeze_bn=true")
            accelerator.backward(loss)
            if cfg.max_grad_norm is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        n = labels.numel()
        totals += torch.tensor([loss.item() * n, (logits.argmax(1) == labels).sum().item(), n],
                               device=totals.device, dtype=torch.float64)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    totals = accelerator.reduce(totals, reduction="sum")
    n = max(1.0, float(totals[2]))
    return {"train_loss": float(totals[0]) / n, "train_top1": 100.0 * float(totals[1]) / n}


@dataclass
class FitResult:
    """What :func:`fit` returns: the per-epoch history and the last evaluation."""

    history: list[dict[str, Any]]
    final: dict[str, float]
    resumed_from: int | None


def fit(model: nn.Module, train_loader: DataLoader, eval_loader: DataLoader, cfg: TrainConfig,
        accelerator: Accelerator, out_dir: str | Path, *, resume: bool = False, loss_fn: LossFn | None = None,
        stage: str = "train", extra_modules: Iterable[nn.Module] = (),
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` epochs with evaluation, logging and per-epoch checkpoints in ``out_dir``.

    The model and loaders must *not* be prepared yet: ``fit`` builds the optimizer and scheduler, prepares everything
    and, with ``resume``, restores the last checkpoint under ``out_dir/checkpoints`` (weights, optimizer, scheduler,
    every process's RNG states and the metrics history) and continues with the next epoch; the sampler order of
    epoch ``e`` depends only on ``seed + e``, so the result equals an uninterrupted run's. ``extra_modules``
    (e.g. a distillation teacher) are moved to the device without being trained. ``on_epoch_end(epoch, row)`` is
    called after each epoch's checkpoint (1-based epoch). Returns a :class:`FitResult`; the trained model stays
    prepared (use ``accelerator.unwrap_model``).
    """
    out = Path(out_dir)
    loss_fn = loss_fn or cross_entropy_loss(cfg.label_smoothing)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, optimizer_steps_per_epoch(train_loader, cfg))
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    for extra in extra_modules:
        extra.to(accelerator.device).eval()
    checkpoints = CheckpointManager(out / "checkpoints", accelerator)
    logger = MetricsLogger(out, accelerator)
    history: list[dict[str, Any]] = []
    start, resumed_from = 0, None
    if resume:
        state = checkpoints.load_latest()
        if state is not None:
            start = resumed_from = int(state["epoch"])
            history = list(state["history"])
            accelerator.print(f"{stage}: resumed from epoch {start} ({checkpoints.latest()})")
    final = _eval_of(history[-1]) if history else {}
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        _set_epoch(train_loader, epoch)
        train_stats = train_one_epoch(model, train_loader, optimizer, scheduler, accelerator, cfg, loss_fn,
                                      desc=f"{stage} {epoch + 1}/{cfg.epochs}")
        final = evaluate(model, eval_loader, accelerator, desc=f"{stage} eval {epoch + 1}/{cfg.epochs}")
        row = {"epoch": epoch + 1, **train_stats, "eval_top1": final["top1"], "eval_top5": final["top5"],
               "eval_loss": final["loss"], "eval_samples": final["num_samples"], "lr": scheduler.get_last_lr()[0],
               "epoch_s": time.perf_counter() - t0}
        history.append(row)
        checkpoints.save(epoch + 1, {"epoch": epoch + 1, "history": history})
        logger.write(history)
        accelerator.print(f"{stage} epoch {epoch + 1}/{cfg.epochs}: loss {train_stats['train_loss']:.4f} "
                          f"train top1 {train_stats['train_top1']:.2f} | eval top1 {final['top1']:.2f} "
                          f"top5 {final['top5']:.2f} ({row['epoch_s']:.1f}s)")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, row)
    if not final:
        final = evaluate(model, eval_loader, accelerator, desc=f"{stage} eval")
    return FitResult(history, final, resumed_from)


def _eval_of(row: dict[str, Any]) -> dict[str, float]:
    return {"top1": row["eval_top1"], "top5": row["eval_top5"], "loss": row["eval_loss"],
            "num_samples": row["eval_samples"]}


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make the shuffle of ``epoch`` depend on ``seed + epoch`` only (accelerate's seedable sampler)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
