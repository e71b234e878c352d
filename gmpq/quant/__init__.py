"""Layer 1 — the numbers: quantizers, fixed-bit quantized layers and calibration. Knows nothing of timm or data."""

from gmpq.quant.calibration import calibrate
from gmpq.quant.functional import FLOAT_BITS, check_bits
from gmpq.quant.layers import QUANTIZABLE_TYPES, QConv2d, QLinear, QuantMixin, to_quantized
from gmpq.quant.quantizers import ActQuantizer, WeightQuantizer, quantization_bypassed

__all__ = [
    "FLOAT_BITS", "QUANTIZABLE_TYPES", "ActQuantizer", "QConv2d", "QLinear", "QuantMixin", "WeightQuantizer",
    "calibrate", "check_bits", "quantization_bypassed", "to_quantized",
]
