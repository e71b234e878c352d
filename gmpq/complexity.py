"""Complexity accounting: multiply-accumulates (MACs) per layer and bit operations (BOPs).

For a layer with ``w`` weight bits and ``a`` activation bits, ``BOPs = MACs * w * a`` (float = 32 bits). MACs are
measured by a real forward pass at the deployment resolution with hooks on every Conv2d/Linear:

    conv:   MACs = H_out * W_out * C_out * (C_in / groups) * k_h * k_w
    linear: MACs = (leading elements of the input) * in_features * out_features

Searched-layer BOPs exclude the kept layers (stem, classifier); total BOPs include them.
The search uses :func:`expected_bops`, the differentiable expectation over per-layer bit probabilities (EdMIPS).

Papers count BOPs differently, so a budget only means something with its convention. :data:`BOPS_PRESETS` names
them; a budget is stated in one (``search.bops_preset``) and a searched policy records it
(``provenance.bops_preset``):

* ``searched`` — the searched layers only (kept stem and classifier excluded): gmpq's default and the budgets of
  its paper recipes.
* ``kept8`` — the searched layers plus the kept layers counted at 8/8 bits, whatever bits they run at: the BOPs of
  HAWQ-V3 (its ResNet-18 INT8 row, 116 G, is all 1.814 G MACs x 64) and of OMPQ's code (first and last layers x 64).
* ``all`` — every quantizable layer at the bits it runs at (kept layers at ``model.kept_bits``; 32 = float
  counts 32 x 32, as the float figures of the README's complexity table).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from gmpq.models import default_input_size, kept_layer_names, quantizable_layers
from gmpq.models.structure import layer_kind
from gmpq.quant import FLOAT_BITS, QuantMixin, find_conversion, quantization_bypassed

GIGA = 1e9

BopsPreset = Literal["searched", "kept8", "all"]

#: What each BOPs convention counts (see the module docstring).
BOPS_PRESETS: dict[str, str] = {
    "searched": "searched layers only (kept stem and classifier excluded)",
    "kept8": "searched layers + kept layers counted at 8/8 bits (HAWQ-V3, OMPQ)",
    "all": "every quantizable layer at the bits it runs at (kept layers at their own bits, float = 32)",
}
#: Bits at which the ``kept8`` preset counts kept layers.
KEPT8_BITS = 8


def check_bops_preset(preset: str) -> BopsPreset:
    """``preset`` if it names a BOPs convention of :data:`BOPS_PRESETS`, else ``ValueError``."""
    if preset not in BOPS_PRESETS:
        raise ValueError(f"unknown BOPs preset {preset!r}; choose one of {', '.join(BOPS_PRESETS)}")
    return preset  # type: ignore[return-value]


@dataclass(frozen=True)
class LayerComplexity:
    """One quantizable layer's cost, and what it is.

    ``layer_type`` is the float layer type (for a quantized layer, the type it was made from, e.g. ``Conv2dSame``);
    ``conversion`` what a quantized layer of it computes (:class:`gmpq.quant.Conversion`'s summary), ``None`` for a
    type without a conversion (which :func:`gmpq.quantize` refuses).
    """

    name: str
    kind: str  # "conv", "dwconv" (depthwise), "gconv" (other grouped) or "linear"
    macs: int
    w_bits: int
    a_bits: int
    kept: bool
    layer_type: str = ""
    conversion: str | None = None

    @property
    def bops(self) -> int:
        return self.macs * self.w_bits * self.a_bits


@dataclass(frozen=True)
class BopsReport:
    """Per-layer MACs and bits of a model at one input size, with searched and total BOPs."""

    arch: str
    input_size: int
    layers: list[LayerComplexity]

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def bops_total_g(self) -> float:
        return sum(layer.bops for layer in self.layers) / GIGA

    @property
    def bops_searched_g(self) -> float:
        return sum(layer.bops for layer in self.layers if not layer.kept) / GIGA

    @property
    def bops_kept_g(self) -> float:
        return self.bops_total_g - self.bops_searched_g

    def bops_g(self, preset: BopsPreset) -> float:
        """BOPs (G) under the convention ``preset`` (:data:`BOPS_PRESETS`)."""
        if check_bops_preset(preset) == "searched":
            return self.bops_searched_g
        if preset == "all":
            return self.bops_total_g
        kept_macs = sum(layer.macs for layer in self.layers if layer.kept)
        return self.bops_searched_g + kept_macs * KEPT8_BITS * KEPT8_BITS / GIGA

    def to_dict(self) -> dict:
        return {
            "arch": self.arch, "input_size": self.input_size, "macs": self.macs,
            "bops_total_g": self.bops_total_g, "bops_searched_g": self.bops_searched_g,
            "bops_kept_g": self.bops_kept_g, "bops_presets": {p: self.bops_g(p) for p in BOPS_PRESETS},
            "layers": [asdict(layer) for layer in self.layers],
        }


@torch.no_grad()
def layer_macs(model: nn.Module, input_size: int, in_chans: int = 3) -> dict[str, int]:
    """MACs of every quantizable layer for one ``in_chans x input_size x input_size`` image, by module path.

    Quantizers are bypassed during the trace, so counting never calibrates or changes a quantized model.
    """
    if input_size <= 0:
        raise ValueError(f"input size must be positive, got {input_size}")
    layers = quantizable_layers(model)
    macs: dict[str, int] = {}

    def hook(name: str, module: nn.Module):
        def fn(_m: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            if isinstance(module, nn.Linear):
                macs[name] = macs.get(name, 0) + output.numel() * module.in_features
            else:
                per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
                macs[name] = macs.get(name, 0) + output.numel() * per_output
        return fn

    handles = [m.register_forward_hook(hook(n, m)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, in_chans, input_size, input_size, device=param.device, dtype=param.dtype)
        with quantization_bypassed():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: macs.get(name, 0) for name in layers}


def count_bops(model: nn.Module, input_size: int | None = None, in_chans: int = 3) -> BopsReport:
    """Per-layer MACs and BOPs of ``model`` at ``input_size`` (default: the model's native resolution).

    Bits come from the quantized layers (float layers count 32/32); kept layers are those of the model's policy
    when it has one, else the stem and classifier.
    """
    size = input_size or default_input_size(model)
    policy = getattr(model, "gmpq_policy", None)
    kept = set(policy.kept) if policy is not None else set(kept_layer_names(model))
    macs = layer_macs(model, size, in_chans)
    rows = []
    for name, module in quantizable_layers(model).items():
        w, a = (module.w_bits, module.a_bits) if isinstance(module, QuantMixin) else (FLOAT_BITS, FLOAT_BITS)
        conversion = getattr(module, "conversion", None) or find_conversion(module)
        layer_type = conversion.float_type.__name__ if conversion is not None else type(module).__name__
        rows.append(LayerComplexity(name, layer_kind(module), macs[name], w, a, name in kept, layer_type,
                                    conversion.summary if conversion is not None else None))
    return BopsReport(getattr(model, "gmpq_arch", type(model).__name__), size, rows)


def expected_bops(
    macs: torch.Tensor, w_probs: torch.Tensor, a_probs: torch.Tensor, w_bits: torch.Tensor, a_bits: torch.Tensor,
) -> torch.Tensor:
    """Differentiable expected BOPs in G: sum_l MACs_l * E[b_w,l] * E[b_a,l] / 1e9.

    Args:
        macs: [L] MACs per searched layer (at the deployment resolution).
        w_probs, a_probs: [L, K_w] and [L, K_a] bit probabilities (rows of softmax(alpha)).
        w_bits, a_bits: [K_w] and [K_a] candidate bit widths.
    """
    # elementwise products and sums, not matrix products: autocast leaves them in the probabilities' precision
    expected_w = (w_probs * w_bits.to(w_probs.dtype)).sum(-1)
    expected_a = (a_probs * a_bits.to(a_probs.dtype)).sum(-1)
    return (macs.to(w_probs.dtype) * expected_w * expected_a).sum() / GIGA
