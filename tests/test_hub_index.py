"""The local hub and the command line: `gmpq export` of a fine-tune run, the hub index, `gmpq hub list`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gmpq
from gmpq.cli import main
from gmpq.hub import format as F
from gmpq.hub import write_model_dir
from gmpq.hub.index import INDEX_FILE, list_hub, update_index
from gmpq.pipeline import export_run
from gmpq.policy import LayerBits


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A run directory laid out like `gmpq finetune`'s: finetune/{model/, metrics.json}."""
    torch.manual_seed(0)
    model = gmpq.create_model("mobilenetv2_050_cifar", num_classes=10)
    policy = gmpq.uniform_policy(model, 4, 4)
    policy.layers = {n: LayerBits((2, 3, 4, 6)[i % 4], (3, 4)[i % 2]) for i, n in enumerate(policy.layers)}
    gmpq.quantize(model, policy)
    gmpq.calibrate(model, [torch.randn(2, 3, 32, 32)])
    run = tmp_path_factory.mktemp("run")
    write_model_dir(model, run / "finetune" / "model",
                    extra={"recipe_name": "unit", "data": {"dataset": "cifar10_embedded", "eval_split": None}})
    (run / "finetune" / "metrics.json").write_text(json.dumps(
        {"top1": 33.4, "num_eval_samples": 500, "epochs": 2, "num_train_samples": 1500, "distill": 0.0}))
    return run, model.eval()


def test_cli_export_of_a_finetune_run_prints_size_and_ratio(finetune_run, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    run, model = finetune_run
    assert main(["export", str(run), "--out", str(tmp_path / "hub" / "m1"), "--name", "unit-m1"]) == 0
    out = capsys.readouterr().out
    config = json.loads((tmp_path / "hub" / "m1" / F.CONFIG_FILE).read_text())
    m = config["metrics"]
    assert f"{m['file_bytes']:,} bytes" in out and f"FP32 safetensors {m['fp32_bytes']:,} bytes" in out
    assert f"ratio {m['ratio_fp32']:.4f}" in out
    assert m["top1"] == 33.4 and m["dataset"] == "cifar10_embedded" and m["eval_split"] == "test"
    assert config["name"] == "unit-m1"
    card = (tmp_path / "hub" / "m1" / F.CARD_FILE).read_text()
    assert "| top-1 accuracy (cifar10_embedded, test, 500 images) | 33.40 % |" in card
    assert "recipe `unit`, 2 epochs, 1,500 training images of cifar10_embedded" in card
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(gmpq.from_pretrained(tmp_path / "hub" / "m1")(x), model(x), rtol=0, atol=1e-5)


def test_held_out_evaluation_of_the_same_model_is_preferred(finetune_run, tmp_path: Path) -> None:
    run, _ = finetune_run
    (run / "evaluate").mkdir(exist_ok=True)
    (run / "evaluate" / "metrics.json").write_text(json.dumps(
        {"top1": 35.0, "dataset": "cifar10_embedded", "split": "test", "num_eval_samples": 500,
         "model_dir": str(run / "finetune" / "model")}))
    try:
        report = export_run(run / "finetune", tmp_path / "m", format="float")
    finally:
        (run / "evaluate" / "metrics.json").unlink()
    assert report.layout == "float"
    assert json.loads((tmp_path / "m" / F.CONFIG_FILE).read_text())["metrics"]["top1"] == 35.0


def test_a_stage_model_directory_loads_like_an_export(finetune_run) -> None:
    """One model-directory format: the fine-tune stage's model loads with from_pretrained, as its export does."""
    run, model = finetune_run
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gmpq.from_pretrained(run / "finetune" / "model")(x), model(x))


def test_cli_export_of_something_else_fails_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gmpq: error: no quantized model found at") and "\n" not in err


def test_hub_index_and_list(finetune_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, model = finetune_run
    hub = tmp_path / "hub"
    hub.mkdir()
    assert main(["hub", "list", "--hub", str(hub)]) == 2
    assert "gmpq hub index" in capsys.readouterr().err
    gmpq.save_pretrained(model, hub / "b-model", card=False, dataset="cifar10_embedded", top1=12.0)
    update_index(hub)
    export_run(run, hub / "a-model", name="a-model")   # the index exists: refreshed on export
    entries = list_hub(hub)
    assert [e.name for e in entries] == ["a-model", "b-model"]
    a = entries[0]
    config = json.loads((hub / "a-model" / F.CONFIG_FILE).read_text())
    assert (a.arch, a.dataset, a.top1, a.path) == ("mobilenetv2_050_cifar", "cifar10_embedded", 33.4, "a-model")
    assert a.file_bytes == config["metrics"]["file_bytes"] == (hub / "a-model" / F.WEIGHTS_FILE).stat().st_size
    assert a.bops_searched_g == pytest.approx(gmpq.count_bops(model, 32).bops_searched_g)
    assert main(["hub", "list", "--hub", str(hub)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["name", "arch", "dataset", "top-1"]
    assert lines[1].split()[:4] == ["a-model", "mobilenetv2_050_cifar", "cifar10_embedded", "33.40"]
    assert f"{a.bops_searched_g:.3f}/{a.bops_total_g:.3f}" in lines[1]
    assert main(["hub", "list", "--hub", str(hub), "--json"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)] == ["a-model", "b-model"]
    (hub / INDEX_FILE).write_text("{}")
    assert main(["hub", "list", "--hub", str(hub)]) == 2
    assert "not a gmpq hub index" in capsys.readouterr().err
