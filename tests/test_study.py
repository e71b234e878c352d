"""``gmpq study``: the grid, the protocol checks, the statistics, a smoke study with resume, slices and archives."""

from __future__ import annotations

import json
import math
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from gmpq.cli import main
from gmpq.errors import BudgetError, RecipeError, RunError
from gmpq.rundir import RunDir
from gmpq.search.budget import decode_uniform
from gmpq.study import load_study, paired_difference, run_study, spread, study_from_dict
from gmpq.study.grid import expand_grid, proxy_space

#: A study small enough for the suite: every stage runs on one or two batches of the embedded subset.
SMOKE = {
    "name": "smoke",
    "strategies": ["gmpq", "uniform"],
    "budgets": [0.21],
    "seeds": [0],
    "recipe": {
        "model": {"arch": "mobilenetv2_050_cifar", "deploy_arch": "mobilenetv2_050_cifar", "deploy_input_size": 32},
        "data": {"dataset": "cifar10_embedded", "batch_size": 4, "max_train_samples": 8, "holdout": 8,
                 "eval_split": "holdout", "eval_batch_size": 8},
        "pretrain": {"epochs": 1, "max_steps": 1},
        "search": {"epochs": 1, "max_steps": 1, "lr_alpha": 3.0},
        "finetune": {"epochs": 1, "max_steps": 1, "calibration_batches": 1},
        "evaluate": {"split": "test"},
        "target": {"dataset": "cifar10_embedded", "holdout": 8, "max_train_samples": 8, "max_eval_samples": 8},
    },
    "target_pretrain": {"epochs": 1, "max_steps": 1},
}


def _write(tmp_path: Path, data: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _study(tmp_path: Path, **changes) -> dict:
    data = json.loads(json.dumps(SMOKE))
    data["output_dir"] = str(tmp_path / "out")
    data.update(changes)
    return data


# ------------------------------------------------------------------------------------------------ grid and config
def test_grid_expands_strategies_budgets_seeds_with_uniform_on_both_sides(tmp_path) -> None:
    study = study_from_dict(_study(tmp_path, strategies=["gmpq", "edmips", "uniform"], budgets=[0.21, 0.25],
                                   seeds=[0, 1, 2]))
    grid = expand_grid(study)
    assert len(grid) == 4 * 2 * 3
    assert [c.seed for c in grid[:8]] == [0] * 8  # seed-major: a slice covers every strategy of one seed first
    by_key = {c.key: c for c in grid}
    below, above = by_key["uniform_below_b0.21_s0"], by_key["uniform_above_b0.21_s0"]
    space = proxy_space(study)
    assert below.run_id == "uniform_w2a3_s0" and above.run_id == "uniform_w2a4_s0"
    assert space.searched_bops_g(decode_uniform(space, 0.21, "below").choices) <= 0.21
    assert space.searched_bops_g(decode_uniform(space, 0.21, "above").choices) > 0.21
    # W3A3 (0.2476 G) is the policy below 0.25: a uniform run serves every budget whose neighbour it is
    assert by_key["uniform_below_b0.25_s1"].run_id == "uniform_w3a3_s1"
    assert by_key["gmpq_b0.25_s2"].overrides == ("search.strategy=gmpq",)


def test_decode_uniform_sides_are_the_nearest_pairs(tmp_path) -> None:
    space = proxy_space(study_from_dict(_study(tmp_path)))
    total = sum(space.macs) / 1e9
    for budget in (0.15, 0.25, 0.45, 0.9):
        lo = decode_uniform(space, budget, "below")
        hi = decode_uniform(space, budget, "above")
        products = sorted({w * a for w, a in space.pairs})
        assert lo.bops_g == pytest.approx(total * max(p for p in products if total * p <= budget))
        assert hi.bops_g == pytest.approx(total * min(p for p in products if total * p > budget))
    with pytest.raises(BudgetError, match="uniform_side=below"):
        decode_uniform(space, total * 36, "above")


def test_budget_is_checked_before_anything_runs(tmp_path) -> None:
    with pytest.raises(BudgetError, match="smallest feasible budget"):
        expand_grid(study_from_dict(_study(tmp_path, budgets=[0.01])))


@pytest.mark.parametrize(("change", "message"), [
    ({"strategies": ["gmpq", "magic"]}, "unknown study strategy 'magic'"),
    ({"seeds": [0, 0]}, "lists a value twice"),
    ({"budgets": []}, "non-empty list"),
    ({"color": "red"}, "unknown study key 'color'"),
    ({"recipe": {**SMOKE["recipe"], "target": {"dataset": "cifar10_embedded"}}}, "target.holdout"),
    ({"recipe": {**SMOKE["recipe"], "evaluate": {"split": None}}}, "evaluate.split"),
    ({"recipe": {**SMOKE["recipe"], "data": {"dataset": "cifar10_embedded"}}}, "data.holdout"),
    ({"recipe": {**SMOKE["recipe"], "target": None}}, "target.dataset"),
    ({"target_pretrain": {"epochs": 1, "lr_typo": 1}}, "lr_typo"),
])
def test_bad_studies_are_one_clear_error(tmp_path, change, message) -> None:
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        study_from_dict(_study(tmp_path, **change))


def test_cli_bad_study_exits_2(tmp_path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe\x00binary")
    assert main(["study", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(["study", "embedded_to_tinyimagenet_cpx", "--report"]) == 2
    assert "did you mean embedded_to_tinyimagenet_cpu" in capsys.readouterr().err


def test_packaged_studies_load_by_name_and_pass_the_protocol() -> None:
    for name in ("embedded_to_tinyimagenet_cpu", "embedded_to_tinyimagenet", "resnet20_cifar10_jpeg"):
        study = load_study(name)
        assert study.name == name and len(study.seeds) >= 3 and len(study.budgets) >= 2
        assert {"gmpq", "edmips", "random", "uniform"} <= set(study.strategies)
        expand_grid(study)  # every budget feasible


def test_a_study_directory_written_before_separate_candidates_keeps_its_fingerprint(tmp_path) -> None:
    """The archived resnet20_cifar10_jpeg study (its study.yaml, with a target_float recipe, written before
    search.w_bits / search.a_bits existed) still has the fingerprint it was run under: resuming it is not refused."""
    from gmpq.study.config import load_study_directory

    archive = Path(__file__).resolve().parents[1] / "docs" / "studies" / "resnet20_cifar10_jpeg" / "cells.tar.gz"
    with tarfile.open(archive) as tar:
        tar.extract("study.yaml", tmp_path, filter="data")
    held = yaml.safe_load((tmp_path / "study.yaml").read_text())
    assert "w_bits" not in held["recipe"]["search"] and "target_float" in held
    assert load_study_directory(tmp_path).fingerprint() == held["fingerprint"]
    for section in ("recipe", "target_float"):  # set, the new keys count
        changed = {k: v for k, v in held.items() if k != "fingerprint"}
        changed[section] = {**held[section], "search": {**held[section]["search"], "a_bits": [3, 4, 6]}}
        assert study_from_dict(changed, base_dir=tmp_path).fingerprint() != held["fingerprint"], section


# ------------------------------------------------------------------------------------------------ statistics
def test_paired_difference_is_a_t_interval_over_common_seeds() -> None:
    x = {0: 30.0, 1: 32.0, 2: 31.0, 3: 99.0}
    u = {0: 29.0, 1: 30.0, 2: 31.5}
    d = paired_difference(x, u)
    diffs = [1.0, 2.0, -0.5]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in diffs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2)
    assert (d.n, d.mean, d.sd) == (3, pytest.approx(mean), pytest.approx(sd))
    assert (d.low, d.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert not d.excludes_zero
    one = paired_difference({0: 1.0}, {0: 0.5})
    assert one.n == 1 and one.low is None and paired_difference({0: 1.0}, {1: 0.5}) is None
    assert spread([2.0]).sd is None and spread([1.0, 3.0]).sd == pytest.approx(math.sqrt(2))


# ------------------------------------------------------------------------------------------------ a whole study
def test_smoke_study_runs_resumes_slices_and_travels_as_an_archive(tmp_path, capsys) -> None:
    path = _write(tmp_path, _study(tmp_path))
    first = run_study(path, cells="0:1")
    assert first.ran == ["gmpq_b0.21_s0"] and first.total_cells == 3 and len(first.rows) == 1
    out = tmp_path / "out"
    assert (out / "proxy_float" / "pretrain" / "model").is_dir()
    assert (out / "target_float" / "evaluate" / "metrics.json").exists()

    second = run_study(path)  # the rest; the finished cell is not run again
    assert second.ran == ["uniform_w2a3_s0", "uniform_w2a4_s0"] and len(second.rows) == 3
    rows = {r["strategy"]: r for r in second.rows}
    assert rows["gmpq"]["budget_fraction"] == pytest.approx(rows["gmpq"]["bops_searched_g"] / 0.21)
    assert 0.97 <= rows["gmpq"]["budget_fraction"] <= 1.0
    assert rows["uniform_below"]["budget_fraction"] <= 1.0 < rows["uniform_above"]["budget_fraction"]
    assert rows["gmpq"]["alpha_entropy"] is not None and rows["gmpq"]["proxy_holdout_top1"] is not None
    summary = (out / "summary.md").read_text()
    assert "| 0.21 | gmpq | 1 |" in summary and "uniform_above" in summary and "float target model: top-1" in summary
    assert "## The search's loss terms" in summary and "| 0.21 | gmpq | 1 | 1 |" in summary
    assert (out / "study.png").stat().st_size > 10_000
    assert len((out / "results.csv").read_text().splitlines()) == 4

    # an interrupted cell (no metrics.json) is run again, the others are not
    RunDir(out / "cells" / "uniform_w2a4_s0").summary.unlink()
    assert run_study(path).ran == ["uniform_w2a4_s0"]

    archive = run_study(path, report_only=True, pack=tmp_path / "cells.tar.gz")
    assert archive.ran == []
    with tarfile.open(tmp_path / "cells.tar.gz") as tar:
        names = tar.getnames()
    assert "study_archive.json" in names and not any("checkpoints" in n for n in names)

    # elsewhere: a fresh directory merges the archive and needs to run nothing
    moved = _write(tmp_path, _study(tmp_path, output_dir=str(tmp_path / "elsewhere")), "moved.yaml")
    merged = run_study(moved, unpack=[tmp_path / "cells.tar.gz"])
    assert merged.ran == [] and len(merged.rows) == 3

    # gmpq compare reads a study directory as its finished cells, wherever it was run from
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "elsewhere"), "--json"]) == 0
    compared = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in compared] == ["gmpq_b0.21_s0", "uniform_w2a3_s0", "uniform_w2a4_s0"]
    assert {r["strategy"] for r in compared} == {"gmpq", "uniform"}
    assert (tmp_path / "elsewhere" / "proxy_float" / "pretrain" / "model" / "model.safetensors").exists()

    # another study (other recipe) refuses the archive and the directory
    other = _write(tmp_path, _study(tmp_path, output_dir=str(tmp_path / "elsewhere"),
                                    target_pretrain={"epochs": 2, "max_steps": 1}), "other.yaml")
    with pytest.raises(RunError, match="holds another study"):
        run_study(other, report_only=True)
    with pytest.raises(RunError, match="belongs to another study"):
        from gmpq.study.archive import unpack_study

        unpack_study(load_study(other), tmp_path / "cells.tar.gz")
    shutil.rmtree(tmp_path / "elsewhere")


def test_slice_arguments_are_checked(tmp_path) -> None:
    path = _write(tmp_path, _study(tmp_path))
    for kwargs, message in (({"cells": "3"}, "A:B"), ({"shard": "2/2"}, "K/N"),
                            ({"cells": "0:1", "shard": "0/2"}, "either")):
        with pytest.raises(RecipeError, match=message):
            run_study(path, report_only=True, **kwargs)


def test_attribution_effect_counts_the_layers_gmpq_and_edmips_decode_differently(tmp_path) -> None:
    import gmpq
    from gmpq.policy import LayerBits
    from gmpq.study.report import attribution_effect

    study = study_from_dict(_study(tmp_path, strategies=["gmpq", "edmips"]))
    base = gmpq.uniform_policy(gmpq.create_model("mobilenetv2_050_cifar", num_classes=10), w_bits=3, a_bits=3)
    first, second = list(base.layers)[:2]
    for run_id, change in (("g", {}), ("e", {first: LayerBits(2, 3), second: LayerBits(6, 6)})):
        policy = gmpq.Policy(arch=base.arch, input_size=32, layers={**base.layers, **change}, kept=base.kept)
        policy.save(RunDir(study.cell_dir(run_id)).policy)
    rows = [{"strategy": s, "budget_g": 0.21, "seed": 0, "run_id": r} for s, r in (("gmpq", "g"), ("edmips", "e"))]
    (effect,) = attribution_effect(study, rows)
    n = len(base.layers)
    assert (effect["differ"], effect["layers"]) == (2, n)
    assert effect["mean_abs_dw"] == pytest.approx(4 / n) and effect["mean_abs_da"] == pytest.approx(3 / n)
    assert (tmp_path / "out" / "policies_b0.21.png").stat().st_size > 5_000


def test_a_rerun_of_some_strategies_borrows_the_other_cells_as_baselines(tmp_path) -> None:
    from gmpq.study.archive import float_weights_digest
    from gmpq.study.baselines import borrow_baselines

    base = _write(tmp_path, _study(tmp_path, strategies=["uniform"], output_dir=str(tmp_path / "base")))
    run_study(base)
    rerun = _study(tmp_path, strategies=["gmpq"], seeds=[0], output_dir=str(tmp_path / "rerun"),
                   baselines=str(tmp_path / "base"))
    rerun["recipe"]["search"]["lr_alpha"] = 0.3
    result = run_study(_write(tmp_path, rerun, "rerun.yaml"))
    assert result.ran == ["gmpq_b0.21_s0"] and [r["strategy"] for r in result.rows] == ["gmpq"]
    for name in ("proxy_float", "target_float"):  # started from the baseline study's float models, not its own
        assert float_weights_digest(tmp_path / "rerun" / name) == float_weights_digest(tmp_path / "base" / name)
    summary = (tmp_path / "rerun" / "summary.md").read_text()
    assert "cells finished: 1 of 1" in summary
    assert "2 finished cells borrowed from study `smoke`" in summary and "`search.lr_alpha` 0.3 here, 3.0 there" in summary
    gmpq_row = next(line for line in summary.splitlines() if line.startswith("| 0.21 | gmpq | 1 |"))
    assert "(n=1)" in gmpq_row.split("|")[7] and "| 0.21 | uniform_below † | 1 |" in summary
    csv_rows = (tmp_path / "rerun" / "results.csv").read_text().splitlines()
    assert csv_rows[0].endswith(",error,borrowed_from") and sum(str(tmp_path / "base") in r for r in csv_rows) == 2

    # not comparable: other fine-tuning, other float weights, its own directory
    finetune = {**rerun["recipe"]["finetune"], "max_steps": 2}
    other = study_from_dict({**rerun, "recipe": {**rerun["recipe"], "finetune": finetune}})
    with pytest.raises(RecipeError, match=r"recipe\.finetune\.max_steps is 2 here and 1 there"):
        borrow_baselines(other)
    weights = tmp_path / "base" / "target_float" / "pretrain" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(RecipeError, match="other float weights"):
        borrow_baselines(study_from_dict(rerun))
    with pytest.raises(RecipeError, match="own directory"):
        borrow_baselines(study_from_dict({**rerun, "baselines": str(tmp_path / "rerun")}))
    with pytest.raises(RecipeError, match="'baselines' must be the path"):
        study_from_dict({**rerun, "baselines": 3})


# ------------------------------------------------------------------------------------------------ proxies and PTQ
#: A study with named proxies and both deployments, small enough for the suite (the embedded subset throughout).
PROXIED = {
    **json.loads(json.dumps(SMOKE)),
    "name": "proxied",
    "strategies": ["gmpq", "edmips", "random", "uniform"],
    "deploy": ["ptq", "qat"],
    "ptq": {"method": "bn", "calibration_images": 8, "batch_size": 4},
    "proxies": {
        "small": {"float": "target", "data": {"max_train_samples": 8, "subset_seed": 0}},
        "ood": {"float": {"epochs": 1, "max_steps": 1}, "data": {"classes": 5, "holdout": 8}},
        "oracle": {"float": "target", "data": {"max_train_samples": 12}},
    },
    "references": [{"method": "PACT", "paper": "Choi et al. 2018", "bits": "2/2", "top1": "89.7"}],
}


def test_proxies_expand_per_searched_strategy_and_refuse_bad_specs(tmp_path) -> None:
    data = {**json.loads(json.dumps(PROXIED)), "output_dir": str(tmp_path / "out")}
    study = study_from_dict(data)
    grid = expand_grid(study)
    keys = [c.key for c in grid]
    assert keys == ["gmpq@small_b0.21_s0", "gmpq@ood_b0.21_s0", "gmpq@oracle_b0.21_s0", "edmips@small_b0.21_s0",
                    "edmips@ood_b0.21_s0", "edmips@oracle_b0.21_s0", "random_b0.21_s0", "uniform_below_b0.21_s0",
                    "uniform_above_b0.21_s0"]
    ood = next(c for c in grid if c.proxy == "ood")
    assert ood.run_id == "gmpq_ood_b0.21_s0" and "data.classes=5" in ood.overrides
    assert study.fingerprint() != study_from_dict({**data, "deploy": ["qat"]}).fingerprint()
    for change, message in (
            ({"proxies": {"x": {"data": {}}}}, "'float'"),
            ({"proxies": {"x": {"float": "target", "model": {}}}}, "unknown key 'model'"),
            ({"proxies": {"x": {"float": "target", "data": {"holdot": 3}}}}, "holdot"),
            ({"proxies": {"x": {"float": {"epochz": 1}}}}, "epochz"),
            ({"deploy": ["qat", "fp8"]}, "deploy"),
            ({"ptq": {"method": "magic"}}, "ptq.method"),
            ({"ptq": {"calibration_images": 10, "batch_size": 4}}, "multiple"),
            ({"references": [{"top1": 1}]}, "method and paper")):
        with pytest.raises(RecipeError, match=message):
            study_from_dict({**data, **change})


def test_target_float_recipe_must_hold_out_the_targets_slice(tmp_path) -> None:
    data = {**json.loads(json.dumps(PROXIED)), "output_dir": str(tmp_path / "out"), "target_pretrain": None}
    made = {"model": {"arch": "mobilenetv2_050_cifar"}, "data": {"dataset": "cifar10_embedded", "holdout": 8},
            "pretrain": {"epochs": 1, "max_steps": 1}}
    assert study_from_dict({**data, "target_float": made}).target_float.data.holdout == 8
    with pytest.raises(RecipeError, match="data.holdout=4"):
        study_from_dict({**data, "target_float": {**made, "data": {"dataset": "cifar10_embedded", "holdout": 4}}})
    with pytest.raises(RecipeError, match="not both"):
        study_from_dict({**data, "target_float": made, "target_pretrain": {"epochs": 1}})


def test_subset_seed_fixes_the_training_subset_across_run_seeds() -> None:
    from gmpq.recipes import Recipe
    from gmpq.train import build_dataloaders

    def labels(seed: int, subset_seed: int | None) -> list[int]:
        r = Recipe.from_dict({"seed": seed, "model": {"arch": "mobilenetv2_050_cifar"},
                              "data": {"dataset": "cifar10_embedded", "max_train_samples": 16, "batch_size": 4,
                                       "subset_seed": subset_seed}})
        return sorted(build_dataloaders(r).train.dataset.split.dataset["label"])

    assert labels(0, 0) == labels(1, 0)
    assert labels(0, None) != labels(1, None)


@pytest.mark.slow
def test_proxied_study_runs_every_deployment_and_reports_transfer(tmp_path) -> None:
    path = _write(tmp_path, {**json.loads(json.dumps(PROXIED)), "output_dir": str(tmp_path / "out")})
    result = run_study(path)
    out = tmp_path / "out"
    assert len(result.ran) == 9 and len(result.rows) == 18  # 9 runs, each deployed twice
    assert (out / "proxy_float_ood" / "pretrain" / "model").is_dir()
    assert not (out / "proxy_float").exists()  # the other proxies start from the target float model
    ood_search = json.loads(RunDir(out / "cells" / "gmpq_ood_b0.21_s0").search.metrics.read_text())
    assert ood_search["float_checkpoint"] == str(out / "proxy_float_ood" / "pretrain" / "model")
    small = json.loads(RunDir(out / "cells" / "gmpq_small_b0.21_s0").search.metrics.read_text())
    assert small["float_checkpoint"] == str(out / "target_float" / "pretrain" / "model")
    ptq = json.loads((out / "cells" / "gmpq_small_b0.21_s0" / "ptq" / "metrics.json").read_text())
    assert ptq["method"] == "bn" and ptq["calibration_images"] == 8 and ptq["split"] == "test"
    assert ptq["num_eval_samples"] == 8 and 0.97 <= ptq["bops_searched_g"] / 0.21 <= 1.0
    rows = {(r["strategy"], r["proxy"], r["deploy"]): r for r in result.rows}
    assert rows[("gmpq", "small", "ptq")]["top1"] == ptq["top1"]
    assert rows[("gmpq", "small", "qat")]["finetune_s"] > 0 and rows[("random", "", "ptq")]["search_s"] is not None
    summary = (out / "summary.md").read_text()
    for text in ("— PTQ (post-training)", "— QAT (fine-tuning", "| 0.21 | gmpq@ood | 1 |", "against the oracle's",
                 "| qat | gmpq | small |", "| ptq | ood |", "## Where the bits went", "## Search cost",
                 "| gmpq@oracle | 1 |", "| PACT | 2/2 | 89.7 |", "proxy `ood`"):
        assert text in summary, text
    assert (out / "study.png").exists() and (out / "study_ptq.png").exists()
    assert (out / "policies_b0.21_ood.png").exists()
    header = (out / "results.csv").read_text().splitlines()[0]
    assert header.startswith("strategy,proxy,deploy,budget_g")
    # an archive carries every float model, the out-of-domain proxy's included
    run_study(path, report_only=True, pack=tmp_path / "cells.tar.gz")
    with tarfile.open(tmp_path / "cells.tar.gz") as tar:
        names = tar.getnames()
    assert "proxy_float_ood/pretrain/model/model.safetensors" in names
    assert "target_float/pretrain/model/model.safetensors" in names
    # a cell whose PTQ stage is missing is not finished: only its PTQ runs again
    (out / "cells" / "random_b0.21_s0" / "ptq" / "metrics.json").unlink()
    assert run_study(path).ran == ["random_b0.21_s0"]


def test_float_dirs_name_every_shared_float_run(tmp_path) -> None:
    study = load_study(_write(tmp_path, {**json.loads(json.dumps(PROXIED)), "output_dir": str(tmp_path / "out")}))
    names = [d.name for d in study.float_dirs()]
    assert names[0] == "proxy_float" and names[-1] == "target_float"
    assert names == ["proxy_float", "proxy_float_ood", "target_float"]  # the other proxies use the target's


def test_ptq_reconstruct_needs_gmpq_ptq(tmp_path) -> None:
    import gmpq
    from gmpq.study.deploy import PTQConfig, _quantize

    model = gmpq.create_model("mobilenetv2_050_cifar", num_classes=10)
    policy = gmpq.uniform_policy(model, w_bits=4, a_bits=4)
    images = [torch.randn(2, 3, 32, 32)]
    if not hasattr(gmpq, "ptq"):
        with pytest.raises(RecipeError, match="gmpq.ptq"):
            _quantize(model, policy, images, "reconstruct")
    assert PTQConfig().method == "bn"
    bn = _quantize(gmpq.create_model("mobilenetv2_050_cifar", num_classes=10), policy, images, "bn")
    assert bn.gmpq_policy is policy and not bn.training


@pytest.mark.slow
def test_resnet20_cifar10_jpeg_study_runs_every_cell_kind_on_a_few_batches(tmp_path, shared_cifar10,
                                                                             monkeypatch) -> None:
    """The packaged study itself, end to end on one seed and one budget, every stage cut to a batch or two: the float
    reference made by its recipe, the out-of-domain proxy's float model, every strategy on every proxy, random and
    both uniform policies, each deployed post-training and by QAT."""
    from gmpq.recipes import load_recipe, packaged_recipes

    if not (shared_cifar10.parent / "tinyimagenet" / "train-00000-of-00001.parquet").exists():
        pytest.skip("the shared Tiny-ImageNet subset is not beside the checkout")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the study's data paths are relative to the checkout
    data = yaml.safe_load(packaged_recipes("study")["resnet20_cifar10_jpeg"].read_text())
    made = load_recipe("resnet20_cifar10_float", ["pretrain.epochs=1", "pretrain.max_steps=2",
                                                   "data.max_train_samples=256", "data.max_eval_samples=32"])
    few = {"max_eval_samples": 32}
    data.update(seeds=[0], budgets=[0.28], output_dir=str(tmp_path / "out"), target_float=made.to_dict(),
                ptq={"method": "bn", "calibration_images": 64, "batch_size": 32})
    for name, proxy in data["proxies"].items():
        proxy["data"].update(few, **({"max_train_samples": 256} if name == "oracle" else {}))
    data["proxies"]["ood"]["float"].update(epochs=1, max_steps=1)
    r = data["recipe"]
    r["data"].update(few)
    r["search"].update(epochs=1, max_steps=1, score_batch_size=8)
    r["finetune"].update(max_steps=1, calibration_batches=1)
    r["target"].update(max_train_samples=256, max_eval_samples=32)
    result = run_study(_write(tmp_path, data))
    kinds = {(row["strategy"], row["proxy"], row["deploy"]) for row in result.rows}
    searched = {(s, p, d) for s in ("gmpq", "edmips", "hawq", "ompq") for p in ("indomain", "ood", "oracle")
                for d in ("ptq", "qat")}
    baselines = {(s, "", d) for s in ("random", "uniform_below", "uniform_above") for d in ("ptq", "qat")}
    assert kinds == searched | baselines and len(result.rows) == 30 and result.total_cells == 15
    assert result.float_top1 is not None
    out = tmp_path / "out"
    assert (out / "target_float" / "pretrain" / "model").is_dir() and (out / "proxy_float_ood").is_dir()
    ptq = json.loads((out / "cells" / "hawq_ood_b0.28_s0" / "ptq" / "metrics.json").read_text())
    assert ptq["calibration_images"] == 64 and ptq["num_eval_samples"] == 32
    summary = (out / "summary.md").read_text()
    for text in ("against the oracle's", "| qat | hawq | ood |", "## Where the bits went", "| ompq@oracle | 1 |",
                 "| LQ-Nets | 2/2, 3/3 | 90.2, 91.6 |", "first 20 classes"):
        assert text in summary, text


def test_a_given_timm_target_checkpoint_is_made_a_model_directory_once(tmp_path) -> None:
    """``target.checkpoint=timm:NAME.TAG`` (or a Hub id): the study writes it once as the float reference's model
    directory, untrained, and evaluates that directory; the float weights are exactly the shipped ones."""
    from gmpq.hub.load import load_model_dir
    from gmpq.models import create_model
    from gmpq.study.runner import _float_models
    from gmpq.train.checkpoint import init_from_checkpoint

    data = _study(tmp_path, target_pretrain={"epochs": 5})
    r = data["recipe"]
    r["model"].update(arch="resnet20_cifar", deploy_arch="resnet20_cifar", checkpoint="timm:resnet20_cifar.jpeg_ft")
    r["target"]["checkpoint"] = "timm:resnet20_cifar.jpeg_ft"
    _, target = _float_models(load_study(_write(tmp_path, data)))
    assert target == str(tmp_path / "out" / "target_float" / "pretrain" / "model")
    made = json.loads((tmp_path / "out" / "target_float" / "pretrain" / "metrics.json").read_text())
    assert made["epochs"] == 0  # taken as given: target_pretrain is not used
    assert (tmp_path / "out" / "target_float" / "evaluate" / "metrics.json").exists()
    shipped = create_model("resnet20_cifar", num_classes=10)
    init_from_checkpoint(shipped, "timm:resnet20_cifar.jpeg_ft")
    written = load_model_dir(target)
    for (name, a), b in zip(shipped.state_dict().items(), written.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
