"""The adapter: any timm CNN, kept layers, CIFAR variants in timm's registry."""

from __future__ import annotations

import pytest
import timm
import torch

import gmpq
from gmpq import ModelError
from gmpq.models import base_arch, model_data_config
from gmpq.models.cifar import CIFAR_MEAN

ARCHS = {  # arch -> (kept layers, a small input size for a fast forward)
    "resnet18": (["conv1", "fc"], 64),
    "resnet50": (["conv1", "fc"], 64),
    "mobilenetv2_100": (["conv_stem", "classifier"], 64),
    "efficientnet_b0": (["conv_stem", "classifier"], 64),
    "regnetx_002": (["stem.conv", "head.fc"], 64),
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_adapter_quantizes_every_layer_of_timm_families(arch: str) -> None:
    kept, size = ARCHS[arch]
    model = gmpq.create_model(arch, num_classes=7)
    names_before = list(gmpq.quantizable_layers(model))
    assert gmpq.kept_layer_names(model) == kept
    gmpq.quantize(model, gmpq.uniform_policy(model, 4, 4))
    layers = gmpq.quantizable_layers(model)
    assert list(layers) == names_before
    assert all(isinstance(m, gmpq.quant.QuantMixin) for m in layers.values())
    assert all((m.w_bits, m.a_bits) == ((8, 8) if n in kept else (4, 4)) for n, m in layers.items())
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["resnet18_cifar", "resnet50_cifar", "mobilenetv2_100_cifar", "mobilenetv2_050_cifar"])
def test_cifar_variants_keep_base_layer_names_and_a_4x4_final_map(arch: str) -> None:
    variant = gmpq.create_model(arch, num_classes=10)
    base = gmpq.create_model(base_arch(arch), num_classes=10)
    assert list(gmpq.quantizable_layers(variant)) == list(gmpq.quantizable_layers(base))
    assert variant.gmpq_input_size == 32
    with torch.no_grad():
        feats = variant.forward_features(torch.randn(1, 3, 32, 32))
    assert feats.shape[-2:] == (4, 4)
    assert variant.pretrained_cfg["mean"] == CIFAR_MEAN
    assert timm.is_model(arch) and arch in gmpq.list_cifar_variants()
    assert model_data_config(arch) == model_data_config(variant) and model_data_config(arch).input_size == 32
    assert type(timm.create_model(arch, num_classes=10)) is type(variant)  # a timm model like any other


def test_unknown_arch_is_a_model_error_with_suggestions() -> None:
    with pytest.raises(ModelError, match="did you mean resnet18"):
        gmpq.create_model("resnet1")


def test_a_model_registered_in_timm_is_a_gmpq_model() -> None:
    from timm.models import register_model

    @register_model
    def gmpq_tiny_test_net(pretrained: bool = False, **kwargs):
        return timm.create_model("resnet18", pretrained=pretrained, **kwargs)

    model = gmpq.create_model("gmpq_tiny_test_net", num_classes=3)
    assert model.gmpq_arch == "gmpq_tiny_test_net" and model.gmpq_input_size == 224
    assert gmpq.kept_layer_names(model) == ["conv1", "fc"]


def test_32_bit_policy_reproduces_the_float_model_exactly() -> None:
    float_model = gmpq.create_model("mobilenetv2_050_cifar", num_classes=10).eval()
    policy = gmpq.uniform_policy(float_model, 32, 32, kept_bits=32)
    quantized = gmpq.create_model("mobilenetv2_050_cifar", num_classes=10, policy=policy)
    quantized.load_state_dict(float_model.state_dict(), strict=False)
    quantized.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(quantized(x), float_model(x))


def test_gmpq_backbones_lists_the_cifar_variants(capsys) -> None:
    from gmpq.cli import main

    assert main(["backbones"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == gmpq.list_cifar_variants()
    assert "base=mobilenetv2_050" in lines[0] and "input=32" in lines[0]
