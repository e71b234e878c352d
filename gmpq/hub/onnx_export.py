"""Export a gmpq quantized model to ONNX: integer weights and QuantizeLinear/DequantizeLinear (QDQ) activations.

``export_onnx(model, path)`` writes a graph that computes what the model's forward computes, in the form the
deployment runtimes read (ONNX Runtime, TensorRT, OpenVINO). A gmpq quantized layer computes
``op(Q_a(x), Q_w(W)) + bias`` (:mod:`gmpq.quant.functional`); in the graph:

**Weights.** ``Q_w(W) = s * q`` with integer codes ``q`` in ``[-Q_p, Q_p]`` (``Q_p = 2^(b-1) - 1``) and one step
``s`` per output channel. The graph stores ``q`` as an initializer of the storage type (below) and ``s`` as a float32
vector, and feeds ``DequantizeLinear(q, s, 0, axis=output channel)`` to the Conv/Gemm. A BatchNormalization right
after the layer is folded into it (``W' = g * W_q``, ``b' = g * (b - mu) + beta``, ``g = gamma / sqrt(var + eps)``
per output channel): folding keeps the codes and multiplies the step, ``s' = g * s`` (the codes of a channel with
``g < 0`` are negated, so that every step stays positive). The export checks that every exported weight equals
``s' * q`` to float rounding.

**Activations.** ``Q_a(x) = c/n * round(clamp(x, lo, c) * n/c)`` with the calibrated clip ``c``, ``lo = 0`` and
``n = 2^b - 1`` for an unsigned input, ``lo = -c`` and ``n = 2^(b-1) - 1`` for a signed one. In the graph:
``DequantizeLinear(QuantizeLinear(x, c/n, 0), c/n, 0)``; both ONNX operators round half to even, like
``torch.round``. QuantizeLinear saturates to its storage type's range, so where gmpq's code range (``[0, n]`` or
``[-n, n]``) is narrower, the input is bounded to ``[lo, c]`` first, by ``Max(x, -c)`` (signed) and ``Min(x, c)``:
for signed inputs (``[-n, n]`` lacks the type's most negative code), for unsigned inputs with fewer bits than their
storage type, and for every 4-bit input (ONNX Runtime's CPU provider, up to at least 1.32, fails to load a graph
where a Clip — such as ReLU6 — feeds a 4-bit QuantizeLinear, and the bound keeps them apart). Max/Min rather than
Clip, for the same reason.

**Parity.** The graph computes gmpq's quantized values bit for bit except at rounding ties: QuantizeLinear divides
by the step, ``x / (c/n)``, where gmpq multiplies by its inverse, ``x * (n/c)``, and ONNX Runtime's float32
convolutions (and the folded BatchNorm) sum and scale in another order than PyTorch's. Where a value lies within a
float32 ulp of a rounding tie the two can round to neighbouring codes, and in low-bit networks such a one-step
difference propagates to later layers; :func:`gmpq.hub.onnx_runtime.onnx_parity` measures the effect on the
predictions.

**Storage types.** 5-8 bits: INT8 weights, UINT8/INT8 activations. <= 4 bits: INT4 weights and UINT4/INT4
activations (ONNX opset 21, which ONNX Runtime's CPU provider runs), or, with ``low_bit_storage="int8"`` (any
opset), the 8-bit types holding the narrower code range. What each layer got is in the graph's metadata.

The graph has a dynamic batch dimension and a fixed input resolution (``input_size``). Its ``metadata_props`` hold
the policy JSON (``gmpq.policy``), each layer's bits and storage (``gmpq.layers``), the architecture, input shape and
normalisation. ``onnx`` and ``onnxruntime`` are optional dependencies: ``pip install "gmpq[onnx]"``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gmpq.errors import ModelError
from gmpq.hub.card import license_section
from gmpq.hub.export import check_calibrated, weight_codes
from gmpq.hub.onnx_graph import INPUT_NAME, OUTPUT_NAME, consumers_of, require_onnx
from gmpq.hub.onnx_runtime import kernel_report
from gmpq.models import default_input_size, quantizable_layers
from gmpq.policy import Policy
from gmpq.quant import QConv2d, QLinear, QuantMixin, quantization_bypassed
from gmpq.quant import functional as QF
from gmpq.utils import atomic_write, atomic_write_text
from gmpq.version import __version__

#: Opset of the export by default: the first with INT4/UINT4 QuantizeLinear/DequantizeLinear.
DEFAULT_OPSET = 21
INT4_OPSET = 21
#: The oldest opset torch.onnx's exporter writes (per-axis DequantizeLinear needs 13).
MIN_OPSET = 18
LOW_BIT_STORAGES = ("int4", "int8")
FORMAT_NAME = "gmpq-onnx-qdq"
FORMAT_VERSION = 1
ONNX_FILE = "model.onnx"
CARD_FILE = "README.md"


@dataclass(frozen=True)
class Storage:
    """How one quantized tensor is stored in the graph.

    Attributes:
        dtype: the ONNX storage type name (``int8``, ``uint8``, ``int4``, ``uint4``).
        qmin / qmax: the integer codes gmpq uses (a sub-range of the type's range when it is narrower).
        bounded: Max/Min nodes bound the input to gmpq's range before QuantizeLinear (activations only).
    """

    dtype: str
    qmin: int
    qmax: int
    bounded: bool


@dataclass(frozen=True)
class OnnxLayer:
    """What the export wrote for one quantizable layer.

    Attributes:
        name: module path.
        op: the ONNX operator computing it (``Conv`` or ``Gemm``).
        w_bits / a_bits: its bits (32 = float).
        weight: storage type of the weight codes, ``float`` for a float weight.
        weight_range: the codes gmpq's weight uses, ``[-Q_p, Q_p]`` (``None`` for a float weight).
        activation: storage type of the input's QDQ pair, ``float`` when the input is not quantized.
        activation_range: the codes gmpq's input quantizer uses, ``[0, n]`` or ``[-n, n]`` (``None`` when float):
            a sub-range of the storage type's when the layer has fewer bits than its type.
        signed: the input quantizer's sign mode (``None`` for a float input).
        bounded: Max/Min nodes bound the input to gmpq's clipping range before its QuantizeLinear.
        bn_folded: a BatchNormalization was folded into the layer (its weight steps are ``gamma/sigma * s``).
    """

    name: str
    op: str
    w_bits: int
    a_bits: int
    weight: str
    weight_range: tuple[int, int] | None
    activation: str
    activation_range: tuple[int, int] | None
    signed: bool | None
    bounded: bool
    bn_folded: bool


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file.
        card: the model card written beside it (``None`` when ``path`` was a file name).
        file_bytes: size of the ``.onnx`` file.
        opset: the ONNX opset of the default domain.
        input_shape: ``[C, H, W]`` (the batch dimension is dynamic).
        layers: one record per quantizable layer, in module order.
    """

    path: Path
    card: Path | None
    file_bytes: int
    opset: int
    input_shape: tuple[int, int, int]
    layers: tuple[OnnxLayer, ...]

    def summary(self) -> str:
        """One line for the command line."""
        quantized = [x for x in self.layers if x.weight != "float" or x.activation != "float"]
        kinds = sorted({f"W:{x.weight}" for x in quantized if x.weight != "float"}
                       | {f"A:{x.activation}" for x in quantized if x.activation != "float"})
        return (f"{self.path}: {self.file_bytes:,} bytes, ONNX opset {self.opset}, input [N, "
                f"{', '.join(map(str, self.input_shape))}], {len(quantized)} of {len(self.layers)} layers quantized "
                f"({', '.join(kinds) or 'none'})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (for ``gmpq export --format onnx --json``)."""
        data = asdict(self)
        data.update(path=str(self.path), card=str(self.card) if self.card else None)
        return data


def storage(bits: int, signed: bool, low_bit_storage: str, weight: bool) -> Storage:
    """The storage of a ``bits``-bit tensor: its type and gmpq's code range in it.

    Weights use the symmetric codes ``[-Q_p, Q_p]`` (no Clip needed: the codes are stored, not computed). Activations
    use ``[0, 2^b - 1]`` (unsigned) or ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (signed), bounded explicitly where that range
    is narrower than the type's saturation range, and always in 4-bit types (see the module docstring).
    """
    width = 4 if bits <= 4 and low_bit_storage == "int4" else 8
    if weight or signed:
        qmax = QF.weight_qmax(bits) if weight else QF.act_levels(bits, True)
        return Storage(f"int{width}", -qmax, qmax, bounded=not weight)
    qmax = QF.act_levels(bits, False)
    return Storage(f"uint{width}", 0, qmax, bounded=qmax < 2**width - 1 or width == 4)


def export_onnx(
    model: nn.Module, path: str | os.PathLike, *, input_size: int | None = None, opset: int = DEFAULT_OPSET,
    low_bit_storage: str = "int4", name: str | None = None,
) -> OnnxExport:
    """Export the gmpq quantized ``model`` to an ONNX QDQ graph (see the module docstring for the graph's form).

    Args:
        model: a model quantized by gmpq (``gmpq.quantize``, ``gmpq.create_model(..., policy=)``,
            ``gmpq.from_pretrained``) whose quantizers are calibrated.
        path: a ``.onnx`` file; any other path is a directory that receives ``model.onnx`` and its model card
            ``README.md`` (how to run it with ONNX Runtime, what each layer stores).
        input_size: the input resolution H = W of the graph (default: the model's native one); the batch dimension
            is dynamic.
        opset: ONNX opset of the graph (>= 18; INT4 storage needs 21).
        low_bit_storage: ``"int4"`` stores <= 4-bit tensors as INT4/UINT4, ``"int8"`` as INT8/UINT8 with the
            narrower code range (for runtimes or opsets without 4-bit types).
        name: the model's name on the card (default: the name in a loaded export's config, else the directory's).

    The graph is checked by ``onnx.checker`` and loaded by ONNX Runtime's CPU provider before anything is written;
    files are written atomically. Bad input raises :class:`~gmpq.errors.ModelError` naming the layer and the fix.
    """
    onnx, _ = require_onnx()
    policy, layers = _check_model(model)
    _check_storage(layers, opset, low_bit_storage)
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0):
        raise ModelError(f"input_size must be a positive resolution in pixels, got {input_size!r}")
    size = input_size or default_input_size(model)
    in_chans = _in_channels(next(iter(layers.values())))
    proto = _float_graph(model, layers, (in_chans, size, size), opset)
    records = _quantize_graph(proto, layers, low_bit_storage)
    _annotate(proto, model, policy, records, (in_chans, size, size))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ModelError(f"the exported graph of {_arch(model)!r} fails onnx.checker ({_first_line(e)}); nothing "
                         "was written") from None
    _check_runtime(proto)

    target = Path(path)
    card_path = None
    if target.suffix != ".onnx":
        target, card_path = target / ONNX_FILE, target / CARD_FILE
    atomic_write(target, lambda tmp: onnx.save_model(proto, str(tmp)))
    export = OnnxExport(target, card_path, target.stat().st_size, opset, (in_chans, size, size), tuple(records))
    if card_path is not None:
        name = name or (getattr(model, "gmpq_config", None) or {}).get("name") or target.parent.resolve().name
        atomic_write_text(card_path, render_card(export, model, policy, kernel_report(target), name))
    return export


# ---------------------------------------------------------------------------------------------------- checks
def _arch(model: nn.Module) -> str:
    return getattr(model, "gmpq_arch", None) or type(model).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_model(model: nn.Module) -> tuple[Policy, dict[str, QuantMixin]]:
    """The model's policy and quantized layers; a clear error for anything without an ONNX QDQ form."""
    policy = getattr(model, "gmpq_policy", None)
    if not isinstance(policy, Policy):
        raise ModelError("export_onnx needs a model quantized by gmpq (gmpq.quantize(model, policy), "
                         "gmpq.create_model(arch, policy=...) or gmpq.from_pretrained); this model has no gmpq_policy")
    layers = quantizable_layers(model)
    for name, m in layers.items():
        if type(m) not in (QConv2d, QLinear):
            kind = type(m).__name__
            if hasattr(m, "w_candidates"):
                raise ModelError(f"layer {name!r} is a {kind}, a search supernet layer mixing several bit widths, "
                                 "which has no ONNX form; export the model quantized with its decoded policy "
                                 "(gmpq.quantize(float_model, policy), or the result of `gmpq finetune`)")
            raise ModelError(f"layer {name!r} is a {kind}, which has no ONNX QDQ form in gmpq; quantize it as a "
                             "gmpq QConv2d or QLinear (gmpq.quantize(model, policy)) before exporting")
    check_calibrated(layers)
    return policy, layers


def _check_storage(layers: dict[str, QuantMixin], opset: int, low_bit_storage: str) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ModelError(f"opset must be an integer in {MIN_OPSET}..{newest} (the onnx package's newest), got "
                         f"{opset!r}")
    if low_bit_storage not in LOW_BIT_STORAGES:
        raise ModelError(f"low_bit_storage must be one of {', '.join(LOW_BIT_STORAGES)}, got {low_bit_storage!r}")
    if low_bit_storage == "int4" and opset < INT4_OPSET:
        for name, m in layers.items():
            low = [f"{kind}{bits}" for kind, bits in (("W", m.w_bits), ("A", m.a_bits)) if bits <= 4]
            if low:
                raise ModelError(f"layer {name!r} has {'/'.join(low)} bits: INT4 storage needs ONNX opset >= "
                                 f"{INT4_OPSET}, got opset {opset}; export with opset={INT4_OPSET} (--opset "
                                 f"{INT4_OPSET}), or store <= 4-bit tensors in 8-bit types with "
                                 "low_bit_storage='int8' (--low-bit-storage int8)")


def _check_runtime(proto: Any) -> None:
    """Load the graph in ONNX Runtime's CPU provider: a graph it refuses is never written."""
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, NotImplemented ...)
        raise ModelError(f"ONNX Runtime {ort.__version__} cannot load the exported graph ({_first_line(e)}); "
                         "nothing was written — try low_bit_storage='int8' or a newer onnxruntime") from None


def _in_channels(layer: nn.Module) -> int:
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


# ---------------------------------------------------------------------------------------------------- float graph
@torch.no_grad()
def _float_graph(model: nn.Module, layers: dict[str, QuantMixin], input_shape: tuple[int, int, int],
                 opset: int) -> Any:
    """torch.onnx's graph of the network with every quantizer removed and every weight set to ``s * q``.

    The onnxscript optimizer that torch.onnx runs folds BatchNormalization into the preceding Conv; the weights keep
    their module-path names (``<layer>.weight``), by which :func:`_quantize_graph` finds each layer.
    """
    twin = copy.deepcopy(model).float().cpu().eval()
    for layer in quantizable_layers(twin).values():
        if not layer.wq.is_float:
            q = weight_codes(layer).float()
            layer.weight.copy_(q * layer.wq.scale.float().view(-1, *([1] * (q.dim() - 1))))
    example = torch.randn(2, *input_shape)
    batch = torch.export.Dim("batch", min=1)
    try:
        with quantization_bypassed(), contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(twin, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), optimize=True,
                                        verbose=False)
    except Exception as e:  # torch.export / torch.onnx raise many types; report the first line and the arch
        raise ModelError(f"torch.onnx failed to export {_arch(model)!r} at input [N, "
                         f"{', '.join(map(str, input_shape))}] ({_first_line(e)}); a module whose operation has no "
                         "ONNX form must be replaced before exporting") from None
    return program.model_proto


# ---------------------------------------------------------------------------------------------------- QDQ surgery
def _int_tensor(values: np.ndarray, dtype: str, name: str) -> Any:
    """An integer initializer of ONNX type ``dtype``; 4-bit types are stored packed, two values to a byte."""
    import ml_dtypes
    from onnx import numpy_helper

    numpy_type = {"int8": np.int8, "uint8": np.uint8, "int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4}[dtype]
    return numpy_helper.from_array(np.asarray(values).astype(numpy_type), name)


def _float_tensor(values: Any, name: str) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def _folded_steps(name: str, exported: np.ndarray, codes: np.ndarray, steps: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel steps ``s'`` and codes with ``exported = s' * codes`` (axis 0 = output channel).

    ``exported`` is the graph's weight: ``s * q``, or ``g * s * q`` where a BatchNormalization was folded into it.
    ``s'`` is the least-squares fit per channel; channels with ``s' < 0`` get negated codes. Raises ``RuntimeError``
    if the exported weight is not codes times a step per channel (a gmpq bug, not a user error).
    """
    w = exported.reshape(exported.shape[0], -1).astype(np.float64)
    q = codes.reshape(codes.shape[0], -1).astype(np.float64)
    norm = (q * q).sum(axis=1)
    fitted = np.where(norm > 0, (w * q).sum(axis=1) / np.maximum(norm, 1), 0.0)
    codes = codes.copy()
    codes[fitted < 0] *= -1
    steps_out = np.abs(fitted)
    dead = (norm == 0) | (steps_out == 0)
    codes[dead] = 0
    steps_out[dead] = steps[dead]
    residual = np.abs(w - np.sign(fitted)[:, None] * steps_out[:, None] * q)
    residual[dead] = np.abs(w[dead])
    tolerance = 1e-5 * np.abs(w).max(axis=1, initial=0.0)[:, None] + 1e-30
    if (residual > tolerance).any():
        channel = int(np.argwhere(residual > tolerance)[0][0])
        raise RuntimeError(f"layer {name!r}: the exported weight of output channel {channel} is not its integer "
                           "codes times one step; this is a gmpq bug, please report it")
    return codes, steps_out.astype(np.float32)


def _quantize_graph(proto: Any, layers: dict[str, QuantMixin], low_bit_storage: str) -> list[OnnxLayer]:
    """Replace each quantized layer's float weight by integer codes + DequantizeLinear and put a QDQ pair (bounded
    by Max/Min where needed) on its input; return what each layer got."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers = consumers_of(graph)
    records = []
    for name, layer in layers.items():
        weight_name = f"{name}.weight"
        users = consumers.get(weight_name, [])
        if weight_name not in initializers or len(users) != 1 or users[0].op_type not in ("Conv", "Gemm"):
            ops = ", ".join(n.op_type for n in users) or "nothing"
            raise ModelError(f"layer {name!r}: its weight reaches {ops} in torch.onnx's graph instead of one Conv or "
                             "Gemm, so it has no ONNX QDQ form here; keep the layer's output going straight to its "
                             "consumer (a plain Conv2d / Linear forward)")
        node = users[0]
        if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
            raise ModelError(f"layer {name!r} was exported as a Gemm without transB; gmpq's QDQ export expects "
                             "torch's nn.Linear layout")
        node.name = f"{name}/{node.op_type}"
        new_nodes: list[Any] = []
        weight_kind, act_kind, bounded = "float", "float", False
        weight_range = act_range = None
        bn_folded = any(p.key == "pkg.onnxscript.rewriter.rule_name" and "FuseBatchNorm" in p.value
                        for p in node.metadata_props)
        if not layer.wq.is_float:
            kind = storage(layer.w_bits, True, low_bit_storage, weight=True)
            exported = numpy_helper.to_array(initializers[weight_name])
            codes, steps = _folded_steps(name, exported, weight_codes(layer).cpu().numpy().astype(np.int32),
                                         layer.wq.scale.detach().float().cpu().numpy())
            graph.initializer.remove(initializers[weight_name])
            graph.initializer.extend([
                _int_tensor(codes, kind.dtype, f"{name}.weight_quantized"),
                _float_tensor(steps, f"{name}.weight_scale"),
                _int_tensor(np.zeros(len(steps), np.int32), kind.dtype, f"{name}.weight_zero_point"),
            ])
            new_nodes.append(helper.make_node(
                "DequantizeLinear", [f"{name}.weight_quantized", f"{name}.weight_scale", f"{name}.weight_zero_point"],
                [f"{name}.weight_dequantized"], name=f"{name}/weight/DequantizeLinear", axis=0))
            node.input[1] = f"{name}.weight_dequantized"
            weight_kind, weight_range = kind.dtype, (kind.qmin, kind.qmax)
        if not layer.aq.is_float:
            signed = bool(layer.aq.signed)
            kind = storage(layer.a_bits, signed, low_bit_storage, weight=False)
            n = QF.act_levels(layer.a_bits, signed)
            c = layer.aq.clip.detach().float().cpu()
            scale = (c / n).reshape(())
            source = node.input[0]
            if kind.bounded:
                bounds = [("Max", "lower", -c)] if signed else []
                for op, side, value in [*bounds, ("Min", "upper", c)]:
                    graph.initializer.append(_float_tensor(value, f"{name}.input_{side}"))
                    new_nodes.append(helper.make_node(op, [source, f"{name}.input_{side}"],
                                                      [f"{name}.input_{side}_bounded"], name=f"{name}/input/{op}"))
                    source = f"{name}.input_{side}_bounded"
                bounded = True
            graph.initializer.extend([_float_tensor(scale, f"{name}.input_scale"),
                                      _int_tensor(np.zeros((), np.int32), kind.dtype, f"{name}.input_zero_point")])
            qparams = [f"{name}.input_scale", f"{name}.input_zero_point"]
            new_nodes += [
                helper.make_node("QuantizeLinear", [source, *qparams], [f"{name}.input_quantized"],
                                 name=f"{name}/input/QuantizeLinear"),
                helper.make_node("DequantizeLinear", [f"{name}.input_quantized", *qparams],
                                 [f"{name}.input_dequantized"], name=f"{name}/input/DequantizeLinear"),
            ]
            node.input[0] = f"{name}.input_dequantized"
            act_kind, act_range = kind.dtype, (kind.qmin, kind.qmax)
        position = list(graph.node).index(node)
        for offset, new in enumerate(new_nodes):
            graph.node.insert(position + offset, new)
        sign_mode = None if layer.aq.is_float else bool(layer.aq.signed)
        records.append(OnnxLayer(name, node.op_type, layer.w_bits, layer.a_bits, weight_kind, weight_range, act_kind,
                                 act_range, sign_mode, bounded, bn_folded))
    return records


# ---------------------------------------------------------------------------------------------------- metadata
def _annotate(proto: Any, model: nn.Module, policy: Policy, records: list[OnnxLayer],
              input_shape: tuple[int, int, int]) -> None:
    """Model metadata: the policy JSON, per-layer storage, arch, input shape, normalisation; node metadata (torch's
    stack traces with local file paths) is dropped."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        del value.metadata_props[:]
    del proto.metadata_props[:]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    config = getattr(model, "gmpq_config", None) or {}
    fields = {
        "gmpq.format": FORMAT_NAME,
        "gmpq.format_version": str(FORMAT_VERSION),
        "gmpq.version": __version__,
        "gmpq.arch": _arch(model),
        "gmpq.num_classes": str(getattr(model, "num_classes", "")),
        "gmpq.input_shape": json.dumps(["batch", *input_shape]),
        "gmpq.mean": json.dumps(list(config.get("mean") or cfg.get("mean") or ())),
        "gmpq.std": json.dumps(list(config.get("std") or cfg.get("std") or ())),
        "gmpq.policy": json.dumps(policy.to_dict(), separators=(",", ":")),
        "gmpq.layers": json.dumps({r.name: {k: v for k, v in asdict(r).items() if k != "name"} for r in records},
                                  separators=(",", ":")),
    }
    for key, value in fields.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name, proto.producer_version = "gmpq", __version__
    proto.doc_string = (f"{_arch(model)} quantized by gmpq: integer weights with per-channel steps and "
                        "QuantizeLinear/DequantizeLinear activations at each layer's bits; see metadata gmpq.*")


# ---------------------------------------------------------------------------------------------------- card
def _storage_counts(records: list[OnnxLayer], attr: str) -> str:
    counts: dict[str, int] = {}
    for r in records:
        counts[getattr(r, attr)] = counts.get(getattr(r, attr), 0) + 1
    return ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))


def render_card(export: OnnxExport, model: nn.Module, policy: Policy, kernels: list[Any], name: str) -> str:
    """The model card of an ONNX export directory: what the graph holds and how to run it in three lines."""
    import onnxruntime as ort

    c, h, w = export.input_shape
    config = getattr(model, "gmpq_config", None) or {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = config.get("mean") or cfg.get("mean"), config.get("std") or cfg.get("std")
    metrics = config.get("metrics") or {}
    records = list(export.layers)
    integer = [k for k in kernels if k.integer]
    norm = (f"normalised with mean ({', '.join(f'{v:g}' for v in mean)}) and std "
            f"({', '.join(f'{v:g}' for v in std)})" if mean and std else "normalised as in training")
    license_id, license_lines = license_section(config)
    lines = [
        "---", "library_name: onnx", f"license: {license_id}", "pipeline_tag: image-classification",
        "tags:", "- gmpq", "- onnx", "- quantization", "- mixed-precision", "---", "",
        f"# {name} (ONNX)", "",
        f"`{_arch(model)}` ({getattr(model, 'num_classes', '?')} classes) quantized by gmpq with a mixed-precision "
        f"policy, as an ONNX graph (opset {export.opset}) with integer weights and QuantizeLinear/DequantizeLinear "
        "activations that reproduce gmpq's forward.",
    ]
    if metrics.get("top1") is not None:
        lines += ["", f"gmpq measured top-1 {metrics['top1']:.2f} % on {metrics.get('dataset')} "
                      f"({metrics.get('eval_split')}, {metrics.get('eval_samples')} images) for this model."]
    lines += [
        "", "## Run it with ONNX Runtime", "",
        "```python",
        "import onnxruntime as ort",
        f'session = ort.InferenceSession("{ONNX_FILE}", providers=["CPUExecutionProvider"])',
        f'logits = session.run(None, {{"{INPUT_NAME}": x}})[0]   # x: float32 [N, {c}, {h}, {w}], {norm}',
        "```", "",
        "## What the graph holds", "",
        f"- `{ONNX_FILE}`: {export.file_bytes:,} bytes; input `{INPUT_NAME}` [N, {c}, {h}, {w}] (N dynamic), output "
        f"`{OUTPUT_NAME}` [N, {getattr(model, 'num_classes', '?')}].",
        f"- Weights of the {len(records)} Conv/Gemm layers: {_storage_counts(records, 'weight')} (integer codes with one "
        "float32 step per output channel, BatchNorm folded into the steps).",
        f"- Layer inputs: {_storage_counts(records, 'activation')} (a QuantizeLinear/DequantizeLinear pair with the "
        f"calibrated step; {sum(r.bounded for r in records)} bounded first by Max/Min to gmpq's clipping range).",
        f"- On ONNX Runtime {ort.__version__} (CPU provider, all graph optimizations), {len(integer)} of "
        f"{len(kernels)} layers run an integer kernel"
        + (f" ({', '.join(sorted({k.kernel for k in integer}))})" if integer else "")
        + "; the others dequantize their weights and inputs and run in float32.",
        "- Metadata (`metadata_props`): `gmpq.policy` (the policy JSON), `gmpq.layers` (bits and storage per layer), "
        "`gmpq.arch`, `gmpq.input_shape`, `gmpq.mean`, `gmpq.std`.", "",
        "| layer | op | W bits | A bits | weight storage | input storage | ONNX Runtime CPU kernel |",
        "|---|---|---|---|---|---|---|",
    ]
    by_name = {k.name: k for k in kernels}
    for r in records:
        k = by_name.get(r.name)
        kernel = "-" if k is None else f"{k.kernel} ({'integer' if k.integer else 'float'})"
        lines.append(f"| `{r.name}` | {r.op} | {_bits(r.w_bits)} | {_bits(r.a_bits)} | {r.weight} | "
                     f"{r.activation}{' (bounded)' if r.bounded else ''} | {kernel} |")
    lines += ["", f"Made with gmpq {__version__} from the policy in the graph's `gmpq.policy` metadata "
                  f"({len(policy.layers)} searched and {len(policy.kept)} kept layers).", "", *license_lines]
    return "\n".join(lines)


def _bits(bits: int) -> str:
    return "fp32" if bits == QF.FLOAT_BITS else str(bits)

