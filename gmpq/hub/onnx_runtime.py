"""Run an exported ONNX graph with ONNX Runtime: sessions, which layers run integer kernels, parity with gmpq.

* :func:`session` — an ONNX Runtime CPU session of a ``.onnx`` file.
* :func:`kernel_report` — per quantized layer, the kernel ONNX Runtime's CPU provider runs after its graph
  optimizations (read from the optimized graph it saves): an integer kernel (``QLinearConv``, ``QLinearMatMul``,
  ``QGemm``, ``ConvInteger``, ``MatMulIntegerToFloat`` ...) where it fused the layer's QDQ pattern, else the float
  operator on dequantized weights and inputs.
* :func:`onnx_parity` — top-1 agreement and the largest logit difference between ONNX Runtime and gmpq's forward.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gmpq.hub.onnx_graph import INPUT_NAME, consumers_of, read_metadata, require_onnx

#: Operators of ONNX Runtime's CPU provider whose arithmetic is integer (8-bit operands, 32-bit accumulation).
INTEGER_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger",
                             "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearAdd"})


@dataclass(frozen=True)
class LayerKernel:
    """The kernel ONNX Runtime runs for one quantizable layer.

    Attributes:
        name: module path.
        kernel: the operator computing the layer in the optimized graph (``QLinearConv``, ``Conv``, ``FusedConv``,
            ``Gemm`` ...).
        integer: whether that operator computes in integer arithmetic.
    """

    name: str
    kernel: str
    integer: bool


@dataclass(frozen=True)
class OnnxParity:
    """ONNX Runtime against gmpq's forward on the same images.

    Attributes:
        samples: number of images.
        agreement: percentage of images on which both predict the same class.
        top1_torch / top1_onnx: top-1 accuracy (percent) of each (``None`` without labels).
        max_logit_diff: the largest absolute difference of a logit.
        mean_logit_diff: the mean absolute difference of the logits.
    """

    samples: int
    agreement: float
    top1_torch: float | None
    top1_onnx: float | None
    max_logit_diff: float
    mean_logit_diff: float

    @property
    def top1_gap(self) -> float | None:
        """|top-1 of ONNX Runtime - top-1 of gmpq| in points."""
        return None if self.top1_torch is None else abs(self.top1_onnx - self.top1_torch)

    def summary(self) -> str:
        top1 = "" if self.top1_torch is None else (f", top-1 gmpq {self.top1_torch:.2f} % / ONNX Runtime "
                                                   f"{self.top1_onnx:.2f} %")
        return (f"{self.samples} images: top-1 agreement {self.agreement:.2f} %{top1}, largest logit difference "
                f"{self.max_logit_diff:.3g} (mean {self.mean_logit_diff:.3g})")


def session(path: str | os.PathLike, threads: int | None = None, optimized_path: str | os.PathLike | None = None
            ) -> Any:
    """An ONNX Runtime session of ``path`` on the CPU provider, all graph optimizations on.

    ``threads`` sets the intra-op thread count (default: ONNX Runtime's); ``optimized_path`` saves the optimized
    graph there.
    """
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernel_report(path: str | os.PathLike) -> list[LayerKernel]:
    """Per layer of the export at ``path``, the operator ONNX Runtime's CPU provider computes it with.

    The layer is found in the optimized graph by its weight initializer (``<layer>.weight_quantized`` for integer
    weights, ``<layer>.weight`` for float ones): the node consuming it directly is the kernel when it is an integer
    operator; when the weight goes through DequantizeLinear first, the kernel is the float node consuming that.
    """
    onnx, _ = require_onnx()
    layers = read_metadata(path).get("layers") or {}
    with tempfile.TemporaryDirectory(prefix="gmpq-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, threads=1, optimized_path=optimized)
        graph = onnx.load_model(str(optimized), load_external_data=False).graph
    consumers = consumers_of(graph)
    report = []
    for name, info in layers.items():
        weight = f"{name}.weight" if info.get("weight") == "float" else f"{name}.weight_quantized"
        node = _compute_node(weight, consumers)
        kernel = node.op_type if node is not None else "folded"
        report.append(LayerKernel(name, kernel, kernel in INTEGER_KERNELS))
    return report


def _compute_node(value: str, consumers: dict[str, list[Any]]) -> Any:
    """The first node downstream of ``value`` that is not a DequantizeLinear, a Transpose or a layout reorder."""
    seen = set()
    frontier = [value]
    while frontier:
        current = frontier.pop(0)
        for node in consumers.get(current, []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ("DequantizeLinear", "Transpose", "ReorderInput", "ReorderOutput", "Identity"):
                frontier.extend(node.output)
            else:
                return node
    return None


@torch.no_grad()
def onnx_parity(model: nn.Module, path: str | os.PathLike, batches: Iterable[Any], threads: int | None = None
                ) -> OnnxParity:
    """Compare ONNX Runtime on the graph at ``path`` with ``model``'s forward on ``batches``.

    ``batches`` yields image tensors, or ``(images, labels)`` pairs for top-1 accuracies. The model runs in eval mode
    on the CPU in float32; both see the same float32 images.
    """
    sess = session(path, threads=threads)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    agree = correct_torch = correct_onnx = samples = 0
    max_diff = sum_diff = 0.0
    labelled = True
    try:
        for batch in batches:
            images, labels = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            labelled &= labels is not None
            x = images.float().cpu()
            ref = model(x.to(device)).float().cpu()
            out = torch.from_numpy(sess.run(None, {INPUT_NAME: np.ascontiguousarray(x.numpy())})[0])
            diff = (out - ref).abs()
            max_diff = max(max_diff, float(diff.max()))
            sum_diff += float(diff.sum())
            pred_ref, pred_out = ref.argmax(1), out.argmax(1)
            agree += int((pred_ref == pred_out).sum())
            if labels is not None:
                labels = labels.cpu()
                correct_torch += int((pred_ref == labels).sum())
                correct_onnx += int((pred_out == labels).sum())
            samples += len(x)
            num_classes = ref.shape[1]
    finally:
        model.train(was_training)
    if samples == 0:
        raise ValueError("onnx_parity needs at least one batch")
    return OnnxParity(samples, 100.0 * agree / samples, 100.0 * correct_torch / samples if labelled else None,
                      100.0 * correct_onnx / samples if labelled else None, max_diff,
                      sum_diff / (samples * num_classes))
