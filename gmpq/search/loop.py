"""The search stage: ``search(recipe)`` — what ``gmpq search RECIPE`` runs.

Steps (single process, or every process under ``torchrun`` / ``accelerate launch``):

1. Float weights: the student starts from ``model.checkpoint`` (else ``search.teacher``, else this run's
   ``pretrain/model``, else timm's weights with ``model.pretrained``); the frozen float teacher (eval mode, no
   gradients) comes from ``search.teacher`` (else the same float weights).
2. The search space: searched layers (all but stem and classifier) and their MACs on ``model.deploy_arch`` at
   ``model.deploy_input_size``. The budget is checked *before any training* (:func:`~gmpq.search.budget.check_budget`).
   Strategy ``uniform`` stops here with the best uniform pair.
3. The supernet (:func:`~gmpq.search.supernet.build_supernet`), calibrated on real batches (per-candidate clips and
   steps), wrapped in :class:`~gmpq.search.attribution.AttributionModel` (closed-form Grad-CAM for GAP + linear
   heads, no extra backward pass). The autograd fallback differentiates only the head twice (``autograd.grad`` of
   the logits w.r.t. the last feature map, inside the wrapped forward); under DDP the head's parameters then get
   their gradient from both paths summed before DDP's reduction hook fires once (measured: 2 gloo processes give the
   1-process gradients of the same global batch to 2e-5 relative; tests/test_search_loop.py runs a search with it
   under torchrun).
4. Training on the proxy data: every batch, ``L = CE + lambda_attr * L_attr + L_complexity``
   (:class:`~gmpq.search.losses.SearchObjective`), one backward pass, then both optimizers step — SGD on the network
   weights (``search.lr_w``, momentum, weight decay on conv/linear weights only) and SGD on the architecture logits
   (``search.lr_alpha``, momentum, ``search.alpha_weight_decay``); both learning rates decay by ``gamma`` every
   ``step_size`` epochs. The budget multiplier is updated after each step.
5. After each epoch: a record in ``search_log.jsonl`` and an atomic checkpoint (``checkpoints/epoch_NNNN``: weights,
   alphas, both optimizers, RNG states, the budget multiplier, the log) — ``resume=true`` continues from it and
   reaches the same result as an uninterrupted run.
6. The policy: exact decoding under the budget (searched BOPs in [97%, 100%] of it), then the decoded fixed-bit
   network is evaluated once — its top-1 before fine-tuning, with BN statistics re-estimated on the calibration
   batches (:func:`reestimate_batchnorm`).

Output in ``<output_dir>/search``: ``policy.json`` (with provenance), ``alphas.json`` (final logits and
probabilities of every searched layer), ``search_log.jsonl`` (one JSON object per epoch: ``epoch, loss, loss_ce,
loss_attr, loss_complexity, expected_bops_g, budget_g, decoded_bops_g, alpha_entropy, p, lr_w, lr_alpha, train_top1,
policy {layer: [w_bits, a_bits]}, probs {layer: {"w": [...], "a": [...]}}, bits`` and ``mu``, ``epoch_s``),
``metrics.json``, ``recipe.yaml`` and ``env.json``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gmpq.errors import RecipeError
from gmpq.models import base_arch, create_model
from gmpq.policy import Policy
from gmpq.quant import calibrate
from gmpq.search.attribution import AttributionModel, Method
from gmpq.search.budget import Decoded, check_budget
from gmpq.search.losses import BudgetPenalty, SearchObjective, capacity_p, expected_bops_g
from gmpq.search.strategies import Strategy, get_strategy
from gmpq.search.supernet import (
    SearchSpace,
    alpha_parameters,
    alpha_table,
    build_supernet,
    deployment_macs,
    fix_supernet,
    layer_probabilities,
    search_space,
    weight_param_groups,
)
from gmpq.train import (
    CheckpointManager,
    build_dataloaders,
    calibration_batches,
    init_from_checkpoint,
    make_accelerator,
    prepare_output_dir,
    read_model_config,
    resolve_model_dir,
    write_metrics_json,
    write_run_info,
)
from gmpq.train import evaluate as evaluate_loader
from gmpq.train.stages import stage_dir
from gmpq.utils import atomic_write_text

if TYPE_CHECKING:
    from accelerate import Accelerator

    from gmpq.recipes import Recipe

#: Training batches used to calibrate the supernet's clips, steps and sign modes before the search.
CALIBRATION_BATCHES = 4
LOG_NAME = "search_log.jsonl"


class SearchResult(dict):
    """The search stage's metrics (the content of ``metrics.json``, as every stage returns) with the decoded
    :class:`~gmpq.policy.Policy` attached as ``.policy``."""

    policy: Policy

    def __init__(self, metrics: dict[str, Any], policy: Policy) -> None:
        super().__init__(metrics)
        self.policy = policy


def search(recipe: Recipe, attribution: Method = "auto") -> SearchResult:
    """Run the search stage of ``recipe`` (see the module docstring) and return its metrics and policy.

    ``attribution`` forces the Grad-CAM implementation (``closed`` / ``autograd``); ``auto`` picks the closed form
    whenever the head is verified to be GAP + linear.
    """
    recipe.require("model.arch", "to search")
    cfg = recipe.search
    strategy = get_strategy(cfg.strategy)
    budget = float(recipe.require("search.budget_g", "to search (the searched-layer BOPs budget in G at "
                                                      "model.deploy_input_size)"))
    run_recipe = recipe if cfg.batch_size is None else recipe.override([f"data.batch_size={cfg.batch_size}"])
    out = stage_dir(recipe, "search")
    accelerator = make_accelerator(run_recipe, None)
    if prepare_output_dir(out, recipe.resume, recipe.force, accelerator):
        return SearchResult(json.loads((out / "metrics.json").read_text()), Policy.load(out / "policy.json"))
    t0 = time.perf_counter()
    num_classes = _num_classes(run_recipe, accelerator)
    deploy_arch = recipe.model.deploy_arch or base_arch(recipe.model.arch)
    model = create_model(recipe.model.arch, num_classes=num_classes,
                         pretrained=recipe.model.pretrained and strategy.trains_supernet)
    space = search_space(model, cfg.bits, recipe.model.kept_bits,
                         deployment_macs(deploy_arch, recipe.model.deploy_input_size, num_classes), deploy_arch,
                         recipe.model.deploy_input_size)
    check_budget(space, budget)
    write_run_info(out, recipe, accelerator)
    if not strategy.trains_supernet:
        decoded = strategy.decode(space, budget, uniform_side=cfg.uniform_side)
        policy = space.policy(decoded.choices, _provenance(recipe, strategy, space, budget, decoded, p=None))
        metrics = _metrics(recipe, strategy, space, budget, decoded, accelerator, t0, epochs=0, resumed_from=None)
        _write_outputs(out, policy, {}, space, metrics, accelerator)
        return SearchResult(metrics, policy)
    return _search_supernet(recipe, run_recipe, strategy, model, space, budget, out, accelerator, attribution, t0)


# ------------------------------------------------------------------------------------------------ the supernet search
def _search_supernet(recipe: Recipe, run_recipe: Recipe, strategy: Strategy, model: nn.Module, space: SearchSpace,
                     budget: float, out: Path, accelerator: Accelerator, attribution: Method,
                     t0: float) -> SearchResult:
    cfg = recipe.search
    student_source, teacher_source = _float_sources(recipe, strategy)
    if student_source is not None:
        init_from_checkpoint(model, student_source)
    teacher = None
    if strategy.uses_attribution:
        teacher_model = copy.deepcopy(model)
        if teacher_source != student_source:
            init_from_checkpoint(teacher_model, teacher_source)
        teacher = AttributionModel(teacher_model, attribution).freeze()
    loaders = build_dataloaders(run_recipe, accelerator)
    build_supernet(model, space)
    batches = calibration_batches(run_recipe, CALIBRATION_BATCHES, accelerator)
    calibrate(model, batches)
    student = AttributionModel(model, attribution)
    opt_w = torch.optim.SGD(weight_param_groups(model, cfg.weight_decay), lr=cfg.lr_w, momentum=cfg.momentum)
    opt_a = torch.optim.SGD(alpha_parameters(model), lr=cfg.lr_alpha, momentum=cfg.momentum,
                            weight_decay=cfg.alpha_weight_decay)
    student, opt_w, opt_a, train_loader, eval_loader = accelerator.prepare(student, opt_w, opt_a, loaders.train,
                                                                           loaders.eval)
    if teacher is not None:
        teacher.to(accelerator.device)
    supernet = accelerator.unwrap_model(student).model
    penalty = BudgetPenalty(budget, scale=len(space.layers))
    objective = SearchObjective(space, penalty, strategy.lambda_attr(cfg.lambda_attr), cfg.p, cfg.kappa)
    checkpoints = CheckpointManager(out / "checkpoints", accelerator)
    history: list[dict[str, Any]] = []
    start = resumed_from = None
    state = checkpoints.load_latest() if recipe.resume else None
    if state is not None:
        start = resumed_from = int(state["epoch"])
        history = list(state["history"])
        penalty.load_state_dict(state["penalty"])
        accelerator.print(f"search: resumed from epoch {start} ({checkpoints.latest()})")
    for epoch in range(start or 0, cfg.epochs):
        t_epoch = time.perf_counter()
        lr_w, lr_a = (lr * cfg.gamma ** (epoch // cfg.step_size) for lr in (cfg.lr_w, cfg.lr_alpha))
        _set_lr(opt_w, lr_w)
        _set_lr(opt_a, lr_a)
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        stats = _train_epoch(student, teacher, supernet, objective, opt_w, opt_a, train_loader, accelerator,
                             cfg.max_steps, f"search {epoch + 1}/{cfg.epochs}")
        decoded = strategy.decode(space, budget, supernet)
        row = _epoch_record(epoch + 1, stats, supernet, space, objective, budget, decoded, lr_w, lr_a,
                            time.perf_counter() - t_epoch)
        history.append(row)
        checkpoints.save(epoch + 1, {"epoch": epoch + 1, "history": history, "penalty": penalty.state_dict()})
        if accelerator.is_main_process:
            atomic_write_text(out / LOG_NAME, "".join(json.dumps(r) + "\n" for r in history))
        accelerator.print(f"search epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} (ce {row['loss_ce']:.4f} "
                          f"attr {row['loss_attr']:.5f} cplx {row['loss_complexity']:+.4f}) | E[BOPs] "
                          f"{row['expected_bops_g']:.3f} G, decoded {row['decoded_bops_g']:.3f} G of {budget:g} G | "
                          f"entropy {row['alpha_entropy']:.3f} | train top1 {row['train_top1']:.2f} "
                          f"({row['epoch_s']:.1f}s)")
    decoded = strategy.decode(space, budget, supernet)
    fixed = fix_supernet(copy.deepcopy(supernet), decoded.choices)
    reestimate_batchnorm(fixed, batches)
    decoded_eval = evaluate_loader(fixed, eval_loader, accelerator, desc="search: decoded policy eval")
    p_final = objective.exponent(supernet) if strategy.uses_attribution else None
    policy = space.policy(decoded.choices, _provenance(recipe, strategy, space, budget, decoded, p=p_final))
    metrics = _metrics(recipe, strategy, space, budget, decoded, accelerator, t0, epochs=cfg.epochs,
                       resumed_from=resumed_from)
    metrics.update({
        "expected_bops_g": expected_bops_g(supernet, space).item(), "mu": penalty.mu,
        "train_top1": history[-1]["train_top1"] if history else None,
        "alpha_entropy": history[-1]["alpha_entropy"] if history else None,
        "decoded_top1": decoded_eval["top1"], "decoded_top5": decoded_eval["top5"],
        "num_train_samples": len(loaders.train.dataset), "num_eval_samples": decoded_eval["num_samples"],
        "attribution": accelerator.unwrap_model(student).method if strategy.uses_attribution else None,
        "float_checkpoint": student_source, "teacher": teacher_source if strategy.uses_attribution else None,
    })
    _write_outputs(out, policy, alpha_table(supernet, space), space, metrics, accelerator)
    return SearchResult(metrics, policy)


def _train_epoch(student: nn.Module, teacher: nn.Module | None, supernet: nn.Module, objective: SearchObjective,
                 opt_w: torch.optim.Optimizer, opt_a: torch.optim.Optimizer, loader: Any, accelerator: Accelerator,
                 max_steps: int | None, desc: str) -> dict[str, float]:
    """One epoch of single-level search: both optimizers step on the same batch after one backward pass."""
    student.train()
    sums = torch.zeros(6, dtype=torch.float64, device=accelerator.device)  # ce, attr, cplx, total, correct, count
    total = len(loader) if max_steps is None else min(len(loader), max_steps)
    bar = tqdm(loader, desc=desc, total=total, leave=False, disable=not accelerator.is_local_main_process)
    for step, (images, labels) in enumerate(bar):
        if step >= total:
            break
        logits, cam_q = student(images)
        cam_fp = None
        if teacher is not None:
            with torch.no_grad():
                _, cam_fp = teacher(images)
        terms = objective(supernet, logits, labels, cam_q, cam_fp)
        opt_w.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        accelerator.backward(terms.total)
        opt_w.step()
        opt_a.step()
        objective.penalty.update(terms.expected_bops_g.item())
        n = labels.numel()
        sums += torch.tensor([terms.ce.item() * n, terms.attr.item() * n, terms.complexity.item() * n,
                              terms.total.item() * n, (logits.detach().argmax(1) == labels).sum().item(), n],
                             dtype=torch.float64, device=sums.device)
        if step % 5 == 0:
            bar.set_postfix(loss=f"{terms.total.item():.3f}", bops=f"{terms.expected_bops_g.item():.2f}G")
    sums = accelerator.reduce(sums, reduction="sum")
    n = max(1.0, float(sums[5]))
    return {"loss_ce": float(sums[0]) / n, "loss_attr": float(sums[1]) / n, "loss_complexity": float(sums[2]) / n,
            "loss": float(sums[3]) / n, "train_top1": 100.0 * float(sums[4]) / n, "steps": total}


def _epoch_record(epoch: int, stats: dict[str, float], supernet: nn.Module, space: SearchSpace,
                  objective: SearchObjective, budget: float, decoded: Decoded, lr_w: float, lr_a: float,
                  seconds: float) -> dict[str, Any]:
    """One line of ``search_log.jsonl`` (keys listed in the module docstring)."""
    with torch.no_grad():
        w_probs, a_probs = layer_probabilities(supernet, space)
        bops = expected_bops_g(supernet, space).item()
    return {
        "epoch": epoch, "loss": stats["loss"], "loss_ce": stats["loss_ce"], "loss_attr": stats["loss_attr"],
        "loss_complexity": stats["loss_complexity"], "expected_bops_g": bops, "budget_g": budget,
        "decoded_bops_g": decoded.bops_g, "alpha_entropy": alpha_entropy(w_probs, a_probs),
        "p": capacity_p(supernet, space, objective.kappa) if objective.p == "auto" else float(objective.p),
        "lr_w": lr_w, "lr_alpha": lr_a, "train_top1": stats["train_top1"], "mu": objective.penalty.mu,
        "epoch_s": seconds, "steps": stats["steps"],
        "policy": {n: list(decoded.choices[n]) for n in space.layers},
        "probs": {n: {"w": w_probs[i].tolist(), "a": a_probs[i].tolist()} for i, n in enumerate(space.layers)},
        "bits": list(space.bits),
    }


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Replace the BN running statistics of ``model`` by the plain average over ``batches`` (train-mode forwards).

    The supernet's statistics were gathered under the bit *mixture*; the decoded fixed-bit network's activations
    differ, so its accuracy before fine-tuning is only meaningful with statistics of its own.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the mean over the batches
    was_training = model.training
    model.train()
    device = next(model.parameters()).device
    for batch in batches:
        model(batch.to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


def alpha_entropy(w_probs: torch.Tensor, a_probs: torch.Tensor) -> float:
    """Mean over searched layers of (H(p_w) + H(p_a)) / 2, in nats (log K for uniform probabilities, 0 one-hot)."""

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(1e-30))).sum(1)

    return float(0.5 * (entropy(w_probs) + entropy(a_probs)).mean())


# ------------------------------------------------------------------------------------------------ helpers
def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _num_classes(recipe: Recipe, accelerator: Accelerator) -> int:
    """``model.num_classes``, else the dataset's class count (from its registry entry, else from the data)."""
    from gmpq.data import get_dataset_spec

    if recipe.model.num_classes:
        return recipe.model.num_classes
    spec = get_dataset_spec(recipe.data.dataset, recipe.data.path)
    if spec.num_classes:
        return spec.num_classes
    return build_dataloaders(recipe, accelerator, train=False).num_classes


def _float_sources(recipe: Recipe, strategy: Strategy) -> tuple[str | None, str | None]:
    """(student initialisation, teacher) float weights; see the module docstring for the order of precedence."""
    own = stage_dir(recipe, "pretrain") / "model"
    pretrained_run = None
    if resolve_model_dir(own) is not None and read_model_config(own).get("arch") == recipe.model.arch:
        pretrained_run = str(own)
    student = recipe.model.checkpoint or recipe.search.teacher or pretrained_run
    teacher = recipe.search.teacher or recipe.model.checkpoint or pretrained_run
    if student is None and not recipe.model.pretrained:
        raise RecipeError(f"the {strategy.name} search starts from a float model: set model.checkpoint (a gmpq model "
                          f"dir, a .safetensors/.pth file or a Hub id), set model.pretrained=true, or run "
                          f"`gmpq pretrain` first (it writes {own})")
    return student, teacher


def _provenance(recipe: Recipe, strategy: Strategy, space: SearchSpace, budget: float, decoded: Decoded,
                p: float | None) -> dict[str, Any]:
    from gmpq import __version__

    cfg = recipe.search
    return {
        "strategy": strategy.name, "lambda_attr": strategy.lambda_attr(cfg.lambda_attr),
        "p": cfg.p if strategy.uses_attribution else None, "p_final": p,
        "kappa": cfg.kappa if strategy.uses_attribution and cfg.p == "auto" else None,
        "budget_g": budget, "budget_fraction": decoded.bops_g / budget, "log_prob": decoded.log_prob,
        "proxy_dataset": recipe.data.dataset, "proxy_input_size": recipe.data.input_size,
        "search_arch": space.arch, "epochs": cfg.epochs if strategy.trains_supernet else 0, "seed": recipe.seed,
        "recipe": recipe.name, "gmpq_version": __version__,
        **({"uniform_side": cfg.uniform_side} if strategy.name == "uniform" else {}),
    }


def _metrics(recipe: Recipe, strategy: Strategy, space: SearchSpace, budget: float, decoded: Decoded,
             accelerator: Accelerator, t0: float, epochs: int, resumed_from: int | None) -> dict[str, Any]:
    searched = decoded.bops_g
    w_mean = sum(w for w, _ in decoded.choices.values()) / len(decoded.choices)
    a_mean = sum(a for _, a in decoded.choices.values()) / len(decoded.choices)
    return {
        "stage": "search", "strategy": strategy.name, "arch": recipe.model.arch, "deploy_arch": space.deploy_arch,
        "deploy_input_size": space.deploy_input_size, "budget_g": budget, "bops_searched_g": searched,
        "bops_total_g": searched + space.kept_bops_g, "budget_fraction": searched / budget,
        "mean_w_bits": w_mean, "mean_a_bits": a_mean, "num_searched_layers": len(space.layers),
        "candidate_bits": list(space.bits), "epochs": epochs, "resumed_from_epoch": resumed_from,
        "world_size": accelerator.num_processes, "policy": str(stage_dir(recipe, "search") / "policy.json"),
        "wall_s": time.perf_counter() - t0,
    }


def _write_outputs(out: Path, policy: Policy, alphas: dict[str, Any], space: SearchSpace, metrics: dict[str, Any],
                   accelerator: Accelerator) -> None:
    """policy.json, alphas.json and (last, as the stage's completion mark) metrics.json — main process only."""
    if accelerator.is_main_process:
        policy.save(out / "policy.json")
        atomic_write_text(out / "alphas.json", json.dumps({"bits": list(space.bits), "layers": alphas}, indent=1))
    write_metrics_json(out, metrics, accelerator)
    accelerator.wait_for_everyone()

