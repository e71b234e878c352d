"""What the stages share: where a run's float weights are, the model's size and BOPs, the end of a stage."""

from __future__ import annotations

import json
import os
import re
import time
from typing import TYPE_CHECKING, Any

from torch import nn

from gmpq.complexity import count_bops
from gmpq.errors import RecipeError
from gmpq.hub import is_model_dir
from gmpq.hub.format import read_config
from gmpq.models import base_arch, create_model, uniform_policy
from gmpq.policy import LayerBits, Policy, as_policy
from gmpq.quant import QuantMixin
from gmpq.rundir import RunDir, StageDir
from gmpq.train import write_metrics_json
from gmpq.train.checkpoint import checkpoint_license

if TYPE_CHECKING:
    from accelerate import Accelerator

    from gmpq.recipes import Recipe


def run_float_model(recipe: Recipe) -> str | None:
    """This run's float model (its pretrain stage's) when it exists and is of ``model.arch``, else None."""
    own = RunDir.of(recipe).float_model
    if is_model_dir(own) and read_config(own).get("arch") == recipe.model.arch:
        return str(own)
    return None


def require_float_weights(recipe: Recipe, source: str | None, who: str) -> None:
    """Refuse to start ``who`` from random weights: ``source`` or timm's pretrained weights must exist."""
    if source is None and not recipe.model.pretrained:
        raise RecipeError(f"{who} needs float weights: set model.checkpoint (a gmpq model dir, a .safetensors/.pth "
                          f"file or a Hub id), set model.pretrained=true, or run `gmpq pretrain` first (it writes "
                          f"{RunDir.of(recipe).float_model})")


def model_size_mb(model: nn.Module) -> float:
    """Weight storage in MB (1e6 bytes): quantized layers' weights at their bits, every other parameter at 32 bits."""
    bits = 0
    quantized_weights = set()
    for module in model.modules():
        if isinstance(module, QuantMixin):
            bits += module.weight.numel() * module.w_bits
            quantized_weights.add(id(module.weight))
    for name, p in model.named_parameters():
        if id(p) in quantized_weights or name.endswith(("wq.scale", "aq.clip")):
            continue
        bits += p.numel() * 32
    return bits / 8 / 1e6


def policy_bops(recipe: Recipe, policy: Policy, num_classes: int) -> dict[str, Any]:
    """Searched and total BOPs (G) of ``policy`` on ``model.deploy_arch`` at ``model.deploy_input_size``."""
    arch = recipe.model.deploy_arch or base_arch(recipe.model.arch)
    deploy = create_model(arch, policy=policy, num_classes=num_classes)
    report = count_bops(deploy, recipe.model.deploy_input_size)
    return {"bops_searched_g": report.bops_searched_g, "bops_total_g": report.bops_total_g,
            "macs_g": report.macs / 1e9, "deploy_arch": arch, "deploy_input_size": recipe.model.deploy_input_size}


def deploy_macs(recipe: Recipe, num_classes: int) -> dict[str, Any]:
    """MACs (G) of the float ``model.deploy_arch`` at ``model.deploy_input_size``."""
    arch = recipe.model.deploy_arch or base_arch(recipe.model.arch)
    report = count_bops(create_model(arch, num_classes=num_classes), recipe.model.deploy_input_size)
    return {"macs_g": report.macs / 1e9, "deploy_arch": arch, "deploy_input_size": recipe.model.deploy_input_size}


def accuracy(result: dict[str, float]) -> dict[str, float]:
    return {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"]}


def model_dir_extra(recipe: Recipe, weights_from: str | None) -> dict[str, Any]:
    """What a stage's model directory records beside its tensors: its training data (``gmpq evaluate`` of the
    directory reads it) and the license of the weights it was trained from (``weights_from``), which its exports'
    cards carry on."""
    d = recipe.data
    extra: dict[str, Any] = {
        "recipe_name": recipe.name,
        "data": {"dataset": d.dataset, "path": d.path, "train_split": d.train_split, "eval_split": d.eval_split,
                 "input_size": d.input_size}}
    license_ = checkpoint_license(weights_from)
    if license_ is not None:
        extra["weights_license"] = license_
    return extra


def report_init(accelerator: Accelerator, source: str, report: dict[str, list[str]]) -> None:
    """Say which tensors an initialisation from ``source`` skipped or left at their initial values."""
    skipped, missing = report["skipped_shape"], report["missing"]
    if skipped or missing:
        accelerator.print(f"initialised from {source}: {len(skipped)} tensors skipped for shape "
                          f"({', '.join(skipped[:4])}{'...' if len(skipped) > 4 else ''}), {len(missing)} left at "
                          f"their initial values")


def read_metrics(stage: StageDir) -> dict[str, Any]:
    """The final numbers of a finished stage."""
    return json.loads(stage.metrics.read_text())


def finish(stage: StageDir, metrics: dict[str, Any], t0: float, accelerator: Accelerator) -> dict[str, Any]:
    """Add the wall time, write the stage's final numbers (its completion mark), wait for every process."""
    metrics["wall_s"] = time.perf_counter() - t0
    write_metrics_json(stage, metrics, accelerator)
    accelerator.wait_for_everyone()
    return metrics


_UNIFORM = re.compile(r"^w([2-8]|32)a([2-8]|32)$")


def resolve_policy(recipe: Recipe, model: nn.Module, policy: Policy | str | os.PathLike | None = None) -> Policy:
    """The policy to fine-tune: ``policy`` > ``finetune.policy`` (file or ``wXaY``) > this run's searched policy.

    The kept layers get ``model.kept_bits``.
    """
    spec = policy if policy is not None else recipe.finetune.policy
    if spec is None:
        searched = RunDir.of(recipe).policy
        if not searched.exists():
            raise RecipeError(f"no policy to fine-tune: set finetune.policy (a policy JSON file, or wXaY such as w4a4 "
                              f"for uniform bits) or run the search first (it writes {searched})")
        spec = searched
    if isinstance(spec, str) and _UNIFORM.match(spec.lower()):
        w, a = (int(b) for b in _UNIFORM.match(spec.lower()).groups())
        pol = uniform_policy(model, w, a, kept_bits=recipe.model.kept_bits, arch=recipe.model.arch)
    else:
        pol = as_policy(spec)
    kept = recipe.model.kept_bits
    return Policy(arch=pol.arch, input_size=pol.input_size, layers=dict(pol.layers),
                  kept={n: LayerBits(kept, kept) for n in pol.kept}, candidate_w_bits=pol.candidate_w_bits,
                  candidate_a_bits=pol.candidate_a_bits,
                  bops_searched_g=pol.bops_searched_g, bops_total_g=pol.bops_total_g, provenance=dict(pol.provenance))
