"""``gmpq run``: the whole GMPQ pipeline of one recipe, stage after stage, in one run directory.

    pretrain (float teacher on the proxy; skipped when model.checkpoint is given)
      -> search (policy under search.budget_g on the proxy)
      -> finetune (QAT of the policy on the target: ``target`` section, else the proxy itself)
      -> evaluate (held-out top-1 / top-5, BOPs, size)
      -> export (packed low-bit safetensors + policy + config + model card)
    [+ the uniform baselines: the best single (w, a) under the budget and, with run.compare_uniform_above, the nearest
       one above it, fine-tuned the same way]

All in one run directory (:class:`~gmpq.rundir.RunDir`: a directory per stage, the export, the uniform baseline
as a nested run, the figures and the run's summary), which this process holds for the duration. A finished stage
is reused unless ``force=true``; an interrupted stage resumes from its last checkpoint. Under ``torchrun`` / ``accelerate launch`` every process runs this function; stages split batches across
processes and only the main process writes the summary, figures and export.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmpq.errors import ModelError, RecipeError
from gmpq.hub import ExportReport, OnnxExport, export_onnx, from_pretrained, load_model_dir, save_pretrained
from gmpq.hub.format import read_config, read_json
from gmpq.hub.onnx_export import DEFAULT_OPSET
from gmpq.models import base_arch, create_model
from gmpq.recipes import Recipe
from gmpq.rundir import RunDir, StageDir
from gmpq.stages import evaluate, finetune, pretrain, search
from gmpq.train import checkpoint_license, find_model_dir, process_state
from gmpq.train.runlog import command_line
from gmpq.utils import atomic_write_text


@dataclass
class RunResult:
    """What ``gmpq run`` produced: the summary (``metrics.json``) and where things are."""

    output_dir: Path
    metrics: dict[str, Any]
    export_dir: Path | None = None
    figures: list[Path] = field(default_factory=list)


def target_recipe(recipe: Recipe, require_weights: bool = True) -> Recipe:
    """The recipe of the target stages (finetune, evaluate, export): ``recipe`` with its ``target`` section applied.

    Without ``target.dataset`` the target is the proxy itself and the recipe is returned unchanged. With
    ``require_weights`` (the default) a target model without float weights (no ``target.checkpoint``, not
    ``target.pretrained``) is refused; a study turns it off to train the target's float model.
    """
    t = recipe.target
    if t.dataset is None:
        return recipe
    data = recipe.to_dict()
    data["model"].update(arch=t.arch or recipe.model.deploy_arch or base_arch(recipe.model.arch),
                         checkpoint=t.checkpoint, pretrained=t.pretrained, num_classes=None)
    data["data"].update(dataset=t.dataset, path=t.path, input_size=t.input_size, train_split=t.train_split,
                        eval_split=t.eval_split, batch_size=t.batch_size or recipe.data.batch_size,
                        max_train_samples=t.max_train_samples, max_eval_samples=t.max_eval_samples, subset_seed=None,
                        holdout=t.holdout, classes=t.classes)
    if require_weights and t.checkpoint is None and not t.pretrained:
        raise RecipeError("target.dataset is set but the target model has no float weights: set target.pretrained=true "
                          "or target.checkpoint")
    return Recipe.from_dict(data)


def uniform_recipe(recipe: Recipe, side: str = "below") -> Recipe:
    """A uniform baseline's recipe: same budget and training, strategy ``uniform`` on ``side`` of the budget, under
    ``<output_dir>/uniform`` (below) or ``<output_dir>/uniform_above``.

    It reuses this run's float model, so the baseline differs from the main run in its policy only.
    """
    data = recipe.to_dict()
    run = RunDir.of(recipe)
    data["search"].update(strategy="uniform", uniform_side=side)
    data["output_dir"] = str((run.uniform if side == "below" else run.uniform_above).root)
    data["run"].update(compare_uniform=False, compare_uniform_above=False)
    if data["model"]["checkpoint"] is None:
        data["model"]["checkpoint"] = str(run.float_model)
    return Recipe.from_dict(data)


def run(recipe: Recipe) -> RunResult:
    """Run the whole pipeline of ``recipe`` (see the module docstring); return the summary."""
    state = process_state(recipe.dist_timeout_s)
    check_recipe_budget(recipe)
    staged = _staged(recipe)
    out = RunDir.of(recipe)
    with out.claim():
        t0 = time.perf_counter()
        stage_metrics: dict[str, dict[str, Any]] = {}
        if recipe.model.checkpoint is None:
            stage_metrics["pretrain"] = pretrain(staged)
        stage_metrics["search"] = search(staged)
        target = target_recipe(staged)
        stage_metrics["finetune"] = finetune(target, policy=out.policy)
        stage_metrics["evaluate"] = evaluate(target)
        uniform = _uniform_baseline(staged, "below") if recipe.run.compare_uniform else None
        above = _uniform_baseline(staged, "above") if recipe.run.compare_uniform_above else None

        result = RunResult(out.root, {})
        if state.is_main_process:
            baselines = {side: b for side, b in (("uniform", uniform), ("uniform_above", above)) if b is not None}
            result.figures = _figures(out, list(baselines.values()))
            search_figure = next((f for f in result.figures if f.name == out.search_figure.name), None)
            t_export = time.perf_counter()
            result.export_dir, export_metrics = _export(target, list(baselines.values()), search_figure)
            stage_metrics["export"] = {**export_metrics, "wall_s": time.perf_counter() - t_export}
            result.metrics = _summary(recipe, target, stage_metrics, baselines, time.perf_counter() - t0)
            atomic_write_text(out.summary, json.dumps(result.metrics, indent=2, sort_keys=True) + "\n")
        state.wait_for_everyone()
        if not state.is_main_process:
            result.metrics = json.loads(out.summary.read_text())
        return result


def check_recipe_budget(recipe: Recipe) -> None:
    """Fail before any training when ``search.budget_g`` is missing or no policy over the candidate bits
    (``search.w_bits`` / ``search.a_bits``, else ``search.bits``) can meet it.

    The check needs only the layers' MACs on ``model.deploy_arch`` at ``model.deploy_input_size``; the classifier's
    size does not matter (it is a kept layer), so a 10-class model stands in for the dataset's.
    """
    from gmpq.search.budget import check_budget
    from gmpq.search.supernet import deployment_macs, search_space

    budget = float(recipe.require("search.budget_g", "for gmpq run (the searched-layer BOPs budget in G)"))
    deploy_arch = recipe.model.deploy_arch or base_arch(recipe.model.arch)
    macs = deployment_macs(deploy_arch, recipe.model.deploy_input_size, num_classes=10)
    space = search_space(create_model(recipe.model.arch, num_classes=10), *recipe.search.candidates(),
                         recipe.model.kept_bits, macs, deploy_arch, recipe.model.deploy_input_size,
                         bops_preset=recipe.search.bops_preset)
    check_budget(space, budget)


def _staged(recipe: Recipe) -> Recipe:
    """Each stage resumes (or reuses) what exists unless ``force``; with ``force`` each is redone once."""
    return recipe.override(["resume=false", "force=true"] if recipe.force else ["resume=true", "force=false"])


def _uniform_baseline(recipe: Recipe, side: str) -> dict[str, Any]:
    base = uniform_recipe(recipe, side)
    policy = RunDir.of(base).policy
    searched = search(base)
    target = target_recipe(base)
    tuned = finetune(target, policy=policy)
    evaluated = evaluate(target)
    return {"search": searched, "finetune": tuned, "evaluate": evaluated, "policy": str(policy)}


def _export(target: Recipe, baselines: list[dict[str, Any]],
            search_figure: Path | None) -> tuple[Path, dict[str, Any]]:
    """Export the fine-tuned model; its card shows the search's trajectory and the uniform policies beside it."""
    export_dir = Path(target.export.dir) if target.export.dir else RunDir.of(target).export
    same_arch = (target.model.deploy_arch or base_arch(target.model.arch)) == target.model.arch
    figures = {} if search_figure is None else {
        "the search: expected BOPs against the budget, loss terms, per-layer expected bits over epochs": search_figure}
    comparison = []
    for baseline in baselines:
        u = _uniform_metrics(baseline)
        comparison.append({"model": _uniform_name(u, target.search.budget_g), "top1": u["top1"],
                           "bops_searched_g": u["bops_searched_g"], "mean_w_bits": u["w_bits"],
                           "mean_a_bits": u["a_bits"]})
    report = export_run(target.output_dir, export_dir, format=target.export.format,
                            name=target.export.name or target.name,
                            bops_input_size=target.model.deploy_input_size if same_arch else None,
                            figures=figures, comparison=comparison, command=command_line())
    return export_dir, {"size_bytes": report.file_bytes, "fp32_bytes": report.fp32_bytes,
                        "ratio_fp32": report.ratio_fp32, "export_dir": str(export_dir)}


def export_run(
    source: str | os.PathLike, save_dir: str | os.PathLike, *, format: str = "packed", name: str | None = None,
    bops_input_size: int | None = None, repo_id: str | None = None,
    figures: Mapping[str, str | os.PathLike] | None = None, comparison: Sequence[Mapping[str, Any]] = (),
    command: str | None = None,
) -> ExportReport:
    """Export the quantized model of a run (run dir, ``finetune`` stage dir or its ``model`` dir) — ``gmpq export``.

    The card's top-1, dataset, split and image count are those the run measured (:func:`_measured_accuracy`); its
    description states how the model was trained, its license is that of the float weights the run started from,
    and its "Reproduce" section shows ``command`` (default: the command the run recorded). ``figures`` and
    ``comparison`` go to the card as in :func:`gmpq.save_pretrained`.
    """
    model_dir = _quantized_model_dir(source)
    model = load_model_dir(model_dir)
    cfg = read_config(model_dir)
    stage = StageDir.holding(model_dir)
    metrics = read_json(stage.metrics) if stage is not None and stage.metrics.is_file() else None
    metrics = metrics if isinstance(metrics, dict) else {}
    env = read_json(stage.env) if stage is not None and stage.env.is_file() else None
    return save_pretrained(model, save_dir, format=format, name=name, bops_input_size=bops_input_size,
                           description=_training_description(stage, cfg), repo_id=repo_id, figures=figures,
                           comparison=comparison, data=cfg.get("data"),
                           weights_license=cfg.get("weights_license") or checkpoint_license(
                               metrics.get("float_checkpoint")),
                           command=command or (env.get("command") if isinstance(env, dict) else None),
                           **_measured_accuracy(model_dir, stage, cfg))


def export_run_onnx(
    source: str | os.PathLike, save_dir: str | os.PathLike, *, input_size: int | None = None,
    opset: int = DEFAULT_OPSET, low_bit_storage: str = "int4", name: str | None = None,
) -> OnnxExport:
    """The ONNX QDQ graph and card (:func:`gmpq.export_onnx`) of the quantized model of a run (run dir, ``finetune``
    stage dir or its ``model`` dir), of any quantized gmpq model directory (e.g. an export), or of a published model
    (``hub/<name>`` of the checkout or a Hugging Face repo id) — ``gmpq export --format onnx``."""
    if find_model_dir(source, quantized=True) is None and not Path(source).expanduser().exists():
        model = from_pretrained(source)
    else:
        model = load_model_dir(_quantized_model_dir(source))
    return export_onnx(model, save_dir, input_size=input_size, opset=opset, low_bit_storage=low_bit_storage,
                       name=name)


def _quantized_model_dir(source: str | os.PathLike) -> Path:
    """The quantized model directory ``source`` means (itself, or the model of a stage or run holding one)."""
    model_dir = find_model_dir(source, quantized=True)
    if model_dir is None:
        raise ModelError(f"no quantized model found at {str(source)!r} (neither a quantized model directory nor a run "
                         "or stage holding one); export the result of `gmpq finetune`")
    return model_dir


def _measured_accuracy(model_dir: Path, stage: StageDir | None, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Top-1 of the model in ``model_dir`` as its run measured it, with dataset, split and image count.

    A held-out evaluation of this very model (the run's evaluate stage naming ``model_dir``) is preferred; else the
    fine-tune stage's final evaluation. Empty when neither exists.
    """
    data = cfg.get("data") or {}
    if stage is None:
        return {}
    evaluation = stage.run.evaluate.metrics
    if evaluation.is_file():
        ev = read_json(evaluation)
        if isinstance(ev, dict) and ev.get("top1") is not None and ev.get("model_dir") and \
                Path(ev["model_dir"]).resolve() == model_dir.resolve():
            dataset = ev.get("dataset") or data.get("dataset")
            return {"top1": ev["top1"], "dataset": dataset, "eval_split": _split_name(dataset, ev.get("split")),
                    "eval_samples": ev.get("num_eval_samples")}
    if not stage.finished:
        return {}
    metrics = read_json(stage.metrics)
    if not isinstance(metrics, dict) or metrics.get("top1") is None:
        return {}
    return {"top1": metrics["top1"], "dataset": data.get("dataset"),
            "eval_split": _split_name(data.get("dataset"), data.get("eval_split")),
            "eval_samples": metrics.get("num_eval_samples")}


def _split_name(dataset: str | None, split: str | None) -> str | None:
    """``split``, or the dataset's default evaluation split when the run recorded none (or "default")."""
    if split not in (None, "default") or not dataset:
        return split
    from gmpq.data import get_dataset_spec

    return get_dataset_spec(dataset).eval_split


def _training_description(stage: StageDir | None, cfg: Mapping[str, Any]) -> str | None:
    metrics = read_json(stage.metrics) if stage is not None and stage.finished else None
    if not isinstance(metrics, dict):
        return None
    ptq = metrics.get("mode") == "ptq"
    facts = ["Post-training quantization by `gmpq ptq` (no fine-tuning)" if ptq else
             "Quantization-aware fine-tuning by `gmpq finetune`"]
    if cfg.get("recipe_name"):
        facts.append(f"recipe `{cfg['recipe_name']}`")
    if ptq:
        dataset = (cfg.get("data") or {}).get("dataset") or "its dataset"
        how = ("learned rounding fitted block by block (AdaRound + BRECQ"
               + (f", QDrop p={metrics['ptq_qdrop']}" if metrics.get("ptq_qdrop") else "") + ")"
               if metrics.get("ptq_rounding") == "learned" else "round-to-nearest")
        facts.append(f"{metrics['ptq_images']:,} calibration images of {dataset}'s training split, {how}")
    elif metrics.get("epochs") is not None:
        facts.append(f"{metrics['epochs']} epochs")
    if metrics.get("num_train_samples") is not None:
        dataset = (cfg.get("data") or {}).get("dataset") or "its dataset"
        facts.append(f"{metrics['num_train_samples']:,} training images of {dataset}")
    if metrics.get("distill"):
        facts.append(f"distillation weight {metrics['distill']}")
    if metrics.get("float_checkpoint"):
        facts.append(f"from the float model `{metrics['float_checkpoint']}`")
    return ", ".join(facts) + "."


def _figures(run: RunDir, baselines: list[dict[str, Any]]) -> list[Path]:
    from gmpq.policy import Policy
    from gmpq.viz import plot_policies, plot_search

    policies = [Policy.load(run.policy)] + [Policy.load(b["policy"]) for b in baselines]
    figures = [plot_policies(policies, run.policy_figure)]
    if run.search.epoch_log.exists():
        figures.append(plot_search(run.search.path, run.search_figure))
    return [Path(f) for f in figures]


def _summary(recipe: Recipe, target: Recipe, stages: dict[str, dict[str, Any]],
             baselines: dict[str, dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """``metrics.json`` of a run; ``baselines`` maps ``uniform`` / ``uniform_above`` to their stages' metrics."""
    evaluated, tuned = stages["evaluate"], stages["finetune"]
    summary: dict[str, Any] = {
        "recipe": recipe.name, "strategy": recipe.search.strategy, "arch": recipe.model.arch,
        "target_arch": target.model.arch, "proxy_dataset": recipe.data.dataset, "target_dataset": target.data.dataset,
        "budget_g": recipe.search.budget_g, "bops_preset": stages["search"].get("bops_preset", "searched"),
        "bops_budgeted_g": stages["search"].get("bops_budgeted_g", stages["search"]["bops_searched_g"]),
        "budget_fraction": stages["search"]["budget_fraction"], "top1": evaluated["top1"], "top5": evaluated["top5"],
        "eval_split": _split_name(target.data.dataset, evaluated.get("split")),
        "eval_samples": evaluated.get("num_eval_samples"),
        "bops_searched_g": tuned["bops_searched_g"], "bops_total_g": tuned["bops_total_g"],
        "deploy_arch": tuned.get("deploy_arch"), "deploy_input_size": tuned.get("deploy_input_size"),
        "size_bytes": stages["export"]["size_bytes"], "fp32_bytes": stages["export"]["fp32_bytes"],
        "mean_w_bits": tuned.get("mean_w_bits"), "mean_a_bits": tuned.get("mean_a_bits"),
        "export_dir": stages["export"]["export_dir"],
        "wall_s": {name: m.get("wall_s") for name, m in stages.items()},
    }
    if "pretrain" in stages:
        summary["float_top1"] = stages["pretrain"]["top1"]
    for key, baseline in baselines.items():
        summary[key] = _uniform_metrics(baseline)
        summary["wall_s"][key] = sum(baseline[k].get("wall_s") or 0.0 for k in ("search", "finetune", "evaluate"))
    summary["wall_s"]["total"] = wall_s
    return summary


def _uniform_metrics(uniform: dict[str, Any]) -> dict[str, Any]:
    """What a run records of its uniform baseline (``metrics.json``'s ``uniform``), from the baseline's stages."""
    tuned, evaluated = uniform["finetune"], uniform["evaluate"]
    return {"top1": evaluated["top1"], "top5": evaluated["top5"], "bops_searched_g": tuned["bops_searched_g"],
            "bops_total_g": tuned["bops_total_g"], "w_bits": tuned.get("mean_w_bits"),
            "a_bits": tuned.get("mean_a_bits")}


def _uniform_name(u: dict[str, Any], budget_g: float) -> str:
    """``uniform WbAb (B G, P % of the budget)`` of a baseline's :func:`_uniform_metrics`: uniform policies are
    coarse, so the nearest one may use much less (or more) of the budget and is never called "the same budget"."""
    return (f"uniform W{u['w_bits']:.0f}A{u['a_bits']:.0f} ({u['bops_searched_g']:.3f} G, "
            f"{100 * u['bops_searched_g'] / budget_g:.0f} % of the budget)")


def _evaluated_on(m: Mapping[str, Any]) -> str:
    """``test split, 10,000 images`` of a run's metrics (runs made before gmpq recorded the split: unnamed)."""
    if not m.get("eval_split"):
        return "evaluation split"
    return f"{m['eval_split']} split" + (f", {m['eval_samples']:,} images" if m.get("eval_samples") else "")


def format_summary(result: RunResult) -> str:
    """The lines ``gmpq run`` prints at the end."""
    m = result.metrics
    lines = [
        f"gmpq run {m['recipe']}: {m['strategy']} policy searched on {m['proxy_dataset']}, fine-tuned on "
        f"{m['target_dataset']} ({m['target_arch']})",
        f"  top-1 {m['top1']:.2f} %  top-5 {m['top5']:.2f} %  ({_evaluated_on(m)})",
        f"  BOPs searched {m['bops_searched_g']:.3f} G"
        + ("" if m["bops_preset"] == "searched" else f", {m['bops_preset']} {m['bops_budgeted_g']:.3f} G")
        + f" of budget {m['budget_g']:.3f} G ({100 * m['budget_fraction']:.1f} %), total {m['bops_total_g']:.3f} G at "
        f"{m['deploy_input_size']}x{m['deploy_input_size']} ({m['deploy_arch']})",
    ]
    for u in (m[key] for key in ("uniform", "uniform_above") if key in m):
        lines.append(f"  {_uniform_name(u, m['budget_g'])}: top-1 {u['top1']:.2f} %  ->  {m['strategy']} "
                     f"{m['top1'] - u['top1']:+.2f} points")
    if "float_top1" in m:
        lines.append(f"  float teacher top-1 {m['float_top1']:.2f} %")
    lines.append(f"  exported model: {m['export_dir']} (model card README.md, {m['size_bytes'] / 1e6:.2f} MB, "
                 f"{m['fp32_bytes'] / max(m['size_bytes'], 1):.1f}x smaller than FP32)")
    lines.append(f"  run directory: {result.output_dir} ({RunDir(result.output_dir).summary.name}, "
                 + ", ".join(p.name for p in result.figures) + f"); wall time {m['wall_s']['total']:.0f} s")
    return "\n".join(lines)
