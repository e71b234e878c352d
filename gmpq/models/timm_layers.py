"""timm's own subclasses of ``nn.Conv2d`` and ``nn.Linear`` in gmpq's conversion table.

Each entry states what the timm layer's forward computes as ``op(pad(x), T(W)) + b`` (see
:mod:`gmpq.quant.conversion`), with the same functions and arguments as timm's forward, so that a quantized layer at
32/32 bits computes exactly what the float one does:

================================  ============================================  ======================================
timm type                         pad (outside the convolution)                 T (weight transform)
================================  ============================================  ======================================
``Conv2dSame``                    TF 'SAME' padding from the input size          identity
``Conv2dSameExport``              TF 'SAME' padding fixed at the first input     identity
``StdConv2d``                     none                                           standardisation per output channel
``StdConv2dSame``                 TF 'SAME' padding if ``same_pad``              standardisation per output channel
``ScaledStdConv2d``               none                                           scaled standardisation, gain ``g``
``ScaledStdConv2dSame``           TF 'SAME' padding if ``same_pad``              scaled standardisation, gain ``g``
``Linear``                        —                                              identity (differs only in TorchScript)
================================  ============================================  ======================================

Standardisation: ``T(W)[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)`` over the ``C_in/groups * k_h * k_w``
weights of output channel ``o`` (biased variance); scaled: ``T(W)[o] * g[o] * gamma / sqrt(fan_in)``
(``scale = gamma / sqrt(fan_in)`` is a constant of the layer, ``g`` a learnable parameter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.linear import Linear as TimmLinear
from timm.layers.padding import pad_same, pad_same_arg
from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn

from gmpq.quant.conversion import Conversion, register_conversion


def same_pad(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """TensorFlow 'SAME' padding of ``x`` for ``layer``'s kernel, stride and dilation (``Conv2dSame``)."""
    return pad_same(x, layer.kernel_size, layer.stride, layer.dilation)


def same_pad_if_dynamic(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """:func:`same_pad` where timm decided at construction that 'SAME' needs dynamic padding (``layer.same_pad``)."""
    return same_pad(layer, x) if layer.same_pad else x


def same_pad_fixed_at_first_input(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``Conv2dSameExport``'s padding: 'SAME' for the first input size seen, then fixed (a ``ZeroPad2d``)."""
    if layer.pad is None:
        layer.pad = nn.ZeroPad2d(pad_same_arg(x.size()[-2:], layer.weight.size()[-2:], layer.stride, layer.dilation))
        layer.pad_input_size = x.size()[-2:]
    return layer.pad(x)


def standardized(layer: nn.Conv2d, weight: torch.Tensor) -> torch.Tensor:
    """Weight standardisation per output channel (``StdConv2d``)."""
    return F.batch_norm(weight.reshape(1, layer.out_channels, -1), None, None, training=True, momentum=0.0,
                        eps=layer.eps).reshape_as(weight)


def scaled_standardized(layer: nn.Conv2d, weight: torch.Tensor) -> torch.Tensor:
    """Scaled weight standardisation with the learnable per-channel gain (``ScaledStdConv2d``)."""
    return F.batch_norm(weight.reshape(1, layer.out_channels, -1), None, None,
                        weight=(layer.gain * layer.scale).view(-1), training=True, momentum=0.0,
                        eps=layer.eps).reshape_as(weight)


TIMM_CONVERSIONS: tuple[Conversion, ...] = (
    Conversion(Conv2dSame, "conv2d", "conv2d, TF 'SAME' padding", pad=same_pad),
    Conversion(Conv2dSameExport, "conv2d", "conv2d, TF 'SAME' padding fixed at the first input",
               pad=same_pad_fixed_at_first_input, attributes=("pad", "pad_input_size")),
    Conversion(StdConv2d, "conv2d", "conv2d, standardised weight", weight=standardized, attributes=("eps",)),
    Conversion(StdConv2dSame, "conv2d", "conv2d, standardised weight, TF 'SAME' padding", pad=same_pad_if_dynamic,
               weight=standardized, attributes=("eps", "same_pad")),
    Conversion(ScaledStdConv2d, "conv2d", "conv2d, scaled standardised weight", weight=scaled_standardized,
               attributes=("eps", "scale"), parameters=("gain",)),
    Conversion(ScaledStdConv2dSame, "conv2d", "conv2d, scaled standardised weight, TF 'SAME' padding",
               pad=same_pad_if_dynamic, weight=scaled_standardized, attributes=("eps", "scale", "same_pad"),
               parameters=("gain",)),
    Conversion(TimmLinear, "linear", "linear"),
)

for _conversion in TIMM_CONVERSIONS:
    register_conversion(_conversion)
