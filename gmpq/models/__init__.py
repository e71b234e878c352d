"""Layer 3 — models: the timm adapter (the only code that knows how timm builds models), gmpq's CIFAR variants in
timm's registry, and the structural role of every quantizable layer."""

from gmpq.models.adapter import (
    ModelDataConfig,
    ModelSignature,
    classifier,
    create_model,
    default_input_size,
    gap_linear_classifier,
    kept_layer_names,
    model_data_config,
    model_signature,
    quantizable_layers,
    quantize,
    replace_layers,
    searchable_layer_names,
    uniform_policy,
)
from gmpq.models.cifar import base_arch, list_cifar_variants

__all__ = [
    "ModelDataConfig", "ModelSignature", "base_arch", "classifier", "create_model", "default_input_size",
    "gap_linear_classifier", "kept_layer_names", "list_cifar_variants", "model_data_config", "model_signature",
    "quantizable_layers", "quantize", "replace_layers", "searchable_layer_names", "uniform_policy",
]
