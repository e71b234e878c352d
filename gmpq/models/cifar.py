"""gmpq's CIFAR models in timm's model registry: the CIFAR ResNets, and CIFAR variants of ImageNet architectures.

The CIFAR ResNets (``resnet20_cifar`` ... ``resnet110_cifar``, :mod:`gmpq.models.resnet_cifar`) are native 32x32
networks with their own pretrained configurations: ``resnet20_cifar`` (default tag ``jpeg_ft``) loads the
JPEG-adapted weights shipped in ``gmpq/models/weights``; the ``orig`` tags take the original CIFAR-10 weights from a
local file, ``pretrained_cfg_overlay=dict(file=...)`` (timm's way; nothing is downloaded).

Each variant of an ImageNet architecture is a timm model (``timm.create_model("resnet18_cifar")``, ``timm.list_models(module="cifar")``) whose
default configuration says 32x32 inputs and CIFAR-10 normalisation. Built from its base architecture with a 3x3
stride-1 stem (and no max-pool for ResNets, a stride-1 second stage for MobileNetV2), it keeps every module path of
the base, so a policy searched on the variant at 32x32 applies to the base at 224x224 and vice versa:
:func:`base_arch` names the base.

With ``pretrained=True`` the base's ImageNet weights are loaded (the replaced ResNet stem is re-initialised).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import nn

from gmpq.errors import ModelError
from gmpq.models.resnet_cifar import CifarResNet

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_SIZE = 32

#: Normalisation of the CIFAR ResNets' published weights (ImageNet's constants, as they were trained).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The weights shipped inside the package (each with its license notice and a README saying how it was made).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: The license notice that must travel with every copy of these pretrained weights and of models made from them.
WEIGHT_NOTICES = {name: WEIGHTS_DIR / "LICENSE-resnet-cifar10.txt"
                  for name in ("resnet20_cifar.jpeg_ft", "resnet20_cifar.orig", "resnet56_cifar.orig")}
#: CIFAR ResNet depth -> one-line description.
RESNET_DEPTHS = {20: "0.27 M params, 40.6 M MACs", 32: "0.46 M params, 68.9 M MACs", 44: "0.66 M params, 97.2 M MACs",
                 56: "0.85 M params, 125.5 M MACs", 110: "1.73 M params, 252.9 M MACs"}

#: variant -> (base timm architecture, one-line description).
VARIANTS: dict[str, tuple[str, str]] = {
    "resnet18_cifar": ("resnet18", "ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool (final map 4x4)"),
    "resnet50_cifar": ("resnet50", "ResNet-50 for 32x32 inputs: 3x3 stride-1 stem, no max-pool (final map 4x4)"),
    "mobilenetv2_100_cifar": ("mobilenetv2_100", "MobileNetV2 1.0 for 32x32 inputs: stride-1 stem and second stage "
                                                 "(final map 4x4)"),
    "mobilenetv2_050_cifar": ("mobilenetv2_050", "MobileNetV2 0.5 for 32x32 inputs (28 M MACs, final map 4x4): the "
                                                 "quick-start backbone for CPUs"),
}
RESNET_NAMES = {f"resnet{d}_cifar" for d in RESNET_DEPTHS}
VARIANTS.update({f"resnet{d}_cifar": (f"resnet{d}_cifar", f"ResNet-{d} of He et al. for CIFAR (option-A shortcuts, "
                                                          f"{text})") for d, text in RESNET_DEPTHS.items()})


def _variant_cfg(base: str, description: str) -> timm.models.PretrainedCfg:
    """The base's configuration (stem and classifier names) at 32x32 with CIFAR-10 normalisation and no weights."""
    cfg = timm.get_pretrained_cfg(base)
    return dataclasses.replace(
        cfg, url="", file=None, state_dict=None, hf_hub_id=None, hf_hub_filename=None, source=None, tag=None,
        input_size=(3, CIFAR_SIZE, CIFAR_SIZE), test_input_size=None, min_input_size=None, crop_pct=1.0,
        test_crop_pct=None, mean=CIFAR_MEAN, std=CIFAR_STD, pool_size=(CIFAR_SIZE // 8, CIFAR_SIZE // 8),
        test_pool_size=None, description=description, origin_url=None, paper_name=None, paper_ids=None,
        notes=(f"base architecture: {base}",))


_ORIG_NOTE = ("trained on the original CIFAR-10 pixels by Yerlan Idelbayev (akamaster/pytorch_resnet_cifar10, "
              "BSD-2-Clause); pass the file: pretrained_cfg_overlay=dict(file=...)")


def _resnet_cfg(depth: int, **kwargs: Any) -> dict[str, Any]:
    """A CIFAR ResNet's pretrained configuration: 32x32, ImageNet normalisation, stem ``conv1``, head ``linear``."""
    return dict(num_classes=10, input_size=(3, CIFAR_SIZE, CIFAR_SIZE), pool_size=(8, 8), crop_pct=1.0,
                interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="conv1",
                classifier="linear", description=f"ResNet-{depth} for CIFAR (He et al. 2016, option-A shortcuts)",
                paper_ids="arXiv:1512.03385", **kwargs)


_RESNET_CFGS = {f"resnet{d}_cifar": _resnet_cfg(d) for d in RESNET_DEPTHS if d not in (20, 56)}
_RESNET_CFGS.update({
    "resnet20_cifar.jpeg_ft": _resnet_cfg(
        20, file=str(WEIGHTS_DIR / "resnet20_cifar_jpeg.safetensors"), license="bsd-2-clause",
        notes=("the original CIFAR-10 weights fine-tuned on CIFAR-10 stored as JPEG q75 (gmpq's data); "
               "see gmpq/models/weights/README.md",)),
    "resnet20_cifar.orig": _resnet_cfg(20, license="bsd-2-clause", notes=(_ORIG_NOTE,)),
    "resnet56_cifar.orig": _resnet_cfg(56, license="bsd-2-clause", notes=(_ORIG_NOTE,)),
})

#: Read by timm's ``register_model`` (the module's ``default_cfgs``, keyed by model name).
default_cfgs = generate_default_cfgs(
    {name: _variant_cfg(base, text) for name, (base, text) in VARIANTS.items() if name not in RESNET_NAMES}
    | _RESNET_CFGS)


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


def _cifar_resnet(name: str, depth: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    """Build a :class:`~gmpq.models.resnet_cifar.CifarResNet` through timm's builder (which loads the weights its
    pretrained configuration points at); a configuration without weights is refused rather than left random."""
    cfg = resolve_pretrained_cfg(name, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay")).to_dict()
    if pretrained and not any(cfg.get(k) for k in ("file", "url", "hf_hub_id", "state_dict")):
        tag = cfg.get("tag")
        raise ModelError(f"{name}{'.' + tag if tag else ''} has no weights of its own: pass the file of the original "
                         f"CIFAR-10 weights, create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file="
                         f"'.../{name.replace('_cifar', '')}_cifar10.safetensors')), or use pretrained=False")
    return build_model_with_cfg(CifarResNet, name, pretrained, depth=depth, **kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-20 for CIFAR (option-A shortcuts); ``pretrained=True`` loads the shipped JPEG-adapted weights."""
    return _cifar_resnet("resnet20_cifar", 20, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-32 for CIFAR (option-A shortcuts); no weights."""
    return _cifar_resnet("resnet32_cifar", 32, pretrained, **kwargs)


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-44 for CIFAR (option-A shortcuts); no weights."""
    return _cifar_resnet("resnet44_cifar", 44, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-56 for CIFAR (option-A shortcuts); ``pretrained=True`` with the original weights' file."""
    return _cifar_resnet("resnet56_cifar", 56, pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-110 for CIFAR (option-A shortcuts); no weights."""
    return _cifar_resnet("resnet110_cifar", 110, pretrained, **kwargs)
