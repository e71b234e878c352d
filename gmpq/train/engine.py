"""The training engine on accelerate, in its canonical form: ``prepare``, ``accumulate``, ``backward``,
``clip_grad_norm_``, ``gather_for_metrics``, ``save_state`` / ``load_state``. One loop, :func:`fit`, trains every
stage: float pretraining, the supernet search and quantization-aware fine-tuning.

* :func:`fit` — the epoch loop: for each batch, the stage's :class:`TrainingStep` computes the loss; ``fit`` checks it
  is finite (a divergence stops with a :class:`~gmpq.errors.RecipeError` naming the remedies), back-propagates under
  ``accelerator.accumulate`` (``grad_accum`` batches per optimizer step), clips the global gradient norm
  (``max_grad_norm``), steps every optimizer and its learning-rate schedule, and calls the step's
  ``on_step_end`` after each optimizer step. bf16 autocast comes from the accelerator (``mixed_precision``). After
  each epoch: optional evaluation, one log row (JSONL + CSV), an atomic checkpoint (with the step's own state), a
  printed line; ``resume`` continues from the last checkpoint.
* :class:`TrainingStep` — what one optimisation step trains and how: its optimizers and schedules
  (``configure_optimizers``, over the loop's total number of optimizer steps), its loss on a batch, what happens
  after each optimizer step (``on_step_end`` with the :class:`Progress`: step-wise schedules of anything) and what an
  epoch adds to the log. :class:`SupervisedStep` is the loss-on-logits step of pretraining and fine-tuning.
* :func:`make_accelerator` — a seeded :class:`accelerate.Accelerator`: bf16 autocast on GPUs when asked, gradient
  accumulation, global batches split across processes (``split_batches=True``) and a seedable sampler.
* :func:`build_optimizer` — SGD (momentum, Nesterov if asked) or AdamW; weight decay only on tensors with more than one
  dimension (conv/linear weights), never on biases, norm parameters or quantizer steps/clips.
* :func:`lr_factor` / :func:`build_scheduler` — per-optimizer-step multiplier of the peak lr: linear warm-up from 1%
  over the warm-up steps, then cosine ``0.5 (1 + cos(pi t))`` with ``t`` the post-warm-up progress in [0, 1], or
  step decay ``gamma ** floor(epoch / step_size)``.
* :func:`evaluate` — top-1 / top-5 accuracy (percent) and mean cross-entropy over a loader, gathered across processes
  with ``gather_for_metrics`` (the padding of the last distributed batch is not counted).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gmpq.errors import RecipeError
from gmpq.faults import fault_point
from gmpq.rundir import StageDir
from gmpq.train.checkpoint import CheckpointManager
from gmpq.train.runlog import MetricsLogger

if TYPE_CHECKING:
    from gmpq.recipes import Recipe, TrainConfig

#: ``loss_fn(model, images, labels) -> (loss, logits)``; the default is cross-entropy with label smoothing.
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class LoopConfig(Protocol):
    """What :func:`fit` reads of a recipe section (``pretrain``, ``finetune`` and ``search`` all have it); gradient
    accumulation and mixed precision are the accelerator's (:func:`make_accelerator`)."""

    epochs: int
    max_steps: int | None
    max_grad_norm: float | None
    grad_accum: int


def process_state(timeout_s: float | None = None) -> PartialState:
    """This process's rank and world size, set up the way :func:`make_accelerator` sets it up.

    Call this (not a bare ``PartialState()``) before the first accelerator of a process exists: the state is a
    process-wide singleton, and one made without ``cpu=True`` on a machine without CUDA ignores torchrun's
    ``WORLD_SIZE`` — every later accelerator would then run as an independent single process. ``timeout_s`` (a
    recipe's ``dist_timeout_s``) bounds every collective of a distributed run; the first call of a process sets it.
    """
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    return PartialState(cpu=not torch.cuda.is_available(), **kwargs)


def lost_process_message(error: BaseException) -> str | None:
    """One line for an error of a collective whose peer died or hung (gloo / NCCL: connection reset or closed, a
    timeout) in a distributed run; None for any other error."""
    import torch.distributed as dist

    text = str(error)
    markers = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout", "broken pipe",
               "pair closure")
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or \
            not any(m in text.lower() for m in markers):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    rank, world = dist.get_rank(), dist.get_world_size()
    # with two processes the lost one is the other; with more, only the launcher knows which one failed
    peer = f"process {1 - rank} (its only peer)" if world == 2 else "another process"
    return (f"process {rank} of {world} lost contact with {peer} of this distributed run ({first[:200]}); the "
            "launcher (torchrun) names the process that failed")


def make_accelerator(recipe: Recipe, train_cfg: TrainConfig | None = None) -> Accelerator:
    """A fresh, seeded accelerator for one stage of ``recipe``.

    ``train_cfg`` is any section with ``mixed_precision`` / ``grad_accum`` fields (``pretrain``, ``search``,
    ``finetune``; None: float32, no accumulation). bf16 is used only when ``train_cfg.mixed_precision == 'bf16'``
    and a CUDA device is present (CPU runs stay in float32). Under ``torchrun`` on CPU the processes join a gloo group. The accelerator state of a previous stage in
    this process is reset (accelerate's ``_reset_state``; the process group is kept), so that stages with different
    precision or accumulation settings can run one after another in one process.
    """
    process_state(recipe.dist_timeout_s)
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
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_factor(schedule: str, steps_per_epoch: int, total_steps: int, warmup_steps: int = 0, step_size: int = 1,
              gamma: float = 1.0) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at optimizer step ``s`` (module docstring): warm-up over
    ``warmup_steps``, then ``cosine`` (to 0 at ``total_steps``) or ``step`` decay (by ``gamma`` every ``step_size``
    epochs of ``steps_per_epoch`` steps)."""
    steps_per_epoch = max(1, steps_per_epoch)
    total = max(1, total_steps)
    warmup = min(total, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        if schedule == "cosine":
            t = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if schedule == "step":
            return gamma ** ((step // steps_per_epoch) // step_size)
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step :class:`~torch.optim.lr_scheduler.LambdaLR` of ``cfg``'s schedule (:func:`lr_factor`)."""
    steps_per_epoch = max(1, steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.schedule, steps_per_epoch, cfg.epochs *
                                                                  steps_per_epoch, warmup, cfg.step_size, cfg.gamma))


def optimizer_steps_per_epoch(loader: DataLoader, cfg: LoopConfig) -> int:
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


# ------------------------------------------------------------------------------------------------ the step
@dataclass
class StepOutput:
    """What a :class:`TrainingStep` computed on one batch.

    Attributes:
        loss: the scalar that is back-propagated.
        logits: the model's logits (the epoch's training top-1 is counted from them).
        metrics: scalars to log, each averaged over the epoch's samples (e.g. ``{"train_loss": loss}``).
        aux: anything the step wants back in ``on_step_end``.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    metrics: dict[str, torch.Tensor]
    aux: Any = None


@dataclass(frozen=True)
class Progress:
    """Where the loop is after an optimizer step: ``step`` of ``total_steps`` optimizer steps done, in ``epoch``
    (0-based) of ``steps_per_epoch`` steps each."""

    step: int
    total_steps: int
    epoch: int
    steps_per_epoch: int

    @property
    def fraction(self) -> float:
        """``step / total_steps``, in [0, 1]: the argument of any schedule over the whole run."""
        return self.step / max(1, self.total_steps)


@dataclass
class ScheduledOptimizer:
    """An optimizer and its per-step learning-rate schedule; ``name`` labels its learning rate in the log
    (``lr`` for an unnamed one, else ``lr_<name>``)."""

    name: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @property
    def log_key(self) -> str:
        return f"lr_{self.name}" if self.name else "lr"


class TrainingStep:
    """What one optimisation step of :func:`fit` trains and how (the loop does everything around it).

    Subclasses implement :meth:`configure_optimizers` and :meth:`__call__`; the other hooks have defaults.
    ``remedy`` completes the message of a diverged loss.
    """

    remedy: str = "lower the learning rate or set max_grad_norm"

    def configure_optimizers(self, model: nn.Module, steps_per_epoch: int,
                             total_steps: int) -> list[ScheduledOptimizer]:
        """The optimizers (with their schedules over ``total_steps`` optimizer steps) of the unprepared ``model``;
        they step in this order."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        """The loss of one batch (``model`` is prepared: on the device, possibly wrapped by DDP)."""
        raise NotImplementedError

    def train_mode(self, model: nn.Module) -> None:
        """Put ``model`` in training mode at the start of each epoch."""
        model.train()

    def on_step_end(self, out: StepOutput, progress: Progress) -> None:
        """Called after each optimizer step (not after batches that only accumulate gradients)."""

    def epoch_summary(self) -> dict[str, Any]:
        """Fields this step adds to the epoch's log row."""
        return {}

    def describe(self, stage: str, epochs: int, row: dict[str, Any]) -> str:
        """The line printed after each epoch."""
        text = f"{stage} epoch {row['epoch']}/{epochs}: " + " ".join(
            f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "epoch_s") and isinstance(v, float))
        return f"{text} ({row['epoch_s']:.1f}s)"

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state saved in each checkpoint (restored by :meth:`load_state_dict` on resume)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, before the checkpoint's weights; raising refuses the checkpoint."""


class SupervisedStep(TrainingStep):
    """Pretraining and fine-tuning: ``loss_fn(model, images, labels)`` (cross-entropy or distillation), one
    optimizer and schedule of ``cfg`` (:func:`build_optimizer`, :func:`build_scheduler`); with ``cfg.freeze_bn``
    BatchNorm layers keep their running statistics."""

    def __init__(self, cfg: TrainConfig, loss_fn: LossFn | None = None) -> None:
        self.cfg = cfg
        self.loss_fn = loss_fn or cross_entropy_loss(cfg.label_smoothing)
        self.remedy = "lower the learning rate, set max_grad_norm, or for low-bit QAT set finetune.freeze_bn=true"

    def configure_optimizers(self, model: nn.Module, steps_per_epoch: int,
                             total_steps: int) -> list[ScheduledOptimizer]:
        optimizer = build_optimizer(model, self.cfg)
        return [ScheduledOptimizer("", optimizer, build_scheduler(optimizer, self.cfg, steps_per_epoch))]

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        if getattr(self.cfg, "freeze_bn", False):
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        loss, logits = self.loss_fn(model, images, labels)
        return StepOutput(loss, logits, {"train_loss": loss})

    def describe(self, stage: str, epochs: int, row: dict[str, Any]) -> str:
        text = f"{stage} epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} train top1 {row['train_top1']:.2f}"
        if "eval_top1" in row:
            text += f" | eval top1 {row['eval_top1']:.2f} top5 {row['eval_top5']:.2f}"
        return f"{text} ({row['epoch_s']:.1f}s)"


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class FitResult:
    """What :func:`fit` returns: the per-epoch history, the last evaluation (empty without an evaluation loader) and
    the epoch it resumed from."""

    history: list[dict[str, Any]]
    final: dict[str, float]
    resumed_from: int | None


def fit(model: nn.Module, train_loader: DataLoader, eval_loader: DataLoader | None, cfg: LoopConfig,
        accelerator: Accelerator, out_dir: str | os.PathLike | StageDir, *, resume: bool = False,
        loss_fn: LossFn | None = None, step: TrainingStep | None = None, stage: str = "train",
        extra_modules: Iterable[nn.Module] = ()) -> FitResult:
    """Train ``model`` for ``cfg.epochs`` epochs with logging and per-epoch checkpoints in the stage directory
    ``out_dir`` (the module docstring describes one step and one epoch).

    ``step`` says what one optimisation step does (default: :class:`SupervisedStep` of ``cfg`` with ``loss_fn``).
    The model and loaders must *not* be prepared yet: ``fit`` has the step build its optimizers and schedules,
    prepares everything and, with ``resume``, restores the last checkpoint (weights, optimizers, schedules, every
    process's RNG states, the metrics history and the step's state) and continues with the next epoch; the sampler
    order of epoch ``e`` depends only on ``seed + e``, so the result equals an uninterrupted run's. With an
    ``eval_loader`` the model is evaluated after every epoch. ``extra_modules`` (e.g. a frozen teacher) are moved
    to the device without being trained. The trained model stays prepared (use ``accelerator.unwrap_model``).
    """
    out = StageDir.of(out_dir)
    step = step or SupervisedStep(cfg, loss_fn)
    steps_per_epoch = optimizer_steps_per_epoch(train_loader, cfg)
    total_steps = cfg.epochs * steps_per_epoch
    slots = step.configure_optimizers(model, steps_per_epoch, total_steps)
    loaders = [train_loader] if eval_loader is None else [train_loader, eval_loader]
    prepared = accelerator.prepare(model, *(s.optimizer for s in slots), *loaders, *(s.scheduler for s in slots))
    model, rest = prepared[0], list(prepared[1:])
    for slot in slots:
        slot.optimizer = rest.pop(0)
    train_loader = rest.pop(0)
    eval_loader = rest.pop(0) if eval_loader is not None else None
    for slot in slots:
        slot.scheduler = rest.pop(0)
    for extra in extra_modules:
        extra.to(accelerator.device).eval()
    checkpoints = CheckpointManager(out.checkpoints, accelerator)
    logger = MetricsLogger(out, accelerator)
    history: list[dict[str, Any]] = []
    start, resumed_from = 0, None
    if resume:
        state = checkpoints.load_latest(before_restore=lambda s: step.load_state_dict(s.get("step", {})))
        if state is not None:
            start = resumed_from = int(state["epoch"])
            history = list(state["history"])
            accelerator.print(f"{stage}: resumed from epoch {start} ({checkpoints.latest()})")
    final = _eval_of(history[-1]) if history and eval_loader is not None else {}
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        _set_epoch(train_loader, epoch)
        row: dict[str, Any] = {"epoch": epoch + 1}
        row.update(_train_epoch(model, train_loader, slots, step, accelerator, cfg,
                                Progress(epoch * steps_per_epoch, total_steps, epoch, steps_per_epoch),
                                desc=f"{stage} {epoch + 1}/{cfg.epochs}"))
        if eval_loader is not None:
            final = evaluate(model, eval_loader, accelerator, desc=f"{stage} eval {epoch + 1}/{cfg.epochs}")
            row.update({"eval_top1": final["top1"], "eval_top5": final["top5"], "eval_loss": final["loss"],
                        "eval_samples": final["num_samples"]})
        row.update(step.epoch_summary())
        converted = _take_converted(train_loader)
        if converted:
            row["images_converted_to_rgb"] = converted
            accelerator.print(f"{stage} epoch {epoch + 1}: {converted} training images were not RGB (grayscale, RGBA, "
                              "palette, CMYK) and were converted to RGB")
        row["epoch_s"] = time.perf_counter() - t0
        history.append(row)
        checkpoints.save(epoch + 1, {"epoch": epoch + 1, "history": history, "step": step.state_dict()})
        logger.write(history)
        accelerator.print(step.describe(stage, cfg.epochs, row))
    if not final and eval_loader is not None:
        final = evaluate(model, eval_loader, accelerator, desc=f"{stage} eval")
    return FitResult(history, final, resumed_from)


def _train_epoch(model: nn.Module, loader: DataLoader, slots: list[ScheduledOptimizer], step: TrainingStep,
                 accelerator: Accelerator, cfg: LoopConfig, progress: Progress, desc: str) -> dict[str, Any]:
    """One epoch of accelerate's canonical loop; returns the step's metrics and the training top-1 (means over all
    processes' samples), the learning rate of each optimizer's last step and the number of batches."""
    step.train_mode(model)
    total = len(loader) if cfg.max_steps is None else min(len(loader), cfg.max_steps)
    bar = tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process, total=total)
    sums: torch.Tensor | None = None  # per metric: sum of batch mean * batch size; then correct, count
    names: list[str] = []
    lrs: dict[str, float] = {}
    done = progress.step
    for batch, (images, labels) in enumerate(bar):
        if batch >= total:
            break
        with accelerator.accumulate(model):
            out = step(model, images, labels)
            if not torch.isfinite(out.loss.detach()).all():
                raise RecipeError(f"{desc}: training diverged (loss {out.loss.item()}) at batch {batch}; "
                                  f"{step.remedy}")
            accelerator.backward(out.loss)
            if cfg.max_grad_norm is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            for slot in slots:
                slot.optimizer.step()
            if accelerator.sync_gradients:
                lrs = {slot.log_key: slot.optimizer.param_groups[0]["lr"] for slot in slots}
            for slot in slots:
                slot.scheduler.step()
            for slot in slots:
                slot.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            done += 1
            step.on_step_end(out, Progress(done, progress.total_steps, progress.epoch, progress.steps_per_epoch))
            fault_point("step")
        n = labels.numel()
        if sums is None:
            names = list(out.metrics)
            sums = torch.zeros(len(names) + 2, dtype=torch.float64, device=accelerator.device)
        values = [out.metrics[k].detach().double() * n for k in names]
        correct = (out.logits.detach().argmax(1) == labels).sum().double()
        sums += torch.stack([*values, correct, torch.tensor(float(n), dtype=torch.float64, device=sums.device)])
        if batch % 10 == 0:
            bar.set_postfix(loss=f"{out.loss.item():.3f}", **{k: f"{v:.2e}" for k, v in lrs.items()})
    if sums is None:
        raise RecipeError(f"{desc}: the training loader yielded no batch; lower data.batch_size")
    sums = accelerator.reduce(sums, reduction="sum")
    n = max(1.0, float(sums[-1]))
    stats: dict[str, Any] = {name: float(sums[i]) / n for i, name in enumerate(names)}
    stats["train_top1"] = 100.0 * float(sums[-2]) / n
    return {**stats, **lrs, "steps": min(total, batch + 1)}


def _eval_of(row: dict[str, Any]) -> dict[str, float]:
    return {"top1": row["eval_top1"], "top5": row["eval_top5"], "loss": row["eval_loss"],
            "num_samples": row["eval_samples"]}


def _take_converted(loader: DataLoader) -> int:
    """Images of ``loader``'s dataset converted to RGB since the last call (on this process; 0 for other datasets)."""
    take = getattr(loader.dataset, "take_converted", None)
    return int(take()) if take is not None else 0


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make the shuffle of ``epoch`` depend on ``seed + epoch`` only (accelerate's seedable sampler)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
