"""The models published in this repository's hub/: they load from a fresh clone (tracked files only), and every
figure on their cards is what the loaded model measures again here."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import gmpq
from gmpq.hub import format as F
from gmpq.hub.index import INDEX_FILE, list_hub

REPO = Path(__file__).resolve().parents[1]
HUB_LIMIT_BYTES = 10_000_000


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the files git tracks under hub/ — what a fresh clone holds."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: cannot tell which hub/ files a fresh clone holds")
    listed = subprocess.run(["git", "ls-files", "-z", "hub"], cwd=REPO, capture_output=True, check=True).stdout
    files = [f for f in listed.decode().split("\0") if f]
    root = tmp_path_factory.mktemp("clone")
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    return root


def test_hub_is_tracked_small_and_indexed(clone: Path) -> None:
    files = [p for p in (clone / "hub").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < HUB_LIMIT_BYTES
    entries = list_hub(clone / "hub")
    assert entries, "hub/ must publish at least one model"
    on_disk = sorted(p.parent.name for p in (clone / "hub").glob(f"*/{F.CONFIG_FILE}"))
    assert sorted(e.path for e in entries) == on_disk
    # the index is what the exports' config.json files say
    for e in entries:
        metrics = json.loads((clone / "hub" / e.path / F.CONFIG_FILE).read_text())["metrics"]
        assert (e.top1, e.file_bytes, e.bops_searched_g) == (metrics["top1"], metrics["file_bytes"],
                                                              metrics["bops_searched_g"])
    assert json.loads((clone / "hub" / INDEX_FILE).read_text())["index_version"] == 1


def _top1(model: torch.nn.Module, dataset: str, split: str, size: int, mean, std) -> tuple[float, int]:
    from gmpq.data import ImageDataset, build_transform, get_dataset_spec, load_split
    from gmpq.train.engine import evaluate

    spec = get_dataset_spec(dataset)
    data = ImageDataset(load_split(spec, split), build_transform(spec.family, size, mean, std, train=False))
    result = evaluate(model, DataLoader(data, batch_size=250))
    return result["top1"], result["num_samples"]


def test_published_models_load_from_a_fresh_clone_and_their_cards_state_what_the_files_hold(
        clone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(clone)
    for entry in list_hub(clone / "hub"):
        model = gmpq.from_pretrained(f"hub/{entry.path}")
        config = model.gmpq_config
        m = config["metrics"]
        weights = clone / "hub" / entry.path / F.WEIGHTS_FILE
        assert weights.stat().st_size == m["file_bytes"] == entry.file_bytes
        assert m["file_bytes"] <= 1.05 * (m["packed_bytes"] + m["extras_bytes"])
        assert m["fp32_bytes"] == gmpq.hub.export.fp32_safetensors_bytes(model)
        bops = gmpq.count_bops(model, m["bops_input_size"])
        assert bops.bops_searched_g == pytest.approx(m["bops_searched_g"], rel=1e-9)
        assert bops.bops_total_g == pytest.approx(m["bops_total_g"], rel=1e-9)
        card = (clone / "hub" / entry.path / F.CARD_FILE).read_text()
        assert f"| {m['top1']:.2f} % |" in card and f"{m['file_bytes']:,} bytes" in card
        assert f"{m['bops_searched_g']:.4f} G" in card and f"{m['bops_total_g']:.4f} G" in card
        lic = config.get("weights_license")
        if lic is not None:     # weights derived from licensed ones carry their license and notice on the card
            assert f"license: {lic['license']}" in card and (lic["notice"] or "").strip()[:60] in card


def test_models_on_the_embedded_data_measure_what_their_cards_say(clone: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(clone)
    on_embedded = [e for e in list_hub(clone / "hub") if e.dataset == "cifar10_embedded"]
    assert on_embedded, "hub/ keeps at least one model a fresh clone can measure (on the embedded data)"
    for entry in on_embedded:
        model = gmpq.from_pretrained(f"hub/{entry.path}")
        config, m = model.gmpq_config, model.gmpq_config["metrics"]
        top1, n = _top1(model, m["dataset"], m["eval_split"], config["input_size"][-1], config["mean"], config["std"])
        assert n == m["eval_samples"]
        assert abs(top1 - m["top1"]) <= 100.0 / n + 1e-9    # at most one image apart (batch-size rounding)


@pytest.mark.slow
def test_models_on_the_full_cifar10_measure_what_their_cards_say_and_onnx_agrees(
        clone: Path, shared_cifar10: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CIFAR ResNet models: their card's top-1 on the 10,000 test images again, and ONNX Runtime's top-1 classes
    agree with gmpq's on at least 99.5 % of them (``tools/onnx_agreement.py``)."""
    pytest.importorskip("onnxruntime")
    spec = importlib.util.spec_from_file_location("onnx_agreement", REPO / "tools" / "onnx_agreement.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.chdir(clone)
    on_shared = [e for e in list_hub(clone / "hub") if e.dataset == "cifar10"]
    assert on_shared, "hub/ publishes CIFAR ResNet models fine-tuned on the full CIFAR-10"
    for entry in on_shared:
        got = tool.agreement(f"hub/{entry.path}", str(shared_cifar10), None)
        assert (got["split"], got["images"]) == ("test", 10_000)
        assert got["gmpq_top1"] == pytest.approx(got["card_top1"], abs=0.01 + 1e-9)
        assert got["agreement"] >= 99.5, f"{entry.path}: ONNX Runtime agrees with gmpq on {got['agreement']} %"


def test_gmpq_evaluate_runs_on_the_published_model(clone: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """`gmpq evaluate hub/<name>` as a new user types it: the data and split come from the model's config."""
    from gmpq.cli import main

    monkeypatch.chdir(clone)
    entry = list_hub(clone / "hub")[0]
    assert main(["evaluate", f"hub/{entry.path}", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    m = json.loads((clone / "hub" / entry.path / F.CONFIG_FILE).read_text())["metrics"]
    assert got["dataset"] == m["dataset"] and got["num_eval_samples"] == m["eval_samples"]
    assert got["precision"] == "quantized" and got["bops_searched_g"] == pytest.approx(m["bops_searched_g"], rel=1e-9)
    assert abs(got["top1"] - m["top1"]) <= 100.0 / m["eval_samples"] + 1e-9
