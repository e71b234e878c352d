"""Recipe schema: loading, validation errors naming the dotted key, overrides, round trips, shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import gmpq
from gmpq.cli import main
from gmpq.errors import RecipeError
from gmpq.recipes import PACKAGED_RECIPES_DIR, Recipe, apply_overrides, describe, load_recipe, packaged_recipes

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_name_from_file(tmp_path):
    r = load_recipe(write(tmp_path, {"model": {"arch": "resnet18_cifar"}}, "my_run.yaml"))
    assert r.name == "my_run"
    assert r.output_dir == str(Path("runs") / "my_run")
    assert r.seed == 0 and r.resume is False and r.force is False
    assert r.model.kept_bits == 8 and r.model.deploy_input_size == 224 and r.model.num_classes is None
    assert r.data.dataset == "cifar10_embedded" and r.data.num_workers == 0
    assert r.search.bits == [2, 3, 4, 6] and r.search.p == 3.0 and r.search.budget_g is None
    assert r.search.w_bits is None and r.search.a_bits is None
    assert r.search.candidates() == ([2, 3, 4, 6], [2, 3, 4, 6])
    assert r.finetune.calibration_batches == 8 and r.finetune.distill == 0.0 and r.finetune.policy is None
    assert r.export.format == "packed"


def test_values_are_read_and_typed(tmp_path):
    r = load_recipe(write(tmp_path, {
        "name": "x", "seed": 3, "output_dir": "out/x",
        "model": {"arch": "resnet18", "num_classes": 100},
        "pretrain": {"lr": "1e-3", "epochs": 2},          # PyYAML reads 1e-3 as a string
        "finetune": {"lr": 1, "optimizer": "adamw", "policy": "w4a4"},
        "search": {"p": "auto", "bits": [2, 4]},
    }))
    assert r.pretrain.lr == pytest.approx(1e-3) and isinstance(r.pretrain.lr, float)
    assert r.finetune.lr == 1.0 and isinstance(r.finetune.lr, float)
    assert r.finetune.optimizer == "adamw" and r.search.p == "auto" and r.search.bits == [2, 4]
    assert r.output_dir == "out/x" and r.model.num_classes == 100
    assert r.search.candidates() == ([2, 4], [2, 4])


def test_weight_and_activation_candidates_default_to_search_bits(tmp_path):
    r = load_recipe(write(tmp_path, {"model": {"arch": "a"}, "search": {"bits": [2, 4], "a_bits": [3, 4, 8]}}))
    assert r.search.candidates() == ([2, 4], [3, 4, 8])
    r = r.override(["search.w_bits=[2,3,4,6]"])
    assert r.search.candidates() == ([2, 3, 4, 6], [3, 4, 8])
    assert Recipe.from_dict(r.to_dict()).search.candidates() == ([2, 3, 4, 6], [3, 4, 8])


@pytest.mark.parametrize("data, key, hint", [
    ({"modle": {"arch": "a"}}, "'modle'", "did you mean 'model'"),
    ({"model": {"arch": "a", "kept_bit": 8}}, "'model.kept_bit'", "did you mean 'model.kept_bits'"),
    ({"model": {"arch": "a"}, "finetune": {"lrr": 0.1}}, "'finetune.lrr'", "did you mean 'finetune.lr'"),
])
def test_unknown_keys_name_the_dotted_key_with_a_hint(tmp_path, data, key, hint):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, data))
    assert key in str(e.value) and hint in str(e.value)


@pytest.mark.parametrize("data, key", [
    ({"model": {"arch": "a"}, "seed": "zero"}, "'seed'"),
    ({"model": {"arch": "a", "pretrained": "yes"}}, "'model.pretrained'"),
    ({"model": {"arch": "a"}, "data": {"batch_size": 12.5}}, "'data.batch_size'"),
    ({"model": {"arch": "a"}, "data": {"batch_size": True}}, "'data.batch_size'"),
    ({"model": {"arch": "a"}, "search": {"bits": [2, "four"]}}, "'search.bits[1]'"),
    ({"model": {"arch": "a"}, "search": {"bits": 4}}, "'search.bits'"),
    ({"model": {"arch": "a"}, "search": {"w_bits": [2, "four"]}}, "'search.w_bits'"),
    ({"model": {"arch": "a"}, "search": {"a_bits": 4}}, "'search.a_bits'"),
    ({"model": {"arch": "a"}, "pretrain": {"lr": "fast"}}, "'pretrain.lr'"),
    ({"model": {"arch": "a"}, "data": "cifar10"}, "'data'"),
])
def test_wrong_types_name_the_key(tmp_path, data, key):
    with pytest.raises(RecipeError, match="must be") as e:
        load_recipe(write(tmp_path, data))
    assert key in str(e.value)


@pytest.mark.parametrize("data, key", [
    ({"model": {"arch": "a"}, "pretrain": {"lr": 0}}, "'pretrain.lr' must be > 0"),
    ({"model": {"arch": "a"}, "finetune": {"distill": 1.5}}, "'finetune.distill' must be <= 1"),
    ({"model": {"arch": "a", "kept_bits": 9}}, "'model.kept_bits'"),
    ({"model": {"arch": "a"}, "search": {"bits": [1, 4]}}, "'search.bits[0]'"),
    ({"model": {"arch": "a"}, "search": {"w_bits": [2, 9]}}, "'search.w_bits[1]' must be in 2..8, got 9"),
    ({"model": {"arch": "a"}, "search": {"a_bits": [32]}}, "'search.a_bits[0]' must be in 2..8, got 32"),
    ({"model": {"arch": "a"}, "search": {"a_bits": []}}, "'search.a_bits' must list at least one bit width"),
    ({"model": {"arch": "a"}, "search": {"p": "max"}}, "'search.p'"),
])
def test_out_of_range_values(tmp_path, data, key):
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, data))
    assert key in str(e.value)


def test_literal_choices_suggest_the_closest(tmp_path):
    with pytest.raises(RecipeError, match=r"'finetune.optimizer' must be one of 'sgd', 'adamw'.*did you mean 'adamw'"):
        load_recipe(write(tmp_path, {"model": {"arch": "a"}, "finetune": {"optimizer": "adam"}}))


def test_missing_required_arch(tmp_path):
    with pytest.raises(RecipeError, match="'model.arch' is required.*model.arch=VALUE"):
        load_recipe(write(tmp_path, {"data": {"batch_size": 8}}))


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping at the top level"):
        load_recipe(bad)


def test_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path, {"model": {"arch": "a"}, "finetune": {"epochs": 5}})
    r = load_recipe(path, ["finetune.epochs=1", "output_dir=runs/try1", "search.bits=[2, 4]",
                           "model.checkpoint=null", "finetune.lr=1e-3", "resume=true", "model.arch=resnet18"])
    assert r.finetune.epochs == 1 and r.output_dir == "runs/try1" and r.search.bits == [2, 4]
    assert r.model.checkpoint is None and r.finetune.lr == pytest.approx(1e-3) and r.resume is True
    assert r.model.arch == "resnet18"
    assert r.override(["seed=7"]).seed == 7 and r.seed == 0


@pytest.mark.parametrize("override, match", [
    ("finetune.epoch=1", "'finetune.epoch'; did you mean 'finetune.epochs'"),
    ("finetune", "must have the form dotted.key=value"),
    ("model.arch.x=1", "'model.arch' is a value, not a section"),
    ("finetune.epochs=one", "'finetune.epochs' must be int"),
])
def test_bad_overrides(tmp_path, override, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write(tmp_path, {"model": {"arch": "a"}}), [override])


def test_round_trip_through_dict_and_yaml(tmp_path):
    r = load_recipe(write(tmp_path, {"model": {"arch": "a"}, "search": {"budget_g": 1.5}}))
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r
    data = r.to_dict()
    apply_overrides(data, ["data.path=/x"])
    assert data["data"]["path"] == "/x"


def test_require_names_the_key(tmp_path):
    r = load_recipe(write(tmp_path, {"model": {"arch": "a"}}))
    with pytest.raises(RecipeError, match="'search.budget_g' must be set to search"):
        r.require("search.budget_g", "to search")
    assert r.require("model.arch", "x") == "a"


def test_describe_lists_every_leaf_key():
    keys = {row[0] for row in describe()}
    for key in ("model.arch", "data.batch_size", "pretrain.lr", "finetune.distill", "search.lambda_attr",
                "evaluate.split", "export.format", "seed", "output_dir"):
        assert key in keys


def test_every_shipped_recipe_loads():
    paths = sorted((REPO / "recipes").glob("*.yaml"))
    assert any(p.name == "pretrain_quick.yaml" for p in paths) and any(p.name == "finetune_quick.yaml" for p in paths)
    for path in paths:
        load_recipe(path)


def test_recipes_ship_inside_the_package_and_load_by_name(tmp_path, monkeypatch, capsys):
    packaged = packaged_recipes()
    assert PACKAGED_RECIPES_DIR.parent == Path(gmpq.__file__).parent  # package data, in the wheel
    assert (REPO / "recipes").resolve() == PACKAGED_RECIPES_DIR  # the checkout's recipes/ is the same folder
    assert {"quickstart", "pretrain_quick", "finetune_quick", "resnet18_cifar10", "resnet50_food"} <= set(packaged)
    monkeypatch.chdir(tmp_path)  # no recipes/ here: names resolve inside the package
    for name in ("quickstart", "quickstart.yaml"):
        assert load_recipe(name).to_dict() == load_recipe(REPO / "recipes" / "quickstart.yaml").to_dict()
    assert load_recipe("resnet18_cifar10", ["target.path=/data/imagenet"]).target.path == "/data/imagenet"
    write(tmp_path, {"model": {"arch": "resnet18"}, "search": {"epochs": 1}}, "quickstart.yaml")
    assert load_recipe("quickstart.yaml").search.epochs == 1  # an existing file wins over a packaged name
    with pytest.raises(RecipeError, match="no packaged recipe of that name.*did you mean quickstart.*gmpq recipes"):
        load_recipe("quickstrt")
    with pytest.raises(RecipeError, match="cannot read recipe 'sub/quickstart.yaml'"):
        load_recipe("sub/quickstart.yaml")  # a path is a path
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    studies = packaged_recipes("study")
    n = len(packaged)
    assert [line.split()[0] for line in out[:n]] == list(packaged) and "gmpq run" in out[n]
    assert "gmpq study NAME" in out[n + 2] and [line.split()[0] for line in out[n + 3:]] == list(studies)
    assert any(line.startswith("quickstart ") and "quick-start" in line for line in out)
    assert main(["recipes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed if r["kind"] == "recipe"] == list(packaged)
    assert [r["name"] for r in listed if r["kind"] == "study"] == list(studies) and "resnet20_cifar10_jpeg" in studies
    assert main(["run", "quickstrt"]) == 2 and "did you mean quickstart" in capsys.readouterr().err


def test_cli_reports_recipe_errors_in_one_line(tmp_path, capsys):
    path = write(tmp_path, {"model": {"arch": "a"}, "pretrain": {"epoch": 1}})
    assert main(["pretrain", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'pretrain.epoch'" in err[0] and "did you mean 'pretrain.epochs'" in err[0]
    assert main(["finetune", str(path), "finetune.epochs"]) == 2


def test_yaml_booleans_and_numbers_in_text_fields(tmp_path):
    path = write(tmp_path, {"model": {"arch": "a"}})
    path.write_text(path.read_text() + "finetune:\n  mixed_precision: no\n")
    assert load_recipe(path).finetune.mixed_precision == "no"
    r = load_recipe(path, ["pretrain.mixed_precision=no", "name=2024", "data.path=123", "finetune.policy=null",
                           "data.dataset=on"])
    assert r.pretrain.mixed_precision == "no" and r.name == "2024" and r.data.path == "123"
    assert r.finetune.policy is None and r.data.dataset == "on"
    with pytest.raises(RecipeError, match="'pretrain.mixed_precision' must be one of"):
        load_recipe(path, ["pretrain.mixed_precision=yes"])
