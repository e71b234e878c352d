"""The conversion table: how a quantized layer reproduces what each float layer type computes.

Every float layer gmpq quantizes computes, for some input padding ``pad`` done outside the operation, a weight
transform ``T`` and an operation ``op`` (a 2-D convolution with the layer's own stride, padding, dilation and groups,
or a matrix product)::

    y = op(pad(x), T(W)) + b

e.g. ``nn.Conv2d``: no ``pad``, ``T`` the identity; timm's ``Conv2dSame``: ``pad`` the TensorFlow 'SAME' padding
computed from the input size; timm's ``StdConv2d``: ``T`` the weight standardisation
``T(W)[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)``. Its quantized counterparts — the fixed-bit
:class:`~gmpq.quant.QConv2d` / :class:`~gmpq.quant.QLinear` and the mixed :class:`~gmpq.quant.MixedConv2d` /
:class:`~gmpq.quant.MixedLinear` — compute::

    y = op(pad(Q_a(x)), Q_w(T(W))) + b

so that the weight quantizer sees the weight the float layer really uses, and the activation quantizer the real
input (``Q_a(0) = 0`` in both sign modes, so quantizing before or after zero padding is the same; calibration
observes the unpadded input). With 32/32 bits both quantizers are identities and the quantized layer computes
exactly the float one.

The table is keyed by the **exact** layer type: a subclass of ``nn.Conv2d`` / ``nn.Linear`` may change what its
forward computes, so it is never treated as its base class. :func:`conversion_for` refuses a type without an entry
with a :class:`~gmpq.errors.ModelError` naming the layer and its type (gmpq's documented choice: refuse rather than
keep a layer float behind the user's back or quantize it into a different network). Entries for ``nn.Conv2d`` and
``nn.Linear`` live here; :mod:`gmpq.models.timm_layers` registers timm's subclasses, and
:func:`register_conversion` lets a user add their own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from gmpq.errors import ModelError

Op = Literal["conv2d", "linear"]
#: ``pad(layer, x) -> x``: the input padding a layer does outside its operation.
PadFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
#: ``transform(layer, W) -> T(W)``: the weight the layer's operation uses.
WeightFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Conversion:
    """How layers of one exact float type compute, in the terms a quantized layer reproduces.

    Attributes:
        float_type: the float layer type (exact; subclasses need their own entry).
        op: ``conv2d`` (the layer is an ``nn.Conv2d``) or ``linear`` (an ``nn.Linear``).
        summary: what the float forward computes, in a few words (shown by ``gmpq layers``).
        pad: input padding done outside the operation, or ``None``.
        weight: the weight transform ``T``, or ``None`` (identity).
        attributes: plain attributes of the float layer that ``pad`` / ``weight`` read (copied to the quantized
            layer, e.g. ``eps``).
        parameters: parameters of the float layer beyond ``weight`` and ``bias`` that ``weight`` reads (copied, and
            trained, e.g. a per-channel ``gain``). Folding the transform into the weight removes them.
    """

    float_type: type[nn.Module]
    op: Op
    summary: str
    pad: PadFn | None = None
    weight: WeightFn | None = None
    attributes: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        base = nn.Conv2d if self.op == "conv2d" else nn.Linear
        if self.op not in ("conv2d", "linear") or not issubclass(self.float_type, base):
            raise ValueError(f"a {self.op!r} conversion needs a subclass of {base.__name__}, got "
                             f"{self.float_type.__name__}")
        if self.op == "linear" and self.pad is not None:
            raise ValueError("a linear conversion has no input padding")

    def adopt(self, layer: nn.Module, source: nn.Module) -> None:
        """Make the new quantized ``layer`` compute like ``source`` (a float layer of this type, or a quantized layer
        made from one): record this conversion, copy ``weight`` and ``bias``, and copy the attributes and extra
        parameters the conversion reads (nothing is shared with ``source``)."""
        layer.conversion = self
        with torch.no_grad():
            layer.weight.copy_(source.weight)
            if source.bias is not None:
                layer.bias.copy_(source.bias)
        for name in self.attributes:
            value = getattr(source, name)
            setattr(layer, name, copy.deepcopy(value) if isinstance(value, nn.Module) else value)
        for name in self.parameters:
            value = getattr(source, name)
            layer.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad))

    def folded(self) -> Conversion:
        """This conversion once its weight transform is folded into the weight (see :func:`fold_weight_transform`)."""
        return Conversion(self.float_type, self.op, f"{self.summary} (transform folded into the weight)", self.pad,
                          None, self.attributes, ())


#: The conversions of the two plain types, which every quantized layer uses unless it adopts another.
PLAIN_CONV2D = Conversion(nn.Conv2d, "conv2d", "conv2d")
PLAIN_LINEAR = Conversion(nn.Linear, "linear", "linear")

_TABLE: dict[type[nn.Module], Conversion] = {nn.Conv2d: PLAIN_CONV2D, nn.Linear: PLAIN_LINEAR}


def register_conversion(conversion: Conversion) -> Conversion:
    """Add ``conversion`` to the table under its exact ``float_type`` (replacing any entry of that type)."""
    _TABLE[conversion.float_type] = conversion
    return conversion


def conversions() -> dict[type[nn.Module], Conversion]:
    """A copy of the table: exact float type -> :class:`Conversion`."""
    return dict(_TABLE)


def find_conversion(module: nn.Module) -> Conversion | None:
    """The entry of ``type(module)`` exactly, or ``None``."""
    return _TABLE.get(type(module))


def conversion_for(module: nn.Module, name: str = "") -> Conversion:
    """The entry of ``type(module)``; a type without one raises :class:`~gmpq.errors.ModelError` naming the layer
    ``name``, its type and the way out."""
    entry = find_conversion(module)
    if entry is not None:
        return entry
    kind = type(module)
    where = f"layer {name!r}" if name else "the layer"
    if hasattr(module, "conversion") and hasattr(module, "wq"):
        raise ModelError(f"{where} is already quantized ({kind.__name__}); quantize a float model")
    base = "nn.Conv2d" if isinstance(module, nn.Conv2d) else "nn.Linear"
    raise ModelError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, a subclass of {base} that gmpq has no conversion for "
        f"(its forward may compute something else than {base}'s, so gmpq does not quantize it as one); supported "
        f"types: {', '.join(sorted(t.__name__ for t in _TABLE))}. Register one with "
        "gmpq.quant.register_conversion, or replace the layer by a supported type")


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """``T(W)``: the weight a quantized ``layer``'s operation uses before quantization.

    Without autograd the transformed weight is kept on the layer for as long as the tensors it is computed from
    (``weight`` and the conversion's parameters) keep their storage and in-place version: an evaluation transforms
    each weight once, and the weight quantizer, which keeps its result for an unchanged input tensor, sees the same
    tensor until a source changes (a new one is made while the old one is still held, so it never takes its place in
    memory).
    """
    conversion: Conversion = layer.conversion
    if conversion.weight is None:
        return layer.weight
    sources = [layer.weight, *(getattr(layer, name) for name in conversion.parameters)]
    if torch.is_grad_enabled() or any(t.is_inference() for t in sources):
        return conversion.weight(layer, layer.weight)
    key = (conversion, *((t.data_ptr(), t._version) for t in sources))
    kept = layer.__dict__.get("_gmpq_effective_weight")
    if kept is None or kept[0] != key:
        kept = (key, conversion.weight(layer, layer.weight))
        layer.__dict__["_gmpq_effective_weight"] = kept
    return kept[1]


def pad_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``pad(x)``: the input padding a quantized ``layer`` does outside its operation (identity for most types)."""
    pad = layer.conversion.pad
    return x if pad is None else pad(layer, x)


@torch.no_grad()
def fold_weight_transform(layer: nn.Module) -> list[str]:
    """Replace ``layer.weight`` by ``T(W)`` and drop the transform and its parameters, in place; the layer then
    computes the same with a plain weight (the form an export stores). Returns the removed parameter names."""
    conversion: Conversion = layer.conversion
    if conversion.weight is None:
        return []
    layer.weight.copy_(effective_weight(layer))
    for name in conversion.parameters:
        delattr(layer, name)
    layer.conversion = conversion.folded()
    return list(conversion.parameters)

