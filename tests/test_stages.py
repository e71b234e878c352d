"""Stages end to end on the embedded CIFAR-10 subset: pretrain -> finetune (QAT + KD) -> evaluate, resume, errors.

A tiny timm test ResNet on 64 training / 40 evaluation images keeps each stage to a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gmpq
from gmpq.cli import main
from gmpq.errors import CheckpointError, PolicyError, RecipeError
from gmpq.recipes import load_recipe
from gmpq.stages import evaluate as evaluate_stage
from gmpq.stages import finetune, pretrain
from gmpq.train.checkpoint import CheckpointManager

TINY = ["model.arch=test_resnet", "data.input_size=32", "data.batch_size=16", "data.max_train_samples=64",
        "data.max_eval_samples=40", "pretrain.epochs=2", "pretrain.lr=0.05", "finetune.epochs=1",
        "finetune.calibration_batches=2", "model.deploy_input_size=64"]


def tiny(out: Path, *overrides: str):
    return load_recipe(None, [*TINY, f"output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    pretrain(tiny(out))
    return out


def test_pretrain_writes_its_directory(pretrained):
    stage = pretrained / "pretrain"
    metrics = json.loads((stage / "metrics.json").read_text())
    for key in ("top1", "top5", "loss", "wall_s", "macs_g", "model_size_mb"):
        assert isinstance(metrics[key], float)
    assert metrics["num_eval_samples"] == 40 and metrics["num_train_samples"] == 64 and metrics["epochs"] == 2
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["eval_top1"] == metrics["top1"]
    assert (stage / "metrics.csv").read_text().startswith("epoch,")
    assert load_recipe(stage / "recipe.yaml").model.arch == "test_resnet"
    assert json.loads((stage / "env.json").read_text())["world_size"] == 1
    assert [p.name for p in sorted((stage / "checkpoints").iterdir())] == ["epoch_0001", "epoch_0002"]
    config = json.loads((stage / "model" / "config.json").read_text())
    assert config["format"] == "gmpq" and list(config["files"]) == ["model.safetensors"]  # a float model


def test_finetune_with_distillation_then_evaluate_reloads_the_same_model(pretrained):
    recipe = tiny(pretrained, "finetune.policy=w4a4", "finetune.distill=0.5")
    metrics = finetune(recipe)
    stage = pretrained / "finetune"
    assert metrics["float_checkpoint"] == str(pretrained / "pretrain" / "model")
    assert metrics["mean_w_bits"] == 4.0 and metrics["mean_a_bits"] == 4.0 and metrics["distill"] == 0.5
    float_metrics = json.loads((pretrained / "pretrain" / "metrics.json").read_text())
    assert metrics["model_size_mb"] < float_metrics["model_size_mb"] / 3
    deploy = gmpq.create_model("test_resnet", num_classes=10, policy=stage / "policy.json")
    report = gmpq.count_bops(deploy, 64)
    assert metrics["bops_searched_g"] == pytest.approx(report.bops_searched_g)
    assert metrics["bops_total_g"] == pytest.approx(report.bops_total_g) and metrics["deploy_input_size"] == 64
    policy = gmpq.Policy.load(stage / "model" / "policy.json")
    assert set(b.w_bits for b in policy.kept.values()) == {8}
    weights = load_file(str(stage / "model" / "model.safetensors"))
    assert any(k.endswith("aq.clip") for k in weights) and all(bool(v) for k, v in weights.items()
                                                               if k.endswith("aq.calibrated"))
    for target in (pretrained, stage, stage / "model"):
        again = evaluate_stage(target)
        assert (again["top1"], again["top5"]) == (metrics["top1"], metrics["top5"])
        assert again["loss"] == pytest.approx(metrics["loss"], rel=1e-5)
        assert again["bops_total_g"] == pytest.approx(metrics["bops_total_g"]) and again["num_eval_samples"] == 40
    assert json.loads((pretrained / "evaluate" / "metrics.json").read_text())["precision"] == "quantized"


def test_evaluate_from_the_command_line(pretrained, capsys):
    assert main(["evaluate", str(pretrained / "pretrain"), "evaluate.split=train", "data.max_eval_samples=24",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_eval_samples"] == 24 and out["split"] == "train" and out["precision"] == "float"


def test_finished_stage_is_reused_refused_or_overwritten(pretrained):
    recipe = tiny(pretrained)
    with pytest.raises(RecipeError, match="already holds a run"):
        pretrain(recipe)
    before = json.loads((pretrained / "pretrain" / "metrics.json").read_text())
    assert pretrain(recipe.override(["resume=true"])) == before


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, pretrained, monkeypatch, stage):
    extra = ["pretrain.epochs=3"] if stage == "pretrain" else [
        f"model.checkpoint={pretrained / 'pretrain' / 'model'}", "finetune.policy=w3a3", "finetune.epochs=2"]
    run = {"pretrain": pretrain, "finetune": finetune}[stage]
    straight = run(tiny(tmp_path / "straight", *extra))

    original = CheckpointManager.save

    def save_then_die(self, epoch, state):
        path = original(self, epoch, state)
        if epoch == 1:
            raise KeyboardInterrupt("killed after epoch 1")
        return path

    monkeypatch.setattr(CheckpointManager, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(tmp_path / "resumed", *extra))
    monkeypatch.setattr(CheckpointManager, "save", original)
    assert not (tmp_path / "resumed" / stage / "metrics.json").exists()
    resumed = run(tiny(tmp_path / "resumed", *extra, "resume=true"))
    assert resumed["resumed_from_epoch"] == 1 and straight["resumed_from_epoch"] is None
    for key in ("top1", "top5", "loss"):
        assert resumed[key] == straight[key]
    a = load_file(str(tmp_path / "straight" / stage / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / stage / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = [json.loads(x) for x in (tmp_path / "straight" / stage / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "resumed" / stage / "metrics.jsonl").read_text().splitlines()]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "epoch_s"} for r in rows]  # noqa: E731
    assert drop(rows_a) == drop(rows_b)


def test_finetune_input_errors(tmp_path, pretrained):
    with pytest.raises(RecipeError, match="no policy to fine-tune: set finetune.policy"):
        finetune(tiny(pretrained / "other", f"model.checkpoint={pretrained / 'pretrain' / 'model'}"))
    with pytest.raises(RecipeError, match="needs float weights.*gmpq pretrain"):
        finetune(tiny(tmp_path / "fresh", "finetune.policy=w4a4"))
    bad = gmpq.Policy.uniform("test_resnet", 32, ["layer9.conv"], ["conv1.0", "fc"], 4, 4)
    bad.save(tmp_path / "bad.json")
    with pytest.raises(PolicyError, match="'layer9.conv' is not a quantizable layer"):
        finetune(tiny(tmp_path / "b", f"model.checkpoint={pretrained / 'pretrain' / 'model'}",
                      f"finetune.policy={tmp_path / 'bad.json'}"))
    with pytest.raises(CheckpointError, match="holds no gmpq model"):
        evaluate_stage(tmp_path)
    assert main(["finetune", str(Path(__file__).parents[1] / "recipes" / "finetune_quick.yaml"),
                 f"output_dir={tmp_path / 'q'}"]) == 2


def test_same_machine_same_seed_same_result(tmp_path, pretrained):
    """What the README promises as reproducible: one machine, one seed -> the same weights and metrics, bit for bit
    (data order, augmentation and initialisation all follow the recipe's seed); another seed -> other weights."""
    again = pretrain(tiny(tmp_path / "again"))
    first = json.loads((pretrained / "pretrain" / "metrics.json").read_text())
    for key in ("top1", "top5", "loss"):
        assert again[key] == first[key]
    a = load_file(str(pretrained / "pretrain" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "again" / "pretrain" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pretrain(tiny(tmp_path / "seed1", "seed=1"))
    c = load_file(str(tmp_path / "seed1" / "pretrain" / "model" / "model.safetensors"))
    assert not torch.equal(a["fc.weight"], c["fc.weight"])
