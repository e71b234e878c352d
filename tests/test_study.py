"""``gmpq study``: the grid, the protocol checks, the statistics, a smoke study with resume, slices and archives."""

from __future__ import annotations

import json
import math
import shutil
import tarfile
from pathlib import Path

import pytest
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
        products = sorted({w * a for w in space.bits for a in space.bits})
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
    for name in ("embedded_to_tinyimagenet_cpu", "embedded_to_tinyimagenet"):
        study = load_study(name)
        assert study.name == name and len(study.seeds) >= 3 and len(study.budgets) >= 2
        assert {"gmpq", "edmips", "random", "uniform"} <= set(study.strategies)
        expand_grid(study)  # every budget feasible


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
