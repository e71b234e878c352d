"""Layer 1 — the numbers: quantizers, fixed-bit and mixed quantized layers, the conversion table and calibration.
Knows nothing of timm or data."""

from gmpq.quant.calibration import calibrate
from gmpq.quant.conversion import (
    Conversion,
    conversion_for,
    conversions,
    find_conversion,
    fold_weight_transform,
    register_conversion,
)
from gmpq.quant.functional import FLOAT_BITS, check_bits
from gmpq.quant.layers import QUANTIZABLE_TYPES, QConv2d, QLinear, QuantMixin, to_quantized
from gmpq.quant.mixed import MIXED_TYPES, MixedConv2d, MixedLinear, MixedMixin, mixed_layers, to_mixed
from gmpq.quant.quantizers import ActQuantizer, WeightQuantizer, quantization_bypassed

__all__ = [
    "FLOAT_BITS", "MIXED_TYPES", "QUANTIZABLE_TYPES", "ActQuantizer", "Conversion", "MixedConv2d", "MixedLinear",
    "MixedMixin", "QConv2d", "QLinear", "QuantMixin", "WeightQuantizer", "calibrate", "check_bits", "conversion_for",
    "conversions", "find_conversion", "fold_weight_transform", "mixed_layers", "quantization_bypassed",
    "register_conversion", "to_mixed", "to_quantized",
]
