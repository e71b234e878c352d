"""ONNX QDQ export: graph form, storage per bit width, metadata, the CLI, bad input, and parity with gmpq's forward
under ONNX Runtime on held-out images (the published hub model, resnet18 W4A4 and a mixed 2/3/4/6 policy)."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from torch.utils.data import DataLoader

import gmpq
from gmpq.cli import main
from gmpq.data import ImageDataset, build_transform, get_dataset_spec, load_split
from gmpq.errors import ModelError
from gmpq.hub.export import weight_codes, write_model_dir
from gmpq.hub.onnx_export import storage
from gmpq.hub.onnx_graph import read_metadata
from gmpq.hub.onnx_runtime import kernel_report, onnx_parity, session
from gmpq.models.cifar import CIFAR_MEAN, CIFAR_STD
from gmpq.quant import to_mixed

HUB_MODEL = "hub/mobilenetv2_050_cifar-gmpq-embedded"
MIXED_BITS = [(2, 3), (3, 6), (4, 2), (6, 4), (3, 3), (6, 6), (2, 4), (4, 6)]


def _embedded(split: str, size: int = 32, mean=CIFAR_MEAN, std=CIFAR_STD) -> ImageDataset:
    spec = get_dataset_spec("cifar10_embedded")
    return ImageDataset(load_split(spec, split), build_transform(spec.family, size, mean, std, train=False))


def _held_out(mean=CIFAR_MEAN, std=CIFAR_STD) -> DataLoader:
    """The held-out split of the embedded CIFAR-10 subset (500 images)."""
    return DataLoader(_embedded("test", mean=mean, std=std), batch_size=50)


class Tiny(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> linear: the smallest net with every export case."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)
        self.num_classes, self.gmpq_input_size = 10, 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _tiny(w_bits: int, a_bits: int) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny()
    for bn in (model.bn1, model.bn2):  # BN statistics and affine terms that are not the identity
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(-1.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    policy = gmpq.uniform_policy(model, w_bits, a_bits, arch="tiny", input_size=16)
    gmpq.quantize(model, policy)
    gmpq.calibrate(model, [torch.randn(16, 3, 16, 16) for _ in range(2)])
    return model.eval()


@pytest.fixture(scope="module")
def alive_resnet18() -> tuple[nn.Module, list[torch.Tensor]]:
    """Float resnet18 (10 classes, 32x32 input) with random weights made informative — BN scales at 1 instead of
    timm's zero init of each block's last BN, BN statistics estimated on embedded CIFAR-10 training images — and
    those images in four batches (for calibration)."""
    torch.manual_seed(0)
    model = gmpq.create_model("resnet18", num_classes=10)
    train = _embedded("train")
    batches = [torch.stack([train[i][0] for i in range(j, j + 32)]) for j in range(0, 128, 32)]
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        nn.init.ones_(bn.weight)
        bn.momentum = None
        bn.reset_running_stats()
    with torch.no_grad():
        model.train()
        for b in batches:
            model(b)
    return model.eval(), batches


def _quantized_resnet18(alive: tuple[nn.Module, list[torch.Tensor]], bits: list[tuple[int, int]] | None
                        ) -> nn.Module:
    """The alive resnet18 quantized with uniform W4A4 (``bits=None``) or per-layer ``bits`` (cycled over the
    searched layers; stem and classifier at 8 bits), calibrated on the four batches."""
    model, batches = copy.deepcopy(alive[0]), alive[1]
    policy = gmpq.uniform_policy(model, 4, 4, input_size=32)
    if bits is not None:
        cycle = itertools.cycle(bits)
        policy.layers = {name: gmpq.LayerBits(*next(cycle)) for name in policy.layers}
    gmpq.quantize(model, policy)
    gmpq.calibrate(model, batches)
    return model.eval()


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


# ------------------------------------------------------------------------------------------------ graph form


def test_storage_follows_the_bit_width_and_gmpq_code_ranges() -> None:
    assert storage(8, False, "int4", weight=False) == storage(8, False, "int8", weight=False)
    assert (storage(8, False, "int4", False).dtype, storage(8, False, "int4", False).bounded) == ("uint8", False)
    assert (storage(6, False, "int4", False).dtype, storage(6, False, "int4", False).qmax) == ("uint8", 63)
    assert storage(6, False, "int4", False).bounded          # 63 < 255: the bound makes QuantizeLinear stop at c
    assert (storage(8, True, "int4", False).qmin, storage(8, True, "int4", False).bounded) == (-127, True)
    assert storage(4, False, "int4", False).dtype == "uint4" and storage(4, False, "int8", False).dtype == "uint8"
    assert (storage(3, True, "int4", False).dtype, storage(3, True, "int4", False).qmax) == ("int4", 3)
    weight = storage(2, True, "int4", weight=True)
    assert (weight.dtype, weight.qmin, weight.qmax, weight.bounded) == ("int4", -1, 1, False)
    assert storage(5, True, "int4", weight=True).dtype == "int8"


@pytest.mark.parametrize("low_bit_storage", ["int4", "int8"])
def test_tiny_w4a4_graph_stores_codes_and_steps_and_matches_gmpq(tmp_path: Path, low_bit_storage: str) -> None:
    model = _tiny(4, 4)
    out = gmpq.export_onnx(model, tmp_path / "tiny.onnx", low_bit_storage=low_bit_storage,
                           opset=21 if low_bit_storage == "int4" else 18)
    assert out.card is None and out.path.stat().st_size == out.file_bytes and out.input_shape == (3, 16, 16)
    proto = onnx.load(str(out.path))
    assert proto.opset_import[0].version == (21 if low_bit_storage == "int4" else 18)
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops and ops.count("QuantizeLinear") == 3
    inits = _initializers(out.path)
    layers = gmpq.quantizable_layers(model)
    for name in ("conv2",):  # a searched 4-bit layer with a folded BN: codes kept, step = |gamma / sigma| * s
        layer, bn = layers[name], model.bn2
        codes = inits[f"{name}.weight_quantized"].astype(np.int64)
        g = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
        want = weight_codes(layer).numpy().astype(np.int64) * np.sign(g)[:, None, None, None]
        assert np.array_equal(codes, want) and np.abs(codes).max() <= 7
        np.testing.assert_allclose(inits[f"{name}.weight_scale"], np.abs(g) * layer.wq.scale.detach().numpy(),
                                   rtol=1e-6)
        step = float(layers[name].aq.clip.detach()) / 15
        np.testing.assert_allclose(inits[f"{name}.input_scale"], step, rtol=1e-7)
    want_type = {"int4": (onnx.TensorProto.INT4, onnx.TensorProto.UINT4), "int8": (onnx.TensorProto.INT8,
                                                                                   onnx.TensorProto.UINT8)}
    types = {t.name: t.data_type for t in proto.graph.initializer}
    assert types["conv2.weight_quantized"] == want_type[low_bit_storage][0]
    assert types["conv2.input_zero_point"] == want_type[low_bit_storage][1]      # after ReLU: unsigned
    assert types["conv1.weight_quantized"] == onnx.TensorProto.INT8              # the kept stem: 8 bits
    assert types["conv1.input_zero_point"] == onnx.TensorProto.INT8              # image input: signed
    meta = read_metadata(out.path)
    assert meta["layers"]["conv2"]["weight"] == ("int4" if low_bit_storage == "int4" else "int8")
    assert meta["layers"]["conv2"]["bn_folded"] and meta["layers"]["conv1"]["signed"]
    assert meta["layers"]["conv2"]["weight_range"] == [-7, 7] and meta["layers"]["conv2"]["activation_range"] == [0, 15]
    assert meta["layers"]["conv1"]["activation_range"] == [-127, 127]
    assert meta["policy"] == model.gmpq_policy.to_dict() and meta["input_shape"] == ["batch", 3, 16, 16]
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        ref = model(x).numpy()
    for batch in (1, 64):  # dynamic batch dimension
        got = session(out.path).run(None, {"input": x[:batch].numpy()})[0]
        np.testing.assert_allclose(got, ref[:batch], atol=1e-4, rtol=1e-4)


def test_uniform_w8a8_runs_integer_kernels_where_the_graph_allows(tmp_path: Path) -> None:
    """conv1 -> ReLU -> conv2's uint8 QuantizeLinear fuses into ONNX Runtime's QLinearConv; conv2 (its output is
    averaged in float) and the classifier dequantize and run in float; the report reads that from ORT's graph."""
    out = gmpq.export_onnx(_tiny(8, 8), tmp_path / "w8a8.onnx")
    kernels = {k.name: k for k in kernel_report(out.path)}
    assert kernels["conv1"].kernel == "QLinearConv" and kernels["conv1"].integer
    assert not kernels["conv2"].integer and not kernels["fc"].integer


# ------------------------------------------------------------------------------------------------ bad input


def test_a_search_supernet_layer_has_no_onnx_form(tmp_path: Path) -> None:
    model = _tiny(4, 4)
    model.conv2 = to_mixed(nn.Conv2d(8, 16, 3, padding=1, bias=False), (2, 4), (2, 4))
    with pytest.raises(ModelError, match=r"layer 'conv2' is a MixedConv2d, a search supernet layer.*decoded policy"):
        gmpq.export_onnx(model, tmp_path / "x.onnx")
    assert not any(tmp_path.iterdir())


def test_an_opset_too_old_for_int4_names_the_layer_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"layer 'conv2' has W4/A4 bits: INT4 storage needs ONNX opset >= 21, got "
                                         r"opset 20; export with opset=21.*low_bit_storage='int8'"):
        gmpq.export_onnx(_tiny(4, 4), tmp_path / "x.onnx", opset=20)
    with pytest.raises(ModelError, match="has no gmpq_policy"):
        gmpq.export_onnx(Tiny(), tmp_path / "x.onnx")
    model = _tiny(4, 4)
    model.conv2.aq.calibrated.fill_(False)
    with pytest.raises(ModelError, match="layer 'conv2' has an uncalibrated activation quantizer"):
        gmpq.export_onnx(model, tmp_path / "x.onnx")
    assert not any(tmp_path.iterdir())


def test_a_failed_write_leaves_nothing_half_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = tmp_path / "model.onnx"
    previous.write_bytes(b"the previous export")

    def broken_save(proto, path, *args, **kwargs):
        Path(path).write_bytes(proto.SerializeToString()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        gmpq.export_onnx(_tiny(4, 4), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert previous.read_bytes() == b"the previous export"


# ------------------------------------------------------------------------------------------------ parity


@pytest.fixture(scope="module")
def hub_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`gmpq export RUN --format onnx` of a run whose fine-tuned model is the hub model (written as `gmpq finetune`
    writes its model directory): the run's model goes through the one loader into the graph."""
    root = tmp_path_factory.mktemp("onnx")
    write_model_dir(gmpq.from_pretrained(HUB_MODEL), root / "run" / "finetune" / "model")
    assert main(["export", str(root / "run"), "--format", "onnx", "--out", str(root / "hub-onnx")]) == 0
    return root / "hub-onnx"


def test_cli_exports_a_run_with_its_policy_and_a_three_line_card(hub_export: Path) -> None:
    assert sorted(p.name for p in hub_export.iterdir()) == ["README.md", "model.onnx"]
    model = gmpq.from_pretrained(HUB_MODEL)
    meta = read_metadata(hub_export / "model.onnx")
    assert meta["policy"] == model.gmpq_policy.to_dict() and meta["arch"] == "mobilenetv2_050_cifar"
    layers = gmpq.quantizable_layers(model)
    assert list(meta["layers"]) == list(layers)
    for name, info in meta["layers"].items():
        m = layers[name]
        assert (info["w_bits"], info["a_bits"], info["signed"]) == (m.w_bits, m.a_bits, bool(m.aq.signed))
        assert info["weight"] == ("int4" if m.w_bits <= 4 else "int8")
        assert info["activation"] == ("" if m.aq.signed else "u") + ("int4" if m.a_bits <= 4 else "int8")
    card = (hub_export / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0].strip().splitlines()
    assert snippet[0] == "import onnxruntime as ort" and len(snippet) == 3
    assert 'ort.InferenceSession("model.onnx"' in snippet[1] and "[N, 3, 32, 32]" in snippet[2]
    assert "0.4914" in snippet[2] and "| `blocks.1.0.conv_dw` | Conv | 3 | 4 | int4 | uint4" in card


def test_cli_refuses_int4_at_an_old_opset_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", HUB_MODEL, "--format", "onnx", "--opset", "20", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layer 'blocks.0.0.conv_dw' has W2/A3 bits" in err[0] and "--opset 21" in err[0]
    assert main(["export", HUB_MODEL, "--opset", "21", "--out", str(tmp_path / "y")]) == 2
    assert "--opset apply to --format onnx only" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_export_of_a_directory_without_a_quantized_model_is_one_line(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(tmp_path), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gmpq: error: no quantized model found at") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_hub_model_parity_on_its_held_out_split(hub_export: Path) -> None:
    """ONNX Runtime against gmpq on the 500 held-out images the hub model was evaluated on.

    This model (W2-W6 / A2-A6, 34 % top-1, small logit margins) is numerically chaotic: gmpq's own float32 and
    float64 forwards agree on the top-1 class of only 96.6-98.8 % of these images (README, ONNX export), because a
    float32 rounding difference at a quantizer's rounding tie moves a population of equal values by one step and
    later low-bit layers amplify it. ONNX Runtime measures 95.6 %, so the 99.5 % asked of well-conditioned models
    (the resnet18 test) is out of reach here; the bounds below still fail on a 5 % error in a single layer's step
    (measured: 84-85 % agreement, mean logit difference 0.11-0.13).
    """
    model = gmpq.from_pretrained(HUB_MODEL)
    cfg = model.gmpq_config
    parity = onnx_parity(model, hub_export / "model.onnx", _held_out(cfg["mean"], cfg["std"]), threads=1)
    print(parity.summary())
    assert parity.samples == 500
    assert parity.agreement >= 93.0 and parity.top1_gap <= 1.0
    assert parity.mean_logit_diff <= 0.05


@pytest.mark.parametrize(("label", "bits"), [("w4a4", None), ("mixed-2/3/4/6", MIXED_BITS)])
def test_resnet18_parity_on_held_out_images(alive_resnet18, tmp_path: Path, label: str, bits) -> None:
    model = _quantized_resnet18(alive_resnet18, bits)
    out = gmpq.export_onnx(model, tmp_path / "r18.onnx", input_size=32)
    stored = {r.name: r for r in out.layers}
    for name, layer in gmpq.quantizable_layers(model).items():
        assert stored[name].weight == ("int4" if layer.w_bits <= 4 else "int8"), name
    parity = onnx_parity(model, out.path, _held_out(), threads=1)
    print(label, parity.summary())
    assert parity.samples == 500
    # Random weights give small logit margins and A2/A3 layers amplify a one-step difference at a rounding tie
    # (see the hub test): over seeds 0-3 the agreement measured 98.6-100 % and the top-1 gap 0-0.2 points.
    assert parity.agreement >= 98.5 and parity.top1_gap <= 0.4 + 1e-9
    assert parity.mean_logit_diff <= 0.02
    assert json.loads(json.dumps(out.to_dict()))["opset"] == 21
