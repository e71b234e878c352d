"""Fixed-bit quantized layers: drop-in subclasses of ``nn.Conv2d`` and ``nn.Linear``.

A quantized layer computes ``op(pad(Q_a(x)), Q_w(T(W))) + bias`` with one :class:`ActQuantizer` on its input and
one :class:`WeightQuantizer` on its weight, where ``pad`` and ``T`` are the input padding and weight transform of
the float layer type it was made from (its :class:`~gmpq.quant.conversion.Conversion`; none for a plain
``nn.Conv2d`` / ``nn.Linear``). It keeps the float layer's parameter names (``weight``, ``bias``, and e.g. ``gain``),
so a float state dict loads into it, and with 32/32 bits its output equals the float layer's exactly.
Grouped and depthwise convolutions are supported unchanged (the weight quantizer is per output channel).
Quantizers are created on the layer's device and dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gmpq.quant.conversion import (
    PLAIN_CONV2D,
    PLAIN_LINEAR,
    Conversion,
    conversion_for,
    effective_weight,
    pad_input,
)
from gmpq.quant.quantizers import ActQuantizer, WeightQuantizer


class QuantMixin:
    """Shared behaviour of quantized layers: bit widths, the conversion they reproduce, the quantized weight."""

    wq: WeightQuantizer
    aq: ActQuantizer
    weight: nn.Parameter
    conversion: Conversion

    @property
    def w_bits(self) -> int:
        return self.wq.bits

    @property
    def a_bits(self) -> int:
        return self.aq.bits

    def effective_weight(self) -> torch.Tensor:
        """``T(W)``: the float weight the operation uses (``weight`` itself for plain layers)."""
        return effective_weight(self)

    def quantized_weight(self) -> torch.Tensor:
        """``Q_w(T(W))``."""
        return self.wq(self.effective_weight())


class QConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with ``w_bits``-bit weights and ``a_bits``-bit input activations."""

    def __init__(self, *args, w_bits: int = 32, a_bits: int = 32, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.wq = WeightQuantizer(w_bits, self.out_channels, **factory)
        self.aq = ActQuantizer(a_bits, **factory)
        self.conversion = PLAIN_CONV2D

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, conversion: Conversion | None = None) -> QConv2d:
        """A quantized copy of ``conv`` sharing nothing with it, computing what ``conversion`` (default: the table's
        entry for ``type(conv)``) says ``conv`` computes. ``conv`` may also be a quantized layer made from such a
        layer, with its ``conversion`` passed."""
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            w_bits=w_bits, a_bits=a_bits, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        (conversion or conversion_for(conv)).adopt(q, conv)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(pad_input(self, self.aq(x)), self.quantized_weight(), self.bias)


class QLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with ``w_bits``-bit weights and ``a_bits``-bit input activations."""

    def __init__(self, *args, w_bits: int = 32, a_bits: int = 32, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.wq = WeightQuantizer(w_bits, self.out_features, **factory)
        self.aq = ActQuantizer(a_bits, **factory)
        self.conversion = PLAIN_LINEAR

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int,
                   conversion: Conversion | None = None) -> QLinear:
        """A quantized copy of ``linear`` (weights are copied); see :meth:`QConv2d.from_float`."""
        q = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            w_bits=w_bits, a_bits=a_bits, device=linear.weight.device, dtype=linear.weight.dtype,
        )
        (conversion or conversion_for(linear)).adopt(q, linear)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.aq(x), self.quantized_weight(), self.bias)


QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def to_quantized(module: nn.Module, w_bits: int, a_bits: int, name: str = "") -> QConv2d | QLinear:
    """The fixed-bit quantized counterpart of float ``module`` (at module path ``name``), by the conversion table;
    a type without an entry raises :class:`~gmpq.errors.ModelError` naming ``name`` and the type."""
    conversion = conversion_for(module, name)
    make = QConv2d if conversion.op == "conv2d" else QLinear
    return make.from_float(module, w_bits, a_bits, conversion)
