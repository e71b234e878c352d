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


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnets_have_6n_plus_2_layers_and_parameter_free_shortcuts(depth: int) -> None:
    from gmpq.models.resnet_cifar import OptionAShortcut

    model = gmpq.create_model(f"resnet{depth}_cifar").eval()
    layers = gmpq.quantizable_layers(model)
    assert len(layers) == depth  # 6n+1 convolutions (no shortcut convs) and the classifier
    assert gmpq.kept_layer_names(model) == ["conv1", "linear"] and model.gmpq_input_size == 32
    shortcuts = [m for m in model.modules() if isinstance(m, OptionAShortcut)]
    assert len(shortcuts) == 2 and all(not list(m.parameters()) for m in shortcuts)
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(shortcuts[0](x)[:, 8:24], x[:, :, ::2, ::2]) and not shortcuts[0](x)[:, :8].any()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 64, 8, 8)
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)


def test_cifar_resnet_without_weights_refuses_pretrained_instead_of_random_weights() -> None:
    with pytest.raises(ModelError, match="pretrained_cfg_overlay=dict\\(file="):
        gmpq.create_model("resnet56_cifar", pretrained=True)
    assert gmpq.create_model("resnet20_cifar.orig").gmpq_arch == "resnet20_cifar"  # the tag names weights only


#: correct top-1 of the original weights on the first 1,000 images of the evaluation subset (seeded, the same for
#: every recipe) of ../shared/data/cifar10's JPEG test split; over the whole split: 81.03 % and 83.20 %
#: (../shared/models/README.md).
ORIGINAL_CORRECT_OF_1000 = {20: 824, 56: 832}


@pytest.mark.parametrize("depth", [20, 56])
def test_original_cifar_resnet_weights_load_and_reproduce_their_accuracy(depth, shared_models, shared_cifar10):
    from gmpq.recipes import Recipe
    from gmpq.train.loaders import build_dataloaders

    file = shared_models / f"resnet{depth}_cifar10.safetensors"
    model = gmpq.create_model(f"resnet{depth}_cifar.orig", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(file))).eval()  # strict: every key, no mapping
    policy = gmpq.uniform_policy(model, 32, 32, kept_bits=32)
    quantized = gmpq.create_model(f"resnet{depth}_cifar", policy=policy)
    quantized.load_state_dict(model.state_dict(), strict=False)
    quantized.eval()
    recipe = Recipe.from_dict({"model": {"arch": f"resnet{depth}_cifar"},
                               "data": {"dataset": "cifar10", "path": str(shared_cifar10), "max_eval_samples": 1000,
                                        "eval_batch_size": 250}})
    correct = 0
    with torch.no_grad():
        for x, y in build_dataloaders(recipe, train=False).eval:
            logits = model(x)
            assert torch.equal(quantized(x), logits)  # 32/32 bits change no logit
            correct += int((logits.argmax(1) == y).sum())
    assert correct == ORIGINAL_CORRECT_OF_1000[depth]
