"""The timm adapter: builds models through timm's registry and swaps their Conv2d/Linear layers for quantized ones.

This is the only module that knows how timm builds models: names are resolved by ``timm.is_model`` /
``timm.create_model``; the stem and classifier are read from timm's ``pretrained_cfg`` (``first_conv``,
``classifier``); input size and normalisation come from ``timm.data.resolve_model_data_config``; the head structure
from timm's ``global_pool`` / ``get_classifier`` / ``forward_head`` interface.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import timm
from timm.data import resolve_data_config, resolve_model_data_config
from timm.models import split_model_name_tag
from torch import nn

from gmpq.errors import ModelError, PolicyError
from gmpq.models import timm_layers  # noqa: F401 — registers timm's layer types in the conversion table
from gmpq.models.cifar import base_arch, list_cifar_variants
from gmpq.policy import DEFAULT_KEPT_BITS, LayerBits, Policy, as_policy
from gmpq.quant import QUANTIZABLE_TYPES, check_bits, conversion_for, to_quantized

PolicyLike = Policy | Mapping[str, Any] | str | os.PathLike


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Conv2d`` and ``nn.Linear`` of ``model`` (quantized or not), keyed by module path, in order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES)}


def kept_layer_names(model: nn.Module) -> list[str]:
    """The layers excluded from search by default: the stem conv and the classifier.

    Read from timm's ``pretrained_cfg['first_conv']`` and ``['classifier']``; where a model lacks them, the first
    and the last quantizable layer.
    """
    layers = list(quantizable_layers(model))
    if not layers:
        return []
    cfg = getattr(model, "pretrained_cfg", None) or {}
    kept: list[str] = []
    for key, fallback in (("first_conv", layers[0]), ("classifier", layers[-1])):
        named = cfg.get(key) or []
        found = [n for n in ([named] if isinstance(named, str) else named) if n in layers]
        kept.extend(n for n in found or [fallback] if n not in kept)
    return kept


def searchable_layer_names(model: nn.Module) -> list[str]:
    """The quantizable layers that a search assigns bits to: all but :func:`kept_layer_names`."""
    kept = set(kept_layer_names(model))
    return [n for n in quantizable_layers(model) if n not in kept]


def classifier(model: nn.Module) -> nn.Module:
    """The classifier layer of a timm model (``get_classifier()``)."""
    return model.get_classifier()


def gap_linear_classifier(model: nn.Module) -> nn.Linear | None:
    """The classifier when the model declares its head to be global average pooling + one linear layer, else None.

    Declared by timm's interface: a ``global_pool`` that averages (``pool_type='avg'`` or an ``AdaptiveAvgPool2d``),
    no head dropout, ``forward_features`` / ``forward_head`` and a ``get_classifier()`` that is an ``nn.Linear``
    (float, quantized or mixed). This reads the structure only; callers that rely on it check the behaviour too.
    """
    pool = getattr(model, "global_pool", None)
    if pool is None or not all(hasattr(model, f) for f in ("get_classifier", "forward_features", "forward_head")):
        return None
    avg = isinstance(pool, nn.AdaptiveAvgPool2d) or getattr(pool, "pool_type", None) == "avg"
    if not avg or float(getattr(model, "drop_rate", 0.0) or 0.0) > 0:
        return None
    head = model.get_classifier()
    return head if isinstance(head, nn.Linear) else None


def replace_layers(model: nn.Module, make: Callable[[str, nn.Module], nn.Module], names: list[str]) -> nn.Module:
    """Replace each module at a path in ``names`` by ``make(path, module)``, keeping module paths."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, make(name, getattr(parent, leaf)))
    return model


def uniform_policy(
    model: nn.Module, w_bits: int, a_bits: int, kept_bits: int = DEFAULT_KEPT_BITS, arch: str | None = None,
    input_size: int | None = None,
) -> Policy:
    """A policy giving every searched layer of ``model`` ``w_bits``/``a_bits`` and the kept ones ``kept_bits``."""
    return Policy.uniform(
        arch or getattr(model, "gmpq_arch", type(model).__name__), input_size or default_input_size(model),
        searchable_layer_names(model), kept_layer_names(model), w_bits, a_bits, kept_bits,
    )


def quantize(model: nn.Module, policy: PolicyLike) -> nn.Module:
    """Quantize ``model`` in place with ``policy`` (a :class:`Policy`, dict or JSON path) and return it.

    Every Conv2d/Linear becomes a :class:`~gmpq.quant.QConv2d` / :class:`~gmpq.quant.QLinear` with the policy's
    bits, under the same module path and on the same device and dtype, computing what the float layer computed
    (by the conversion table, :mod:`gmpq.quant.conversion`: timm's 'SAME'-padded and weight-standardised
    convolutions included). The policy must name every quantizable layer exactly once; anything else raises
    :class:`~gmpq.errors.PolicyError`; a layer type without a conversion (or an already quantized layer) raises
    :class:`~gmpq.errors.ModelError` naming the layer and its type, before anything is replaced. The policy is
    attached as ``model.gmpq_policy``.
    """
    source = os.fspath(policy) if isinstance(policy, (str, os.PathLike)) else None
    policy = as_policy(policy)
    layers = quantizable_layers(model)
    try:
        policy.validate_layers(layers)
    except PolicyError as e:
        model_arch = getattr(model, "gmpq_arch", None)
        if model_arch and base_arch(policy.arch) != base_arch(model_arch):
            e = PolicyError(f"the policy was made for {policy.arch!r}, not for {model_arch!r} ({e}); use a policy "
                            f"searched for {model_arch!r} (or an architecture with the same layer names)")
        raise PolicyError(f"{source}: {e}" if source else str(e)) from None
    for name, module in layers.items():  # every layer is convertible before any is replaced
        conversion_for(module, name)
    bits = policy.all_layers()
    replace_layers(model, lambda name, m: to_quantized(m, bits[name].w_bits, bits[name].a_bits, name), list(layers))
    model.gmpq_policy = policy
    return model


@dataclass(frozen=True)
class ModelDataConfig:
    """What the data pipeline takes from a model: native input size and normalisation constants."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def model_data_config(model_or_arch: nn.Module | str) -> ModelDataConfig:
    """Native input size, mean and std of a model (``timm.data.resolve_model_data_config``) or of an architecture
    name (``timm.data.resolve_data_config`` over its registered configuration; no model is built). Names timm has no
    configuration for get timm's defaults (224, ImageNet normalisation)."""
    if isinstance(model_or_arch, nn.Module):
        cfg = resolve_model_data_config(model_or_arch)
    else:
        pretrained = timm.get_pretrained_cfg(model_or_arch) if timm.is_model(model_or_arch) else None
        cfg = resolve_data_config(args={} if pretrained else {"input_size": (3, 224, 224)},
                                  pretrained_cfg=pretrained.to_dict() if pretrained else None)
    return ModelDataConfig(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]))


@dataclass(frozen=True)
class ModelSignature:
    """What rebuilds a network (``create_model(arch, num_classes=, in_chans=)``) and what it is fed."""

    arch: str
    num_classes: int
    in_chans: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def model_signature(model: nn.Module) -> ModelSignature:
    """The :class:`ModelSignature` of a model made by :func:`create_model` (or any timm model)."""
    arch = getattr(model, "gmpq_arch", None) or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise ModelError("cannot tell the model's architecture: create it with gmpq.create_model(name, ...) so that "
                         "it carries gmpq_arch")
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int):
        raise ModelError(f"cannot tell the number of classes of {arch!r}: expected a timm model with num_classes")
    first = next(iter(quantizable_layers(model).values()))
    in_chans = first.in_channels if isinstance(first, nn.Conv2d) else first.in_features
    data = model_data_config(model)
    return ModelSignature(arch, num_classes, in_chans, default_input_size(model), data.mean, data.std)


def default_input_size(model: nn.Module) -> int:
    """The model's native input resolution (``gmpq_input_size``, else :func:`model_data_config`)."""
    size = getattr(model, "gmpq_input_size", None)
    return int(size) if size else model_data_config(model).input_size


def create_model(
    name: str, policy: PolicyLike | None = None, num_classes: int | None = None, pretrained: bool = False,
    kept_bits: int | None = None, **timm_kwargs: Any,
) -> nn.Module:
    """Create a backbone by name, optionally quantized with ``policy`` — gmpq's one front door.

    ``name`` is any timm model name, gmpq's CIFAR variants included (:mod:`gmpq.models.cifar`). Without a policy
    the float model is returned. ``kept_bits`` overrides the bits of the policy's kept layers (32 keeps them float).
    Other keyword arguments go to timm's ``create_model``: e.g. ``device="cuda"`` and ``dtype`` build the model, and
    its quantized layers, there directly.
    The model carries ``gmpq_arch`` and ``gmpq_input_size`` attributes (and ``gmpq_policy`` when quantized).
    """
    if num_classes is not None:
        timm_kwargs["num_classes"] = num_classes
    if ":" not in name and not timm.is_model(name):  # "hf-hub:..." / "local-dir:..." names are timm's to resolve
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ModelError(
            f"unknown architecture {name!r}; use a timm model name (gmpq adds the CIFAR variants "
            f"{', '.join(list_cifar_variants())})" + (f" — did you mean {', '.join(close)}?" if close else ""))
    model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    model.gmpq_arch = name if ":" in name else split_model_name_tag(name)[0]  # the weights' tag is not the network
    model.gmpq_input_size = model_data_config(model).input_size
    if policy is not None:
        if kept_bits is not None:
            try:
                check_bits(kept_bits)
            except ValueError as e:
                raise ModelError(f"kept_bits: {e}") from None
            resolved = as_policy(policy)
            policy = replace(resolved, kept={n: LayerBits(kept_bits, kept_bits) for n in resolved.kept})
        quantize(model, policy)
    return model
