"""CIFAR variants of ImageNet architectures, registered in timm's model registry.

Each variant is a timm model (``timm.create_model("resnet18_cifar")``, ``timm.list_models(module="cifar")``) whose
default configuration says 32x32 inputs and CIFAR-10 normalisation. Built from its base architecture with a 3x3
stride-1 stem (and no max-pool for ResNets, a stride-1 second stage for MobileNetV2), it keeps every module path of
the base, so a policy searched on the variant at 32x32 applies to the base at 224x224 and vice versa:
:func:`base_arch` names the base.

With ``pretrained=True`` the base's ImageNet weights are loaded (the replaced ResNet stem is re-initialised).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import timm
from timm.models import generate_default_cfgs, register_model
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_SIZE = 32

#: variant -> (base timm architecture, one-line description).
VARIANTS: dict[str, tuple[str, str]] = {
    "resnet18_cifar": ("resnet18", "ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool (final map 4x4)"),
    "resnet50_cifar": ("resnet50", "ResNet-50 for 32x32 inputs: 3x3 stride-1 stem, no max-pool (final map 4x4)"),
    "mobilenetv2_100_cifar": ("mobilenetv2_100", "MobileNetV2 1.0 for 32x32 inputs: stride-1 stem and second stage "
                                                 "(final map 4x4)"),
    "mobilenetv2_050_cifar": ("mobilenetv2_050", "MobileNetV2 0.5 for 32x32 inputs (28 M MACs, final map 4x4): the "
                                                 "quick-start backbone for CPUs"),
}


def _variant_cfg(base: str, description: str) -> timm.models.PretrainedCfg:
    """The base's configuration (stem and classifier names) at 32x32 with CIFAR-10 normalisation and no weights."""
    cfg = timm.get_pretrained_cfg(base)
    return dataclasses.replace(
        cfg, url="", file=None, state_dict=None, hf_hub_id=None, hf_hub_filename=None, source=None, tag=None,
        input_size=(3, CIFAR_SIZE, CIFAR_SIZE), test_input_size=None, min_input_size=None, crop_pct=1.0,
        test_crop_pct=None, mean=CIFAR_MEAN, std=CIFAR_STD, pool_size=(CIFAR_SIZE // 8, CIFAR_SIZE // 8),
        test_pool_size=None, description=description, origin_url=None, paper_name=None, paper_ids=None,
        notes=(f"base architecture: {base}",))


#: Read by timm's ``register_model`` (the module's ``default_cfgs``, keyed by model name).
default_cfgs = generate_default_cfgs({name: _variant_cfg(base, text) for name, (base, text) in VARIANTS.items()})


def base_arch(name: str) -> str:
    """The timm architecture whose layer names ``name`` keeps: the base of a CIFAR variant, else ``name`` itself."""
    return VARIANTS[name][0] if name in VARIANTS else name


def list_cifar_variants() -> list[str]:
    """The CIFAR variants gmpq registers in timm, sorted."""
    return timm.list_models(module=__name__.rpartition(".")[2])


def _finish(model: nn.Module, name: str) -> nn.Module:
    """Give the variant its own configuration (timm reads input size, normalisation, stem and classifier from it)."""
    model.pretrained_cfg = model.default_cfg = timm.get_pretrained_cfg(name).to_dict()
    return model


def _cifar_stem(model: nn.Module, stem: str) -> None:
    """Replace the conv at path ``stem`` by a 3x3 stride-1 conv with the same channels (re-initialised, on the old
    conv's device and dtype)."""
    parent_name, _, leaf = stem.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old: nn.Conv2d = getattr(parent, leaf)
    setattr(parent, leaf, nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None,
                                    device=old.weight.device, dtype=old.weight.dtype))


def _resnet_cifar(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    model = timm.create_model(base_arch(name), pretrained=pretrained, **kwargs)
    _cifar_stem(model, "conv1")
    model.maxpool = nn.Identity()
    return _finish(model, name)


def _mobilenetv2_cifar(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    model = timm.create_model(base_arch(name), pretrained=pretrained, **kwargs)
    model.conv_stem.stride = (1, 1)
    model.blocks[1][0].conv_dw.stride = (1, 1)
    if not pretrained and isinstance(model.classifier, nn.Linear):
        # timm draws the classifier from U(+-1/sqrt(num_classes)): for 10 classes the initial logits have std ~4 and
        # the first epochs are spent shrinking them. N(0, 0.01) (torchvision's MobileNetV2 init) starts at log(K).
        nn.init.normal_(model.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(model.classifier.bias)
    return _finish(model, name)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool (final map 4x4 at 32x32)."""
    return _resnet_cifar("resnet18_cifar", pretrained, **kwargs)


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 for 32x32 inputs: 3x3 stride-1 stem, no max-pool (final map 4x4 at 32x32)."""
    return _resnet_cifar("resnet50_cifar", pretrained, **kwargs)


@register_model
def mobilenetv2_100_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """MobileNetV2 1.0 for 32x32 inputs: stride-1 stem and stride-1 second stage (final map 4x4 at 32x32)."""
    return _mobilenetv2_cifar("mobilenetv2_100_cifar", pretrained, **kwargs)


@register_model
def mobilenetv2_050_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """MobileNetV2 0.5 for 32x32 inputs (28 M MACs, final map 4x4): the quick-start backbone for CPUs."""
    return _mobilenetv2_cifar("mobilenetv2_050_cifar", pretrained, **kwargs)
