"""Fixed-bit quantized layers: drop-in subclasses of ``nn.Conv2d`` and ``nn.Linear``.

A quantized layer computes ``op(Q_a(x), Q_w(W)) + bias`` with one :class:`ActQuantizer` on its input and one
:class:`WeightQuantizer` on its weight. It keeps the float layer's parameter names (``weight``, ``bias``), so a
float state dict loads into it, and with 32/32 bits its output equals the float layer's exactly.
Grouped and depthwise convolutions are supported unchanged (the weight quantizer is per output channel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gmpq.quant.quantizers import ActQuantizer, WeightQuantizer


class QuantMixin:
    """Shared behaviour of quantized layers: bit widths and the quantized weight."""

    wq: WeightQuantizer
    aq: ActQuantizer
    weight: nn.Parameter

    @property
    def w_bits(self) -> int:
        return self.wq.bits

    @property
    def a_bits(self) -> int:
        return self.aq.bits

    def quantized_weight(self) -> torch.Tensor:
        return self.wq(self.weight)


class QConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with ``w_bits``-bit weights and ``a_bits``-bit input activations."""

    def __init__(self, *args, w_bits: int = 32, a_bits: int = 32, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.wq = WeightQuantizer(w_bits, self.out_channels)
        self.aq = ActQuantizer(a_bits)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int) -> QConv2d:
        """A quantized copy of ``conv`` sharing nothing with it (weights are copied)."""
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            w_bits=w_bits, a_bits=a_bits, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        q.load_state_dict(conv.state_dict(), strict=False)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.aq(x), self.quantized_weight(), self.bias)


class QLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with ``w_bits``-bit weights and ``a_bits``-bit input activations."""

    def __init__(self, *args, w_bits: int = 32, a_bits: int = 32, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.wq = WeightQuantizer(w_bits, self.out_features)
        self.aq = ActQuantizer(a_bits)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int) -> QLinear:
        """A quantized copy of ``linear`` (weights are copied)."""
        q = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            w_bits=w_bits, a_bits=a_bits, device=linear.weight.device, dtype=linear.weight.dtype,
        )
        q.load_state_dict(linear.state_dict(), strict=False)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.aq(x), self.quantized_weight(), self.bias)


QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def to_quantized(module: nn.Module, w_bits: int, a_bits: int) -> nn.Module:
    """The fixed-bit quantized counterpart of a float ``nn.Conv2d`` or ``nn.Linear``."""
    if isinstance(module, nn.Conv2d):
        return QConv2d.from_float(module, w_bits, a_bits)
    if isinstance(module, nn.Linear):
        return QLinear.from_float(module, w_bits, a_bits)
    raise TypeError(f"cannot quantize a {type(module).__name__}; only nn.Conv2d and nn.Linear are quantizable")
