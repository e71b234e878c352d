"""Mixed-precision (supernet) layers: the EdMIPS composite form with shared weights.

A searched layer holds architecture logits ``alpha_w`` (over its K_w weight candidates) and ``alpha_a`` (over its
K_a activation candidates), one weight step per candidate and output channel, and one activation clip per candidate::

    p_w = softmax(alpha_w),  p_a = softmax(alpha_a)
    x_mix = sum_i p_a,i * Q_a(x; c_i, b_i)          (PACT/LSQ quantizer of gmpq.quant.functional)
    W_mix = sum_j p_w,j * Q_w(T(W); s_j, b_j)       (one shared float weight W)
    y     = op(pad(x_mix), W_mix) + bias            (ONE convolution / matrix product, never K of them)

where ``pad`` and ``T`` are the input padding and weight transform of the float layer type (its
:class:`~gmpq.quant.conversion.Conversion`, e.g. timm's dynamic 'SAME' padding or weight standardisation; none for
a plain ``nn.Conv2d`` / ``nn.Linear``). Since ``Q_a(0) = 0``, ``pad(x_mix)`` is the mixture of the padded input.

With a one-hot ``p`` the layer computes exactly the fixed-bit :class:`~gmpq.quant.QConv2d` /
:class:`~gmpq.quant.QLinear` with that candidate's step and clip (see :meth:`MixedConv2d.to_fixed`).
The forward and backward passes run on the fused kernels of :mod:`gmpq.quant.fused`, which store nothing beyond
the float layer's own input and weight; ``fused = False`` selects the plain autograd form (for reference).

Parameter names follow the fixed-bit layers: ``weight``, ``bias``, ``wq.scale`` ([K_w, C_out]), ``aq.clip``
([K_a]), ``aq.signed``, plus ``alpha_w`` and ``alpha_a``. :func:`gmpq.quant.calibrate` calibrates mixed layers too
(per-candidate MSE-optimal clips and steps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gmpq.quant import functional as QF
from gmpq.quant import fused
from gmpq.quant import quantizers as _quantizers
from gmpq.quant.conversion import (
    PLAIN_CONV2D,
    PLAIN_LINEAR,
    Conversion,
    conversion_for,
    effective_weight,
    pad_input,
)
from gmpq.quant.layers import QConv2d, QLinear
from gmpq.quant.quantizers import ActQuantizer, WeightQuantizer, host_bool, optimal_clip

#: Observed activations each candidate's MSE-optimal clip is searched on (a fixed random subset of them).
_CLIP_SAMPLES = 16384


def check_candidates(bits: Sequence[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated candidate bit widths; each must be an integer in 2..8."""
    cands = tuple(sorted(set(bits)))
    if not cands:
        raise ValueError("candidate bits must not be empty")
    for b in cands:
        if QF.check_bits(b) == QF.FLOAT_BITS:
            raise ValueError("32 (float) is not a searchable candidate bit width; use integers in 2..8")
    return cands


class MixedActQuantizer(ActQuantizer):
    """K activation quantizers sharing one sign mode, each with its own learnable clip (``clip`` has shape [K])."""

    def __init__(self, bits: Sequence[int], device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(QF.FLOAT_BITS, device=device, dtype=dtype)
        self.bits = check_candidates(bits)  # type: ignore[assignment]
        self.clip = nn.Parameter(torch.ones(len(self.bits), device=device, dtype=dtype))

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Fix the sign mode and set every candidate's clip to its MSE-optimal value on the observed inputs (at most
        16384 of them, a fixed random subset)."""
        if not self._samples:
            raise RuntimeError("MixedActQuantizer.finish_calibration() called before any batch was observed")
        values = torch.cat(self._samples)
        if values.numel() > _CLIP_SAMPLES:  # K clip searches: a fixed random subset keeps calibration cheap
            values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:_CLIP_SAMPLES]]
        signed = self._seen_negative
        self.signed.fill_(signed)
        for i, b in enumerate(self.bits):
            self.clip[i] = optimal_clip(values, b, signed)
        self.calibrated.fill_(True)
        self._samples, self._seen_negative, self.observing = [], False, False

    def prepare(self, x: torch.Tensor) -> bool:
        """Calibrate on ``x`` if never calibrated; return False while observing or bypassed (pass ``x`` through)."""
        if _quantizers._BYPASS:
            return False
        if self.observing:
            self.observe(x)
            return False
        if not host_bool(self.calibrated):
            self.observe(x)
            self.finish_calibration()
        return True

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``sum_i probs[i] * Q_a(x; clip[i], bits[i])`` (fused)."""
        if not self.prepare(x):
            return x
        return fused.mixed_activation(x, probs, self.clip, self.bits, host_bool(self.signed))

    def reference(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The same mixture in plain autograd form (K quantizers, all intermediates stored)."""
        signed = host_bool(self.signed)
        return sum(probs[i] * QF.quantize_activation(x, self.clip[i], b, signed) for i, b in enumerate(self.bits))

    def candidate(self, bits: int) -> ActQuantizer:
        """A fixed-bit :class:`ActQuantizer` equal to candidate ``bits`` (clip and sign mode copied)."""
        i = self.bits.index(bits)
        q = ActQuantizer(bits, device=self.clip.device, dtype=self.clip.dtype)
        with torch.no_grad():
            q.clip.copy_(self.clip[i])
        q.signed.copy_(self.signed)
        q.calibrated.copy_(self.calibrated)
        return q

    def extra_repr(self) -> str:
        return f"bits={list(self.bits)}, signed={bool(self.signed)}"


class MixedWeightQuantizer(WeightQuantizer):
    """K symmetric per-channel weight quantizers of one weight, each with its own steps (``scale``: [K, C_out])."""

    def __init__(self, bits: Sequence[int], out_channels: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(QF.FLOAT_BITS, out_channels, device=device, dtype=dtype)
        self.bits = check_candidates(bits)  # type: ignore[assignment]
        self.scale = nn.Parameter(torch.ones(len(self.bits), out_channels, device=device, dtype=dtype))

    @torch.no_grad()
    def init_scale(self, weight: torch.Tensor) -> None:
        """Set every candidate's per-channel step to the MSE-optimal one for ``weight``."""
        flat = weight.detach().reshape(weight.shape[0], -1).float()
        max_abs = flat.abs().amax(dim=1).clamp_min(1e-8)
        for j, b in enumerate(self.bits):
            self.scale[j] = QF.mse_optimal_scale(flat, max_abs, QF.weight_qmax(b)).to(self.scale.dtype)
        self.initialized.fill_(True)

    def forward(self, weight: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``sum_j probs[j] * Q_w(weight; scale[j], bits[j])`` (fused)."""
        if _quantizers._BYPASS:
            return weight
        self.prepare(weight)
        return fused.mixed_weight(weight, probs, self.scale, self.bits)

    def prepare(self, weight: torch.Tensor) -> None:
        """Initialise the steps from ``weight`` on first use."""
        if not host_bool(self.initialized):
            self.init_scale(weight)

    def reference(self, weight: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The same mixture in plain autograd form."""
        return sum(probs[j] * QF.quantize_weight(weight, self.scale[j], b) for j, b in enumerate(self.bits))

    def candidate(self, bits: int) -> WeightQuantizer:
        """A fixed-bit :class:`WeightQuantizer` equal to candidate ``bits``."""
        j = self.bits.index(bits)
        q = WeightQuantizer(bits, self.scale.shape[1], device=self.scale.device, dtype=self.scale.dtype)
        with torch.no_grad():
            q.scale.copy_(self.scale[j])
        q.initialized.copy_(self.initialized)
        return q

    def extra_repr(self) -> str:
        return f"bits={list(self.bits)}"


class MixedMixin:
    """Shared behaviour of mixed layers: architecture logits, probabilities, expected bits, decoding."""

    weight: nn.Parameter
    alpha_w: nn.Parameter
    alpha_a: nn.Parameter
    wq: MixedWeightQuantizer
    aq: MixedActQuantizer
    fused: bool
    conversion: Conversion

    def _init_mixed(self, w_bits: Sequence[int], a_bits: Sequence[int], out_channels: int,
                    conversion: Conversion) -> None:
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.wq = MixedWeightQuantizer(w_bits, out_channels, **factory)
        self.aq = MixedActQuantizer(a_bits, **factory)
        self.alpha_w = nn.Parameter(torch.zeros(len(self.wq.bits), **factory))
        self.alpha_a = nn.Parameter(torch.zeros(len(self.aq.bits), **factory))
        self.fused = True
        self.conversion = conversion

    def effective_weight(self) -> torch.Tensor:
        """``T(W)``: the float weight the operation uses (``weight`` itself for plain layers)."""
        return effective_weight(self)

    @property
    def w_candidates(self) -> tuple[int, ...]:
        return self.wq.bits

    @property
    def a_candidates(self) -> tuple[int, ...]:
        return self.aq.bits

    def probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(softmax(alpha_w), softmax(alpha_a))``."""
        return torch.softmax(self.alpha_w, 0), torch.softmax(self.alpha_a, 0)

    def argmax_bits(self) -> tuple[int, int]:
        """The most probable (weight, activation) bits."""
        return self.wq.bits[int(self.alpha_w.argmax())], self.aq.bits[int(self.alpha_a.argmax())]

    def _observed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight used while activations are observed for calibration: the float ``weight`` (``T(W)``) before
        the steps are initialised (:func:`gmpq.quant.calibrate` sets them right after observing), else the mixed
        weight."""
        if not host_bool(self.wq.initialized):
            return weight
        return self.wq(weight, self.probs()[0])

    def _mixed_operands(self, x: torch.Tensor, weight: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Probabilities after preparing the quantizers on ``x`` and ``weight`` (``T(W)``); ``None`` when the layer
        must pass ``x`` through unquantized."""
        p_w, p_a = self.probs()
        if not self.aq.prepare(x):
            return None
        self.wq.prepare(weight)
        return p_w, p_a, self.aq.clip, self.wq.scale


class MixedConv2d(MixedMixin, nn.Conv2d):
    """``nn.Conv2d`` searching its weight and input-activation bits over candidate bit widths."""

    def __init__(self, *args, w_bits: Sequence[int] = (2, 3, 4, 6), a_bits: Sequence[int] = (2, 3, 4, 6),
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_mixed(w_bits, a_bits, self.out_channels, PLAIN_CONV2D)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: Sequence[int], a_bits: Sequence[int],
                   conversion: Conversion | None = None) -> MixedConv2d:
        """A mixed copy of ``conv`` (weights copied, alphas zero: uniform probabilities), computing what
        ``conversion`` (default: the table's entry for ``type(conv)``) says ``conv`` computes."""
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                w_bits=w_bits, a_bits=a_bits, device=conv.weight.device, dtype=conv.weight.dtype)
        (conversion or conversion_for(conv)).adopt(m, conv)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        if _quantizers._BYPASS:
            return self._conv_forward(pad_input(self, x), weight, self.bias)
        ops = self._mixed_operands(x, weight)
        if ops is None:  # observing for calibration: float activations, mixed weights once their steps are set
            return self._conv_forward(pad_input(self, x), self._observed_weight(weight), self.bias)
        p_w, p_a, clip, scale = ops
        if not self.fused:
            return self._conv_forward(pad_input(self, self.aq.reference(x, p_a)), self.wq.reference(weight, p_w),
                                      self.bias)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return self._conv_forward(pad_input(self, self.aq(x, p_a)), self.wq(weight, p_w), self.bias)
        return fused.mixed_conv2d(pad_input(self, x), weight, self.bias, p_a, clip, p_w, scale, self.aq.bits,
                                  self.wq.bits, host_bool(self.aq.signed), self.stride, self.padding, self.dilation,
                                  self.groups)

    def to_fixed(self, w_bits: int, a_bits: int) -> QConv2d:
        """The fixed-bit :class:`QConv2d` this layer computes when its probabilities are one-hot on (w_bits, a_bits)."""
        q = QConv2d.from_float(self, w_bits, a_bits, self.conversion)
        q.wq = self.wq.candidate(w_bits)
        q.aq = self.aq.candidate(a_bits)
        return q

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={list(self.wq.bits)}, a_bits={list(self.aq.bits)}"


class MixedLinear(MixedMixin, nn.Linear):
    """``nn.Linear`` searching its weight and input-activation bits over candidate bit widths."""

    def __init__(self, *args, w_bits: Sequence[int] = (2, 3, 4, 6), a_bits: Sequence[int] = (2, 3, 4, 6),
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_mixed(w_bits, a_bits, self.out_features, PLAIN_LINEAR)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: Sequence[int], a_bits: Sequence[int],
                   conversion: Conversion | None = None) -> MixedLinear:
        """A mixed copy of ``linear`` (weights copied, alphas zero); see :meth:`MixedConv2d.from_float`."""
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, w_bits=w_bits, a_bits=a_bits,
                device=linear.weight.device, dtype=linear.weight.dtype)
        (conversion or conversion_for(linear)).adopt(m, linear)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight()
        if _quantizers._BYPASS:
            return F.linear(x, weight, self.bias)
        ops = self._mixed_operands(x, weight)
        if ops is None:
            return F.linear(x, self._observed_weight(weight), self.bias)
        p_w, p_a, clip, scale = ops
        if not self.fused:
            return F.linear(self.aq.reference(x, p_a), self.wq.reference(weight, p_w), self.bias)
        return fused.mixed_linear(x, weight, self.bias, p_a, clip, p_w, scale, self.aq.bits, self.wq.bits,
                                  host_bool(self.aq.signed))

    def to_fixed(self, w_bits: int, a_bits: int) -> QLinear:
        """The fixed-bit :class:`QLinear` this layer computes when its probabilities are one-hot on (w_bits, a_bits)."""
        q = QLinear.from_float(self, w_bits, a_bits, self.conversion)
        q.wq = self.wq.candidate(w_bits)
        q.aq = self.aq.candidate(a_bits)
        return q

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={list(self.wq.bits)}, a_bits={list(self.aq.bits)}"


MIXED_TYPES: tuple[type[nn.Module], ...] = (MixedConv2d, MixedLinear)


def to_mixed(module: nn.Module, w_bits: Sequence[int], a_bits: Sequence[int],
             name: str = "") -> MixedConv2d | MixedLinear:
    """The mixed counterpart of float ``module`` (at module path ``name``), by the conversion table; a type without an
    entry raises :class:`~gmpq.errors.ModelError` naming ``name`` and the type."""
    conversion = conversion_for(module, name)
    make = MixedConv2d if conversion.op == "conv2d" else MixedLinear
    return make.from_float(module, w_bits, a_bits, conversion)


def mixed_layers(model: nn.Module) -> dict[str, MixedConv2d | MixedLinear]:
    """Every mixed layer of ``model`` keyed by module path, in order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MIXED_TYPES)}
