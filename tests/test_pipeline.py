"""``gmpq run``: the paper's eighteen recipes (validated and smoke-run on stand-in data) and the quick-start pipeline
(outputs, reuse, resume after a kill, exported model, CLI errors)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import gmpq
from gmpq.cli import main
from gmpq.hub import load_model_dir, write_model_dir
from gmpq.pipeline import format_summary, run, target_recipe
from gmpq.recipes import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ARCHS = {"mobilenetv2_100": 7.4, "resnet18": 15.3, "resnet50": 30.7}
PROXIES = ("cifar10", "cars", "flowers", "aircraft", "pets", "food")
PAPER = [f"{arch}_{proxy}" for arch in ARCHS for proxy in PROXIES]

#: Stand-in data and the smallest work that still passes through every stage.
TINY = ["data.dataset=cifar10_embedded", "data.path=null", "data.input_size=32", "data.batch_size=4",
        "data.max_train_samples=8", "data.max_eval_samples=8", "data.num_workers=0", "model.pretrained=false",
        "search.epochs=1", "search.max_steps=1", "finetune.epochs=1", "finetune.max_steps=1",
        "finetune.mixed_precision=no", "finetune.calibration_batches=1", "finetune.distill=0",
        "evaluate.batch_size=8"]


def test_the_eighteen_paper_recipes_exist_and_validate() -> None:
    assert set(PAPER) <= {p.stem for p in RECIPES.glob("*.yaml")}
    for name in PAPER:
        recipe = load_recipe(RECIPES / f"{name}.yaml")
        arch, proxy = name.rsplit("_", 1)
        assert recipe.search.budget_g == ARCHS[arch] and recipe.search.bits == [2, 3, 4, 6]
        assert recipe.search.strategy == "gmpq" and recipe.data.dataset == proxy
        assert recipe.model.deploy_arch == arch and recipe.model.deploy_input_size == 224
        assert recipe.target.dataset == "imagenet" and target_recipe(recipe).model.arch == arch
        assert recipe.model.arch == (f"{arch}_cifar" if proxy == "cifar10" else arch)
        assert gmpq.base_arch(recipe.model.arch) == arch


@pytest.fixture(scope="module")
def float_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Stand-in float weights (10 classes) for every proxy and target arch of the paper's recipes."""
    root = tmp_path_factory.mktemp("float")
    out = {}
    for arch in [*ARCHS, *(f"{a}_cifar" for a in ARCHS)]:
        out[arch] = str(write_model_dir(gmpq.create_model(arch, num_classes=10), root / arch))
    return out


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n.startswith("resnet50_") else [])
                                  for n in PAPER])
def test_paper_recipe_smoke_runs_every_stage_on_stand_in_data(name, float_checkpoints, tmp_path) -> None:
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    target_arch = recipe.target.arch
    result = run(load_recipe(RECIPES / f"{name}.yaml", [
        *TINY, f"output_dir={tmp_path}", f"model.checkpoint={float_checkpoints[recipe.model.arch]}",
        "target.dataset=cifar10_embedded", "target.input_size=32", "target.batch_size=4",
        "target.max_train_samples=8", "target.max_eval_samples=8", "target.pretrained=false",
        f"target.checkpoint={float_checkpoints[target_arch]}", "run.compare_uniform=false",
    ]))
    m = result.metrics
    assert m["target_arch"] == target_arch and m["deploy_arch"] == target_arch
    # the decoded policy respects the paper's budget at 224x224 on the deployment arch
    assert 0.97 * recipe.search.budget_g <= m["bops_searched_g"] <= recipe.search.budget_g
    policy = gmpq.Policy.load(tmp_path / "search" / "policy.json")
    assert set(b for lb in policy.layers.values() for b in (lb.w_bits, lb.a_bits)) <= {2, 3, 4, 6}
    assert (result.export_dir / "model.safetensors").exists()


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    overrides = ["data.max_train_samples=32", "data.max_eval_samples=32", "data.batch_size=16",
                 "pretrain.epochs=1", "pretrain.max_steps=2", "search.epochs=1", "search.max_steps=2",
                 "finetune.epochs=1", "finetune.max_steps=2", "finetune.calibration_batches=1",
                 f"output_dir={out}"]
    return overrides, run(load_recipe(RECIPES / "quickstart_mobilenet.yaml", overrides))


def test_quickstart_writes_every_stage_summary_figures_and_export(quickstart_run) -> None:
    _, result = quickstart_run
    out = result.output_dir
    for stage in ("pretrain", "search", "finetune", "evaluate", "uniform/search", "uniform/finetune"):
        assert (out / stage / "metrics.json").exists(), stage
    m = json.loads((out / "metrics.json").read_text())
    assert m == result.metrics
    assert {"top1", "top5", "bops_searched_g", "bops_total_g", "size_bytes", "wall_s", "strategy", "proxy_dataset",
            "target_dataset", "uniform"} <= set(m)
    assert set(m["wall_s"]) >= {"pretrain", "search", "finetune", "evaluate", "export", "uniform", "total"}
    assert 0.97 * 0.45 <= m["bops_searched_g"] <= 0.45 and m["uniform"]["bops_searched_g"] <= 0.45
    assert m["top1"] == json.loads((out / "evaluate" / "metrics.json").read_text())["top1"]
    for figure in result.figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = format_summary(result)
    assert "top-1" in text and "uniform W" in text and str(result.export_dir) in text


def test_quickstart_export_loads_and_matches_the_fine_tuned_model(quickstart_run) -> None:
    _, result = quickstart_run
    exported = gmpq.from_pretrained(result.export_dir)
    tuned = load_model_dir(result.output_dir / "finetune" / "model")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(exported(x), tuned(x), atol=1e-5)
    card = (result.export_dir / "README.md").read_text()
    assert f"{result.metrics['top1']:.2f}" in card or f"{result.metrics['top1']:.1f}" in card
    # the card shows the run's search figure and the uniform policy it was compared with
    assert "](search.png)" in card and (result.export_dir / "search.png").is_file()
    uniform = result.metrics["uniform"]
    share = 100 * uniform["bops_searched_g"] / result.metrics["budget_g"]
    assert (f"| uniform W{uniform['w_bits']:.0f}A{uniform['a_bits']:.0f} ({uniform['bops_searched_g']:.3f} G, "
            f"{share:.0f} % of the budget) | {uniform['top1']:.2f} %") in card and "same budget" not in card
    # `gmpq evaluate` takes the export like any model directory gmpq writes: its data section names the dataset
    again = gmpq.evaluate(result.export_dir, ["data.max_eval_samples=32", f"output_dir={result.output_dir / 'ev'}"])
    assert again["dataset"] == "cifar10_embedded" and again["num_eval_samples"] == 32
    assert abs(again["top1"] - result.metrics["top1"]) <= 100 / 32 + 1e-9


def test_a_finished_run_is_reused_and_a_killed_run_resumes(quickstart_run, monkeypatch) -> None:
    import gmpq.pipeline as pipeline

    overrides, first = quickstart_run
    out = first.output_dir
    again = run(load_recipe(RECIPES / "quickstart_mobilenet.yaml", overrides))
    assert again.metrics["top1"] == first.metrics["top1"]
    assert again.metrics["wall_s"]["search"] == first.metrics["wall_s"]["search"]  # reused, not re-run

    # kill the run during fine-tuning: the stages before it are kept, the next call finishes the run
    for stage in ("finetune", "evaluate", "uniform"):
        shutil.rmtree(out / stage)
    (out / "metrics.json").unlink()
    real_finetune = pipeline.finetune

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "finetune", killed)
    with pytest.raises(KeyboardInterrupt):
        run(load_recipe(RECIPES / "quickstart_mobilenet.yaml", overrides))
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(pipeline, "finetune", real_finetune)
    resumed = run(load_recipe(RECIPES / "quickstart_mobilenet.yaml", overrides))
    assert resumed.metrics["wall_s"]["pretrain"] == first.metrics["wall_s"]["pretrain"]
    assert resumed.metrics["bops_searched_g"] == first.metrics["bops_searched_g"]
    assert resumed.metrics["top1"] == pytest.approx(first.metrics["top1"], abs=1e-6)


def test_a_score_strategy_runs_the_whole_pipeline_from_the_cli(quickstart_run, tmp_path, capsys) -> None:
    """``gmpq run RECIPE search.strategy=ompq``: the same stages, outputs and summary as a GMPQ run."""
    overrides, first = quickstart_run
    assert main(["run", str(RECIPES / "quickstart_mobilenet.yaml"), *overrides, f"output_dir={tmp_path}",
                 "search.strategy=ompq", f"model.checkpoint={first.output_dir / 'pretrain' / 'model'}",
                 "search.score_batches=1", "run.compare_uniform=false"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["strategy"] == "ompq" and m["bops_preset"] == "searched" and 0.97 <= m["budget_fraction"] <= 1.0
    assert "ompq policy searched on cifar10_embedded" in printed and f"({100 * m['budget_fraction']:.1f} %)" in printed
    policy = gmpq.Policy.load(tmp_path / "search" / "policy.json")
    assert policy.provenance["strategy"] == "ompq" and (tmp_path / "search" / "scores.json").exists()
    assert (tmp_path / "policy.png").exists() and not (tmp_path / "search.png").exists()
    assert "- strategy: ompq" in (tmp_path / "export" / "README.md").read_text()


QUICKSTART = str(RECIPES / "quickstart_mobilenet.yaml")


@pytest.mark.parametrize(
    ("argv", "message"),
    [([QUICKSTART, "search.budjet_g=1"], "did you mean 'search.budget_g'"),
     ([QUICKSTART, "search.budget_g=0.01"], "smallest feasible budget"),
     ([QUICKSTART, "data.dataset=cifar11"], "unknown dataset 'cifar11'"),
     (["no/such/recipe.yaml"], "cannot read recipe")],
)
def test_run_bad_input_exits_2(argv, message, tmp_path, capsys) -> None:
    assert main(["run", *argv, f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_every_cli_stage_is_a_public_python_call() -> None:
    import gmpq.pipeline
    import gmpq.stages

    assert gmpq.run is gmpq.pipeline.run
    assert (gmpq.pretrain, gmpq.finetune, gmpq.evaluate) == (
        gmpq.stages.pretrain, gmpq.stages.finetune, gmpq.stages.evaluate)
    assert callable(gmpq.search)
    with pytest.raises(AttributeError):
        gmpq.not_a_thing  # noqa: B018


def test_the_resnet20_quickstart_starts_from_the_shipped_float_model_with_uniform_policies_on_both_sides(tmp_path):
    overrides = ["data.max_train_samples=32", "data.max_eval_samples=32", "data.batch_size=16", "search.epochs=1",
                 "search.max_steps=2", "finetune.epochs=1", "finetune.max_steps=2", "finetune.calibration_batches=1",
                 f"output_dir={tmp_path}"]
    result = run(load_recipe("quickstart", overrides))
    m = result.metrics
    assert not (tmp_path / "pretrain").exists()  # the shipped JPEG-adapted ResNet-20 is the float model
    below, above = m["uniform"], m["uniform_above"]
    assert below["bops_searched_g"] <= 0.28 < above["bops_searched_g"]
    assert (below["w_bits"], below["a_bits"]) in ((2, 3), (3, 2)) and (above["w_bits"], above["a_bits"]) in ((2, 4), (4, 2))
    assert 0.97 * 0.28 <= m["bops_searched_g"] <= 0.28
    text = format_summary(result)
    assert text.count("uniform W") == 2
    card = (result.export_dir / "README.md").read_text()
    assert card.count("uniform W") >= 2
