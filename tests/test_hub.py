"""Export and load of mixed-precision models: exact round trips, the size bound, the card, refused bad files."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import gmpq
from gmpq.errors import CheckpointError, ModelError
from gmpq.hub import format as F
from gmpq.hub.export import weight_codes
from gmpq.hub.packing import packed_nbytes
from gmpq.policy import LayerBits
from gmpq.quant import ActQuantizer, QuantMixin, WeightQuantizer
from gmpq.quant import functional as QF

MIX = (2, 3, 4, 6)



def mixed_model(arch: str, num_classes: int, size: int, kept_bits: int = 8) -> torch.nn.Module:
    """``arch`` quantized with searched layers cycling through W/A bits 2, 3, 4, 6, calibrated on random batches."""
    model = gmpq.create_model(arch, num_classes=num_classes)
    policy = gmpq.uniform_policy(model, 4, 4, kept_bits=kept_bits)
    policy.layers = {n: LayerBits(MIX[i % 4], MIX[(i + 1) % 4]) for i, n in enumerate(policy.layers)}
    gmpq.quantize(model, policy)
    gmpq.calibrate(model, [torch.randn(2, 3, size, size)])
    # a step away from its initialisation, like after training
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantMixin):
                m.wq.scale.mul_(1.0 + 0.1 * torch.rand_like(m.wq.scale))
    return model.eval()


def rehash(export_dir: Path) -> None:
    """Record the current SHA-256 and size of the weights and policy in config.json (to reach the deeper checks)."""
    config = json.loads((export_dir / F.CONFIG_FILE).read_text())
    for name in (F.WEIGHTS_FILE, F.POLICY_FILE):
        config["files"][name] = {"sha256": F.sha256_file(export_dir / name),
                                 "bytes": (export_dir / name).stat().st_size}
    (export_dir / F.CONFIG_FILE).write_text(json.dumps(config))


def rewrite_weights(export_dir: Path, edit) -> None:
    """Rewrite model.safetensors after ``edit(tensors, metadata)``, and rehash."""
    path = export_dir / F.WEIGHTS_FILE
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    rehash(export_dir)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2_100"])
def test_round_trip_is_exact_with_2_3_4_6_bit_layers(arch: str, tmp_path: Path) -> None:
    model = mixed_model(arch, 1000, 32)
    bits = {m.w_bits for m in model.modules() if isinstance(m, QuantMixin)}
    assert set(MIX) <= bits
    x = torch.randn(3, 3, 32, 32)
    expected = model(x)
    report = gmpq.save_pretrained(model, tmp_path / "export", bops_input_size=32, card=False)

    loaded = gmpq.from_pretrained(tmp_path / "export")
    assert not loaded.training
    clips = {n: m.clip.clone() for n, m in loaded.named_modules() if isinstance(m, ActQuantizer)}
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)
    # nothing re-calibrates: a batch from another distribution leaves clips and sign modes alone
    loaded(10 * torch.randn(2, 3, 32, 32) - 5)
    for n, m in loaded.named_modules():
        if isinstance(m, ActQuantizer):
            assert bool(m.calibrated) and torch.equal(m.clip, clips[n]), n
    assert all(bool(m.initialized) for m in loaded.modules() if isinstance(m, WeightQuantizer) and not m.is_float)
    assert loaded.gmpq_policy.to_dict() == model.gmpq_policy.to_dict()

    # size: codes at exactly ceil(n * b / 8) bytes per layer; the file within 5 % of codes + float extras
    coded = [m for m in model.modules() if isinstance(m, QuantMixin) and not m.wq.is_float]
    assert report.packed_bytes == sum(packed_nbytes(m.weight.numel(), m.w_bits) for m in coded)
    assert report.file_bytes == (tmp_path / "export" / F.WEIGHTS_FILE).stat().st_size
    assert report.file_bytes <= 1.05 * (report.packed_bytes + report.extras_bytes)
    assert report.ratio_fp32 < 0.25


def test_float_layout_round_trips_and_holds_plain_dequantized_weights(tmp_path: Path) -> None:
    model = mixed_model("mobilenetv2_050_cifar", 10, 32, kept_bits=32)
    x = torch.randn(2, 3, 32, 32)
    report = gmpq.save_pretrained(model, tmp_path / "f", format="float", card=False)
    assert report.layout == "float" and report.packed_bytes == 0
    torch.testing.assert_close(gmpq.from_pretrained(tmp_path / "f")(x), model(x), rtol=0, atol=1e-5)
    with safe_open(str(tmp_path / "f" / F.WEIGHTS_FILE), "pt") as f:
        layer = model.blocks[1][0].conv_pw
        w = f.get_tensor("blocks.1.0.conv_pw.weight")
        assert w.dtype == torch.float32
        torch.testing.assert_close(w, layer.quantized_weight().detach(), rtol=1e-6, atol=0)
        assert f.get_tensor("conv_stem.weight").shape == model.conv_stem.weight.shape   # kept float layer


@pytest.fixture(scope="module")
def small_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A mixed-precision MobileNetV2-0.5 (CIFAR layout) exported once for the checks below."""
    torch.manual_seed(0)
    model = mixed_model("mobilenetv2_050_cifar", 10, 32)
    out = tmp_path_factory.mktemp("hub") / "mbv2"
    gmpq.save_pretrained(model, out, dataset="cifar10_embedded", top1=42.5, eval_split="test", eval_samples=1000,
                         description="Made for a test.")
    return out, model


@pytest.fixture
def export_copy(small_export: tuple[Path, torch.nn.Module], tmp_path: Path) -> Path:
    shutil.copytree(small_export[0], tmp_path / "copy")
    return tmp_path / "copy"


def test_packed_file_holds_codes_at_their_bit_width(small_export: tuple[Path, torch.nn.Module]) -> None:
    """Decode one 3-bit and one 6-bit layer by hand from the streams and the index."""
    out, model = small_export
    with safe_open(str(out / F.WEIGHTS_FILE), "pt") as f:
        meta = f.metadata()
        codes = f.get_tensor("codes").numpy()
        floats = f.get_tensor("float32")
    assert meta["format"] == "gmpq" and meta["format_version"] == "1" and meta["weights"] == "packed"
    entries = F.decode_index(meta["index"])
    layers = dict(gmpq.quantizable_layers(model))
    offset, checked = 0, set()
    for e in [e for e in entries if e.tag == "c"]:
        layer = layers[e.key.removesuffix(".weight")]
        nbytes = -(-e.numel * layer.w_bits // 8)
        if layer.w_bits in (3, 6) and layer.w_bits not in checked:
            stream = np.unpackbits(codes[offset:offset + nbytes], bitorder="little")[: e.numel * layer.w_bits]
            unsigned = (stream.reshape(-1, layer.w_bits) * (1 << np.arange(layer.w_bits))).sum(axis=1)
            expected = weight_codes(layer).reshape(-1).numpy().astype(np.int64) + QF.weight_qmax(layer.w_bits)
            assert np.array_equal(unsigned, expected)
            checked.add(layer.w_bits)
        offset += nbytes
    assert checked == {3, 6} and offset == codes.size
    # the float stream carries the per-channel steps, found through the index
    start = 0
    for e in entries:
        if e.tag == "f" and e.key == "conv_stem.wq.scale":
            torch.testing.assert_close(floats[start:start + e.numel], model.conv_stem.wq.scale.detach())
            break
        start += e.numel if e.tag == "f" else 0
    else:
        pytest.fail("conv_stem.wq.scale not in the index")


def test_export_files_config_and_card(small_export: tuple[Path, torch.nn.Module]) -> None:
    out, model = small_export
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [F.CARD_FILE, F.CONFIG_FILE, F.FIGURE_FILE, F.POLICY_FILE, F.WEIGHTS_FILE])
    config = json.loads((out / F.CONFIG_FILE).read_text())
    assert config["arch"] == "mobilenetv2_050_cifar" and config["format_version"] == F.FORMAT_VERSION
    assert config["model_kwargs"] == {"num_classes": 10, "in_chans": 3} and config["input_size"] == [3, 32, 32]
    assert config["gmpq_version"] == gmpq.__version__ and config["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    bops = gmpq.count_bops(model, 32)
    m = config["metrics"]
    assert m["bops_searched_g"] == pytest.approx(bops.bops_searched_g) and m["bops_input_size"] == 32
    assert m["file_bytes"] == (out / F.WEIGHTS_FILE).stat().st_size
    assert (out / F.FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / F.CARD_FILE).read_text()
    assert card.startswith("---\nlibrary_name: gmpq")
    assert "| top-1 accuracy (cifar10_embedded, test, 1,000 images) | 42.50 % |" in card
    assert f"| BOPs, searched layers (32x32) | {bops.bops_searched_g:.4f} G |" in card
    assert f"{m['file_bytes']:,} bytes" in card and f"{m['fp32_bytes']:,} bytes" in card
    assert f"![per-layer weight and activation bits]({F.FIGURE_FILE})" in card
    assert f'gmpq.from_pretrained("{out}")' in card and "Made for a test." in card


def test_card_says_not_measured_without_accuracy(tmp_path: Path) -> None:
    model = mixed_model("mobilenetv2_050_cifar", 10, 32)
    gmpq.save_pretrained(model, tmp_path / "m", repo_id="user/m")
    card = (tmp_path / "m" / F.CARD_FILE).read_text()
    assert "| top-1 accuracy | not measured |" in card and 'gmpq.from_pretrained("user/m")' in card


def test_loading_never_unpickles(small_export: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during from_pretrained")

    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(gmpq.from_pretrained(small_export[0])(x), small_export[1](x), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ refused files
def test_truncated_or_tampered_weights_are_refused(export_copy: Path) -> None:
    path = export_copy / F.WEIGHTS_FILE
    data = path.read_bytes()
    config = (export_copy / F.CONFIG_FILE).read_text()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        gmpq.from_pretrained(export_copy)
    rehash(export_copy)   # consistent hashes: the safetensors reader itself must refuse the cut file
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        gmpq.from_pretrained(export_copy)
    (export_copy / F.CONFIG_FILE).write_text(config)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256"):
        gmpq.from_pretrained(export_copy)


def test_bit_width_disagreeing_with_the_policy_is_refused(export_copy: Path) -> None:
    policy = json.loads((export_copy / F.POLICY_FILE).read_text())
    name, bits = next(iter(policy["layers"].items()))
    bits["w_bits"] = 6 if bits["w_bits"] != 6 else 4
    (export_copy / F.POLICY_FILE).write_text(json.dumps(policy, indent=2) + "\n")   # same length as before
    with pytest.raises(CheckpointError, match="SHA-256"):
        gmpq.from_pretrained(export_copy)
    rehash(export_copy)
    with pytest.raises(CheckpointError, match=rf"layer '{name}'.*policy.json says W{bits['w_bits']}"):
        gmpq.from_pretrained(export_copy)


def test_shape_disagreeing_with_the_model_is_refused(export_copy: Path) -> None:
    config = json.loads((export_copy / F.CONFIG_FILE).read_text())
    config["model_kwargs"]["num_classes"] = 12
    (export_copy / F.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'classifier.*shape \[10.*needs \[12"):
        gmpq.from_pretrained(export_copy)


def test_tampered_index_or_codes_are_refused(export_copy: Path, tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    shutil.copytree(export_copy, backup)

    def drop_last_index_entry(tensors, metadata):
        index = F.decode_meta(metadata["index"], "index")
        module = next(reversed(index))
        index[module].popitem()
        metadata["index"] = F.encode_meta(index)

    rewrite_weights(export_copy, drop_last_index_entry)
    with pytest.raises(CheckpointError, match="lacks tensor"):
        gmpq.from_pretrained(export_copy)

    shutil.rmtree(export_copy)
    shutil.copytree(backup, export_copy)

    def max_out_first_codes(tensors, metadata):
        tensors["codes"][:16] = 0xFF     # unsigned code 2^b - 1 is outside [0, 2^b - 2]

    rewrite_weights(export_copy, max_out_first_codes)
    with pytest.raises(CheckpointError, match="exceed"):
        gmpq.from_pretrained(export_copy)

    shutil.rmtree(export_copy)
    shutil.copytree(backup, export_copy)
    rewrite_weights(export_copy, lambda tensors, metadata: tensors.update(float32=tensors["float32"][:-1]))
    with pytest.raises(CheckpointError, match="stream 'float32'"):
        gmpq.from_pretrained(export_copy)


@pytest.mark.parametrize("field, value, message", [
    ("arch", "resnet9000", "unknown architecture 'resnet9000'"),
    ("format_version", 99, "format_version 99 is not supported"),
    ("format", "something-else", "not a gmpq model config"),
    ("weights", "int4", "'weights' must be one of"),
])
def test_bad_config_is_refused(export_copy: Path, field: str, value, message: str) -> None:
    config = json.loads((export_copy / F.CONFIG_FILE).read_text())
    config[field] = value
    (export_copy / F.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        gmpq.from_pretrained(export_copy)


def test_missing_files_and_wrong_paths_are_refused(export_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a file"):
        gmpq.from_pretrained(export_copy / F.CONFIG_FILE)
    with pytest.raises(CheckpointError, match="no model directory"):
        gmpq.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"no model 'not-published' in \./hub or .*published there: "):
        gmpq.from_pretrained("hub/not-published")
    (export_copy / F.POLICY_FILE).unlink()
    with pytest.raises(CheckpointError, match="policy.json is missing"):
        gmpq.from_pretrained(export_copy)


def test_export_refuses_models_it_cannot_represent(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no gmpq_policy"):
        gmpq.save_pretrained(gmpq.create_model("mobilenetv2_050_cifar", num_classes=10), tmp_path / "a")
    model = gmpq.create_model("mobilenetv2_050_cifar", num_classes=10)
    gmpq.quantize(model, gmpq.uniform_policy(model, 4, 4))
    with pytest.raises(ModelError, match="gmpq.calibrate"):
        gmpq.save_pretrained(model, tmp_path / "b")
    gmpq.calibrate(model, [torch.randn(2, 3, 32, 32)])
    with pytest.raises(ModelError, match="unknown export format 'int4'"):
        gmpq.save_pretrained(model, tmp_path / "c", format="int4")
    with pytest.raises(ModelError, match="figure 'the search' not found"):
        gmpq.save_pretrained(model, tmp_path / "d", figures={"the search": tmp_path / "search.png"})
    assert not any((tmp_path / d).exists() for d in "bcd")


def test_card_shows_extra_figures_and_the_comparison_table(tmp_path: Path) -> None:
    model = mixed_model("mobilenetv2_050_cifar", 10, 32)
    figure = tmp_path / "search.png"
    figure.write_bytes(b"\x89PNG\r\n\x1a\n")
    gmpq.save_pretrained(model, tmp_path / "m", top1=40.0, dataset="d", figures={"the search": figure},
                         comparison=[{"model": "uniform W4A4", "top1": 38.5, "bops_searched_g": 0.44,
                                      "mean_w_bits": 4.0, "mean_a_bits": 4.0}])
    card = (tmp_path / "m" / F.CARD_FILE).read_text()
    assert "![the search](search.png)" in card and (tmp_path / "m" / "search.png").read_bytes() == figure.read_bytes()
    assert "| this model | 40.00 % |" in card and "| uniform W4A4 | 38.50 % | 0.4400 G | 4.00 / 4.00 |" in card


def test_weights_license_travels_from_the_float_weights_to_the_card(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Models made from licensed weights (the BSD-2 CIFAR ResNets) carry that license and its notice onwards:
    the pretrained configuration -> a stage's model directory -> the export's config.json and card."""
    from gmpq.train import checkpoint_license
    from gmpq.train.runlog import command_line

    bsd = checkpoint_license("timm:resnet20_cifar.jpeg_ft")
    assert bsd["license"] == "bsd-2-clause" and "Yerlan Idelbayev" in bsd["notice"]
    assert checkpoint_license("timm:resnet18.a1_in1k") == {"license": "apache-2.0", "source": "timm:resnet18.a1_in1k",
                                                          "notice": None}
    assert checkpoint_license(None) is None and checkpoint_license(str(tmp_path / "nothing")) is None
    model = gmpq.create_model("resnet20_cifar", num_classes=10)
    stage_model = gmpq.hub.write_model_dir(model, tmp_path / "pretrain" / "model", extra={"weights_license": bsd})
    assert checkpoint_license(str(stage_model)) == bsd
    gmpq.quantize(model, gmpq.uniform_policy(model, 3, 3))
    gmpq.calibrate(model, [torch.randn(2, 3, 32, 32)])
    report = gmpq.save_pretrained(model.eval(), tmp_path / "out", weights_license=bsd, command="gmpq run x seed=1")
    config = json.loads((report.path / F.CONFIG_FILE).read_text())
    card = (report.path / F.CARD_FILE).read_text()
    assert config["weights_license"] == bsd and "license: bsd-2-clause" in card and "Yerlan Idelbayev" in card
    assert "gmpq run x seed=1" in card
    # BOPs of the float network: every searched layer's MACs at 32 x 32 bits
    macs = sum(layer.macs for layer in gmpq.count_bops(model, 32).layers if not layer.kept)
    assert config["metrics"]["float_bops_searched_g"] == pytest.approx(macs * 1024 / 1e9)
    # a loaded export passes its license on to the next export (and the ONNX card) without being told
    again = gmpq.save_pretrained(gmpq.from_pretrained(report.path), tmp_path / "again")
    assert "license: bsd-2-clause" in (again.path / F.CARD_FILE).read_text()
    plain = gmpq.save_pretrained(model, tmp_path / "plain")
    assert "license: apache-2.0" in (plain.path / F.CARD_FILE).read_text()
    monkeypatch.setattr("sys.argv", ["/venv/bin/gmpq", "run", "quickstart", "output_dir=runs/a b"])
    assert command_line() == "gmpq run quickstart 'output_dir=runs/a b'"
    monkeypatch.setattr("sys.argv", ["/venv/bin/pytest", "-q"])
    assert command_line() is None
