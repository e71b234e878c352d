"""The foundation CLI verbs: output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
