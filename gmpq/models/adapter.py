"""The quantization adapter: swaps the Conv2d/Linear layers of any timm CNN for quantized ones, in place.

This is the only module that knows how timm lays models out: the stem and classifier are read from timm's
``pretrained_cfg`` (``first_conv``, ``classifier``), the convention every timm model follows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import timm
from torch import nn

from gmpq.errors import ModelError, PolicyError
from gmpq.models import timm_layers  # noqa: F401 — registers timm's layer types in the conversion table
from gmpq.models.registry import base_arch, get_backbone, list_backbones
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


def default_input_size(model: nn.Module) -> int:
    """The model's native input resolution: gmpq's registry entry, else timm's ``pretrained_cfg``, else 224."""
    size = getattr(model, "gmpq_input_size", None)
    if size:
        return int(size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def create_model(
    name: str, policy: PolicyLike | None = None, num_classes: int | None = None, pretrained: bool = False,
    kept_bits: int | None = None, **timm_kwargs: Any,
) -> nn.Module:
    """Create a backbone by name, optionally quantized with ``policy`` — gmpq's one front door.

    ``name`` is a registered backbone (see ``gmpq.list_backbones()``) or any timm model name. Without a policy the
    float model is returned. ``kept_bits`` overrides the bits of the policy's kept layers (32 keeps them float).
    Other keyword arguments go to timm's ``create_model``: e.g. ``device="cuda"`` and ``dtype`` build the model, and
    its quantized layers, there directly.
    The model carries ``gmpq_arch`` and ``gmpq_input_size`` attributes (and ``gmpq_policy`` when quantized).
    """
    if num_classes is not None:
        timm_kwargs["num_classes"] = num_classes
    entry = get_backbone(name)
    try:
        if entry is not None:
            model = entry.builder(pretrained=pretrained, **timm_kwargs)
        else:
            model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        import difflib

        close = difflib.get_close_matches(name, list(dict.fromkeys(list_backbones() + timm.list_models())), n=3)
        raise ModelError(
            f"unknown architecture {name!r}; use a registered backbone ({', '.join(list_backbones())}) or a timm "
            f"model name" + (f" — did you mean {', '.join(close)}?" if close else "")
        ) from None
    model.gmpq_arch = name
    model.gmpq_input_size = entry.input_size if entry else default_input_size(model)
    if entry is not None:
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "mean": entry.mean, "std": entry.std,
                                "input_size": (3, entry.input_size, entry.input_size)}
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
