"""The search stage end to end on the embedded CIFAR-10 subset: outputs, resume, strategies, budget errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gmpq
from gmpq.cli import main
from gmpq.hub import write_model_dir
from gmpq.recipes import load_recipe
from gmpq.search import bops_range, deployment_macs, search_space
from gmpq.stages import search
from gmpq.viz import read_search_log

ARCH, DEPLOY = "mobilenetv2_050_cifar", "mobilenetv2_050"
BITS = (2, 3, 4, 6)
LOG_KEYS = {"epoch", "loss", "loss_ce", "loss_attr", "loss_complexity", "expected_bops_g", "budget_g",
            "decoded_bops_g", "alpha_entropy", "p", "lr_w", "lr_alpha", "train_top1", "policy", "probs", "w_bits",
            "a_bits", "mu", "epoch_s", "steps"}


@pytest.fixture(scope="module")
def float_model(tmp_path_factory) -> str:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("float") / "model"
    write_model_dir(gmpq.create_model(ARCH, num_classes=10), out)
    return str(out)


@pytest.fixture(scope="module")
def budget() -> float:
    """A budget between W2A2 and W6A6 of the searched layers of mobilenetv2_050 at 224 (about W3A3)."""
    model = gmpq.create_model(ARCH, num_classes=10)
    lo, hi = bops_range(search_space(model, BITS, BITS, 8, deployment_macs(DEPLOY, 224, 10), DEPLOY, 224))
    return round(lo + 0.2 * (hi - lo), 4)


def _recipe(out: Path, float_model: str, budget: float, *extra: str):
    return load_recipe(None, [
        f"output_dir={out}", f"model.arch={ARCH}", f"model.checkpoint={float_model}", f"model.deploy_arch={DEPLOY}",
        "model.deploy_input_size=224", "data.dataset=cifar10_embedded", "data.batch_size=8",
        "data.max_train_samples=48", "data.max_eval_samples=16", f"search.budget_g={budget}", "search.epochs=1",
        "search.max_steps=3", *extra])


def test_three_step_search_writes_a_valid_policy(tmp_path, float_model, budget):
    result = search(_recipe(tmp_path, float_model, budget))
    out = tmp_path / "search"
    policy = gmpq.Policy.load(out / "policy.json")
    assert policy.to_dict() == result.policy.to_dict()
    deployed = gmpq.count_bops(gmpq.create_model(DEPLOY, policy=policy, num_classes=10), 224)  # validates layers
    assert policy.bops_searched_g == pytest.approx(deployed.bops_searched_g, rel=1e-9)
    assert policy.bops_total_g == pytest.approx(deployed.bops_total_g, rel=1e-9)
    assert 0.97 * budget <= policy.bops_searched_g <= budget
    assert result["budget_fraction"] == pytest.approx(policy.bops_searched_g / budget)
    assert policy.arch == DEPLOY and policy.input_size == 224
    prov = policy.provenance
    assert prov["strategy"] == "gmpq" and prov["lambda_attr"] == 40.0 and prov["p"] == 3.0
    assert prov["proxy_dataset"] == "cifar10_embedded" and prov["seed"] == 0 and prov["gmpq_version"]
    alphas = json.loads((out / "alphas.json").read_text())
    assert alphas["w_bits"] == alphas["a_bits"] == [2, 3, 4, 6] and list(alphas["layers"]) == list(policy.layers)
    moved = [max(abs(v) for v in row["alpha_w"] + row["alpha_a"]) for row in alphas["layers"].values()]
    assert min(moved) > 0, "every searched layer's alphas changed in 3 steps"
    records = read_search_log(out)
    assert len(records) == 1 and set(records[0]) == LOG_KEYS
    rec = records[0]
    assert rec["steps"] == 3 and rec["budget_g"] == budget and rec["w_bits"] == rec["a_bits"] == [2, 3, 4, 6]
    assert rec["loss_attr"] > 0 and rec["loss_ce"] > 0
    assert rec["loss"] == pytest.approx(rec["loss_ce"] + 40 * rec["loss_attr"] + rec["loss_complexity"], rel=1e-6)
    assert rec["policy"] == {n: [b.w_bits, b.a_bits] for n, b in policy.layers.items()}
    assert set(rec["probs"]) == set(policy.layers) and len(rec["probs"][next(iter(policy.layers))]["w"]) == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["attribution"] == "closed" and metrics["epochs"] == 1 and 0 <= metrics["decoded_top1"] <= 100
    assert {"wall_s", "bops_searched_g", "bops_total_g", "policy", "strategy"} <= set(metrics)
    assert (out / "recipe.yaml").exists() and (out / "env.json").exists()


def test_resume_continues_to_the_same_result(tmp_path, float_model, budget):
    """A run killed after its first epoch's checkpoint and resumed ends exactly where an uninterrupted run ends."""
    recipe = _recipe(tmp_path / "run", float_model, budget, "search.epochs=2", "search.max_steps=2",
                     "search.lambda_attr=10", "search.p=auto")
    search(recipe)
    out = tmp_path / "run" / "search"
    whole = {name: (out / name).read_text() for name in ("alphas.json", "policy.json", "search_log.jsonl")}
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["epoch_0001", "epoch_0002"]
    for name in ("metrics.json", "alphas.json", "policy.json"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints" / "epoch_0002")
    with pytest.raises(gmpq.RecipeError, match="resume=true"):
        search(recipe)
    resumed = search(recipe.override(["resume=true"]))
    assert resumed["resumed_from_epoch"] == 1
    assert (out / "alphas.json").read_text() == whole["alphas.json"]
    assert json.loads((out / "policy.json").read_text()) == json.loads(whole["policy.json"])

    def strip(text: str) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "epoch_s"} for line in text.splitlines()]

    assert strip((out / "search_log.jsonl").read_text()) == strip(whole["search_log.jsonl"])
    assert search(recipe.override(["resume=true"]))["resumed_from_epoch"] == 1  # a finished run is reused


def test_search_clips_the_gradient_and_accumulates_like_every_stage(tmp_path, float_model, budget):
    """search.max_grad_norm bounds the step (over weights and logits), search.grad_accum batches per step."""
    runs = {}
    for name, extra in (("free", []), ("clipped", ["search.max_grad_norm=1e-6", "search.mixed_precision=bf16"])):
        runs[name] = search(_recipe(tmp_path / name, float_model, budget, "search.max_steps=4", "search.grad_accum=2",
                                    *extra))
    moved = {}
    for name in runs:
        alphas = json.loads((tmp_path / name / "search" / "alphas.json").read_text())["layers"]
        moved[name] = max(abs(v) for row in alphas.values() for v in row["alpha_w"] + row["alpha_a"])
        record = read_search_log(tmp_path / name)[0]
        assert record["steps"] == 4 and record["lr_alpha"] == 0.01 and record["lr_w"] == 0.1
    # two optimizer steps of SGD (lr 0.01, momentum 0.9) from zero logits, each gradient of norm <= 1e-6
    assert moved["clipped"] <= 0.01 * (1 + 1.9) * 1e-6 + 1e-12 < 1e-4 < moved["free"]
    assert runs["clipped"]["world_size"] == 1 and 0.97 * budget <= runs["clipped"]["bops_searched_g"] <= budget


def test_uniform_and_edmips_strategies(tmp_path, float_model, budget):
    uniform = search(_recipe(tmp_path / "u", float_model, budget, "search.strategy=uniform"))
    assert len(set(uniform.policy.layers.values())) == 1 and uniform.policy.bops_searched_g <= budget
    assert uniform["epochs"] == 0 and not (tmp_path / "u" / "search" / "search_log.jsonl").exists()
    assert uniform.policy.provenance["strategy"] == "uniform"
    edmips = search(_recipe(tmp_path / "e", float_model, budget, "search.strategy=edmips", "search.max_steps=1"))
    assert edmips.policy.provenance["lambda_attr"] == 0.0 and edmips["teacher"] is None
    assert 0.97 * budget <= edmips["bops_searched_g"] <= budget
    assert read_search_log(tmp_path / "e")[0]["loss_attr"] == 0.0


def test_budget_and_teacher_errors_come_before_training(tmp_path, float_model, budget, capsys):
    recipe = _recipe(tmp_path, float_model, 0.001)
    with pytest.raises(gmpq.BudgetError, match="smallest feasible budget is search.budget_g="):
        search(recipe)
    assert not (tmp_path / "search" / "checkpoints").exists()
    yaml_file = tmp_path / "tiny.yaml"
    yaml_file.write_text(f"model:\n  arch: {ARCH}\n  deploy_arch: {DEPLOY}\nsearch:\n  budget_g: 0.001\n")
    code = main(["search", str(yaml_file), f"output_dir={tmp_path / 'cli'}"])
    assert code == 2 and "smallest feasible budget" in capsys.readouterr().err
    no_teacher = load_recipe(None, [f"output_dir={tmp_path / 'nt'}", f"model.arch={ARCH}", f"search.budget_g={budget}",
                                    f"model.deploy_arch={DEPLOY}"])
    with pytest.raises(gmpq.RecipeError, match="model.checkpoint"):
        search(no_teacher)
    with pytest.raises(gmpq.RecipeError, match="search.budget_g"):
        search(load_recipe(None, [f"output_dir={tmp_path / 'nb'}", f"model.arch={ARCH}"]))



def test_a_pretrained_teacher_is_refused_unless_asked(tmp_path, budget, capsys, monkeypatch):
    """model.pretrained=true and no proxy-trained float model: the attribution teacher's classifier never saw the
    proxy, so the search refuses before building anything; search.pretrained_teacher=true runs it anyway."""
    args = [f"output_dir={tmp_path}", f"model.arch={ARCH}", "model.pretrained=true", f"model.deploy_arch={DEPLOY}",
            "model.deploy_input_size=224", "data.batch_size=8", "data.max_train_samples=16", "data.max_eval_samples=8",
            f"search.budget_g={budget}", "search.epochs=1", "search.max_steps=1"]
    with pytest.raises(gmpq.RecipeError, match="never saw 'cifar10_embedded'.*search.pretrained_teacher=true"):
        search(load_recipe(None, args))
    (tmp_path / "r.yaml").write_text(f"model:\n  arch: {ARCH}\n")
    assert main(["search", str(tmp_path / "r.yaml"), *args]) == 2 and "gmpq pretrain" in capsys.readouterr().err
    assert not (tmp_path / "search" / "checkpoints").exists()
    import timm.models._builder

    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda *a, **k: None)  # no Hub on the test machine
    edmips = search(load_recipe(None, [*args, f"output_dir={tmp_path / 'e'}", "search.strategy=edmips"]))
    assert edmips["teacher"] is None  # no attribution, no teacher: nothing to refuse
    allowed = search(load_recipe(None, [*args, "search.pretrained_teacher=true"]))
    assert 0.97 * budget <= allowed["bops_searched_g"] <= budget


DDP_SCRIPT = """
import sys
from gmpq.quant import fused
from gmpq.recipes import load_recipe
from gmpq.stages import search
fused.set_backend("eager")
search(load_recipe(sys.argv[1]), attribution="autograd")
"""


def test_search_under_torchrun_with_autograd_attribution(tmp_path, float_model, budget):
    """Two gloo processes (torchrun), forcing the autograd (create_graph) Grad-CAM: DDP works with it."""
    script, recipe_file = tmp_path / "ddp_search.py", tmp_path / "recipe.yaml"
    script.write_text(DDP_SCRIPT)
    recipe_file.write_text(_recipe(tmp_path, float_model, budget, "search.max_steps=2").to_yaml())
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(recipe_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        raise
    assert proc.returncode == 0, stderr[-3000:]
    metrics = json.loads((tmp_path / "search" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["attribution"] == "autograd"
    assert 0.97 * budget <= metrics["bops_searched_g"] <= budget
    record = read_search_log(tmp_path)[0]
    assert record["steps"] == 2 and record["loss_attr"] > 0


@pytest.mark.parametrize("strategy", ["hawq", "ompq", "random"])
def test_score_strategies_write_the_same_outputs(tmp_path, float_model, budget, strategy):
    result = search(_recipe(tmp_path, float_model, budget, f"search.strategy={strategy}", "search.score_batch_size=4",
                            "search.score_batches=1", "search.hutchinson_samples=1", "data.input_size=16"))
    out = tmp_path / "search"
    policy = gmpq.Policy.load(out / "policy.json")
    assert policy.to_dict() == result.policy.to_dict() and 0.97 * budget <= policy.bops_searched_g <= budget
    gmpq.create_model(DEPLOY, policy=policy, num_classes=10)  # the policy names the deployment arch's layers
    prov = policy.provenance
    assert prov["strategy"] == strategy and prov["bops_preset"] == "searched" and prov["seed"] == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategy"] == strategy and metrics["epochs"] == 0 and metrics["score_s"] >= 0
    assert metrics["budget_fraction"] == pytest.approx(policy.bops_searched_g / budget)
    assert metrics["float_checkpoint"] == (None if strategy == "random" else float_model)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["strategy"] == strategy and list(scores["layers"]) == list(policy.layers)
    first = scores["layers"][next(iter(policy.layers))]
    assert len(first["costs"]) == 4 and len(first["costs"][0]) == 4
    if strategy == "hawq":
        assert prov["hutchinson_samples"] == 1 and metrics["score_images"] == 4
        assert {"trace_w", "trace_x", "mse_w", "mse_x"} <= set(first) and first["trace_w_stderr"] is None
    if strategy == "ompq":
        assert all(b.w_bits == b.a_bits for b in policy.layers.values()) and prov["ompq_beta"] == 1.0
        assert first["costs"][0][1] is None  # w != a is forbidden
    assert not (out / "search_log.jsonl").exists() and not (out / "alphas.json").exists()


@pytest.mark.parametrize("strategy", ["gmpq", "hawq", "ompq", "random", "uniform"])
def test_separate_weight_and_activation_candidates(tmp_path, float_model, strategy):
    """search.w_bits=[2,3,4], search.a_bits=[3,4]: every strategy decodes activations in {3, 4} and weights in
    {2, 3, 4}, inside [97 %, 100 %] of a budget 1 % above uniform W3A4 (which uniform then picks), and records both
    lists."""
    model = gmpq.create_model(ARCH, num_classes=10)
    space = search_space(model, (2, 3, 4), (3, 4), 8, deployment_macs(DEPLOY, 224, 10), DEPLOY, 224)
    budget = round(1.01 * sum(space.macs) * 3 * 4 / 1e9, 6)
    result = search(_recipe(tmp_path, float_model, budget, f"search.strategy={strategy}", "search.w_bits=[2,3,4]",
                            "search.a_bits=[3,4]", "search.max_steps=2", "search.score_batch_size=4",
                            "search.score_batches=1", "search.hutchinson_samples=1"))
    out = tmp_path / "search"
    policy = gmpq.Policy.load(out / "policy.json")
    assert json.loads((out / "policy.json").read_text())["schema_version"] == 2
    assert (policy.candidate_w_bits, policy.candidate_a_bits) == ((2, 3, 4), (3, 4))
    assert {b.a_bits for b in policy.layers.values()} <= {3, 4} and {b.w_bits for b in policy.layers.values()} <= {2, 3, 4}
    assert 0.97 * budget <= policy.bops_searched_g <= budget
    assert (result["candidate_w_bits"], result["candidate_a_bits"]) == ([2, 3, 4], [3, 4])
    if strategy == "uniform":
        assert set(policy.layers.values()) == {gmpq.LayerBits(3, 4)}
    if strategy == "gmpq":
        alphas = json.loads((out / "alphas.json").read_text())
        assert (alphas["w_bits"], alphas["a_bits"]) == ([2, 3, 4], [3, 4])
        assert all(len(row["w"]) == 3 and len(row["a"]) == 2 for row in alphas["layers"].values())
        record = read_search_log(out)[0]
        assert (record["w_bits"], record["a_bits"]) == ([2, 3, 4], [3, 4])
    else:
        scores = json.loads((out / "scores.json").read_text())
        assert (scores["w_bits"], scores["a_bits"]) == ([2, 3, 4], [3, 4])
        assert all(len(row["costs"]) == 3 and len(row["costs"][0]) == 2 for row in scores["layers"].values())


def test_resuming_with_other_candidates_is_refused(tmp_path, float_model, budget):
    """A checkpoint of one candidate set does not continue a search over another, whether the counts agree (the
    logits would load, their meaning would not) or not; a checkpoint that predates the recorded candidates is
    refused by its logits' shapes, and continues with the same candidates."""
    recipe = _recipe(tmp_path, float_model, budget, "search.epochs=2", "search.max_steps=1")
    search(recipe)
    out = tmp_path / "search"
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "checkpoints" / "epoch_0002")
    for a_bits in ("[3,4,6,8]", "[3,4]"):
        with pytest.raises(gmpq.CheckpointError, match=r"^cannot resume this search: its checkpoint searched "
                                                       r"candidate bits \[2, 3, 4, 6\], the recipe asks for candidate "
                                                       r"bits \[2, 3, 4, 6\] \(weights\) and \[3, 4"):
            search(recipe.override(["resume=true", f"search.a_bits={a_bits}"]))
    trainer_state = out / "checkpoints" / "epoch_0001" / "trainer_state.json"
    state = json.loads(trainer_state.read_text())
    assert state["step"].pop("w_bits") == state["step"].pop("a_bits") == [2, 3, 4, 6]
    trainer_state.write_text(json.dumps(state))  # as written before the candidates were recorded
    with pytest.raises(gmpq.CheckpointError, match="(?s)cannot resume from .*size mismatch for .*alpha_a"):
        search(recipe.override(["resume=true", "search.a_bits=[3,4]"]))
    assert search(recipe.override(["resume=true"]))["resumed_from_epoch"] == 1
