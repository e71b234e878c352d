"""Layer 3 — models: the backbone registry and the quantization adapter (the only code that knows timm)."""

from gmpq.models.adapter import (
    create_model,
    default_input_size,
    kept_layer_names,
    quantizable_layers,
    quantize,
    replace_layers,
    searchable_layer_names,
    uniform_policy,
)
from gmpq.models.registry import BackboneEntry, base_arch, get_backbone, list_backbones, register_backbone

__all__ = [
    "BackboneEntry", "base_arch", "create_model", "default_input_size", "get_backbone", "kept_layer_names",
    "list_backbones", "quantizable_layers", "quantize", "register_backbone", "replace_layers",
    "searchable_layer_names", "uniform_policy",
]
