"""The foundation CLI verbs: output and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import gmpq
from gmpq.cli import main


def test_bops_json_for_float_resnet18(capsys) -> None:
    assert main(["bops", "resnet18", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bops_total_g"] == pytest.approx(1853.4, rel=0.01)
    assert {"arch", "input_size", "macs", "bops_total_g", "bops_searched_g", "layers"} <= set(out)
    assert {"name", "w_bits", "a_bits", "macs"} <= set(out["layers"][0])
    assert all(layer["w_bits"] == 32 for layer in out["layers"])


def test_bops_with_policy_and_table_output(tmp_path, capsys) -> None:
    model = gmpq.create_model("resnet18_cifar")
    path = gmpq.uniform_policy(model, 3, 3).save(tmp_path / "p.json")
    assert main(["bops", "resnet18_cifar", "--policy", str(path), "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "BOPs searched" in out


def test_layers_lists_kept_layers(capsys) -> None:
    assert main(["layers", "mobilenetv2_100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    kept = [layer["name"] for layer in out["layers"] if layer["kept"]]
    assert kept == ["conv_stem", "classifier"] and len(out["layers"]) == 53


def test_layers_shows_each_layer_type_and_how_it_is_quantized(capsys) -> None:
    assert main(["layers", "tf_mobilenetv3_small_100", "--input-size", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["layer", "type"] and lines[1].endswith("quantized as")
    stem = next(line for line in lines if line.startswith("conv_stem "))
    assert stem.split()[1] == "Conv2dSame" and stem.endswith("conv2d, TF 'SAME' padding")
    assert main(["layers", "nf_resnet26", "--input-size", "32", "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert {(layer["type"], layer["conversion"]) for layer in layers} == {
        ("ScaledStdConv2d", "conv2d, scaled standardised weight"), ("Linear", "linear")}


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["bops", "resnet1"], "unknown architecture 'resnet1'"),
     (["bops", "resnet18", "--policy", "/no/such/policy.json"], "cannot read policy file"),
     (["bops", "resnet18", "--input-size", "0"], "expected a positive integer"),
     (["layers", "not_a_model_at_all"], "unknown architecture")],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_invalid_policy_file_exits_2_from_the_console_script(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 1, "arch": "resnet18", "input_size": 224,
                               "layers": {"nope": {"w_bits": 4, "a_bits": 4}}}))
    proc = subprocess.run([sys.executable, "-m", "gmpq.cli", "bops", "resnet18", "--policy", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gmpq: error: " + str(bad) + ": policy layer 'nope' is not a quantizable layer (Conv2d/Linear) of the model"]


def test_a_policy_of_another_architecture_is_refused_naming_both(tmp_path, capsys) -> None:
    path = gmpq.uniform_policy(gmpq.create_model("mobilenetv2_050_cifar"), 4, 4, arch="mobilenetv2_050").save(
        tmp_path / "policy.json")
    assert main(["bops", "resnet18", "--policy", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the policy was made for 'mobilenetv2_050', not for 'resnet18'" in err[0]
    # a CIFAR variant's policy fits its base architecture (same layer names): accepted
    cifar = gmpq.uniform_policy(gmpq.create_model("resnet18_cifar"), 4, 4).save(tmp_path / "cifar.json")
    assert main(["bops", "resnet18", "--policy", str(cifar), "--input-size", "32"]) == 0


BINARY = bytes(range(256)) * 4  # not UTF-8 (0x80 cannot start a character)


def _binary_inputs(tmp_path):
    """argv of every verb that reads a file the user hands in, each given a binary file instead."""
    (tmp_path / "garbage.json").write_bytes(BINARY)
    (tmp_path / "garbage.yaml").write_bytes(BINARY)
    for name in ("model", "export", "run", "log"):
        (tmp_path / name).mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "model" / f).write_bytes(BINARY)
    for f in ("config.json", "policy.json", "model.safetensors"):
        (tmp_path / "export" / f).write_bytes(BINARY)
    (tmp_path / "run" / "metrics.json").write_bytes(BINARY)
    (tmp_path / "log" / "search_log.jsonl").write_bytes(BINARY)
    return {
        "policy": (["bops", "resnet18", "--policy", str(tmp_path / "garbage.json")], "policy file"),
        "plot policy": (["plot", str(tmp_path / "garbage.json"), "-o", str(tmp_path / "p.png")], "policy file"),
        "recipe": (["search", str(tmp_path / "garbage.yaml")], "recipe"),
        "run recipe": (["run", str(tmp_path / "garbage.yaml")], "recipe"),
        "model config": (["evaluate", str(tmp_path / "model")], "config"),
        "export config": (["export", str(tmp_path / "export"), "--out", str(tmp_path / "out")], "config"),
        "metrics": (["compare", str(tmp_path / "run")], "metrics"),
        "search log": (["plot", "--search", str(tmp_path / "log"), "-o", str(tmp_path / "s.png")], "search log"),
    }


@pytest.mark.parametrize("case", ["policy", "plot policy", "recipe", "run recipe", "model config", "export config",
                                  "metrics", "search log"])
def test_a_binary_file_gives_one_line_and_exit_2(tmp_path, capsys, case) -> None:
    argv, what = _binary_inputs(tmp_path)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gmpq: error: ") and what in err[0], err
    assert "UnicodeDecodeError" not in err[0]


def test_a_full_disk_gives_one_line_naming_the_file_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    """The writer's real ENOSPC (a write to /dev/full), and safetensors' wrapped form of it, both become
    'no space left on device while writing <file>'; no temporary file is left."""
    from safetensors import SafetensorError

    import gmpq.hub.export as export
    from gmpq.utils import atomic_write

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")

    def to_dev_full(tmp):
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 65536)
            f.flush()

    with pytest.raises(gmpq.StorageError, match=rf"^no space left on device while writing {tmp_path / 'a.bin'};"):
        atomic_write(tmp_path / "a.bin", to_dev_full)
    assert list(tmp_path.iterdir()) == []

    model = gmpq.create_model("resnet18_cifar", num_classes=10)
    gmpq.quantize(model, gmpq.uniform_policy(model, 4, 4))
    gmpq.calibrate(model, [torch.randn(2, 3, 32, 32)])

    def full(*_args, **_kwargs):  # what safetensors raises when its write fails with ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export, "save_file", full)
    with pytest.raises(gmpq.StorageError) as info:
        gmpq.save_pretrained(model, tmp_path / "out")
    assert str(info.value).startswith(f"no space left on device while writing {tmp_path / 'out' / 'model.safetensors'}")
    assert [p.name for p in tmp_path.iterdir()] == []  # no export directory, no staging copy
