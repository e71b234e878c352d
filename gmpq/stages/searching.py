"""``search(recipe)``: the mixed-precision search stage — what ``gmpq search RECIPE`` runs.

Steps (single process, or every process under ``torchrun`` / ``accelerate launch``):

1. Float weights: the student starts from ``model.checkpoint`` (else ``search.teacher``, else this run's float
   model, else timm's weights with ``model.pretrained``); the frozen float teacher (eval mode, no gradients) comes
   from ``search.teacher`` (else the same float weights). An attribution teacher straight from timm's pretrained
   weights is refused unless ``search.pretrained_teacher=true``: its classifier was never trained on the proxy (a
   fresh one where the class count differs), so the class it explains and its Grad-CAM maps mean nothing there.
2. The search space: searched layers (all but stem and classifier) and their MACs on ``model.deploy_arch`` at
   ``model.deploy_input_size``, the budget counted as ``search.bops_preset`` says. The budget is checked *before any
   training* (:func:`~gmpq.search.budget.check_budget`). Score + decode strategies (``hawq``, ``ompq``, ``uniform``,
   ``random``) stop after :func:`_search_scored`: their score of the float model on ``search.score_batches``
   labelled proxy batches of ``search.score_batch_size`` images, decoded under the budget; they write
   ``scores.json`` (the cost table and what it was computed from) instead of ``alphas.json`` and the search log, and
   time the scoring (``score_s``).
3. The supernet (:func:`~gmpq.search.supernet.build_supernet`), calibrated on real batches (per-candidate clips and
   steps), wrapped in :class:`~gmpq.search.attribution.AttributionModel` (closed-form Grad-CAM for GAP + linear
   heads, no extra backward pass). The autograd fallback differentiates only the head twice (``autograd.grad`` of
   the logits w.r.t. the last feature map, inside the wrapped forward); under DDP the head's parameters then get
   their gradient from both paths summed before DDP's reduction hook fires once (measured: 2 gloo processes give the
   1-process gradients of the same global batch to 2e-5 relative; tests/test_search_stage.py runs a search with it
   under torchrun).
4. Training on the proxy data by the one training loop, :func:`gmpq.train.fit`, with :class:`SupernetStep`: every
   batch, ``L = CE + lambda_attr * L_attr + L_complexity`` (:class:`~gmpq.search.losses.SearchObjective`), one
   backward pass, then both optimizers step — SGD on the network weights (``search.lr_w``, momentum, weight decay on
   conv/linear weights only) and SGD on the architecture logits (``search.lr_alpha``, momentum,
   ``search.alpha_weight_decay``); both learning rates decay by ``gamma`` every ``step_size`` epochs. The budget
   multiplier is updated after each optimizer step. ``search.grad_accum``, ``search.max_grad_norm`` (over weights and
   logits together) and ``search.mixed_precision`` work as in the other stages (bf16 on a GPU: the supernet's forward
   under the accelerator's autocast, the frozen teacher in bf16 under inference mode, the loss terms in float32);
   the supernet is not evaluated per epoch.
5. After each epoch: a record in ``search_log.jsonl`` (and its scalar columns in ``search_log.csv``) and an atomic
   checkpoint (``checkpoints/epoch_NNNN``: weights, alphas, both optimizers and schedules, RNG states, the budget
   multiplier, the log) — ``resume=true`` continues from it and reaches the same result as an uninterrupted run.
6. The policy: exact decoding under the budget (searched BOPs in [97%, 100%] of it), then the decoded fixed-bit
   network is evaluated once — its top-1 before fine-tuning, with BN statistics re-estimated on the calibration
   batches (``torch.optim.swa_utils.update_bn``: the supernet's statistics were gathered under the bit mixture).

Output in ``<output_dir>/search``: ``policy.json`` (with provenance), ``alphas.json`` (final logits and
probabilities of every searched layer), ``search_log.jsonl`` (one JSON object per epoch: ``epoch, loss, loss_ce,
loss_attr, loss_complexity, train_top1, lr_w, lr_alpha, steps, expected_bops_g, budget_g, decoded_bops_g,
alpha_entropy, p, mu, policy {layer: [w_bits, a_bits]}, probs {layer: {"w": [...], "a": [...]}}, w_bits, a_bits,
epoch_s``: ``probs`` over the candidate weight bits ``w_bits`` and activation bits ``a_bits``), ``metrics.json``,
``recipe.yaml`` and ``env.json``. A score + decode strategy writes ``scores.json`` (``strategy, w_bits, a_bits, facts``
and per layer ``costs`` — ``[i][j]`` for ``w_bits[i]`` weight and ``a_bits[j]`` activation bits, ``null`` where
forbidden — with what they were computed from) in place of ``alphas.json`` and the log. The candidates are
``search.w_bits`` and ``search.a_bits``, each ``search.bits`` where unset; a run resumed with other candidates than
its checkpoint's is refused (:class:`~gmpq.errors.CheckpointError`).
"""

from __future__ import annotations

import copy
import json
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import update_bn

from gmpq.errors import CheckpointError, RecipeError
from gmpq.models import base_arch, create_model
from gmpq.policy import Policy, describe_candidates
from gmpq.quant import calibrate
from gmpq.rundir import RunDir, StageDir
from gmpq.search import (
    AttributionModel,
    BudgetPenalty,
    Decoded,
    ScoreSettings,
    ScoreStrategy,
    SearchObjective,
    SearchSpace,
    Strategy,
    alpha_entropy,
    alpha_parameters,
    alpha_table,
    build_supernet,
    capacity_p,
    check_budget,
    deployment_macs,
    expected_bops_g,
    fix_supernet,
    get_strategy,
    layer_probabilities,
    search_space,
    weight_param_groups,
)
from gmpq.search.attribution import Method
from gmpq.stages.common import read_metrics, require_float_weights, run_float_model
from gmpq.train import (
    Progress,
    ScheduledOptimizer,
    StepOutput,
    TrainingStep,
    build_dataloaders,
    calibration_batches,
    fit,
    init_from_checkpoint,
    labelled_batches,
    lr_factor,
    make_accelerator,
    prepare_output_dir,
    write_metrics_json,
    write_run_info,
)
from gmpq.train import evaluate as evaluate_loader
from gmpq.utils import atomic_write_text
from gmpq.version import __version__

if TYPE_CHECKING:
    from pathlib import Path

    from accelerate import Accelerator

    from gmpq.recipes import Recipe, SearchConfig

#: Training batches used to calibrate the supernet's clips, steps and sign modes before the search.
CALIBRATION_BATCHES = 4


class SearchResult(dict):
    """The search stage's metrics (the content of ``metrics.json``, as every stage returns) with the decoded
    :class:`~gmpq.policy.Policy` attached as ``.policy``."""

    policy: Policy

    def __init__(self, metrics: dict[str, Any], policy: Policy) -> None:
        super().__init__(metrics)
        self.policy = policy


class SupernetStep(TrainingStep):
    """One single-level search step (module docstring, step 4) for :func:`gmpq.train.fit`.

    ``supernet`` is the model whose weights and architecture logits are trained (the student wraps it),
    ``teacher`` the frozen float :class:`AttributionModel` (None for strategies without attribution). The weight and
    logit optimizers and their schedules are built here over the loop's step counts; the budget multiplier moves
    after each optimizer step (:meth:`on_step_end`), and each epoch logs the decoded policy and the bit
    probabilities (:meth:`epoch_summary`).
    """

    remedy = "lower search.lr_w or search.lr_alpha, or set search.max_grad_norm"

    def __init__(self, supernet: nn.Module, space: SearchSpace, objective: SearchObjective, strategy: Strategy,
                 budget: float, teacher: AttributionModel | None, cfg: SearchConfig) -> None:
        self.supernet = supernet
        self.space = space
        self.objective = objective
        self.strategy = strategy
        self.budget = budget
        self.teacher = teacher
        self.cfg = cfg

    def configure_optimizers(self, model: nn.Module, steps_per_epoch: int,
                             total_steps: int) -> list[ScheduledOptimizer]:
        cfg = self.cfg
        weights = torch.optim.SGD(weight_param_groups(self.supernet, cfg.weight_decay), lr=cfg.lr_w,
                                  momentum=cfg.momentum)
        alphas = torch.optim.SGD(alpha_parameters(self.supernet), lr=cfg.lr_alpha, momentum=cfg.momentum,
                                 weight_decay=cfg.alpha_weight_decay)
        decay = lr_factor("step", steps_per_epoch, total_steps, step_size=cfg.step_size, gamma=cfg.gamma)
        return [ScheduledOptimizer("w", weights, LambdaLR(weights, decay)),
                ScheduledOptimizer("alpha", alphas, LambdaLR(alphas, decay))]

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> StepOutput:
        logits, cam_q = model(images)
        cam_fp = None
        if self.teacher is not None:
            with torch.no_grad():
                _, cam_fp = self.teacher(images)
        terms = self.objective(self.supernet, logits, labels, cam_q, cam_fp)
        return StepOutput(terms.total, logits, {"loss": terms.total, "loss_ce": terms.ce, "loss_attr": terms.attr,
                                                "loss_complexity": terms.complexity}, aux=terms)

    def on_step_end(self, out: StepOutput, progress: Progress) -> None:
        self.objective.penalty.update(out.aux.expected_bops_g.item())

    def epoch_summary(self) -> dict[str, Any]:
        decoded = self.strategy.decode(self.space, self.budget, self.supernet)
        with torch.no_grad():
            w_probs, a_probs = layer_probabilities(self.supernet, self.space)
            bops = expected_bops_g(self.supernet, self.space).item()
        objective = self.objective
        return {
            "expected_bops_g": bops, "budget_g": self.budget, "decoded_bops_g": decoded.bops_g,
            "alpha_entropy": alpha_entropy(w_probs, a_probs),
            "p": capacity_p(self.supernet, self.space, objective.kappa) if objective.p == "auto" else float(objective.p),
            "mu": objective.penalty.mu,
            "policy": {n: list(decoded.choices[n]) for n in self.space.layers},
            "probs": {n: {"w": w_probs[i].tolist(), "a": a_probs[i].tolist()} for i, n in enumerate(self.space.layers)},
            "w_bits": list(self.space.w_bits), "a_bits": list(self.space.a_bits),
        }

    def describe(self, stage: str, epochs: int, row: dict[str, Any]) -> str:
        return (f"{stage} epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f} (ce {row['loss_ce']:.4f} attr "
                f"{row['loss_attr']:.5f} cplx {row['loss_complexity']:+.4f}) | E[BOPs] {row['expected_bops_g']:.3f} G, "
                f"decoded {row['decoded_bops_g']:.3f} G of {row['budget_g']:g} G | entropy {row['alpha_entropy']:.3f} "
                f"| train top1 {row['train_top1']:.2f} ({row['epoch_s']:.1f}s)")

    def state_dict(self) -> dict[str, Any]:
        return {"penalty": self.objective.penalty.state_dict(), "w_bits": list(self.space.w_bits),
                "a_bits": list(self.space.a_bits)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the budget multiplier; a checkpoint of other candidate bits (recorded since separate weight and
        activation candidates exist) is refused."""
        held = (state.get("w_bits", list(self.space.w_bits)), state.get("a_bits", list(self.space.a_bits)))
        if held != (list(self.space.w_bits), list(self.space.a_bits)):
            raise CheckpointError(
                f"cannot resume this search: its checkpoint searched {describe_candidates(*held)}, the recipe asks "
                f"for {describe_candidates(self.space.w_bits, self.space.a_bits)}; resume with the same search.bits, "
                f"search.w_bits and search.a_bits, or pass force=true to start over")
        self.objective.penalty.load_state_dict(state["penalty"])


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
    run = RunDir.of(recipe)
    stage = run.search
    with run.claim():
        accelerator = make_accelerator(run_recipe, cfg)
        if prepare_output_dir(stage, recipe.resume, recipe.force, accelerator):
            return SearchResult(read_metrics(stage), Policy.load(stage.policy))
        t0 = time.perf_counter()
        _check_teacher(recipe, strategy)
        num_classes = _num_classes(run_recipe, accelerator)
        deploy_arch = recipe.model.deploy_arch or base_arch(recipe.model.arch)
        model = create_model(recipe.model.arch, num_classes=num_classes,
                             pretrained=recipe.model.pretrained and strategy.needs_float_model)
        space = search_space(model, *cfg.candidates(), recipe.model.kept_bits,
                             deployment_macs(deploy_arch, recipe.model.deploy_input_size, num_classes), deploy_arch,
                             recipe.model.deploy_input_size, bops_preset=cfg.bops_preset)
        check_budget(space, budget)
        write_run_info(stage, recipe, accelerator)
        if isinstance(strategy, ScoreStrategy):
            return _search_scored(recipe, run_recipe, strategy, model, space, budget, stage, accelerator, t0)
        return _search_supernet(recipe, run_recipe, strategy, model, space, budget, stage, accelerator, attribution,
                                t0)


def _check_teacher(recipe: Recipe, strategy: Strategy) -> None:
    """Refuse an attribution teacher straight from timm's pretrained weights (see the module docstring, step 1)."""
    cfg = recipe.search
    if not (strategy.trains_supernet and strategy.uses_attribution and recipe.model.pretrained):
        return
    if cfg.teacher or recipe.model.checkpoint or run_float_model(recipe) or cfg.pretrained_teacher:
        return
    raise RecipeError(
        f"the {strategy.name} search needs a float teacher trained on the proxy: timm's pretrained weights "
        f"(model.pretrained=true) have a classifier that never saw {recipe.data.dataset!r}, so its attribution maps "
        f"are meaningless; run `gmpq pretrain` first (it writes {RunDir.of(recipe).float_model}), set "
        "model.checkpoint or search.teacher to a proxy-trained float model, or set search.pretrained_teacher=true to "
        "use the pretrained weights anyway")


def _search_scored(recipe: Recipe, run_recipe: Recipe, strategy: ScoreStrategy, model: nn.Module, space: SearchSpace,
                   budget: float, stage: StageDir, accelerator: Accelerator, t0: float) -> SearchResult:
    """A score + decode strategy: ``strategy.score`` of the float model (when it needs one) on labelled proxy
    batches (when it reads them), ``strategy.decode`` under the budget; no training."""
    cfg = recipe.search
    source = None
    if strategy.needs_float_model:
        source = recipe.model.checkpoint or cfg.teacher or run_float_model(recipe)
        require_float_weights(recipe, source, f"the {strategy.name} search")
        if source is not None:
            init_from_checkpoint(model, source)
        model.to(accelerator.device)
    batches = []
    if strategy.reads_batches:
        score_recipe = run_recipe.override([f"data.batch_size={cfg.score_batch_size}"] if cfg.score_batch_size else [])
        batches = [(x.to(accelerator.device), y.to(accelerator.device))
                   for x, y in labelled_batches(score_recipe, cfg.score_batches, accelerator)]
    settings = ScoreSettings(seed=recipe.seed, hutchinson_samples=cfg.hutchinson_samples, ompq_beta=cfg.ompq_beta,
                             uniform_side=cfg.uniform_side)
    t_score = time.perf_counter()
    scores = strategy.score(model if strategy.needs_float_model else None, batches, space, settings)
    t_decode = time.perf_counter()
    decoded = strategy.decode(space, scores, budget, settings)
    score_s, decode_s = t_decode - t_score, time.perf_counter() - t_decode
    accelerator.print(f"search {strategy.name}: scored {len(space.layers)} layers in {score_s:.1f} s, decoded in "
                      f"{decode_s:.2f} s")
    policy = space.policy(decoded.choices, {**_provenance(recipe, strategy, space, budget, decoded, p=None),
                                            **scores.facts})
    metrics = _metrics(recipe, strategy, space, budget, decoded, accelerator, t0, epochs=0, resumed_from=None)
    metrics.update({"score_s": score_s, "decode_s": decode_s, "float_checkpoint": source, **scores.facts})
    _write_outputs(stage, policy, {stage.scores: scores.to_json(strategy.name, space)}, metrics, accelerator)
    return SearchResult(metrics, policy)


def _search_supernet(recipe: Recipe, run_recipe: Recipe, strategy: Strategy, model: nn.Module, space: SearchSpace,
                     budget: float, stage: StageDir, accelerator: Accelerator, attribution: Method,
                     t0: float) -> SearchResult:
    cfg = recipe.search
    own = run_float_model(recipe)
    student_source = recipe.model.checkpoint or cfg.teacher or own
    teacher_source = cfg.teacher or recipe.model.checkpoint or own
    require_float_weights(recipe, student_source, f"the {strategy.name} search")
    if student_source is not None:
        init_from_checkpoint(model, student_source)
    teacher = None
    if strategy.uses_attribution:
        teacher_model = copy.deepcopy(model)
        if teacher_source != student_source:
            init_from_checkpoint(teacher_model, teacher_source)
        # under bf16 the frozen teacher runs in bf16 too (inference mode); the student through the accelerator
        teacher = AttributionModel(teacher_model, attribution).freeze(
            torch.bfloat16 if accelerator.mixed_precision == "bf16" else None)
    loaders = build_dataloaders(run_recipe, accelerator)
    build_supernet(model, space)
    batches = calibration_batches(run_recipe, CALIBRATION_BATCHES, accelerator)
    calibrate(model, batches)
    student = AttributionModel(model, attribution)
    penalty = BudgetPenalty(budget, scale=len(space.layers))
    objective = SearchObjective(space, penalty, strategy.lambda_attr(cfg.lambda_attr), cfg.p, cfg.kappa)
    step = SupernetStep(model, space, objective, strategy, budget, teacher, cfg)
    result = fit(student, loaders.train, None, cfg, accelerator, stage, resume=recipe.resume, step=step,
                 stage="search", extra_modules=[teacher] if teacher is not None else [])
    decoded = strategy.decode(space, budget, model)
    fixed = fix_supernet(copy.deepcopy(model), decoded.choices)
    update_bn(batches, fixed, device=next(fixed.parameters()).device)
    decoded_eval = evaluate_loader(fixed, accelerator.prepare(loaders.eval), accelerator,
                                   desc="search: decoded policy eval")
    p_final = objective.exponent(model) if strategy.uses_attribution else None
    policy = space.policy(decoded.choices, _provenance(recipe, strategy, space, budget, decoded, p=p_final))
    metrics = _metrics(recipe, strategy, space, budget, decoded, accelerator, t0, epochs=cfg.epochs,
                       resumed_from=result.resumed_from)
    metrics.update({
        "expected_bops_g": expected_bops_g(model, space).item(), "mu": penalty.mu,
        "train_top1": result.history[-1]["train_top1"] if result.history else None,
        "alpha_entropy": result.history[-1]["alpha_entropy"] if result.history else None,
        "decoded_top1": decoded_eval["top1"], "decoded_top5": decoded_eval["top5"],
        "num_train_samples": len(loaders.train.dataset), "num_eval_samples": decoded_eval["num_samples"],
        "attribution": student.method if strategy.uses_attribution else None,
        "float_checkpoint": student_source, "teacher": teacher_source if strategy.uses_attribution else None,
    })
    alphas = {"w_bits": list(space.w_bits), "a_bits": list(space.a_bits), "layers": alpha_table(model, space)}
    _write_outputs(stage, policy, {stage.alphas: alphas}, metrics, accelerator)
    return SearchResult(metrics, policy)


def _num_classes(recipe: Recipe, accelerator: Accelerator) -> int:
    """``model.num_classes``, else ``data.classes``, else the dataset's class count (from its registry entry, else
    from the data)."""
    from gmpq.data import get_dataset_spec

    if recipe.model.num_classes or recipe.data.classes:
        return recipe.model.num_classes or recipe.data.classes
    spec = get_dataset_spec(recipe.data.dataset, recipe.data.path)
    if spec.num_classes:
        return spec.num_classes
    return build_dataloaders(recipe, accelerator, train=False).num_classes


def _provenance(recipe: Recipe, strategy: Strategy, space: SearchSpace, budget: float, decoded: Decoded,
                p: float | None) -> dict[str, Any]:
    cfg = recipe.search
    return {
        "strategy": strategy.name, "lambda_attr": strategy.lambda_attr(cfg.lambda_attr),
        "p": cfg.p if strategy.uses_attribution else None, "p_final": p,
        "kappa": cfg.kappa if strategy.uses_attribution and cfg.p == "auto" else None,
        "budget_g": budget, "budget_fraction": space.budgeted_bops_g(decoded.choices) / budget,
        "decoded_cost": decoded.cost,
        "proxy_dataset": recipe.data.dataset, "proxy_input_size": recipe.data.input_size,
        "search_arch": space.arch, "epochs": cfg.epochs if strategy.trains_supernet else 0, "seed": recipe.seed,
        "recipe": recipe.name, "gmpq_version": __version__,
        **({"uniform_side": cfg.uniform_side} if strategy.name == "uniform" else {}),
    }


def _metrics(recipe: Recipe, strategy: Strategy, space: SearchSpace, budget: float, decoded: Decoded,
             accelerator: Accelerator, t0: float, epochs: int, resumed_from: int | None) -> dict[str, Any]:
    searched = decoded.bops_g
    budgeted = space.budgeted_bops_g(decoded.choices)
    w_mean = sum(w for w, _ in decoded.choices.values()) / len(decoded.choices)
    a_mean = sum(a for _, a in decoded.choices.values()) / len(decoded.choices)
    return {
        "stage": "search", "strategy": strategy.name, "arch": recipe.model.arch, "deploy_arch": space.deploy_arch,
        "deploy_input_size": space.deploy_input_size, "budget_g": budget, "bops_searched_g": searched,
        "bops_total_g": searched + space.kept_bops_g, "bops_preset": space.bops_preset,
        "bops_budgeted_g": budgeted, "budget_fraction": budgeted / budget,
        "mean_w_bits": w_mean, "mean_a_bits": a_mean, "num_searched_layers": len(space.layers),
        "candidate_w_bits": list(space.w_bits), "candidate_a_bits": list(space.a_bits), "epochs": epochs,
        "resumed_from_epoch": resumed_from,
        "world_size": accelerator.num_processes, "policy": str(RunDir.of(recipe).policy),
        "wall_s": time.perf_counter() - t0,
    }


def _write_outputs(stage: StageDir, policy: Policy, tables: dict[Path, Any], metrics: dict[str, Any],
                   accelerator: Accelerator) -> None:
    """policy.json, the strategy's ``tables`` (``{path: JSON content}``: ``stage.alphas`` or ``stage.scores``) and
    (last, as the stage's completion mark) metrics.json — main process only."""
    if accelerator.is_main_process:
        policy.save(stage.policy)
        for path, content in tables.items():
            atomic_write_text(path, json.dumps(content, indent=1))
    write_metrics_json(stage, metrics, accelerator)
    accelerator.wait_for_everyone()
