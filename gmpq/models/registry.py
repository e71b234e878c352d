"""The backbone registry: named model builders with their configuration as data, in the manner of timm.

A registered backbone is a function returning an ``nn.Module``, decorated with :func:`register_backbone`. CIFAR
variants of ImageNet architectures (3x3 stride-1 stem, no max-pool) keep every module path of their base arch, so a
policy searched on the variant at 32x32 applies to the base arch at 224x224 and vice versa. Any timm name that is not
registered is built by ``timm.create_model`` directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: its builder and configuration.

    Attributes:
        name: registry name, used by :func:`gmpq.create_model`.
        base: the timm architecture whose module paths it keeps (policies transfer between the two).
        input_size: native input resolution.
        mean / std: input normalisation.
        builder: ``builder(pretrained=..., num_classes=..., **kwargs) -> nn.Module``.
        description: one line for listings.
    """

    name: str
    base: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    builder: Callable[..., nn.Module] = field(repr=False)
    description: str = ""


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(
    name: str | None = None, *, base: str, input_size: int = 224, mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a backbone builder under ``name`` (default: the function's name)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"backbone {key!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[key] = BackboneEntry(key, base, input_size, mean, std, fn, doc[0] if doc else "")
        return fn

    return wrap


def get_backbone(name: str) -> BackboneEntry | None:
    """The registry entry of ``name``, or ``None`` when it is a plain timm name."""
    return _REGISTRY.get(name)


def list_backbones() -> list[str]:
    """Names of the registered backbones, sorted."""
    return sorted(_REGISTRY)


def base_arch(name: str) -> str:
    """The timm architecture whose layer names ``name`` keeps (``name`` itself for unregistered names)."""
    entry = _REGISTRY.get(name)
    return entry.base if entry else name


def _cifar_stem(model: nn.Module, stem: str) -> None:
    """Replace the conv at path ``stem`` by a 3x3 stride-1 conv with the same channels (re-initialised, on the old
    conv's device and dtype)."""
    parent_name, _, leaf = stem.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old: nn.Conv2d = getattr(parent, leaf)
    setattr(parent, leaf, nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None,
                                    device=old.weight.device, dtype=old.weight.dtype))


def _timm(arch: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    return timm.create_model(arch, pretrained=pretrained, **kwargs)


@register_backbone(base="resnet18")
def resnet18(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-18 (timm), ImageNet layout."""
    return _timm("resnet18", pretrained, **kwargs)


@register_backbone(base="resnet50")
def resnet50(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 (timm), ImageNet layout."""
    return _timm("resnet50", pretrained, **kwargs)


@register_backbone(base="mobilenetv2_100")
def mobilenetv2_100(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """MobileNetV2 1.0 (timm), ImageNet layout."""
    return _timm("mobilenetv2_100", pretrained, **kwargs)


def _resnet_cifar(arch: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    model = _timm(arch, pretrained, **kwargs)
    _cifar_stem(model, "conv1")
    model.maxpool = nn.Identity()
    return model


@register_backbone(base="resnet18", input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool (final map 4x4 at 32x32)."""
    return _resnet_cifar("resnet18", pretrained, **kwargs)


@register_backbone(base="resnet50", input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)
def resnet50_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-50 for 32x32 inputs: 3x3 stride-1 stem, no max-pool (final map 4x4 at 32x32)."""
    return _resnet_cifar("resnet50", pretrained, **kwargs)


def _mobilenetv2_cifar(arch: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    model = _timm(arch, pretrained, **kwargs)
    model.conv_stem.stride = (1, 1)
    model.blocks[1][0].conv_dw.stride = (1, 1)
    if not pretrained and isinstance(model.classifier, nn.Linear):
        # timm draws the classifier from U(+-1/sqrt(num_classes)): for 10 classes the initial logits have std ~4 and
        # the first epochs are spent shrinking them. N(0, 0.01) (torchvision's MobileNetV2 init) starts at log(K).
        nn.init.normal_(model.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(model.classifier.bias)
    return model


@register_backbone(base="mobilenetv2_100", input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)
def mobilenetv2_100_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """MobileNetV2 1.0 for 32x32 inputs: stride-1 stem and stride-1 second stage (final map 4x4 at 32x32)."""
    return _mobilenetv2_cifar("mobilenetv2_100", pretrained, **kwargs)


@register_backbone(base="mobilenetv2_050", input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD)
def mobilenetv2_050_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """MobileNetV2 0.5 for 32x32 inputs (28 M MACs, final map 4x4): the quick-start backbone for CPUs."""
    return _mobilenetv2_cifar("mobilenetv2_050", pretrained, **kwargs)
